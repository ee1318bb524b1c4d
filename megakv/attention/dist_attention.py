"""DistAttention (DistKV-LLM section 4.2): micro-attentions over groups of rBlocks, merged exactly.

Each micro-attention covers the blocks of one group and returns (out, lse); the
merge by log-sum-exp makes the result equal to attention over all the blocks.
Within one instance the groups are computed here; across instances the same
partials come back from the instances that hold the blocks.
"""
from __future__ import annotations

import torch

from megakv.attention.metadata import AttentionMetadata
from megakv.kernels.ops import merge_partials, micro_attention, store_kv


def dist_attention(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    metadata: AttentionMetadata,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of query [num_tokens, Hq, D] over its sequences' blocks; returns (out, lse)."""
    tables = metadata.micro_attention_tables or [metadata.block_tables]
    partials = [micro_attention(query, key_cache, value_cache, table, metadata.query_start_loc,
                                metadata.context_lens, scale, metadata.sliding_window) for table in tables]
    if len(partials) == 1:
        return partials[0]
    outs = torch.stack([out for out, _ in partials])
    lses = torch.stack([lse for _, lse in partials])
    return merge_partials(outs, lses)


class DistAttention(torch.nn.Module):
    """The attention core of one layer: store the new K/V in the pool, then attend over the blocks."""

    def __init__(self, layer_index: int, head_dim: int) -> None:
        super().__init__()
        self.layer_index = layer_index
        self.scale = head_dim ** -0.5

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                key_cache: torch.Tensor, value_cache: torch.Tensor,
                metadata: AttentionMetadata) -> torch.Tensor:
        """query [T, Hq, D], key/value [T, Hkv, D] of the new tokens -> out [T, Hq, D]."""
        store_kv(key, value, key_cache, value_cache, metadata.slot_mapping)
        if metadata.remote is not None:
            return metadata.remote.attend(self.layer_index, query, key, value,
                                          lambda: dist_attention(query, key_cache, value_cache, metadata, self.scale))
        out, _ = dist_attention(query, key_cache, value_cache, metadata, self.scale)
        return out
