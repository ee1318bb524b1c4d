"""The HTTP side of ``megakv bench serve``: one streamed request timed token by token, and the server's helpers.

Works with any OpenAI-compatible server. A token arrives with the Server-Sent Event
that carries its text (or its ids, for servers that send them); output and prompt
token counts come from the usage chunk that ``stream_options.include_usage`` asks for.
A request fails when the server answers an HTTP error, sends an error event, breaks
the stream, or the request times out: it is recorded with its reason, never dropped.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

import httpx

# How much of an error body a failed request keeps: enough for the server's message.
MAX_ERROR_CHARS = 500


@dataclass
class RequestResult:
    """What the client saw of one request; times in seconds."""

    success: bool = False
    # Why it failed ("" when it succeeded).
    error: str = ""
    # Prompt tokens as the server counted them (usage), else as the dataset counted them (None: unknown).
    prompt_len: int | None = None
    # Generated tokens as the server counted them (usage), else the number of token events.
    output_len: int = 0
    # When it was sent, after the benchmark's start.
    send_time: float = 0.0
    # Time to the first token; 0 until a token arrives.
    ttft: float = 0.0
    # Gaps between consecutive token events after the first.
    itl: list[float] = field(default_factory=list)
    # From sending to the end of the response.
    latency: float = 0.0


def error_message(status_code: int, body: bytes) -> str:
    """One line for a failed HTTP answer: its status and the server's own message when it sent one."""
    text = body.decode(errors="replace")
    try:
        message = json.loads(text)["error"]["message"]
    except (ValueError, KeyError, TypeError):
        message = text
    return f"HTTP {status_code}: {' '.join(message.split())[:MAX_ERROR_CHARS]}"


def chunk_has_token(choice: dict[str, Any], first: bool) -> bool:
    """True when a streamed choice carries generated text (or token ids); for the ``first`` token, also when it
    finishes the reply: a server may hold back tokens that are not yet whole characters until the end."""
    delta = choice.get("delta") or {}
    return bool(choice.get("text") or delta.get("content") or choice.get("token_ids")
                or (first and choice.get("finish_reason")))


async def send_streaming(client: httpx.AsyncClient, url: str, payload: dict[str, Any], prompt_len: int | None,
                         benchmark_start: float) -> RequestResult:
    """POST one streamed completion or chat request and time its tokens."""
    result = RequestResult(prompt_len=prompt_len)
    start = time.perf_counter()
    result.send_time = start - benchmark_start
    last_token = start
    num_token_events = 0
    usage = None
    try:
        async with client.stream("POST", url, json=payload) as response:
            if response.status_code != 200:
                result.error = error_message(response.status_code, await response.aread())
                return result
            async for line in response.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[len("data:"):].strip()
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    result.error = f"error event: {chunk['error'].get('message', chunk['error'])}"
                    return result
                usage = chunk.get("usage") or usage
                if any(chunk_has_token(choice, num_token_events == 0) for choice in chunk.get("choices") or []):
                    now = time.perf_counter()
                    if num_token_events == 0:
                        result.ttft = now - start
                    else:
                        result.itl.append(now - last_token)
                    last_token = now
                    num_token_events += 1
    except httpx.TimeoutException:
        result.error = f"timed out: no answer for {client.timeout.read} s (--request-timeout)"
        return result
    except (httpx.HTTPError, ValueError) as err:
        result.error = f"{type(err).__name__}: {err}"
        return result
    finally:
        result.latency = time.perf_counter() - start
    if num_token_events == 0:
        result.error = "the response carried no token"
        return result
    result.success = True
    result.output_len = usage["completion_tokens"] if usage else num_token_events
    if usage and usage.get("prompt_tokens") is not None:
        result.prompt_len = usage["prompt_tokens"]
    return result


class ServerAPI:
    """The server's model list and, where it has them, vLLM's /tokenize and /detokenize routes."""

    def __init__(self, client: httpx.AsyncClient, base_url: str) -> None:
        self.client = client
        self.base_url = base_url.rstrip("/")

    async def _request(self, method: str, route: str, what: str, body: dict | None = None) -> dict[str, Any]:
        try:
            response = await self.client.request(method, f"{self.base_url}{route}", json=body)
        except httpx.HTTPError as err:
            raise RuntimeError(f"{what}: cannot reach {self.base_url}{route} ({type(err).__name__}: {err}); "
                               f"check --base-url") from None
        if response.status_code != 200:
            raise RuntimeError(f"{what}: {route} answered {error_message(response.status_code, response.content)}")
        return response.json()

    async def first_model(self) -> str:
        """The id of the first model /v1/models lists."""
        models = (await self._request("GET", "/v1/models", "finding the model (give --model to skip this)"))
        if not models.get("data"):
            raise RuntimeError(f"{self.base_url}/v1/models lists no model: pass --model")
        return models["data"][0]["id"]

    async def tokenize(self, text: str, model: str, what: str) -> list[int]:
        """The server's token ids of ``text`` (no special tokens added); ``what`` says who needs them."""
        body = {"model": model, "prompt": text, "add_special_tokens": False}
        return (await self._request("POST", "/tokenize", what, body))["tokens"]

    async def detokenize(self, token_ids: list[int], model: str, what: str) -> str:
        """The server's text of ``token_ids``."""
        return (await self._request("POST", "/detokenize", what, {"model": model, "tokens": token_ids}))["prompt"]
