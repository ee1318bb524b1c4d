"""The CPU micro-attention (C++ decode op and torch flash path) against the torch reference."""
from __future__ import annotations

import pytest
import torch

from megakv.kernels import cpu_attention
from megakv.kernels.cpu_build import runnable_isas
from megakv.kernels.cpu_attention import MAX_DECODE_QUERIES, merge_partials_cpu, micro_attention_cpu, store_kv_cpu
from megakv.kernels.kv_store import store_kv_ref
from megakv.kernels.merge import merge_partials_ref
from megakv.kernels.micro_attention import micro_attention_ref
from megakv.kernels.ops import micro_attention, store_kv

# Decode sequences, a short chunk (still the decode op) and a long chunk (the torch path) in one batch;
# and a batch of decode sequences only (one without queries among them), which takes the one-call path.
NUM_QUERIES = {"mixed": [1, 3, 1, MAX_DECODE_QUERIES + 4], "decode": [1, 3, 0, 1, MAX_DECODE_QUERIES]}
CASES = [  # (num_kv_heads, group, block_size, head_dim, dtype)
    (2, 1, 16, 64, torch.float32),
    (2, 4, 32, 128, torch.float32),
    (1, 8, 64, 64, torch.float32),
    (2, 4, 16, 128, torch.bfloat16),
    (2, 1, 32, 64, torch.float16),
    (1, 4, 24, 64, torch.float32),  # no multiple of 16: the op ends each block token by token
    (1, 8, 16, 32, torch.float32),
]


@pytest.fixture(params=[*runnable_isas(), "torch"])
def cpu_path(request, monkeypatch):
    """Run each test with every build of the C++ op this CPU can execute (AVX-512, AVX2, generic; skipped if
    it cannot build) and with the pure-torch fallback."""
    if request.param == "torch":
        monkeypatch.setattr(cpu_attention, "load_extension", lambda: None)
        return request.param
    monkeypatch.setenv("MEGAKV_CPU_ISA", request.param)
    if cpu_attention.load_extension() is None:
        pytest.skip(f"the C++ CPU op ({request.param}) did not build here")
    return request.param


@pytest.mark.parametrize("case", range(len(CASES)))
@pytest.mark.parametrize("absent_fraction", [0.0, 0.3])
@pytest.mark.parametrize("batch", NUM_QUERIES)
def test_micro_attention_cpu_matches_reference(paged_batch, attention_close, cpu_path, case, absent_fraction, batch):
    num_kv_heads, group, block_size, head_dim, dtype = CASES[case]
    query, key_cache, value_cache, block_tables, query_start_loc, context_lens = paged_batch(
        case, num_kv_heads, group, block_size, head_dim, dtype, num_queries=NUM_QUERIES[batch],
        max_context=5 * block_size, absent_fraction=absent_fraction)
    scale = head_dim ** -0.5
    expected_out, expected_lse = micro_attention_ref(query, key_cache, value_cache, block_tables, query_start_loc,
                                                     context_lens, scale)
    out, lse = micro_attention(query, key_cache, value_cache, block_tables, query_start_loc, context_lens, scale)
    attention_close(out, lse, expected_out, expected_lse, dtype)


@pytest.mark.parametrize("num_kv_heads,group", [(1, 1), (2, 4), (1, 8)])
def test_micro_attention_cpu_long_decode_splits_match_reference(paged_batch, attention_close, cpu_path,
                                                                 num_kv_heads, group):
    query, key_cache, value_cache, block_tables, query_start_loc, context_lens = paged_batch(
        11, num_kv_heads, group, 16, 128, torch.float32, num_queries=[1, 1], max_context=3000,
        absent_fraction=0.1)
    expected_out, expected_lse = micro_attention_ref(query, key_cache, value_cache, block_tables, query_start_loc,
                                                     context_lens, 128 ** -0.5)
    out, lse = micro_attention_cpu(query, key_cache, value_cache, block_tables, query_start_loc, context_lens,
                                   128 ** -0.5)
    attention_close(out, lse, expected_out, expected_lse, torch.float32)


@pytest.mark.parametrize("num_queries", [[1, MAX_DECODE_QUERIES + 2, 1], [1, MAX_DECODE_QUERIES, 1]])
def test_micro_attention_cpu_sequence_without_blocks_is_empty(paged_batch, cpu_path, num_queries):
    query, key_cache, value_cache, block_tables, query_start_loc, context_lens = paged_batch(
        5, 1, 4, 16, 64, torch.float32, num_queries=num_queries, max_context=60)
    block_tables[1:] = -1
    out, lse = micro_attention_cpu(query, key_cache, value_cache, block_tables, query_start_loc, context_lens, 0.1)
    assert torch.isneginf(lse[1:]).all() and (out[1:] == 0).all() and torch.isfinite(lse[0]).all()


@pytest.mark.parametrize("num_partials", [1, 2, 5])
def test_merge_partials_cpu_matches_reference(random_partials, cpu_path, num_partials):
    outs, lses = random_partials(num_partials, num_partials, torch.float32)
    merged = merge_partials_cpu(outs, lses)
    if cpu_path == "torch":
        assert merged is None
        return
    expected_out, expected_lse = merge_partials_ref(outs, lses)
    out, lse = merged
    torch.testing.assert_close(out, expected_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse, expected_lse)
    assert torch.isneginf(lse[0, 0]) and (out[0, 0] == 0).all() and not torch.isnan(out).any()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("num_kv_heads,block_size,head_dim", [(1, 16, 64), (4, 24, 128), (8, 16, 32)])
def test_store_kv_cpu_matches_reference(cpu_path, dtype, num_kv_heads, block_size, head_dim):
    generator = torch.Generator().manual_seed(num_kv_heads * block_size)
    num_blocks, num_tokens = 6, 20
    key, value = (torch.randn(num_tokens, num_kv_heads, head_dim, generator=generator).to(dtype) for _ in range(2))
    # Scattered slots, some skipped (the token's block lives on another instance).
    slots = torch.randperm(num_blocks * block_size, generator=generator)[:num_tokens]
    slots[::3] = -1
    expected = [torch.full((num_blocks, num_kv_heads, block_size, head_dim), float("nan"), dtype=dtype)
                for _ in range(2)]
    caches = [cache.clone() for cache in expected]
    store_kv_ref(key, value, *expected, slots)
    store_kv(key, value, *caches, slots)
    for cache, reference in zip(caches, expected):
        assert torch.equal(cache.isnan(), reference.isnan())
        assert torch.equal(cache.nan_to_num(), reference.nan_to_num())
    assert store_kv_cpu(key, value, *caches, slots) == (cpu_path != "torch")


def test_store_kv_cpu_leaves_other_dtypes_and_bad_slots_alone(cpu_path):
    cache = torch.zeros(2, 1, 16, 64, dtype=torch.bfloat16)
    # An fp32 key into a bf16 cache converts, which the reference does.
    assert not store_kv_cpu(torch.ones(1, 1, 64), torch.ones(1, 1, 64), cache, cache.clone(), torch.tensor([3]))
    store_kv(torch.ones(1, 1, 64), torch.ones(1, 1, 64), cache, cache.clone(), torch.tensor([3]))
    assert cache[0, 0, 3].eq(1).all()
    if cpu_path != "torch":
        # Nothing is half-written: the first token's slot is valid, the second's is not.
        fresh = torch.zeros_like(cache)
        with pytest.raises(RuntimeError, match="slot 32 is beyond the cache's 32 slots"):
            store_kv_cpu(torch.ones(2, 1, 64, dtype=torch.bfloat16), torch.ones(2, 1, 64, dtype=torch.bfloat16),
                         fresh, fresh.clone(), torch.tensor([5, 32]))
        assert fresh.eq(0).all()


@pytest.mark.parametrize("case", [0, 3, 5])
@pytest.mark.parametrize("window", [1, 21, 48])
@pytest.mark.parametrize("batch", NUM_QUERIES)
def test_micro_attention_cpu_sliding_window_matches_reference(paged_batch, attention_close, poison_before_windows,
                                                              cpu_path, case, window, batch):
    """Each query attends to its last `window` tokens; the blocks wholly before the window are never read."""
    num_kv_heads, group, block_size, head_dim, dtype = CASES[case]
    query, key_cache, value_cache, block_tables, query_start_loc, context_lens = paged_batch(
        40 + case, num_kv_heads, group, block_size, head_dim, dtype, num_queries=NUM_QUERIES[batch],
        max_context=6 * block_size, absent_fraction=0.2)
    scale = head_dim ** -0.5
    expected_out, expected_lse = micro_attention_ref(query, key_cache, value_cache, block_tables, query_start_loc,
                                                     context_lens, scale, window)
    poisoned_keys, poisoned_values = poison_before_windows(key_cache, value_cache, block_tables, query_start_loc,
                                                           context_lens, window)
    out, lse = micro_attention(query, poisoned_keys, poisoned_values, block_tables, query_start_loc, context_lens,
                               scale, window)
    attention_close(out, lse, expected_out, expected_lse, dtype)
