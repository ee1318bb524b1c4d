"""Micro-attention over rBlocks (DistKV-LLM section 4.2, DistAttention).

One micro-attention (MA) attends a batch of queries to the subset of a request's
rBlocks that live in one place, and returns the partial output together with
the log-sum-exp of the scores it saw, so that partials over disjoint block sets
merge exactly (see :mod:`megakv.kernels.merge`).

The same op serves decode (one query per request) and chunked prefill (many
queries per request, each seeing the context up to its own position).
"""
from __future__ import annotations

import torch


def visible_lengths(query_start_loc: list[int], context_lens: list[int]) -> list[torch.Tensor]:
    """Per sequence, how many context tokens each of its queries may see (causal masking)."""
    lengths = []
    for seq_index, context_len in enumerate(context_lens):
        num_queries = query_start_loc[seq_index + 1] - query_start_loc[seq_index]
        # The last query sees the whole context; each earlier one sees one token less.
        lengths.append(torch.arange(context_len - num_queries + 1, context_len + 1))
    return lengths


def micro_attention_ref(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,
    query_start_loc: list[int],
    context_lens: list[int],
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of ``query`` over the blocks named in ``block_tables``; returns ``(out, lse)``.

    query:        [num_queries, num_q_heads, head_dim], the new tokens of every sequence, concatenated
    key_cache:    [num_blocks, num_kv_heads, block_size, head_dim] (value_cache alike)
    block_tables: [num_seqs, max_blocks] physical block ids by logical block index; an entry < 0
                  marks a block that is not part of this micro-attention (it lives elsewhere)
    query_start_loc: num_seqs + 1 offsets of each sequence's queries in ``query``
    context_lens: per sequence, the context length seen by its last query
    Returns out [num_queries, num_q_heads, head_dim] in the query dtype and lse
    [num_queries, num_q_heads] in float32; a query that sees no key gets out 0 and lse -inf.
    """
    num_queries, num_q_heads, head_dim = query.shape
    _, num_kv_heads, block_size, _ = key_cache.shape
    group_size = num_q_heads // num_kv_heads
    out = torch.zeros(num_queries, num_q_heads, head_dim, dtype=query.dtype, device=query.device)
    lse = torch.full((num_queries, num_q_heads), float("-inf"), dtype=torch.float32, device=query.device)
    for seq_index, visible in enumerate(visible_lengths(query_start_loc, context_lens)):
        start, end = query_start_loc[seq_index], query_start_loc[seq_index + 1]
        num_seq_queries = end - start
        num_seq_blocks = -(-context_lens[seq_index] // block_size)
        if num_seq_queries == 0 or num_seq_blocks == 0:
            continue
        table = block_tables[seq_index, :num_seq_blocks].long()
        present = table >= 0
        safe_table = table.clamp(min=0)
        context_width = num_seq_blocks * block_size
        # [num_seq_blocks, Hkv, bs, D] -> [Hkv, num_seq_blocks * bs, D]
        keys = key_cache[safe_table].permute(1, 0, 2, 3).reshape(num_kv_heads, context_width, head_dim).float()
        values = value_cache[safe_table].permute(1, 0, 2, 3).reshape(num_kv_heads, context_width, head_dim).float()
        positions = torch.arange(context_width, device=query.device)
        slot_valid = present.repeat_interleave(block_size) & (positions < context_lens[seq_index])
        # Unused slots may hold garbage (even NaN): zero them so that 0 * garbage cannot leak in.
        keys = keys.masked_fill(~slot_valid[None, :, None], 0.0)
        values = values.masked_fill(~slot_valid[None, :, None], 0.0)
        # [n, Hq, D] -> [Hkv, group, n, D]
        q = query[start:end].float().view(num_seq_queries, num_kv_heads, group_size, head_dim).permute(1, 2, 0, 3)
        scores = torch.matmul(q, keys[:, None].transpose(-1, -2)) * scale  # [Hkv, group, n, ctx]
        allowed = slot_valid[None, :] & (positions[None, :] < visible.to(query.device)[:, None])  # [n, ctx]
        scores = scores.masked_fill(~allowed, float("-inf"))
        seq_lse = torch.logsumexp(scores, dim=-1)  # [Hkv, group, n]
        finite_lse = torch.where(torch.isinf(seq_lse), torch.zeros_like(seq_lse), seq_lse)
        probs = torch.exp(scores - finite_lse[..., None])
        seq_out = torch.matmul(probs, values[:, None])  # [Hkv, group, n, D]
        out[start:end] = seq_out.permute(2, 0, 1, 3).reshape(num_seq_queries, num_q_heads, head_dim).to(query.dtype)
        lse[start:end] = seq_lse.permute(2, 0, 1).reshape(num_seq_queries, num_q_heads)
    return out, lse
