"""The DistKV data plane (DistKV-LLM section 4.2): remote micro-attentions and DGFM block copies.

Per layer, the query of a request goes to every instance holding some of its
rBlocks (with the new tokens' K/V when their slots are there); that instance
runs the micro-attention over its blocks and sends back (out, lse), which merge
exactly with the local partial. The KV never travels, only queries and partials.
Traffic runs over torch.distributed between rank t of each instance (the
DistAttention group of TP rank t), so each rank handles the heads of its shard.
Sends and receives are posted first, the local micro-attention runs while they
fly, then the partials are awaited.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from megakv.attention.metadata import AttentionMetadata
from megakv.distkv.messages import Transfer
from megakv.kernels.ops import merge_partials, micro_attention, store_kv
from megakv.parallel import state


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

    @property
    def num_queries(self) -> int:
        return self.query_start_loc[-1]


@dataclass
class RemotePlan:
    """The cross-instance work of one step for this instance."""

    outgoing: list[OutgoingQueries] = field(default_factory=list)
    incoming: list[ServedQueries] = field(default_factory=list)

    @property
    def is_empty(self) -> bool:
        return not self.outgoing and not self.incoming


# Tags of DGFM block copies start here, clear of the per-layer tags 2 * layer and 2 * layer + 1.
TRANSFER_TAG_BASE = 1 << 20


def _peer(instance_id: int) -> int:
    """Global rank of this TP rank's counterpart in another instance."""
    return instance_id * state.get_tensor_model_parallel_world_size() + state.get_tensor_model_parallel_rank()


def _isend(tensor: torch.Tensor, instance_id: int, tag: int):
    return dist.isend(tensor, dst=_peer(instance_id), group=state.get_dist_attention_group(), tag=tag)


def _irecv(tensor: torch.Tensor, instance_id: int, tag: int):
    return dist.irecv(tensor, src=_peer(instance_id), group=state.get_dist_attention_group(), tag=tag)


def _served_metadata(served: ServedQueries, device: torch.device) -> AttentionMetadata:
    width = max((len(row) for row in served.block_tables), default=0)
    tables = torch.full((len(served.block_tables), width), -1, dtype=torch.int32)
    for row, table in enumerate(served.block_tables):
        tables[row, :len(table)] = torch.tensor(table, dtype=torch.int32)
    return AttentionMetadata(query_start_loc=served.query_start_loc, context_lens=served.context_lens,
                             block_tables=tables.to(device),
                             slot_mapping=torch.tensor(served.write_slots, dtype=torch.long, device=device))


class RemoteAttention:
    """Runs one layer's remote micro-attentions for a step's RemotePlan."""

    def __init__(self, plan: RemotePlan, num_q_heads: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device) -> None:
        self.plan = plan
        self.num_q_heads, self.num_kv_heads, self.head_dim = num_q_heads, num_kv_heads, head_dim
        self.dtype, self.device = dtype, device
        self._served_metadata = [_served_metadata(served, device) for served in plan.incoming]

    def _request_size(self, num_queries: int, num_writes: int) -> int:
        return num_queries * self.num_q_heads * self.head_dim + 2 * num_writes * self.num_kv_heads * self.head_dim

    def _reply_size(self, num_queries: int) -> int:
        return num_queries * self.num_q_heads * (self.head_dim + 1)

    def _serve(self, layer_index: int, key_cache: torch.Tensor, value_cache: torch.Tensor, scale: float,
               requests: list) -> list:
        """Answer the debtors' queries of this layer from the blocks held here; returns the pending sends."""
        sends = []
        for served, metadata, (buffer, handle) in zip(self.plan.incoming, self._served_metadata, requests):
            handle.wait()
            num_writes = len(served.write_slots)
            query, key, value = buffer.split([served.num_queries * self.num_q_heads * self.head_dim,
                                              num_writes * self.num_kv_heads * self.head_dim,
                                              num_writes * self.num_kv_heads * self.head_dim])
            query = query.view(served.num_queries, self.num_q_heads, self.head_dim)
            store_kv(key.view(num_writes, self.num_kv_heads, self.head_dim),
                         value.view(num_writes, self.num_kv_heads, self.head_dim), key_cache, value_cache,
                         metadata.slot_mapping)
            out, lse = micro_attention(query, key_cache, value_cache, metadata.block_tables,
                                           metadata.query_start_loc, metadata.context_lens, scale)
            reply = torch.cat([out.float().flatten(), lse.flatten()])
            sends.append((reply, _isend(reply, served.debtor, 2 * layer_index + 1)))
        return sends

    def _post_incoming(self, layer_index: int) -> list:
        requests = []
        for served in self.plan.incoming:
            buffer = torch.empty(self._request_size(served.num_queries, len(served.write_slots)), dtype=self.dtype,
                                 device=self.device)
            requests.append((buffer, _irecv(buffer, served.debtor, 2 * layer_index)))
        return requests

    def serve_only(self, layer_index: int, key_cache: torch.Tensor, value_cache: torch.Tensor, scale: float) -> None:
        """A layer on an instance with no tokens of its own this step: only answer the debtors."""
        for _, handle in self._serve(layer_index, key_cache, value_cache, scale, self._post_incoming(layer_index)):
            handle.wait()

    def attend(self, layer_index: int, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
               key_cache: torch.Tensor, value_cache: torch.Tensor, scale: float,
               local_attention: Callable[[], tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        """Send queries out, compute the local partial meanwhile, serve debtors, merge the partials."""
        incoming = self._post_incoming(layer_index)
        sends, replies = [], []
        for outgoing in self.plan.outgoing:
            payload = torch.cat([query[outgoing.query_indices].flatten(), key[outgoing.write_indices].flatten(),
                                 value[outgoing.write_indices].flatten()]).to(self.dtype)
            sends.append((payload, _isend(payload, outgoing.creditor, 2 * layer_index)))
            reply = torch.empty(self._reply_size(len(outgoing.query_indices)), dtype=torch.float32,
                                device=self.device)
            replies.append((outgoing, reply, _irecv(reply, outgoing.creditor, 2 * layer_index + 1)))
        local_out, local_lse = local_attention()
        sends.extend(self._serve(layer_index, key_cache, value_cache, scale, incoming))
        outs, lses = [local_out], [local_lse]
        for outgoing, reply, handle in replies:
            handle.wait()
            num_queries = len(outgoing.query_indices)
            out_part, lse_part = reply.split([num_queries * self.num_q_heads * self.head_dim,
                                              num_queries * self.num_q_heads])
            out = torch.zeros_like(local_out)
            lse = torch.full_like(local_lse, float("-inf"))
            out[outgoing.query_indices] = out_part.view(num_queries, self.num_q_heads, self.head_dim).to(out.dtype)
            lse[outgoing.query_indices] = lse_part.view(num_queries, self.num_q_heads)
            outs.append(out)
            lses.append(lse)
        for _, handle in sends:
            handle.wait()
        merged, _ = merge_partials(torch.stack(outs), torch.stack(lses))
        return merged


def execute_transfers(transfers: list[Transfer], key_cache: torch.Tensor, value_cache: torch.Tensor,
                      instance_id: int) -> None:
    """Copy DGFM-moved blocks (every layer's K and V of this rank's heads) between instances.

    All outgoing blocks are read before any incoming block is written, so a rotation
    that sends a block out of the slot it receives into stays correct.
    key_cache/value_cache: [num_layers, num_blocks, Hkv, block_size, D].
    """
    sends, receives = [], []
    for transfer in transfers:
        if transfer.src_instance == instance_id:
            payload = torch.stack([key_cache[:, transfer.src_block], value_cache[:, transfer.src_block]]).contiguous()
            tag = TRANSFER_TAG_BASE + transfer.plan_index
            sends.append((payload, _isend(payload, transfer.dst_instance, tag)))
        if transfer.dst_instance == instance_id:
            buffer = torch.empty_like(torch.stack([key_cache[:, 0], value_cache[:, 0]]))
            tag = TRANSFER_TAG_BASE + transfer.plan_index
            receives.append((transfer, buffer, _irecv(buffer, transfer.src_instance, tag)))
    for transfer, buffer, handle in receives:
        handle.wait()
    for transfer, buffer, _ in receives:
        key_cache[:, transfer.dst_block] = buffer[0]
        value_cache[:, transfer.dst_block] = buffer[1]
    for _, handle in sends:
        handle.wait()
