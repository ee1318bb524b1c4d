"""A client that goes away aborts its request (every block goes back), and SIGTERM stops the server cleanly: open
responses end with an error at once."""
from __future__ import annotations

import json
import signal
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from megakv.bench.server_metrics import scrape, total

from server_process import spawn_server, wait_for_idle_pools

# Every test here starts subprocesses, servers or models: the full run's, not the quick one's.
pytestmark = pytest.mark.slow

# 4096 tokens of KV: a request with EOS ignored runs for seconds, long enough to be cut off.
NUM_BLOCKS = 256
MAX_TOKENS = 4000


@pytest.fixture(scope="module")
def server(chat_model):
    server = spawn_server(chat_model[1], "--num-blocks", str(NUM_BLOCKS), "--served-model-name", "tiny")
    yield server
    server.kill()


def long_request(stream: bool) -> dict:
    return {"model": "tiny", "prompt": "Go", "max_tokens": MAX_TOKENS, "ignore_eos": True, "stream": stream}


def generated_since(before: dict[str, float], after: dict[str, float]) -> float:
    return total(after, "megakv:generation_tokens_total") - total(before, "megakv:generation_tokens_total")


def assert_counted_as_aborted(before: list, after: list) -> None:
    """One more request finished, and it was aborted (vLLM's finished_reason "abort")."""
    assert total(after, "megakv:request_success_total") == total(before, "megakv:request_success_total") + 1
    aborted = total(after, "megakv:request_success_total", finished_reason="abort")
    assert aborted == total(before, "megakv:request_success_total", finished_reason="abort") + 1


def test_stream_disconnect_aborts_the_request_and_frees_its_blocks(server):
    before = scrape(server.url)
    with httpx.stream("POST", f"{server.url}/v1/completions", json=long_request(True), timeout=30) as response:
        assert response.status_code == 200
        # Read three events without leaving the iterator, which would close the connection.
        lines = response.iter_lines()
        events = [line for line in (next(lines) for _ in range(6)) if line.startswith("data: ")]
        assert len(events) == 3
        running = scrape(server.url)
        assert total(running, "megakv:num_requests_running") == 1
        assert total(running, "megakv:kv_blocks_free") < NUM_BLOCKS
    samples = wait_for_idle_pools(server.url, timeout=30)
    assert 2 <= generated_since(before, samples) < MAX_TOKENS
    assert_counted_as_aborted(before, samples)


def test_disconnect_before_a_whole_response_aborts_the_request(server):
    before = scrape(server.url)
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server.url}/v1/completions", json=long_request(False), timeout=httpx.Timeout(30, read=1.0))
    samples = wait_for_idle_pools(server.url, timeout=30)
    assert 0 < generated_since(before, samples) < MAX_TOKENS
    assert_counted_as_aborted(before, samples)


def test_sigterm_stops_the_server_cleanly(chat_model):
    server = spawn_server(chat_model[1], "--num-blocks", "16")
    try:
        started = time.monotonic()
        assert server.stop(signal.SIGTERM) == 0, server.output
        assert time.monotonic() - started < 15
    finally:
        server.kill()


def test_sigterm_ends_open_streams_with_an_error_event_and_no_traceback(chat_model):
    server = spawn_server(chat_model[1], "--num-blocks", str(NUM_BLOCKS), "--served-model-name", "tiny")
    try:
        streams = [httpx.stream("POST", f"{server.url}/v1/completions", json=long_request(True), timeout=30)
                   for _ in range(2)]
        responses = [stream.__enter__() for stream in streams]
        lines = [response.iter_lines() for response in responses]
        for response_lines in lines:
            assert next(response_lines).startswith("data: ")
        with ThreadPoolExecutor(1) as pool:
            whole = pool.submit(httpx.post, f"{server.url}/v1/completions", json=long_request(False), timeout=30)
            time.sleep(0.5)
            started = time.monotonic()
            assert server.stop(signal.SIGTERM) == 0, server.output
            assert time.monotonic() - started < 4  # well within the 5 s grace period: nothing waited for it
            answer = whole.result(timeout=30)
        assert answer.status_code == 503 and answer.json()["error"]["type"] == "ServiceUnavailableError"
        for response_lines in lines:
            events = [line[len("data: "):] for line in response_lines if line.startswith("data: ")]
            assert events[-1] == "[DONE]"
            error = json.loads(events[-2])["error"]
            assert error["code"] == 503 and "shutting down" in error["message"]
        for stream in streams:
            stream.__exit__(None, None, None)
        assert "Traceback" not in server.output and "CancelledError" not in server.output, server.output
    finally:
        server.kill()
