"""The Triton micro-attention against its torch reference (interpreter on CPU, native on a GPU)."""
from __future__ import annotations

import itertools

import pytest
import torch

pytest.importorskip("triton")

from megakv.kernels.micro_attention import (  # noqa: E402
    MAX_DECODE_QUERIES, micro_attention_ref, micro_attention_triton)

# (num_kv_heads, group, block_size, head_dim, dtype, num_splits): every GQA ratio, block size, head_dim
# and dtype appears at least once; the slow sweep takes the full product.
QUICK_CASES = [
    (2, 1, 16, 64, torch.float32, None),
    (1, 4, 32, 64, torch.float16, 3),
    (1, 8, 16, 128, torch.bfloat16, 2),
    (2, 4, 64, 64, torch.float32, 2),
    (1, 8, 32, 64, torch.float32, None),
    (2, 3, 16, 64, torch.float32, None),  # a group that is no power of two: padded query-head rows
]
SLOW_CASES = [(heads, group, block_size, head_dim, dtype, splits) for (heads, group), block_size, head_dim, dtype, splits
              in itertools.product([(2, 1), (2, 4), (1, 8)], [16, 32, 64], [64, 128],
                                   [torch.float32, torch.float16, torch.bfloat16], [None, 3])]


# Decode sequences only (the split-KV kernel), and decode sequences beside prefill chunks of one and of
# several query tiles and a sequence without queries (the tiled kernel takes the chunks).
DECODE_BATCH = [1, 3, 1]
PREFILL_BATCH = [1, MAX_DECODE_QUERIES + 12, 0, 3, 70]


def run_case(paged_batch, attention_close, device, seed, num_kv_heads, group, block_size, head_dim, dtype, num_splits,
             absent_fraction, num_queries=DECODE_BATCH):
    query, key_cache, value_cache, block_tables, query_start_loc, context_lens = paged_batch(
        seed, num_kv_heads, group, block_size, head_dim, dtype, num_queries=num_queries,
        max_context=max(4 * block_size, 2 * max(num_queries)), absent_fraction=absent_fraction)
    scale = head_dim ** -0.5
    expected_out, expected_lse = micro_attention_ref(query, key_cache, value_cache, block_tables, query_start_loc,
                                                     context_lens, scale)
    out, lse = micro_attention_triton(query.to(device), key_cache.to(device), value_cache.to(device),
                                      block_tables.to(device), query_start_loc, context_lens, scale,
                                      num_splits=num_splits)
    assert out.dtype == dtype and lse.dtype == torch.float32
    attention_close(out, lse, expected_out, expected_lse, dtype)


@pytest.mark.parametrize("case", range(len(QUICK_CASES)))
def test_micro_attention_triton_matches_reference(paged_batch, attention_close, device, case):
    absent_fraction = 0.3 if case % 2 else 0.0
    run_case(paged_batch, attention_close, device, case, *QUICK_CASES[case], absent_fraction)


@pytest.mark.parametrize("case", range(len(QUICK_CASES)))
def test_micro_attention_triton_prefill_tiles_match_reference(paged_batch, attention_close, device, case):
    absent_fraction = 0.3 if case % 2 else 0.0
    run_case(paged_batch, attention_close, device, 50 + case, *QUICK_CASES[case], absent_fraction,
             num_queries=PREFILL_BATCH)


@pytest.mark.slow
@pytest.mark.parametrize("case", range(len(SLOW_CASES)))
@pytest.mark.parametrize("batch", ["decode", "prefill"])
def test_micro_attention_triton_sweep_matches_reference(paged_batch, attention_close, device, case, batch):
    run_case(paged_batch, attention_close, device, 100 + case, *SLOW_CASES[case], absent_fraction=0.25,
             num_queries=DECODE_BATCH if batch == "decode" else PREFILL_BATCH)


def test_micro_attention_triton_all_blocks_absent_gives_empty_partial(paged_batch, device):
    query, key_cache, value_cache, block_tables, query_start_loc, context_lens = paged_batch(
        7, 1, 4, 16, 64, torch.float32, num_queries=[1, 2], max_context=40)
    block_tables[1] = -1
    out, lse = micro_attention_triton(query.to(device), key_cache.to(device), value_cache.to(device),
                                      block_tables.to(device), query_start_loc, context_lens, 0.125)
    assert torch.isneginf(lse[1:]).all() and (out[1:] == 0).all()
    assert torch.isfinite(lse[0]).all()


def test_micro_attention_triton_rejects_mismatched_heads():
    query = torch.zeros(1, 3, 64)
    cache = torch.zeros(2, 2, 16, 64)
    with pytest.raises(ValueError, match="divisible"):
        micro_attention_triton(query, cache, cache, torch.zeros(1, 1, dtype=torch.int32), [0, 1], [1], 1.0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("num_queries", [[1] * 8, [1] * 4 + [300]])
def test_micro_attention_dispatch_uses_triton_on_cuda(paged_batch, attention_close, num_queries):
    from megakv.kernels.ops import micro_attention

    query, key_cache, value_cache, block_tables, query_start_loc, context_lens = paged_batch(
        3, 2, 4, 16, 128, torch.bfloat16, num_queries=num_queries, max_context=4096, absent_fraction=0.1)
    expected_out, expected_lse = micro_attention_ref(query, key_cache, value_cache, block_tables, query_start_loc,
                                                     context_lens, 128 ** -0.5)
    out, lse = micro_attention(query.cuda(), key_cache.cuda(), value_cache.cuda(), block_tables.cuda(),
                               query_start_loc, context_lens, 128 ** -0.5)
    attention_close(out, lse, expected_out, expected_lse, torch.bfloat16)


@pytest.mark.parametrize("case", [0, 1, 5])
@pytest.mark.parametrize("window", [1, 21, 64])
@pytest.mark.parametrize("batch", ["decode", "prefill"])
def test_micro_attention_triton_sliding_window_matches_reference(paged_batch, attention_close, poison_before_windows,
                                                                 device, case, window, batch):
    """Each query attends to its last `window` tokens; the blocks wholly before the window are never read."""
    num_kv_heads, group, block_size, head_dim, dtype, num_splits = QUICK_CASES[case]
    num_queries = DECODE_BATCH if batch == "decode" else PREFILL_BATCH
    query, key_cache, value_cache, block_tables, query_start_loc, context_lens = paged_batch(
        70 + case, num_kv_heads, group, block_size, head_dim, dtype, num_queries=num_queries,
        max_context=max(6 * block_size, 2 * max(num_queries)), absent_fraction=0.2)
    scale = head_dim ** -0.5
    expected_out, expected_lse = micro_attention_ref(query, key_cache, value_cache, block_tables, query_start_loc,
                                                     context_lens, scale, window)
    poisoned_keys, poisoned_values = poison_before_windows(key_cache, value_cache, block_tables, query_start_loc,
                                                           context_lens, window)
    out, lse = micro_attention_triton(query.to(device), poisoned_keys.to(device), poisoned_values.to(device),
                                      block_tables.to(device), query_start_loc, context_lens, scale, window,
                                      num_splits=num_splits)
    attention_close(out, lse, expected_out, expected_lse, dtype)
