"""One request's text as it is generated, and several requests' streams merged into one.

Leaving a stream early (a stop string, a client that went away, a sibling that
failed) closes the engine's generator, which aborts the request: its blocks go
back at once.
"""
from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass

from megakv.engine.async_engine import AsyncEngine
from megakv.engine.request import Placement, RequestOutput
from megakv.engine.sampling import SamplingParams, TokenLogprobs
from megakv.server.metrics import RequestTracker
from megakv.server.text import IncrementalDecoder, StopStringMatcher
from megakv.tokenizer import TextTokenizer


class RequestFailedError(RuntimeError):
    """The engine ended one request with an error (its sampling failed, say); the others go on."""


class ServerShuttingDownError(RuntimeError):
    """The server is stopping: a response still open ends with this error, and its requests are aborted."""


@dataclass(frozen=True)
class TextOptions:
    """How a request's tokens become its text."""

    stop_strings: list[str]
    # The stop string, or the text of the stop token, that ended the request stays in its text.
    include_stop_str_in_output: bool = False
    # Special tokens (EOS, chat markers) have no text.
    skip_special_tokens: bool = True


@dataclass(frozen=True)
class TextDelta:
    """What one step added to a request: text, token ids, and at the end why it finished."""

    text: str
    token_ids: list[int]
    # None until the last delta; then "stop" (EOS, a stop token or a stop string), "length" or "abort".
    finish_reason: str | None = None
    # The stop string or stop token id that ended the request (None for EOS and other reasons), as vLLM reports.
    stop_reason: str | int | None = None
    # Logprobs of token_ids, one each, when the request asked for them.
    logprobs: list[TokenLogprobs] | None = None
    # On the first delta, when the request asked for them: the logprobs of the prompt's tokens after the first.
    prompt_logprobs: list[TokenLogprobs] | None = None
    # On the last delta: the instance that served the request, and where its KV blocks were at the end (None
    # when the request never held a block, or when it was cut here and its caller did not wait for them).
    instance: int | None = None
    placement: Placement | None = None
    # Prompt tokens whose KV came from the prefix cache.
    num_cached_tokens: int = 0


async def generate_text(engine: AsyncEngine, prompt_ids: list[int], params: SamplingParams, request_id: str,
                        tokenizer: TextTokenizer | None, options: TextOptions, tracker: RequestTracker,
                        wait_for_placement: bool = False, after: asyncio.Event | None = None,
                        started: asyncio.Event | None = None) -> AsyncIterator[TextDelta]:
    """Serve one request, yielding its text as it grows; a stop string ends it there, once the request has
    ``params.min_tokens`` tokens. The request reaches the engine once ``after`` is set (if given), and sets
    ``started`` (if given) when its prompt has been computed, or when it ends without.

    The engine reports a request's block placement on its last output. A request cut here (a stop string, or a
    stop token under ignore_eos) is still running in the engine: with ``wait_for_placement`` it is aborted and
    its last delta waits for the abort's output, one step later, to report where its blocks were. A request
    left unfinished (its client went away, a sibling failed) is counted as aborted.
    """
    decoder = IncrementalDecoder(tokenizer, prompt_ids, options.skip_special_tokens) if tokenizer is not None else None
    matcher = StopStringMatcher(options.stop_strings, options.include_stop_str_in_output)
    stop_token_ids = set(params.stop_token_ids)
    num_generated, instance, ended = 0, None, "abort"
    try:
        if after is not None:
            await after.wait()
        async with aclosing(engine.generate(prompt_ids, params, request_id)) as outputs:
            async for output in outputs:
                if started is not None:
                    started.set()
                if output.error is not None:
                    ended = "error"
                    raise RequestFailedError(output.error)
                tracker.on_output(output)
                instance = output.instance
                token_ids, finish_reason, stop_reason = output.new_token_ids, output.finish_reason, None
                # Checked here too: the engine's ignore_eos also ignores stop tokens, vLLM's does not.
                stop_at = next((index for index, token in enumerate(token_ids) if token in stop_token_ids), None)
                if stop_at is not None:
                    token_ids, finish_reason, stop_reason = token_ids[:stop_at + 1], "stop", token_ids[stop_at]
                # As vLLM: the text of the EOS or stop token that ended the request is left out, unless asked.
                ends_on_token = finish_reason == "stop"
                text_ids = token_ids[:-1] if ends_on_token and not options.include_stop_str_in_output else token_ids
                new_text = decoder.push(text_ids) if decoder is not None else ""
                num_generated += len(token_ids)
                text = matcher.feed(new_text, finish_reason is not None, match=num_generated >= params.min_tokens)
                if matcher.matched is not None:
                    finish_reason, stop_reason = "stop", matcher.matched
                placement = output.placement
                if finish_reason is not None:
                    ended = None
                    tracker.finish(finish_reason, output.instance)
                    if wait_for_placement and not output.finished:
                        engine.abort(request_id)
                        placement = await _last_placement(outputs)
                logprobs = None if output.new_logprobs is None else output.new_logprobs[:len(token_ids)]
                yield TextDelta(text, token_ids, finish_reason, stop_reason, logprobs, output.prompt_logprobs,
                                output.instance, placement, output.num_cached_tokens)
                if finish_reason is not None:
                    # Leaving the loop closes the engine's generator: a request still running there is aborted.
                    return
    finally:
        if started is not None:
            started.set()
        if ended is not None:
            tracker.finish(ended, instance)


async def _last_placement(outputs: AsyncIterator[RequestOutput]) -> Placement | None:
    """The placement on a request's last output, skipping what it generated after it was cut."""
    async for output in outputs:
        if output.finished:
            return output.placement
    return None


_DONE = object()
_STOP = object()


async def merge(streams: list[AsyncIterator[TextDelta]],
                stop: asyncio.Event) -> AsyncIterator[tuple[int, TextDelta]]:
    """(index of its stream, delta) as each stream yields; the first error ends (and aborts) every stream, and
    so does ``stop``, with ServerShuttingDownError."""
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(index: int, stream: AsyncIterator[TextDelta]) -> None:
        try:
            async with aclosing(stream):
                async for delta in stream:
                    queue.put_nowait((index, delta))
        except Exception as err:  # handed to the consumer, which raises it
            queue.put_nowait((index, err))
            return
        queue.put_nowait((index, _DONE))

    tasks = [asyncio.create_task(pump(index, stream)) for index, stream in enumerate(streams)]
    # Stopping is one more item in the queue, so each delta costs a plain get.
    stopping = asyncio.ensure_future(stop.wait())
    stopping.add_done_callback(lambda waited: waited.cancelled() or queue.put_nowait((None, _STOP)))
    try:
        num_running = len(tasks)
        while num_running:
            index, item = await queue.get()
            if item is _STOP:
                raise ServerShuttingDownError("the server is shutting down: the request was aborted")
            if isinstance(item, Exception):
                raise item
            if item is _DONE:
                num_running -= 1
            else:
                yield index, item
    finally:
        stopping.cancel()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
