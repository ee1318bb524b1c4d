"""The DistKV data plane's C++ ends (kernels/kv_server_cpu.cpp) over real sockets: the KV server's loop
against the reference store and micro-attention, and the asking side's merge against merge_partials; a
link that closes or stalls costs only that link."""
from __future__ import annotations

import socket
import struct
import threading
import time

import pytest
import torch

from megakv.attention.remote import ServedQueries
from megakv.distkv.remote_attention import FETCH, STOP, _encode_plan
from megakv.kernels import cpu_attention
from megakv.kernels.cpu_build import runnable_isas
from megakv.kernels.kv_store import store_kv_ref
from megakv.kernels.merge import merge_partials_ref
from megakv.kernels.micro_attention import micro_attention_ref
from megakv.parallel.kv_links import receive_into, send_all, tensor_bytes

NUM_KV_HEADS, GROUP, BLOCK_SIZE, HEAD_DIM = 2, 4, 16, 64
NUM_Q_HEADS = NUM_KV_HEADS * GROUP
PEER = "rank 5 (instance 2)"
OTHER_PEER = "rank 7 (instance 3)"
# The links' timeout in these tests: a stalled peer is dropped after it.
TIMEOUT = 0.5


@pytest.fixture(params=runnable_isas())
def extension(request, monkeypatch):
    """The C++ module of every build this CPU runs."""
    monkeypatch.setenv("MEGAKV_CPU_ISA", request.param)
    module = cpu_attention.load_extension()
    if module is None:
        pytest.skip(f"the C++ CPU op ({request.param}) did not build here")
    return module


class Served:
    """kv_serve on one end of socket pairs (one per name), in a thread; the test asks on ``links``, the other
    ends (``link`` is the first)."""

    def __init__(self, extension, key_cache: torch.Tensor, value_cache: torch.Tensor,
                 names: tuple[str, ...] = (PEER,)) -> None:
        pairs = [socket.socketpair() for _ in names]
        self.links = [ours for ours, _ in pairs]
        self.link = self.links[0]
        self._theirs = [theirs for _, theirs in pairs]
        self.error: BaseException | None = None
        self.lost: list[str] | None = None
        self._thread = threading.Thread(target=self._serve, args=(extension, key_cache, value_cache, list(names)),
                                        daemon=True)
        self._thread.start()

    def _serve(self, extension, key_cache: torch.Tensor, value_cache: torch.Tensor, names: list[str]) -> None:
        try:
            self.lost = extension.kv_serve([theirs.fileno() for theirs in self._theirs], names, key_cache,
                                           value_cache, NUM_Q_HEADS, HEAD_DIM ** -0.5, TIMEOUT)
        except RuntimeError as error:
            self.error = error

    def ended(self) -> bool:
        """Whether kv_serve returned (or raised) within 30 s."""
        self._thread.join(timeout=30)
        return not self._thread.is_alive()


def header(kind: int, layer: int, metadata_size: int, payload_size: int) -> bytes:
    return struct.pack("<4q", kind, layer, metadata_size, payload_size)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("window", [None, 21])
def test_kv_serve_stores_attends_fetches_and_stops(extension, paged_batch, attention_close, dtype, window):
    query, key_cache, value_cache, tables, query_start_loc, context_lens = paged_batch(
        7, NUM_KV_HEADS, GROUP, BLOCK_SIZE, HEAD_DIM, dtype, [1, 5, 1], 90, absent_fraction=0.3)
    # Two layers of one layout; the second holds other values (NaN stays NaN: slots nobody wrote).
    key_cache, value_cache = torch.stack([key_cache, -1.5 * key_cache]), torch.stack([value_cache, 0.5 * value_cache])
    # The debtor's new K/V go to blocks no table holds (the pool has twice the blocks the tables need).
    free_block = next(block for block in range(key_cache.shape[1]) if block not in tables)
    write_slots = [free_block * BLOCK_SIZE + offset for offset in (0, 3, 4)]
    new_key, new_value = (torch.randn(3, NUM_KV_HEADS, HEAD_DIM).to(dtype) for _ in range(2))
    plan = ServedQueries(debtor=2, write_slots=write_slots, query_start_loc=query_start_loc,
                         context_lens=context_lens, block_tables=[row.tolist() for row in tables],
                         sliding_window=window)
    expected_keys, expected_values = key_cache.clone(), value_cache.clone()
    served = Served(extension, key_cache, value_cache)
    for layer, metadata in ((1, _encode_plan(plan)), (0, b"")):  # the plan comes with the step's first query
        assert extension.kv_send_query(served.link.fileno(), layer, metadata, [query, new_key, new_value], TIMEOUT)
        answer = torch.empty(len(query) * NUM_Q_HEADS * (HEAD_DIM + 1))
        receive_into(served.link, tensor_bytes(answer), "the KV server")
        out, lse = answer.split([len(query) * NUM_Q_HEADS * HEAD_DIM, len(query) * NUM_Q_HEADS])
        store_kv_ref(new_key, new_value, expected_keys[layer], expected_values[layer], torch.tensor(write_slots))
        expected_out, expected_lse = micro_attention_ref(query, expected_keys[layer], expected_values[layer], tables,
                                                         query_start_loc, context_lens, HEAD_DIM ** -0.5, window)
        attention_close(out.view(len(query), NUM_Q_HEADS, HEAD_DIM), lse.view(len(query), NUM_Q_HEADS),
                        expected_out, expected_lse, dtype)
    assert torch.equal(key_cache.nan_to_num(), expected_keys.nan_to_num())
    assert torch.equal(value_cache.nan_to_num(), expected_values.nan_to_num())
    # DGFM: every layer's K and V of the blocks asked for.
    block_ids = [free_block, int(tables[1, 0])]
    ids = struct.pack(f"<{len(block_ids)}q", *block_ids)
    send_all(served.link, [header(FETCH, 0, len(ids), 0), ids])
    blocks = torch.empty((2, 2, len(block_ids), NUM_KV_HEADS, BLOCK_SIZE, HEAD_DIM), dtype=dtype)
    receive_into(served.link, tensor_bytes(blocks), "the KV server")
    expected_blocks = torch.stack([key_cache[:, block_ids], value_cache[:, block_ids]])
    assert torch.equal(blocks.nan_to_num(), expected_blocks.nan_to_num())
    send_all(served.link, [header(STOP, 0, 0, 0)])
    assert served.ended() and served.error is None and served.lost == []


def fetch_one_block(link: socket.socket) -> torch.Tensor:
    """Ask the KV server behind ``link`` for block 0 (zeros) and return it."""
    ids = struct.pack("<q", 0)
    send_all(link, [header(FETCH, 0, len(ids), 0), ids])
    block = torch.empty(2, 1, 1, NUM_KV_HEADS, BLOCK_SIZE, HEAD_DIM)
    receive_into(link, tensor_bytes(block), "the KV server")
    return block


def test_kv_serve_drops_a_link_that_closes_between_requests_and_serves_the_others(extension):
    caches = [torch.zeros(1, 2, NUM_KV_HEADS, BLOCK_SIZE, HEAD_DIM) for _ in range(2)]
    served = Served(extension, *caches, names=(PEER, OTHER_PEER))
    served.links[0].close()
    assert torch.equal(fetch_one_block(served.links[1]), torch.zeros(2, 1, 1, NUM_KV_HEADS, BLOCK_SIZE, HEAD_DIM))
    send_all(served.links[1], [header(STOP, 0, 0, 0)])
    assert served.ended() and served.error is None and served.lost == [PEER]


def test_kv_serve_drops_a_link_that_closes_inside_a_request(extension):
    caches = [torch.zeros(1, 2, NUM_KV_HEADS, BLOCK_SIZE, HEAD_DIM) for _ in range(2)]
    served = Served(extension, *caches)
    send_all(served.link, [header(FETCH, 0, 16, 0), bytes(8)])
    served.link.close()
    assert served.ended() and served.error is None and served.lost == [PEER]


def test_kv_serve_drops_a_link_that_stalls_inside_a_request_after_the_timeout(extension):
    caches = [torch.zeros(1, 2, NUM_KV_HEADS, BLOCK_SIZE, HEAD_DIM) for _ in range(2)]
    served = Served(extension, *caches, names=(PEER, OTHER_PEER))
    started = time.monotonic()
    send_all(served.links[0], [header(FETCH, 0, 16, 0), bytes(8)])  # half its metadata, then nothing
    fetch_one_block(served.links[1])
    send_all(served.links[1], [header(STOP, 0, 0, 0)])
    assert served.ended() and served.error is None and served.lost == [PEER]
    assert TIMEOUT <= time.monotonic() - started < TIMEOUT + 5
    with pytest.raises(OSError):  # shut: the stalled peer's next request fails at once
        fetch_one_block(served.links[0])


def test_kv_serve_refuses_an_unknown_request(extension):
    caches = [torch.zeros(1, 2, NUM_KV_HEADS, BLOCK_SIZE, HEAD_DIM) for _ in range(2)]
    served = Served(extension, *caches)
    send_all(served.link, [header(9, 0, 0, 0)])
    assert served.ended()
    assert f"KV server: {PEER} sent a request this server does not know" in str(served.error)
    served.link.close()


def test_kv_merge_answers_equals_merge_partials_over_the_stacked_partials(extension, random_partials):
    outs, lses = random_partials(3, 3, torch.float32)  # [3, 5 rows, 4 heads, 64]: local, then two creditors
    rows = [[0, 2, 3], [1, 2, 3, 4]]
    links = [socket.socketpair() for _ in rows]
    for (_, creditor), partial, creditor_rows in zip(links, range(1, 3), rows):
        send_all(creditor, [tensor_bytes(outs[partial, creditor_rows]), tensor_bytes(lses[partial, creditor_rows])])
    out, lse, answered = extension.kv_merge_answers([ours.fileno() for ours, _ in links], [PEER, PEER], rows,
                                                    outs[0].contiguous(), lses[0].contiguous(), TIMEOUT)
    assert answered.tolist() == [True, True]
    # A row a creditor did not answer is an empty partial in the stack.
    for partial, creditor_rows in zip(range(1, 3), rows):
        absent = [row for row in range(5) if row not in creditor_rows]
        outs[partial, absent], lses[partial, absent] = 0, float("-inf")
    expected_out, expected_lse = cpu_attention.merge_partials_cpu(outs, lses)
    assert torch.equal(out, expected_out) and torch.equal(lse, expected_lse)
    reference_out, reference_lse = merge_partials_ref(outs, lses)
    torch.testing.assert_close(out, reference_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse, reference_lse)
    for ours, creditor in links:
        ours.close()
        creditor.close()


@pytest.mark.parametrize("fault", ["closes", "stalls"])
def test_kv_merge_answers_leaves_out_a_creditor_that_fails_and_names_it(extension, random_partials, fault):
    outs, lses = random_partials(3, 3, torch.float32)
    rows = [[0, 2, 3], [1, 2, 3, 4]]
    links = [socket.socketpair() for _ in rows]
    _, answering = links[1]
    send_all(answering, [tensor_bytes(outs[2, rows[1]]), tensor_bytes(lses[2, rows[1]])])
    _, failing = links[0]
    if fault == "closes":
        failing.close()
    else:  # half an answer, then silence
        send_all(failing, [tensor_bytes(outs[1, rows[0][:1]])])
    started = time.monotonic()
    out, lse, answered = extension.kv_merge_answers([ours.fileno() for ours, _ in links], [PEER, OTHER_PEER], rows,
                                                    outs[0].contiguous(), lses[0].contiguous(), TIMEOUT)
    assert time.monotonic() - started < TIMEOUT + 5
    assert answered.tolist() == [False, True]
    # The failed creditor is an empty partial everywhere: the merge is the local one's and the other's.
    outs[1], lses[1] = 0, float("-inf")
    absent = [row for row in range(5) if row not in rows[1]]
    outs[2, absent], lses[2, absent] = 0, float("-inf")
    expected_out, expected_lse = cpu_attention.merge_partials_cpu(outs, lses)
    assert torch.equal(out, expected_out) and torch.equal(lse, expected_lse)
    for ours, creditor in links:
        ours.close()
        creditor.close()


def test_kv_send_query_gives_up_on_a_creditor_that_stops_reading(extension):
    ours, theirs = socket.socketpair()
    payload = torch.zeros(16 << 20, dtype=torch.uint8)  # more than the socket buffers hold
    started = time.monotonic()
    assert not extension.kv_send_query(ours.fileno(), 0, b"", [payload], TIMEOUT)
    assert TIMEOUT <= time.monotonic() - started < TIMEOUT + 5
    ours.close()
    theirs.close()
