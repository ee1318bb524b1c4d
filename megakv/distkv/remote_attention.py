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
    # The model's sliding window (None: none), which the creditor's micro-attention honours too.
    sliding_window: int | None = None

    @property
    def num_queries(self) -> int:
        """Queries the debtor sends, all its sequences together."""
        return self.query_start_loc[-1]


@dataclass
class RemotePlan:
    """The cross-instance work of one step for this instance."""

    outgoing: list[OutgoingQueries] = field(default_factory=list)
    incoming: list[ServedQueries] = field(default_factory=list)

    @property
    def is_empty(self) -> bool:
        """True when this step needs no cross-instance traffic."""
        return not self.outgoing and not self.incoming


# Tags of DGFM block copies start here, clear of the per-layer tags 2 * layer and 2 * layer + 1.
TRANSFER_TAG_BASE = 1 << 20


def _peer(instance_id: int) -> int:
    """Global rank of this TP rank's counterpart in another instance."""
    return instance_id * state.get_tensor_model_parallel_world_size() + state.get_tensor_model_parallel_rank()


def _exchange(sends: list[tuple[torch.Tensor, int, int]], receives: list[tuple[torch.Tensor, int, int]]) -> list:
    """Post (tensor, instance, tag) sends and receives as one batch; returns the requests to wait on.

    One batch per phase keeps the exchange deadlock-free where point-to-point operations between
    two ranks match in posting order whatever their tags (NCCL), even when two instances are each
    other's debtor and creditor.
    """
    group = state.get_dist_attention_group()
    if dist.get_backend(group) == dist.Backend.GLOO:
        # Gloo matches by tag and never blocks a posted send, so plain calls are safe and cost less.
        return ([dist.isend(tensor, _peer(instance_id), group, tag) for tensor, instance_id, tag in sends]
                + [dist.irecv(tensor, _peer(instance_id), group, tag) for tensor, instance_id, tag in receives])
    ops = [dist.P2POp(dist.isend, tensor, _peer(instance_id), group, tag) for tensor, instance_id, tag in sends]
    ops += [dist.P2POp(dist.irecv, tensor, _peer(instance_id), group, tag) for tensor, instance_id, tag in receives]
    return dist.batch_isend_irecv(ops) if ops else []


def _wait(requests: list) -> None:
    for request in requests:
        request.wait()


def _served_metadata(served: ServedQueries, device: torch.device) -> AttentionMetadata:
    width = max((len(row) for row in served.block_tables), default=0)
    tables = torch.full((len(served.block_tables), width), -1, dtype=torch.int32)
    for row, table in enumerate(served.block_tables):
        tables[row, :len(table)] = torch.tensor(table, dtype=torch.int32)
    return AttentionMetadata(query_start_loc=served.query_start_loc, context_lens=served.context_lens,
                             block_tables=tables.to(device),
                             slot_mapping=torch.tensor(served.write_slots, dtype=torch.long, device=device),
                             sliding_window=served.sliding_window)


class RemoteAttention:
    """Runs each layer's remote micro-attentions of a step's RemotePlan, in two phases.

    Phase 1 sends this instance's queries (and remote K/V writes) to its creditors and
    receives its debtors' queries; the local micro-attention runs meanwhile. Phase 2 sends
    the answers to the debtors and receives the creditors' partials, which are merged.
    """

    def __init__(self, plan: RemotePlan, num_q_heads: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device) -> None:
        self.plan = plan
        self.num_q_heads, self.num_kv_heads, self.head_dim = num_q_heads, num_kv_heads, head_dim
        self.dtype, self.device = dtype, device
        self._served_metadata = [_served_metadata(served, device) for served in plan.incoming]

    def _query_buffers(self) -> list[torch.Tensor]:
        """Receive buffers for the debtors' queries and K/V writes."""
        sizes = [served.num_queries * self.num_q_heads * self.head_dim
                 + 2 * len(served.write_slots) * self.num_kv_heads * self.head_dim for served in self.plan.incoming]
        return [torch.empty(size, dtype=self.dtype, device=self.device) for size in sizes]

    def _answer(self, key_cache: torch.Tensor, value_cache: torch.Tensor, scale: float,
                buffers: list[torch.Tensor]) -> list[torch.Tensor]:
        """Store the debtors' new K/V, attend their queries over the blocks held here; the replies."""
        replies = []
        for served, metadata, buffer in zip(self.plan.incoming, self._served_metadata, buffers):
            num_writes = len(served.write_slots)
            kv_size = num_writes * self.num_kv_heads * self.head_dim
            query, key, value = buffer.split([buffer.numel() - 2 * kv_size, kv_size, kv_size])
            store_kv(key.view(num_writes, self.num_kv_heads, self.head_dim),
                     value.view(num_writes, self.num_kv_heads, self.head_dim), key_cache, value_cache,
                     metadata.slot_mapping)
            out, lse = micro_attention(query.view(served.num_queries, self.num_q_heads, self.head_dim), key_cache,
                                       value_cache, metadata.block_tables, metadata.query_start_loc,
                                       metadata.context_lens, scale, metadata.sliding_window)
            replies.append(torch.cat([out.float().flatten(), lse.flatten()]))
        return replies

    def serve_only(self, layer_index: int, key_cache: torch.Tensor, value_cache: torch.Tensor, scale: float) -> None:
        """A layer on an instance with no tokens of its own this step: only answer the debtors."""
        self.attend(layer_index, None, None, None, key_cache, value_cache, scale, None)

    def attend(self, layer_index: int, query: torch.Tensor | None, key: torch.Tensor | None,
               value: torch.Tensor | None, key_cache: torch.Tensor, value_cache: torch.Tensor, scale: float,
               local_attention: Callable[[], tuple[torch.Tensor, torch.Tensor]] | None) -> torch.Tensor | None:
        """One layer: send queries out, compute the local partial meanwhile, answer debtors, merge partials.

        query [T, Hq, D] and key/value [T, Hkv, D] are this step's new tokens (None when serving only).
        """
        query_tag, reply_tag = 2 * layer_index, 2 * layer_index + 1
        payloads = [torch.cat([query[out.query_indices].flatten(), key[out.write_indices].flatten(),
                               value[out.write_indices].flatten()]).to(self.dtype) for out in self.plan.outgoing]
        buffers = self._query_buffers()
        phase1 = _exchange([(payload, out.creditor, query_tag) for payload, out in zip(payloads, self.plan.outgoing)],
                           [(buffer, served.debtor, query_tag)
                            for buffer, served in zip(buffers, self.plan.incoming)])
        local = local_attention() if local_attention is not None else None
        _wait(phase1)
        answers = self._answer(key_cache, value_cache, scale, buffers)
        partials = [torch.empty(len(out.query_indices) * self.num_q_heads * (self.head_dim + 1),
                                dtype=torch.float32, device=self.device) for out in self.plan.outgoing]
        _wait(_exchange([(answer, served.debtor, reply_tag) for answer, served in zip(answers, self.plan.incoming)],
                        [(partial, out.creditor, reply_tag) for partial, out in zip(partials, self.plan.outgoing)]))
        if local is None:
            return None
        local_out, local_lse = local
        # Partials merge in fp32 (the creditors send them so), and only the merged rows take the model's dtype.
        outs, lses = [local_out.float()], [local_lse]
        for out_plan, partial in zip(self.plan.outgoing, partials):
            num_queries = len(out_plan.query_indices)
            out_part, lse_part = partial.split([num_queries * self.num_q_heads * self.head_dim,
                                                num_queries * self.num_q_heads])
            out_part = out_part.view(num_queries, self.num_q_heads, self.head_dim)
            lse_part = lse_part.view(num_queries, self.num_q_heads)
            # query_indices ascend without repeats (ModelRunner.prepare), so as many as the batch has rows
            # means every row, in order; otherwise rows without blocks on this creditor get an empty partial.
            if num_queries < len(local_out):
                out = torch.zeros_like(outs[0])
                lse = torch.full_like(local_lse, float("-inf"))
                out[out_plan.query_indices], lse[out_plan.query_indices] = out_part, lse_part
                out_part, lse_part = out, lse
            outs.append(out_part)
            lses.append(lse_part)
        merged, _ = merge_partials(torch.stack(outs), torch.stack(lses))
        return merged.to(local_out.dtype)


def execute_transfers(transfers: list[Transfer], key_cache: torch.Tensor, value_cache: torch.Tensor,
                      instance_id: int) -> None:
    """Copy DGFM-moved blocks (every layer's K and V of this rank's heads) between instances.

    All outgoing blocks are read before any incoming block is written, so a rotation
    that sends a block out of the slot it receives into stays correct.
    key_cache/value_cache: [num_layers, num_blocks, Hkv, block_size, D].
    """
    block_shape = (2, *key_cache[:, 0].shape)  # [K/V, num_layers, Hkv, block_size, D]
    sends = [(torch.stack([key_cache[:, t.src_block], value_cache[:, t.src_block]]), t.dst_instance,
              TRANSFER_TAG_BASE + t.plan_index) for t in transfers if t.src_instance == instance_id]
    incoming = [t for t in transfers if t.dst_instance == instance_id]
    buffers = [key_cache.new_empty(block_shape) for _ in incoming]
    _wait(_exchange(sends, [(buffer, t.src_instance, TRANSFER_TAG_BASE + t.plan_index)
                            for buffer, t in zip(buffers, incoming)]))
    for transfer, buffer in zip(incoming, buffers):
        key_cache[:, transfer.dst_block] = buffer[0]
        value_cache[:, transfer.dst_block] = buffer[1]
