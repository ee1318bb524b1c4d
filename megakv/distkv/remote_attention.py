"""The DistKV data plane (DistKV-LLM section 4.2): remote micro-attentions and DGFM block copies.

Per layer, the query of a request goes to every instance holding some of its
rBlocks (with the new tokens' K/V when their slots are there); that instance
runs the micro-attention over its blocks and sends back (out, lse), which merge
exactly with the local partial. The KV never travels, only queries and partials
(and the blocks DGFM moves home). Traffic runs over torch.distributed between
rank t of each instance (the DistAttention groups of TP rank t), so each rank
handles the heads of its shard. Every rank answers in a KV server thread; the
asking rank sends its queries, computes its local partial while they fly, then
awaits the partials.
"""
from __future__ import annotations

import pickle
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist

from megakv.attention.metadata import AttentionMetadata
from megakv.distkv.rmanager import Transfer
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


# Every message to a KV server is one byte buffer: a header of HEADER_SIZE int64 (kind, layer, bytes of pickled
# metadata, bytes of payload), the metadata padded to whole int64, then the payload. The server keeps a receive
# from any instance posted into a buffer of INLINE_BYTES (a shorter message fills its start), so a layer's
# queries land as soon as they are sent. A message that would only fill the buffer in two parts, header first,
# would cost a rendezvous per layer: the creditor can post the second receive only after the first arrived,
# and the debtor's send then waits for its own CPU. Larger messages (long prefill chunks) are rare enough to
# pay it: their header comes alone and the rest follows on BODY_TAG.
HEADER_SIZE = 4
HEADER_BYTES = HEADER_SIZE * 8
INLINE_BYTES = 4 << 20
QUERY, FETCH, STOP = 0, 1, 2
# Tags on the query group: headers are received from any instance, the rest from the header's sender.
HEADER_TAG, BODY_TAG = 0, 1
# Tag of DGFM block copies on the reply group, clear of the per-layer reply tags.
FETCH_TAG = 1 << 20


def _peer(instance_id: int) -> int:
    """Global rank of this TP rank's counterpart in another instance."""
    return instance_id * state.get_tensor_model_parallel_world_size() + state.get_tensor_model_parallel_rank()


def _ask(kind: int, creditor: int, layer_index: int, metadata: bytes = b"",
         payload: Sequence[torch.Tensor] = ()) -> list:
    """Send one message to a creditor's KV server (the payload's tensors back to back, copied once into the
    message); returns the sends to wait on."""
    group, destination = state.get_dist_attention_group(), _peer(creditor)
    payload_bytes = [tensor.cpu().flatten().view(torch.uint8) for tensor in payload]
    parts = [torch.tensor([kind, layer_index, len(metadata), sum(part.numel() for part in payload_bytes)])
             .view(torch.uint8)]
    if metadata:
        parts.append(torch.frombuffer(bytearray(metadata + bytes(-len(metadata) % 8)), dtype=torch.uint8))
    parts += payload_bytes
    if sum(part.numel() for part in parts) <= INLINE_BYTES:
        return [dist.isend(torch.cat(parts), destination, group, HEADER_TAG)]
    return [dist.isend(parts[0], destination, group, HEADER_TAG),
            dist.isend(torch.cat(parts[1:]), destination, group, BODY_TAG)]


def _wait(works: list) -> None:
    for work in works:
        work.wait()


def _served_metadata(served: ServedQueries, device: torch.device) -> AttentionMetadata:
    width = max((len(row) for row in served.block_tables), default=0)
    tables = torch.full((len(served.block_tables), width), -1, dtype=torch.int32)
    for row, table in enumerate(served.block_tables):
        tables[row, :len(table)] = torch.tensor(table, dtype=torch.int32)
    return AttentionMetadata(query_start_loc=served.query_start_loc, context_lens=served.context_lens,
                             block_tables=tables.to(device),
                             slot_mapping=torch.tensor(served.write_slots, dtype=torch.long, device=device),
                             sliding_window=served.sliding_window)


def _answer(served: ServedQueries, metadata: AttentionMetadata, payload: torch.Tensor, key_cache: torch.Tensor,
            value_cache: torch.Tensor, num_q_heads: int, num_kv_heads: int, head_dim: int) -> torch.Tensor:
    """Store a debtor's new K/V, attend its queries over the blocks held here; the reply, (out, lse) in fp32."""
    num_writes = len(served.write_slots)
    kv_size = num_writes * num_kv_heads * head_dim
    query, key, value = payload.split([payload.numel() - 2 * kv_size, kv_size, kv_size])
    store_kv(key.view(num_writes, num_kv_heads, head_dim), value.view(num_writes, num_kv_heads, head_dim),
             key_cache, value_cache, metadata.slot_mapping)
    out, lse = micro_attention(query.view(served.num_queries, num_q_heads, head_dim), key_cache, value_cache,
                               metadata.block_tables, metadata.query_start_loc, metadata.context_lens,
                               head_dim ** -0.5, metadata.sliding_window)
    return torch.cat([out.float().flatten(), lse.flatten()])


class KVServer:
    """This rank's answers to other instances: their micro-attentions over the blocks it lends, and DGFM copies.

    It runs in a thread of its own, blocked on the query group while nobody asks, so a debtor's layer
    waits only for the micro-attention it asked for, never for the creditor's own step. The KV it touches
    is disjoint from what the instance's own step touches: the slots it writes are lent, and a lent
    block is reused only after its debtor has handed it back, which it does only once it no longer asks.
    """

    def __init__(self, key_cache: torch.Tensor, value_cache: torch.Tensor, num_q_heads: int, num_kv_heads: int,
                 head_dim: int, on_error: Callable[[BaseException], None]) -> None:
        self.key_cache, self.value_cache = key_cache, value_cache
        self.num_q_heads, self.num_kv_heads, self.head_dim = num_q_heads, num_kv_heads, head_dim
        self._on_error = on_error
        self._thread = threading.Thread(target=self._run, name="megakv-kv-server", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Tell the KV server of this TP rank in every other instance that this rank asks nothing more, and
        wait for this one to hear the same from all of them."""
        works = [work for instance in range(state.get_num_instances()) if instance != state.get_instance_id()
                 for work in _ask(STOP, instance, 0)]
        _wait(works)
        self._thread.join()

    def _run(self) -> None:
        try:
            with torch.inference_mode():
                self._serve()
        except BaseException as err:  # a debtor would wait for this answer forever
            self._on_error(err)

    def _serve(self) -> None:
        queries, replies = state.get_dist_attention_group(), state.get_dist_attention_reply_group()
        device = self.key_cache.device
        # Per debtor rank: its latest queries' metadata, sent with the first layer of each of its steps.
        served: dict[int, tuple[ServedQueries, AttentionMetadata]] = {}
        inline = torch.empty(INLINE_BYTES, dtype=torch.uint8)
        num_stops = 0
        while num_stops < state.get_num_instances() - 1:
            debtor = dist.recv(inline, None, queries, HEADER_TAG)
            kind, layer_index, metadata_size, payload_size = inline[:HEADER_BYTES].view(torch.long).tolist()
            if kind == STOP:
                num_stops += 1
                continue
            body_size = metadata_size + (-metadata_size % 8) + payload_size
            if HEADER_BYTES + body_size <= INLINE_BYTES:
                body = inline[HEADER_BYTES:HEADER_BYTES + body_size]
            else:
                body = torch.empty(body_size, dtype=torch.uint8)
                dist.recv(body, debtor, queries, BODY_TAG)
            metadata = pickle.loads(body[:metadata_size].numpy().tobytes()) if metadata_size else None
            if kind == FETCH:
                block_ids = torch.tensor(metadata, dtype=torch.long, device=device)
                blocks = torch.stack([self.key_cache[:, block_ids], self.value_cache[:, block_ids]])
                dist.send(blocks.cpu(), debtor, replies, FETCH_TAG)
                continue
            if metadata is not None:
                served[debtor] = (metadata, _served_metadata(metadata, device))
            # A view into the receive buffer: used up by the answer before the next receive overwrites it.
            payload = body[body_size - payload_size:].view(self.key_cache.dtype)
            queries_meta, attention_meta = served[debtor]
            reply = _answer(queries_meta, attention_meta, payload.to(device), self.key_cache[layer_index],
                            self.value_cache[layer_index], self.num_q_heads, self.num_kv_heads, self.head_dim)
            dist.send(reply.cpu(), debtor, replies, layer_index)


class RemoteAttention:
    """The debtor's side of one step: each layer's queries go to the creditors' KV servers, the local
    micro-attention runs while they compute, and their partials merge with it exactly."""

    def __init__(self, outgoing: list[OutgoingQueries], served: dict[int, ServedQueries], num_q_heads: int,
                 head_dim: int) -> None:
        self.outgoing = outgoing
        self.num_q_heads, self.head_dim = num_q_heads, head_dim
        # Each creditor learns the step's block tables with the first layer's queries.
        self._metadata = {creditor: pickle.dumps(queries) for creditor, queries in served.items()}

    def attend(self, layer_index: int, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
               local_attention: Callable[[], tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        """One layer: query [T, Hq, D] and key/value [T, Hkv, D] are this step's new tokens."""
        replies, works, partials = state.get_dist_attention_reply_group(), [], []
        for out in self.outgoing:
            works += _ask(QUERY, out.creditor, layer_index, self._metadata[out.creditor] if layer_index == 0 else b"",
                          (query[out.query_indices], key[out.write_indices], value[out.write_indices]))
            partial = torch.empty(len(out.query_indices) * self.num_q_heads * (self.head_dim + 1),
                                  dtype=torch.float32)
            works.append(dist.irecv(partial, _peer(out.creditor), replies, layer_index))
            partials.append(partial)
        local_out, local_lse = local_attention()
        _wait(works)
        # Partials merge in fp32 (the creditors send them so), and only the merged rows take the model's dtype.
        outs, lses = [local_out.float()], [local_lse]
        for out_plan, partial in zip(self.outgoing, partials):
            num_queries = len(out_plan.query_indices)
            out_part, lse_part = partial.to(local_out.device).split([num_queries * self.num_q_heads * self.head_dim,
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


def fetch_blocks(transfers: list[Transfer], key_cache: torch.Tensor, value_cache: torch.Tensor) -> None:
    """DGFM: copy each transfer's block (every layer's K and V of this rank's heads) from its creditor's
    KV server into this pool. key_cache/value_cache: [num_layers, num_blocks, Hkv, block_size, D]."""
    by_creditor: dict[int, list[Transfer]] = {}
    for transfer in transfers:
        by_creditor.setdefault(transfer.creditor, []).append(transfer)
    for creditor, moves in by_creditor.items():
        works = _ask(FETCH, creditor, 0, pickle.dumps([move.src_block for move in moves]))
        blocks = torch.empty((2, key_cache.shape[0], len(moves), *key_cache.shape[2:]), dtype=key_cache.dtype)
        dist.recv(blocks, _peer(creditor), state.get_dist_attention_reply_group(), FETCH_TAG)
        _wait(works)
        destination = torch.tensor([move.dst_block for move in moves], dtype=torch.long, device=key_cache.device)
        key_cache[:, destination] = blocks[0].to(key_cache.device)
        value_cache[:, destination] = blocks[1].to(key_cache.device)
