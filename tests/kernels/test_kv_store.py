"""The Triton KV store against its reference: slots scattered over the pool, negative slots skipped."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from megakv.kernels.kv_store import store_kv_ref, store_kv_triton  # noqa: E402
from megakv.kernels.ops import store_kv  # noqa: E402


@pytest.mark.parametrize("block_size,head_dim", [(16, 64), (32, 128), (64, 64)])
@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_store_kv_triton_matches_reference(block_size, head_dim, cache_dtype, device):
    gen = torch.Generator().manual_seed(block_size + head_dim)
    num_blocks, num_kv_heads, num_tokens = 6, 2, 9
    key = torch.randn(num_tokens, num_kv_heads, head_dim, generator=gen)
    value = torch.randn(num_tokens, num_kv_heads, head_dim, generator=gen)
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:num_tokens]
    slots[::3] = -1  # tokens whose block lives on another instance
    expected_key = torch.full((num_blocks, num_kv_heads, block_size, head_dim), float("nan"), dtype=cache_dtype)
    expected_value = expected_key.clone()
    store_kv_ref(key, value, expected_key, expected_value, slots)
    key_cache = torch.full_like(expected_key, float("nan"), device=device)
    value_cache = key_cache.clone()
    store_kv_triton(key.to(device), value.to(device), key_cache, value_cache, slots.to(device))
    # The interpreter may round float32 -> bfloat16 differently from torch: allow one bfloat16 ulp.
    rtol = 2 ** -7 if cache_dtype == torch.bfloat16 else 0
    torch.testing.assert_close(key_cache.cpu(), expected_key, equal_nan=True, atol=0, rtol=rtol)
    torch.testing.assert_close(value_cache.cpu(), expected_value, equal_nan=True, atol=0, rtol=rtol)


def test_store_kv_dispatch_on_cpu_matches_reference():
    key = torch.randn(4, 1, 16)
    expected = torch.zeros(2, 1, 8, 16)
    store_kv_ref(key, key, expected, expected.clone(), torch.tensor([0, -1, 9, 15]))
    key_cache = torch.zeros_like(expected)
    store_kv(key, key, key_cache, key_cache.clone(), torch.tensor([0, -1, 9, 15]))
    assert torch.equal(key_cache, expected)


def test_store_kv_triton_rejects_wrong_slot_count():
    cache = torch.zeros(2, 1, 16, 16)
    with pytest.raises(ValueError, match="slot_mapping"):
        store_kv_triton(torch.zeros(3, 1, 16), torch.zeros(3, 1, 16), cache, cache, torch.zeros(2, dtype=torch.long))
