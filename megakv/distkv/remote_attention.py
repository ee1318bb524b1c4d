"""The DistKV data plane (DistKV-LLM section 4.2): remote micro-attentions and DGFM block copies.

Per layer, the query of a request goes to every instance holding some of its
rBlocks (with the new tokens' K/V when their slots are there); that instance
runs the micro-attention over its blocks and sends back (out, lse), which merge
exactly with the local partial. The KV never travels, only queries and partials
(and the blocks DGFM moves home). Traffic runs over the KV links between rank t
of each instance (the DistAttention group of TP rank t), so each rank handles
the heads of its shard. Every rank answers in a KV server thread; the asking
rank sends its queries, computes its local partial while they fly, then awaits
the partials. Members fail alone: a KV server that loses a debtor's link
serves the others, and a step whose creditor does not answer within the peer
timeout leaves it out and names it (``failed``), for the instance to recompute
the requests whose KV it held.
"""
from __future__ import annotations

import array
import contextlib
import selectors
import socket
import struct
import sys
import threading
from collections.abc import Callable, Sequence

import torch

from megakv.attention.metadata import AttentionMetadata
from megakv.attention.remote import OutgoingQueries, ServedQueries
from megakv.kernels.cpu_attention import native_kv_server
from megakv.kernels.ops import merge_partials, micro_attention, store_kv
from megakv.kvcache.rmanager import Transfer
from megakv.parallel import state
from megakv.parallel.kv_links import KVLinks, receive_into, send_all, tensor_bytes

# The wire format of a request and its answer is described at the top of kernels/kv_server_cpu.cpp, the KV
# server's loop on the CPU; KVServer's Python loop (other devices, or no C++ op) speaks the same.
_HEADER = struct.Struct("<4q")
QUERY, FETCH, STOP = 0, 1, 2


def _ask(link: socket.socket, kind: int, layer_index: int, metadata: bytes = b"",
         payload: Sequence[torch.Tensor] = ()) -> None:
    """Send one request to a creditor's KV server, the payload's tensors straight from their memory."""
    payload_bytes = [tensor_bytes(tensor.cpu()) for tensor in payload]
    send_all(link, [_HEADER.pack(kind, layer_index, len(metadata), sum(part.nbytes for part in payload_bytes)),
                    metadata, *payload_bytes])


def _rows(tensor: torch.Tensor, indices: list[int]) -> torch.Tensor:
    return tensor if len(indices) == len(tensor) else tensor[indices]


def _encode_plan(served: ServedQueries) -> bytes:
    """A step's plan as the metadata of its first query: int64 [num_seqs, num_writes, width, window or -1],
    the write slots, query_start_loc, context_lens, then the block tables padded with -1 to ``width``."""
    width = max((len(row) for row in served.block_tables), default=0)
    values = [len(served.context_lens), len(served.write_slots), width,
              -1 if served.sliding_window is None else served.sliding_window,
              *served.write_slots, *served.query_start_loc, *served.context_lens]
    for row in served.block_tables:
        values += [*row, *[-1] * (width - len(row))]
    return array.array("q", values).tobytes()


def _decode_plan(metadata: bytes, device: torch.device) -> AttentionMetadata:
    values = array.array("q")
    values.frombytes(metadata)
    num_seqs, num_writes, width, window = values[:4]
    slots_end = 4 + num_writes
    starts_end = slots_end + num_seqs + 1
    lens_end = starts_end + num_seqs
    tables = torch.tensor(values[lens_end:], dtype=torch.int32).view(num_seqs, width)
    return AttentionMetadata(query_start_loc=list(values[slots_end:starts_end]),
                             context_lens=list(values[starts_end:lens_end]), block_tables=tables.to(device),
                             slot_mapping=torch.tensor(values[4:slots_end], dtype=torch.long, device=device),
                             sliding_window=None if window < 0 else window)


def _answer(metadata: AttentionMetadata, payload: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
            num_q_heads: int, num_kv_heads: int, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Store a debtor's new K/V, attend its queries over the blocks held here; the partials (out, lse)."""
    num_writes = len(metadata.slot_mapping)
    kv_size = num_writes * num_kv_heads * head_dim
    query, key, value = payload.split([payload.numel() - 2 * kv_size, kv_size, kv_size])
    store_kv(key.view(num_writes, num_kv_heads, head_dim), value.view(num_writes, num_kv_heads, head_dim),
             key_cache, value_cache, metadata.slot_mapping)
    out, lse = micro_attention(query.view(metadata.query_start_loc[-1], num_q_heads, head_dim), key_cache, value_cache,
                               metadata.block_tables, metadata.query_start_loc, metadata.context_lens,
                               head_dim ** -0.5, metadata.sliding_window)
    return out, lse


class KVServer:
    """This rank's answers to other instances: their micro-attentions over the blocks it lends, and DGFM copies.

    It runs in a thread of its own, blocked on its incoming links while nobody asks, so a debtor's layer
    waits only for the micro-attention it asked for, never for the creditor's own step. On the CPU the loop
    is C++ (kernels/kv_server_cpu.cpp) and holds no GIL; elsewhere, or without the C++ op, it is Python
    below, on the same wire format. The KV it touches
    is disjoint from what the instance's own step touches: the slots it writes are lent, and a lent
    block is reused only after its debtor has handed it back, which it does only once it no longer asks.
    A debtor whose link ends without a stop, or stalls mid-request for ``timeout`` seconds, is dropped and
    the others are served. Creating it sets up the links to the other instances, a collective over the
    DistAttention group.
    """

    def __init__(self, key_cache: torch.Tensor, value_cache: torch.Tensor, num_q_heads: int, num_kv_heads: int,
                 head_dim: int, timeout: float, on_error: Callable[[BaseException], None]) -> None:
        self.key_cache, self.value_cache = key_cache, value_cache
        self.num_q_heads, self.num_kv_heads, self.head_dim = num_q_heads, num_kv_heads, head_dim
        self.timeout = timeout
        self.links = KVLinks(timeout)
        # The C++ module whose kv_serve loop answers here (None: the Python loop below).
        self.native = native_kv_server(key_cache, value_cache)
        self._on_error = on_error
        self._thread = threading.Thread(target=self._run, name="megakv-kv-server", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Tell the KV server of this TP rank in every other instance that this rank asks nothing more, and
        wait for this one to hear the same from all of them (from a failed one, a timeout's worth at most)."""
        for link in self.links.outgoing.values():
            with contextlib.suppress(OSError):  # its peer failed: the link is shut or will time out
                _ask(link, STOP, 0)
        self._thread.join(self.timeout)
        if self._thread.is_alive():
            for instance in self.links.incoming:
                self.links.shut(instance)
            self._thread.join()
        self.links.close()

    def _lost(self, peer: str) -> None:
        print(f"megakv: the KV server of {self.links.peer_name(state.get_instance_id())} lost the link from {peer}: "
              f"it ended without a goodbye or stalled for {self.timeout:g} s (the peer was killed, hung or cut off)",
              file=sys.stderr, flush=True)

    def _run(self) -> None:
        try:
            with torch.inference_mode():
                self._serve()
        except BaseException as err:  # a debtor would wait for this answer forever
            self._on_error(err)

    def _serve(self) -> None:
        if self.native is not None:
            debtors = list(self.links.incoming)
            for peer in self.native.kv_serve([self.links.incoming[debtor].fileno() for debtor in debtors],
                                             [self.links.peer_name(debtor) for debtor in debtors], self.key_cache,
                                             self.value_cache, self.num_q_heads, self.head_dim ** -0.5,
                                             self.timeout):
                self._lost(peer)
            return
        # Per debtor: the plan of its current step, sent with the first layer's queries.
        plans: dict[int, AttentionMetadata] = {}
        header = bytearray(_HEADER.size)
        # Payloads land here; it grows to the largest one and stays.
        inbox = [torch.empty(1 << 20, dtype=torch.uint8)]
        with selectors.DefaultSelector() as waiting:
            for debtor, link in self.links.incoming.items():
                waiting.register(link, selectors.EVENT_READ, debtor)
            while waiting.get_map():
                for key, _ in waiting.select():
                    link, debtor = key.fileobj, key.data
                    try:
                        if not self._answer_one(link, debtor, plans, header, inbox):
                            waiting.unregister(link)
                    except OSError:  # ended, failed or stalled: only this debtor is lost
                        waiting.unregister(link)
                        self.links.shut(debtor)
                        self._lost(self.links.peer_name(debtor))

    def _answer_one(self, link: socket.socket, debtor: int, plans: dict[int, AttentionMetadata], header: bytearray,
                    inbox: list[torch.Tensor]) -> bool:
        """Read one request from ``debtor`` and answer it; False for its stop."""
        device = self.key_cache.device
        peer = self.links.peer_name(debtor)
        receive_into(link, header, peer)
        kind, layer_index, metadata_size, payload_size = _HEADER.unpack(header)
        if kind == STOP:
            return False
        metadata = bytearray(metadata_size)
        receive_into(link, metadata, peer)
        if payload_size > inbox[0].numel():
            inbox[0] = torch.empty(payload_size, dtype=torch.uint8)
        payload = inbox[0][:payload_size]
        receive_into(link, tensor_bytes(payload), peer)
        if kind == FETCH:
            block_ids = torch.frombuffer(metadata, dtype=torch.long).to(device)
            blocks = torch.stack([self.key_cache[:, block_ids], self.value_cache[:, block_ids]])
            send_all(link, [tensor_bytes(blocks.cpu())])
            return True
        if metadata_size:
            plans[debtor] = _decode_plan(metadata, device)
        out, lse = _answer(plans[debtor], payload.view(self.key_cache.dtype).to(device),
                           self.key_cache[layer_index], self.value_cache[layer_index],
                           self.num_q_heads, self.num_kv_heads, self.head_dim)
        send_all(link, [tensor_bytes(out.float().cpu()), tensor_bytes(lse.float().cpu())])
        return True


class KVLinkAttention:
    """The debtor's side of one step, a RemoteAttention (megakv.attention.remote): each layer's queries go to
    the creditors' KV servers, the local micro-attention runs while they compute, and their partials merge
    with it exactly. A creditor that fails to take the queries or to answer within the peer timeout joins
    ``failed`` and is not asked again: the rows it held KV of are then wrong, and the instance recomputes them
    (InstanceRanks.run names it to the leader)."""

    def __init__(self, kv_server: KVServer, outgoing: list[OutgoingQueries], served: dict[int, ServedQueries],
                 num_q_heads: int, head_dim: int) -> None:
        self.links = kv_server.links
        self.timeout = kv_server.timeout
        # The C++ module that sends the queries and merges the answers where the KV server's loop is C++, else
        # None.
        self._native = kv_server.native
        self.outgoing = outgoing
        self.num_q_heads, self.head_dim = num_q_heads, head_dim
        # Each creditor learns the step's block tables with the first layer's queries.
        self._metadata = {creditor: _encode_plan(queries) for creditor, queries in served.items()}
        self.failed: set[int] = set()
        self._link_args = self._native_link_args()

    def _native_link_args(self) -> tuple[list[int], list[str], list[list[int]]]:
        """kv_merge_answers' links, creditor names and rows, for the creditors still answering."""
        live = [out for out in self.outgoing if out.creditor not in self.failed]
        return ([self.links.outgoing[out.creditor].fileno() for out in live],
                [self.links.peer_name(out.creditor) for out in live], [out.query_indices for out in live])

    def _fail(self, creditor: int) -> None:
        self.failed.add(creditor)
        self.links.shut(creditor)
        self._link_args = self._native_link_args()

    def attend(self, layer_index: int, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
               local_attention: Callable[[], tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        """One layer: query [T, Hq, D] and key/value [T, Hkv, D] are this step's new tokens."""
        live = [out for out in self.outgoing if out.creditor not in self.failed]
        for out in live:
            link = self.links.outgoing[out.creditor]
            metadata = self._metadata[out.creditor] if layer_index == 0 else b""
            # Indices ascend without repeats (ModelRunner.prepare): as many as the rows means all of them,
            # which go without a copy.
            payload = [_rows(query, out.query_indices), _rows(key, out.write_indices), _rows(value, out.write_indices)]
            if self._native is not None:
                sent = self._native.kv_send_query(link.fileno(), layer_index, metadata, payload, self.timeout)
            else:
                sent = _try(_ask, link, QUERY, layer_index, metadata, payload)
            if not sent:
                self._fail(out.creditor)
        local_out, local_lse = local_attention()
        live = [out for out in live if out.creditor not in self.failed]
        if self._native is not None:
            merged, _, answered = self._native.kv_merge_answers(*self._link_args, local_out.float().contiguous(),
                                                                local_lse.float().contiguous(), self.timeout)
            for out, ok in zip(live, answered.tolist()):
                if not ok:
                    self._fail(out.creditor)
            return merged.to(local_out.dtype)
        # Partials merge in fp32 (the creditors send them so), and only the merged rows take the model's dtype.
        outs, lses = [local_out.float()], [local_lse]
        for out_plan in live:
            num_queries = len(out_plan.query_indices)
            partial = torch.empty(num_queries * self.num_q_heads * (self.head_dim + 1), dtype=torch.float32)
            if not _try(receive_into, self.links.outgoing[out_plan.creditor], tensor_bytes(partial),
                        self.links.peer_name(out_plan.creditor)):
                self._fail(out_plan.creditor)
                continue
            out_part, lse_part = partial.to(local_out.device).split([num_queries * self.num_q_heads * self.head_dim,
                                                                     num_queries * self.num_q_heads])
            out_part = out_part.view(num_queries, self.num_q_heads, self.head_dim)
            lse_part = lse_part.view(num_queries, self.num_q_heads)
            # Rows without blocks on this creditor get an empty partial.
            if num_queries < len(local_out):
                out = torch.zeros_like(outs[0])
                lse = torch.full_like(local_lse, float("-inf"))
                out[out_plan.query_indices], lse[out_plan.query_indices] = out_part, lse_part
                out_part, lse_part = out, lse
            outs.append(out_part)
            lses.append(lse_part)
        merged, _ = merge_partials(torch.stack(outs), torch.stack(lses))
        return merged.to(local_out.dtype)


def _try(operation: Callable[..., None], *args) -> bool:
    """Run a send or receive on a link; False if the link ended, failed or stalled for its timeout."""
    try:
        operation(*args)
    except OSError:
        return False
    return True


def read_blocks(links: KVLinks, owner: int, block_ids: list[int], key_cache: torch.Tensor) -> torch.Tensor | None:
    """DGFM: the K and V of blocks of ``owner``'s pool (every layer, this rank's heads), from its KV server:
    [2, num_layers, len(block_ids), Hkv, block_size, D] on the CPU; None if ``owner`` failed to answer within
    the links' timeout (its links are then shut)."""
    link = links.outgoing[owner]
    blocks = torch.empty((2, key_cache.shape[0], len(block_ids), *key_cache.shape[2:]), dtype=key_cache.dtype)
    if (_try(_ask, link, FETCH, 0, array.array("q", block_ids).tobytes())
            and _try(receive_into, link, tensor_bytes(blocks), links.peer_name(owner))):
        return blocks
    links.shut(owner)
    return None


def write_blocks(blocks: torch.Tensor, block_ids: list[int], key_cache: torch.Tensor,
                 value_cache: torch.Tensor) -> None:
    """Store blocks read by ``read_blocks`` into blocks ``block_ids`` of this pool."""
    destination = torch.tensor(block_ids, dtype=torch.long, device=key_cache.device)
    key_cache[:, destination] = blocks[0].to(key_cache.device)
    value_cache[:, destination] = blocks[1].to(key_cache.device)


def fetch_blocks(links: KVLinks, transfers: list[Transfer], key_cache: torch.Tensor,
                 value_cache: torch.Tensor) -> set[int]:
    """DGFM: copy each transfer's block (every layer's K and V of this rank's heads) from its creditor's
    KV server into this pool; returns the creditors that failed to answer (their transfers' blocks hold nothing).
    key_cache/value_cache: [num_layers, num_blocks, Hkv, block_size, D]."""
    by_creditor: dict[int, list[Transfer]] = {}
    for transfer in transfers:
        by_creditor.setdefault(transfer.creditor, []).append(transfer)
    failed = set()
    for creditor, moves in by_creditor.items():
        blocks = read_blocks(links, creditor, [move.src_block for move in moves], key_cache)
        if blocks is None:
            failed.add(creditor)
        else:
            write_blocks(blocks, [move.dst_block for move in moves], key_cache, value_cache)
    return failed
