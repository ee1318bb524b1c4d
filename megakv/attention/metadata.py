"""What the attention layers need to know about one engine step."""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from megakv.attention.remote import RemoteAttention


@dataclass
class AttentionMetadata:
    """The batch layout of one forward pass, shared by every layer."""

    # num_seqs + 1 offsets: sequence s owns tokens query_start_loc[s]:query_start_loc[s+1] of the batch.
    query_start_loc: list[int]
    # Per sequence, the context length (cached plus new tokens) seen by its last new token.
    context_lens: list[int]
    # [num_seqs, max_blocks] physical block ids by logical index; -1 pads or marks a block held elsewhere.
    block_tables: torch.Tensor
    # [num_tokens] the pool slot (block_id * block_size + offset) receiving each new token's K/V.
    slot_mapping: torch.Tensor
    # Partition of block_tables into micro-attentions, each a table in which the blocks of the
    # other groups are -1. None means one micro-attention over the whole table.
    micro_attention_tables: list[torch.Tensor] | None = None
    # Mistral's sliding window: each query attends to its last sliding_window tokens only (None: all of them).
    sliding_window: int | None = None
    # Cross-instance micro-attentions of this step, or None when every block the batch touches is local.
    remote: RemoteAttention | None = None
