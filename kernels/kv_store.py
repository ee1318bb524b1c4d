"""Writing new tokens' keys and values into their rBlock slots."""
from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # the CPU path and the references need no triton
    triton = None


def store_kv_ref(
    key: torch.Tensor,
    value: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Write key/value [num_tokens, num_kv_heads, head_dim] into the caches at ``slot_mapping``.

    key_cache/value_cache: [num_blocks, num_kv_heads, block_size, head_dim]; a slot is
    ``block_id * block_size + offset``; a negative slot skips the token (its block lives elsewhere).
    """
    block_size = key_cache.shape[2]
    keep = slot_mapping >= 0
    slots = slot_mapping[keep].long()
    block_ids, offsets = slots // block_size, slots % block_size
    key_cache[block_ids, :, offsets] = key[keep].to(key_cache.dtype)
    value_cache[block_ids, :, offsets] = value[keep].to(value_cache.dtype)


if triton is not None:

    @triton.jit
    def _store_kv_kernel(
        key_ptr, value_ptr, key_cache_ptr, value_cache_ptr, slot_mapping_ptr, head_dim,
        stride_kn, stride_kh, stride_vn, stride_vh,
        stride_ckb, stride_ckh, stride_ckt, stride_cvb, stride_cvh, stride_cvt,
        BLOCK_SIZE: tl.constexpr, BLOCK_DIM: tl.constexpr,
    ):
        """One program: one token, one KV head."""
        token = tl.program_id(0)
        head = tl.program_id(1)
        slot = tl.load(slot_mapping_ptr + token).to(tl.int64)
        dims = tl.arange(0, BLOCK_DIM)
        ok = (dims < head_dim) & (tl.zeros([BLOCK_DIM], tl.int64) + slot >= 0)
        block_id = tl.maximum(slot, 0) // BLOCK_SIZE
        offset = tl.maximum(slot, 0) % BLOCK_SIZE
        key = tl.load(key_ptr + token * stride_kn + head * stride_kh + dims, mask=ok)
        value = tl.load(value_ptr + token * stride_vn + head * stride_vh + dims, mask=ok)
        tl.store(key_cache_ptr + block_id * stride_ckb + head * stride_ckh + offset * stride_ckt + dims,
                 key.to(key_cache_ptr.dtype.element_ty), mask=ok)
        tl.store(value_cache_ptr + block_id * stride_cvb + head * stride_cvh + offset * stride_cvt + dims,
                 value.to(value_cache_ptr.dtype.element_ty), mask=ok)


def store_kv_triton(key: torch.Tensor, value: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                    slot_mapping: torch.Tensor) -> None:
    """The Triton KV store; same contract as :func:`store_kv_ref`."""
    if triton is None:
        raise RuntimeError("store_kv_triton needs triton; install it or use store_kv_ref")
    if key.dim() != 3 or value.shape != key.shape or key_cache.dim() != 4 or value_cache.shape != key_cache.shape:
        raise ValueError(f"key/value must be [num_tokens, Hkv, D] and caches [num_blocks, Hkv, block_size, D]; got "
                         f"{tuple(key.shape)}, {tuple(value.shape)}, {tuple(key_cache.shape)}, "
                         f"{tuple(value_cache.shape)}")
    num_tokens, num_kv_heads, head_dim = key.shape
    if key_cache.shape[1] != num_kv_heads or key_cache.shape[3] != head_dim:
        raise ValueError(f"key [.., {num_kv_heads}, {head_dim}] does not fit key_cache {tuple(key_cache.shape)}")
    if slot_mapping.shape != (num_tokens,) or slot_mapping.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"slot_mapping must be int [{num_tokens}], got {tuple(slot_mapping.shape)} "
                         f"{slot_mapping.dtype}")
    if key.stride(2) != 1 or value.stride(2) != 1 or key_cache.stride(3) != 1 or value_cache.stride(3) != 1:
        raise ValueError("key, value and the caches must be contiguous in head_dim")
    if num_tokens == 0:
        return
    _store_kv_kernel[(num_tokens, num_kv_heads)](
        key, value, key_cache, value_cache, slot_mapping.contiguous(), head_dim,
        key.stride(0), key.stride(1), value.stride(0), value.stride(1),
        key_cache.stride(0), key_cache.stride(1), key_cache.stride(2),
        value_cache.stride(0), value_cache.stride(1), value_cache.stride(2),
        BLOCK_SIZE=key_cache.shape[2], BLOCK_DIM=triton.next_power_of_2(head_dim),
    )
