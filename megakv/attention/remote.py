"""Attention over blocks held by other instances (DistKV-LLM section 4.2): the interface the attention layer calls.

The engine plans a step's remote work once, from its block tables: which rows of the batch
go to each instance holding some of their blocks (``OutgoingQueries``) and what that instance
must compute for them (``ServedQueries``). During the forward pass every attention layer hands
its queries and new K/V to a ``RemoteAttention`` of that step, which runs the local
micro-attention while the remote ones compute and merges the partials. megakv.distkv
implements it over its KV links; the layers know nothing of sockets or instances.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch


@dataclass(frozen=True)
class OutgoingQueries:
    """Debtor side: rows of this step's batch whose requests have blocks on ``creditor``."""

    creditor: int
    # Rows of the batch's queries that attend to blocks on the creditor.
    query_indices: list[int]
    # Rows of the batch whose new K/V are stored on the creditor.
    write_indices: list[int]


@dataclass(frozen=True)
class ServedQueries:
    """Creditor side: a debtor's queries to attend over the blocks this instance holds for it."""

    debtor: int
    # Slots of this pool receiving the debtor's new K/V, in the order of its write_indices.
    write_slots: list[int]
    query_start_loc: list[int]
    context_lens: list[int]
    # This pool's block ids by logical index, -1 where the block lives elsewhere.
    block_tables: list[list[int]]
    # The model's sliding window (None: none), which the creditor's micro-attention honours too.
    sliding_window: int | None = None

    @property
    def num_queries(self) -> int:
        """Queries the debtor sends, all its sequences together."""
        return self.query_start_loc[-1]


class RemoteAttention(Protocol):
    """One step's attention over remote blocks, as every layer of the forward pass calls it."""

    def attend(self, layer_index: int, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
               local_attention: Callable[[], tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        """Attention of the new tokens (query [T, Hq, D], key/value [T, Hkv, D]) over every block of their
        requests: ``local_attention`` gives the partial (out, lse) over this pool's blocks, merged exactly
        with the partials of the instances holding the others. Returns out [T, Hq, D]."""
        ...
