"""The engine API: add requests at any time, abort them, step, and read each request's output as it grows.

``LLMEngine`` serves one instance (one TP group) by driving an ``InstanceCore``;
``megakv.distkv.cluster_engine.ClusterEngine`` offers the same calls over a DistKV
cluster. ``megakv generate``, the async front (``megakv.engine.async_engine``) and
the benchmarks use only the calls of :class:`Engine`.
"""
from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Protocol

import torch

from megakv.checkpoint.format import CheckpointInfo
from megakv.config import EngineConfig
from megakv.engine.core import InstanceCore
from megakv.engine.limits import ContextLimit, KVCapacity
from megakv.engine.request import Request, RequestOutput
from megakv.engine.sampling import SamplingParams
from megakv.engine.stats import EngineStats, InstanceStats


class Engine(Protocol):
    """What every front (CLI, server, benchmarks) uses of an engine."""

    # What one request may hold; add_request refuses a longer one with its words. A cluster's shrinks when
    # instances fail; any thread may read it.
    context_limit: ContextLimit
    # Instances declared failed, in that order (a cluster goes on without them); any thread may read it.
    failed_instances: list[int]

    def add_request(self, prompt_ids: list[int], params: SamplingParams, request_id: str | None = None,
                    instance: int | None = None) -> str:
        """Validate and queue a request (ValueError names what is wrong); returns its id."""

    def abort(self, request_id: str) -> None:
        """Stop a request and release its blocks; its last output has finish_reason "abort"."""

    def has_unfinished(self) -> bool:
        """True while any request waits, runs, or has an output not yet returned by step()."""

    def step(self) -> list[RequestOutput]:
        """Run one step; returns what each request gained in it (new tokens, then its finish)."""

    def stats(self) -> EngineStats:
        """Each instance's queues and pool, read between steps (the server's /metrics)."""

    def set_waker(self, wake: Callable[[], None]) -> None:
        """Have ``wake`` called, from any thread, when work reaches the idle engine other than through its methods
        (a cluster hears that an instance failed), so that whoever stops stepping an idle engine steps it again."""


def generate(engine: Engine, prompts: list[list[int]], params: list[SamplingParams],
             instances: list[int | None] | None = None) -> list[RequestOutput]:
    """Serve a batch of prompts to completion; final outputs in prompt order.

    A prompt that can never be served gets an output with finish_reason "error" and the reason in
    ``error``; the others are served.
    """
    finals: dict[str, RequestOutput] = {}
    ids = []
    for index, (prompt_ids, request_params) in enumerate(zip(prompts, params)):
        instance = instances[index] if instances is not None else None
        try:
            ids.append(engine.add_request(prompt_ids, request_params, instance=instance))
        except ValueError as err:
            request_id = f"rejected-{index}"
            ids.append(request_id)
            finals[request_id] = RequestOutput(request_id, list(prompt_ids), [], [], "error", error=str(err))
    while engine.has_unfinished():
        for output in engine.step():
            if output.finished:
                finals[output.request_id] = output
    return [finals[request_id] for request_id in ids]


class LLMEngine:
    """The engine of one instance: requests go straight to its core."""

    def __init__(self, info: CheckpointInfo, config: EngineConfig, dtype: torch.dtype | None = None,
                 device: torch.device | None = None) -> None:
        self.core = InstanceCore(info, config, dtype=dtype, device=device)
        self.model_config = info.model
        self.rmanager = self.core.rmanager
        self.failed_instances: list[int] = []
        self.context_limit = ContextLimit(info.model.max_position_embeddings, config.cache.block_size,
                                          KVCapacity(self.rmanager.pool.num_blocks))
        self._request_counter = itertools.count()
        self._request_ids: set[str] = set()
        # Outputs produced between steps (aborts), returned by the next step().
        self._pending_outputs: list[RequestOutput] = []

    @property
    def step_log(self) -> list[tuple[int, float]]:
        """(tokens run, wall seconds) of every step."""
        return self.core.step_log

    def validate(self, prompt_ids: list[int], params: SamplingParams) -> None:
        """Raise ValueError naming the problem when a request can never be served."""
        self.core.validate(prompt_ids, params, self.context_limit)

    def add_request(self, prompt_ids: list[int], params: SamplingParams, request_id: str | None = None,
                    instance: int | None = None) -> str:
        """Validate and queue a request; returns its id."""
        if instance not in (None, 0):
            raise ValueError(f"instance {instance} does not exist: this engine serves one instance")
        if request_id is None:
            request_id = f"request-{next(self._request_counter)}"
        if request_id in self._request_ids:
            raise ValueError(f"request id {request_id!r} is already in use")
        self.validate(prompt_ids, params)
        self.core.add(Request(request_id, list(prompt_ids), params))
        self._request_ids.add(request_id)
        return request_id

    def abort(self, request_id: str) -> None:
        """Stop a request and release its blocks; a request that already finished is left alone."""
        output = self.core.abort(request_id)
        if output is not None:
            self._pending_outputs.append(output)

    def has_unfinished(self) -> bool:
        """True while any request waits, runs, or has an output not yet returned."""
        return bool(self._pending_outputs) or self.core.has_unfinished()

    def step(self) -> list[RequestOutput]:
        """Run one step (if anything runs); returns each request's progress in it."""
        outputs, self._pending_outputs = self._pending_outputs, []
        if self.core.has_unfinished():
            outputs += self.core.step()
        for output in outputs:
            if output.finished:
                self._request_ids.discard(output.request_id)
        return outputs

    def stats(self) -> EngineStats:
        """This instance's queues and pool, as they are between steps."""
        scheduler = self.core.scheduler
        return EngineStats([InstanceStats(self.rmanager.instance_id, len(scheduler.running), scheduler.num_waiting,
                                          self.rmanager.pool.num_blocks, self.rmanager.num_free_blocks,
                                          num_preemptions=scheduler.num_preemptions,
                                          num_cached_blocks=self.rmanager.pool.num_cached_blocks,
                                          num_prefix_cache_queries=scheduler.num_prefix_cache_queries,
                                          num_prefix_cache_hits=scheduler.num_prefix_cache_hits)])

    def set_waker(self, wake: Callable[[], None]) -> None:
        """Nothing reaches one instance but through its methods: ``wake`` is never needed."""

    def generate(self, prompts: list[list[int]], params: list[SamplingParams]) -> list[RequestOutput]:
        """Serve a batch of prompts to completion (see :func:`generate`)."""
        return generate(self, prompts, params)

    def prompt_logits(self, prompt_ids: list[int]) -> torch.Tensor:
        """Logits [len(prompt), vocab] at every prompt position, by chunked prefill through the KV pool."""
        self.validate(prompt_ids, SamplingParams(max_new_tokens=1))
        return self.core.prompt_logits(f"prompt-logits-{next(self._request_counter)}", prompt_ids)
