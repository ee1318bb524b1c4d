"""Writing new tokens' keys and values into their rBlock slots."""
from __future__ import annotations

import torch


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
