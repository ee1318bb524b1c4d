"""One streamed request as the load generator reads it, against canned Server-Sent Events (httpx's mock transport)."""
from __future__ import annotations

import asyncio
import json

import httpx

from megakv.bench.client import send_streaming


def events(*payloads: dict | str) -> bytes:
    return "".join(f"data: {p if isinstance(p, str) else json.dumps(p)}\n\n" for p in payloads).encode()


def send(status: int, body: bytes):
    transport = httpx.MockTransport(lambda request: httpx.Response(status, content=body))

    async def run():
        async with httpx.AsyncClient(transport=transport, timeout=5) as client:
            return await send_streaming(client, "http://server/v1/completions", {}, 7, 0.0)

    return asyncio.run(run())


def test_send_streaming_counts_token_events_and_takes_counts_from_usage():
    result = send(200, events({"choices": [{"text": "a"}]}, {"choices": [{"text": "bc"}]},
                              {"choices": [{"text": "", "finish_reason": "length"}]},
                              {"choices": [], "usage": {"prompt_tokens": 9, "completion_tokens": 4}}, "[DONE]"))
    assert result.success and result.error == ""
    assert (result.prompt_len, result.output_len, len(result.itl)) == (9, 4, 1)
    assert 0 < result.ttft <= result.latency


def test_send_streaming_chat_opening_chunk_is_not_a_token():
    result = send(200, events({"choices": [{"delta": {"role": "assistant", "content": ""}}]},
                              {"choices": [{"delta": {"content": "Hi"}}]}, "[DONE]"))
    assert result.success and result.output_len == 1 and result.itl == [] and result.prompt_len == 7


def test_send_streaming_reply_held_back_to_its_end_still_succeeds():
    result = send(200, events({"choices": [{"text": "", "finish_reason": "stop"}],
                               "usage": {"prompt_tokens": 3, "completion_tokens": 2}}, "[DONE]"))
    assert result.success and result.output_len == 2 and result.ttft > 0


def test_send_streaming_failures_are_kept_with_their_reason():
    rejected = send(400, json.dumps({"error": {"message": "the prompt has 5000 tokens"}}).encode())
    assert not rejected.success and rejected.error == "HTTP 400: the prompt has 5000 tokens"
    broken = send(200, events({"choices": [{"text": "a"}]}, {"error": {"message": "instance died"}}))
    assert not broken.success and broken.error == "error event: instance died"
    empty = send(200, events("[DONE]"))
    assert not empty.success and empty.error == "the response carried no token"
    garbled = send(200, b"data: {not json\n\n")
    assert not garbled.success and garbled.error.startswith("JSONDecodeError")
