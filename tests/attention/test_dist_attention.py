"""DistAttention over random block tables and random micro-attention groupings equals plain attention."""
from __future__ import annotations

import math

import pytest
import torch

from megakv.attention.dist_attention import dist_attention
from megakv.attention.metadata import AttentionMetadata
from megakv.kernels.merge import merge_partials_ref
from megakv.kernels.micro_attention import micro_attention_ref


def plain_attention(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, visible: torch.Tensor,
                    scale: float, window: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention in float64: query [n, Hq, D], keys/values [ctx, Hkv, D], query i sees visible[i] keys
    (the last ``window`` of them when a window is given)."""
    group = query.shape[1] // keys.shape[1]
    keys = keys.double().repeat_interleave(group, dim=1)
    values = values.double().repeat_interleave(group, dim=1)
    scores = torch.einsum("nhd,khd->hnk", query.double(), keys) * scale
    mask = torch.arange(keys.shape[0])[None, :] < visible[:, None]
    if window is not None:
        mask &= torch.arange(keys.shape[0])[None, :] >= visible[:, None] - window
    scores = scores.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)  # [H, n]
    out = torch.einsum("hnk,khd->nhd", scores.softmax(-1), values)
    return out, lse.T


def random_batch(seed: int, num_kv_heads: int, group: int, block_size: int, head_dim: int = 16):
    """Sequences with random lengths and chunks, their K/V scattered over a NaN-filled pool."""
    gen = torch.Generator().manual_seed(seed)
    num_seqs = 3
    context_lens = torch.randint(1, 6 * block_size, (num_seqs,), generator=gen).tolist()
    num_queries = [int(torch.randint(1, c + 1, (1,), generator=gen)) if i % 2 else 1
                   for i, c in enumerate(context_lens)]
    blocks_per_seq = [-(-c // block_size) for c in context_lens]
    num_pool_blocks = sum(blocks_per_seq) + 7
    key_cache = torch.full((num_pool_blocks, num_kv_heads, block_size, head_dim), float("nan"))
    value_cache = torch.full_like(key_cache, float("nan"))
    physical = torch.randperm(num_pool_blocks, generator=gen).tolist()
    block_tables = torch.full((num_seqs, max(blocks_per_seq)), -1, dtype=torch.int32)
    contexts = []
    for seq, (context_len, num_blocks) in enumerate(zip(context_lens, blocks_per_seq)):
        table = [physical.pop() for _ in range(num_blocks)]
        block_tables[seq, :num_blocks] = torch.tensor(table, dtype=torch.int32)
        keys = torch.randn(context_len, num_kv_heads, head_dim, generator=gen)
        values = torch.randn(context_len, num_kv_heads, head_dim, generator=gen)
        for position in range(context_len):
            key_cache[table[position // block_size], :, position % block_size] = keys[position]
            value_cache[table[position // block_size], :, position % block_size] = values[position]
        contexts.append((keys, values))
    query = torch.randn(sum(num_queries), num_kv_heads * group, head_dim, generator=gen)
    query_start_loc = [0]
    for n in num_queries:
        query_start_loc.append(query_start_loc[-1] + n)
    metadata = AttentionMetadata(query_start_loc=query_start_loc, context_lens=context_lens,
                                 block_tables=block_tables, slot_mapping=torch.empty(0, dtype=torch.long))
    return query, key_cache, value_cache, metadata, contexts, gen


def random_groups(block_tables: torch.Tensor, num_groups: int, gen: torch.Generator) -> list[torch.Tensor]:
    """Assign every block to one of num_groups micro-attentions at random (some groups may be empty)."""
    owner = torch.randint(0, num_groups, block_tables.shape, generator=gen)
    return [torch.where(owner == g, block_tables, torch.full_like(block_tables, -1)) for g in range(num_groups)]


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("num_kv_heads,group", [(2, 1), (2, 4), (1, 8)])
@pytest.mark.parametrize("block_size", [4, 16])
def test_dist_attention_random_groups_equal_plain_attention(seed, num_kv_heads, group, block_size):
    query, key_cache, value_cache, metadata, contexts, gen = random_batch(seed, num_kv_heads, group, block_size)
    num_groups = [1, 2, 3, 5, 8, 16][seed]
    metadata.micro_attention_tables = random_groups(metadata.block_tables, num_groups, gen)
    scale = 1 / math.sqrt(query.shape[-1])
    out, lse = dist_attention(query, key_cache, value_cache, metadata, scale)
    assert not torch.isnan(out).any()
    for seq, (keys, values) in enumerate(contexts):
        start, end = metadata.query_start_loc[seq], metadata.query_start_loc[seq + 1]
        n, context_len = end - start, metadata.context_lens[seq]
        visible = torch.arange(context_len - n + 1, context_len + 1)
        expected_out, expected_lse = plain_attention(query[start:end], keys, values, visible, scale)
        torch.testing.assert_close(out[start:end].double(), expected_out, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(lse[start:end].double(), expected_lse, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("window", [1, 7, 33])
@pytest.mark.parametrize("path", ["ops", "reference"])
def test_dist_attention_sliding_window_equals_plain_attention(seed, window, path):
    query, key_cache, value_cache, metadata, contexts, gen = random_batch(seed, 2, 4, 16)
    metadata.sliding_window = window
    metadata.micro_attention_tables = random_groups(metadata.block_tables, 1 + seed, gen)
    scale = 1 / math.sqrt(query.shape[-1])
    if path == "ops":
        out, lse = dist_attention(query, key_cache, value_cache, metadata, scale)
    else:
        out, lse = micro_attention_ref(query, key_cache, value_cache, metadata.block_tables, metadata.query_start_loc,
                                       metadata.context_lens, scale, window)
    for seq, (keys, values) in enumerate(contexts):
        start, end = metadata.query_start_loc[seq], metadata.query_start_loc[seq + 1]
        n, context_len = end - start, metadata.context_lens[seq]
        visible = torch.arange(context_len - n + 1, context_len + 1)
        expected_out, expected_lse = plain_attention(query[start:end], keys, values, visible, scale, window)
        torch.testing.assert_close(out[start:end].double(), expected_out, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(lse[start:end].double(), expected_lse, atol=1e-5, rtol=1e-5)


def test_dist_attention_all_groups_empty_gives_zero_and_minus_inf():
    query, key_cache, value_cache, metadata, _, _ = random_batch(0, 2, 2, 4)
    metadata.micro_attention_tables = [torch.full_like(metadata.block_tables, -1)] * 2
    out, lse = dist_attention(query, key_cache, value_cache, metadata, 0.25)
    assert torch.equal(out, torch.zeros_like(out))
    assert torch.isneginf(lse).all()


@pytest.mark.parametrize("num_partials", [1, 2, 5])
def test_merge_partials_ref_splits_of_softmax(num_partials):
    gen = torch.Generator().manual_seed(num_partials)
    scores = torch.randn(3, 4, 20, generator=gen)  # [N, H, keys]
    values = torch.randn(20, 8, generator=gen)
    cuts = sorted(torch.randint(0, 21, (num_partials - 1,), generator=gen).tolist())
    bounds = [0, *cuts, 20]
    outs, lses = [], []
    for lo, hi in zip(bounds, bounds[1:]):
        part = scores[..., lo:hi]
        part_lse = torch.logsumexp(part, -1) if hi > lo else torch.full(part.shape[:-1], float("-inf"))
        weights = torch.exp(part - part_lse[..., None]) if hi > lo else part
        outs.append(weights @ values[lo:hi] if hi > lo else torch.zeros(3, 4, 8))
        lses.append(part_lse)
    out, lse = merge_partials_ref(torch.stack(outs), torch.stack(lses))
    torch.testing.assert_close(out, scores.softmax(-1) @ values, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse, torch.logsumexp(scores, -1))
