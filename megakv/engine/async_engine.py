"""An asyncio front over an engine: each request is an async generator of its outputs.

The engine's step loop runs in a thread of its own, so a web server's event loop
never waits for a forward pass. Requests and aborts reach the loop through a queue
and are applied between steps; each output goes back to its request's asyncio
queue. A consumer that stops iterating (a client that went away) aborts its
request, and the blocks it held go back at once. With nothing to run, the loop
thread sleeps on the queue: an idle engine takes no CPU.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import queue
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass

from megakv.engine.limits import ContextLimit
from megakv.engine.llm_engine import Engine
from megakv.engine.request import RequestOutput
from megakv.engine.sampling import SamplingParams
from megakv.engine.stats import EngineStats


@dataclass(frozen=True)
class _Add:
    prompt_ids: list[int]
    params: SamplingParams
    request_id: str | None
    instance: int | None
    loop: asyncio.AbstractEventLoop
    outputs: asyncio.Queue
    # Resolves to the request id, or to the RequestRejectedError that refused the request.
    added: concurrent.futures.Future


@dataclass(frozen=True)
class _Abort:
    request_id: str


@dataclass(frozen=True)
class _Stats:
    # Resolves to the engine's EngineStats.
    result: concurrent.futures.Future


_STOP = object()
# Work reached the engine other than through a command: step it if it has some.
_WAKE = object()


class EngineStoppedError(RuntimeError):
    """The engine loop stopped on an error: the request cannot go on, and no new one can start."""


class RequestRejectedError(ValueError):
    """The engine refused the request (a cluster that lost instances holds less than when it was checked)."""


class AsyncEngine:
    """Drives ``engine`` from a background thread; ``generate`` streams one request's outputs."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        # request id -> (event loop, queue) of its consumer; touched only by the loop thread.
        self._consumers: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._error: BaseException | None = None
        engine.set_waker(lambda: self._commands.put(_WAKE))
        self._thread = threading.Thread(target=self._run, name="megakv-engine-loop", daemon=True)
        self._thread.start()

    async def generate(self, prompt_ids: list[int], params: SamplingParams, request_id: str | None = None,
                       instance: int | None = None) -> AsyncIterator[RequestOutput]:
        """Add a request and yield its outputs until it finishes; raises RequestRejectedError if it is refused."""
        if self._error is not None:
            raise EngineStoppedError(f"the engine loop stopped: {self._error}")
        loop = asyncio.get_running_loop()
        outputs: asyncio.Queue = asyncio.Queue()
        added: concurrent.futures.Future = concurrent.futures.Future()
        self._commands.put(_Add(list(prompt_ids), params, request_id, instance, loop, outputs, added))
        if not self._thread.is_alive():
            self._reject_queued()
        request_id = await asyncio.wrap_future(added)
        finished = False
        try:
            while not finished:
                output = await outputs.get()
                if isinstance(output, BaseException):
                    raise EngineStoppedError(f"the engine loop stopped: {output}") from output
                finished = output.finished
                yield output
        finally:
            if not finished:
                self.abort(request_id)

    @property
    def is_running(self) -> bool:
        """False once the loop thread has stopped (shut down, or the engine failed)."""
        return self._thread.is_alive()

    @property
    def context_limit(self) -> ContextLimit:
        """What one request may hold now (read without waiting for a step)."""
        return self._engine.context_limit

    @property
    def failed_instances(self) -> list[int]:
        """Instances of the cluster declared failed (read without waiting for a step)."""
        return list(self._engine.failed_instances)

    @property
    def error(self) -> BaseException | None:
        """What stopped the loop thread when the engine failed; None while it runs or after a shutdown."""
        return self._error

    def abort(self, request_id: str) -> None:
        """Abort a request from any thread; its consumer gets a last output with finish_reason "abort"."""
        self._commands.put(_Abort(request_id))

    async def stats(self) -> EngineStats:
        """The engine's stats, read by the loop thread between two steps.

        An idle engine first runs one empty step: a cluster's front learns the other instances' pools
        only from the statuses a step exchanges, and blocks go back to their creditors in a step's round.
        """
        result: concurrent.futures.Future = concurrent.futures.Future()
        self._commands.put(_Stats(result))
        if not self._thread.is_alive():
            self._reject_queued()
        return await asyncio.wrap_future(result)

    def shutdown(self) -> None:
        """Stop the loop thread after the step it is in."""
        self._commands.put(_STOP)
        self._thread.join()

    def _apply(self, command: object) -> bool:
        """Apply one queued command; False for the stop command."""
        if command is _STOP:
            return False
        if command is _WAKE:
            return True
        if isinstance(command, _Abort):
            self._engine.abort(command.request_id)
            return True
        if isinstance(command, _Stats):
            if not self._engine.has_unfinished():
                for output in self._engine.step():
                    self._deliver(output, output.request_id)
            command.result.set_result(self._engine.stats())
            return True
        try:
            request_id = self._engine.add_request(command.prompt_ids, command.params, command.request_id,
                                                  command.instance)
        except ValueError as err:
            command.added.set_exception(RequestRejectedError(str(err)))
            return True
        self._consumers[request_id] = (command.loop, command.outputs)
        command.added.set_result(request_id)
        return True

    def _deliver(self, output: RequestOutput | BaseException, request_id: str) -> None:
        consumer = self._consumers.get(request_id)
        if consumer is None:
            return
        loop, outputs = consumer
        if not isinstance(output, RequestOutput) or output.finished:
            del self._consumers[request_id]
        try:
            loop.call_soon_threadsafe(outputs.put_nowait, output)
        except RuntimeError:  # the consumer's event loop is closed: nobody is listening
            pass

    def _run(self) -> None:
        running = True
        try:
            while running:
                # Block only when the engine has nothing to do: the idle engine sleeps here.
                if not self._engine.has_unfinished():
                    running = self._apply(self._commands.get())
                while running:
                    try:
                        running = self._apply(self._commands.get_nowait())
                    except queue.Empty:
                        break
                if running and self._engine.has_unfinished():
                    for output in self._engine.step():
                        self._deliver(output, output.request_id)
        except BaseException as err:  # the engine is broken: every consumer must hear it, not hang
            self._error = err
            for request_id in list(self._consumers):
                self._deliver(err, request_id)
            self._reject_queued()
            raise

    def _reject_queued(self) -> None:
        """Fail the requests and stats queries queued for a loop that has stopped."""
        while True:
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return
            if isinstance(command, _Add):
                future = command.added
            elif isinstance(command, _Stats):
                future = command.result
            else:
                continue
            if not future.done():
                future.set_exception(EngineStoppedError(f"the engine loop stopped: {self._error}"))
