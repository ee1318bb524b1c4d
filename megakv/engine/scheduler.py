"""Continuous batching with chunked prefill over the rBlock pool.

Every step has a token budget. Running requests go first (a decode costs one
token, an unfinished prefill its next chunk), then waiting requests are
admitted while budget, batch slots and blocks last. Blocks are taken as the
requests grow; when the pool runs dry the most recently admitted request is
preempted (its blocks freed, its tokens recomputed later), as in vLLM.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from typing import Protocol

from megakv.config import SchedulerConfig
from megakv.engine.request import Request, RequestStatus
from megakv.distkv.rmanager import RManager


class AdmissionPolicy(Protocol):
    """Who may be admitted, consulted by the scheduler (megakv.distkv.policy has the implementations)."""

    def may_admit(self, request: Request) -> bool: ...

    def num_borrowable_blocks(self, request: Request) -> int: ...

    def on_preempt(self, request: Request) -> None: ...


@dataclass(frozen=True)
class ScheduledChunk:
    """Tokens ``start:start + num_tokens`` of one request run in this step."""

    request: Request
    start: int
    num_tokens: int

    @property
    def samples_next_token(self) -> bool:
        """True when the chunk reaches the request's last token, so its logits give the next one."""
        return self.start + self.num_tokens == self.request.num_tokens

    @property
    def prompt_logprob_positions(self) -> range:
        """The chunk's positions whose logits give the logprob of the next prompt token, for a request that asks
        for prompt logprobs; a preempted request's recomputed chunks skip those it already has."""
        request = self.request
        if request.params.prompt_logprobs is None:
            return range(0)
        return range(max(self.start, len(request.prompt_logprobs)),
                     min(self.start + self.num_tokens, len(request.prompt_ids) - 1))


@dataclass(frozen=True)
class SchedulerOutput:
    """What one step runs, in batch order."""

    chunks: list[ScheduledChunk]

    @property
    def num_tokens(self) -> int:
        return sum(chunk.num_tokens for chunk in self.chunks)


class Scheduler:
    """Decides, step by step, which tokens of which requests run."""

    def __init__(self, config: SchedulerConfig, rmanager: RManager, admission: AdmissionPolicy) -> None:
        self.config = config
        self.rmanager = rmanager
        self.admission = admission
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        # Requests preempted since start, for monitoring.
        self.num_preemptions = 0

    def add(self, request: Request) -> None:
        """Queue a new request."""
        self.waiting.append(request)

    def has_unfinished(self) -> bool:
        """True while any request waits or runs."""
        return bool(self.waiting or self.running)

    def schedule(self) -> SchedulerOutput:
        """Pick this step's chunks: running requests first, then admit waiting ones."""
        budget = self.config.max_num_batched_tokens
        chunks: list[ScheduledChunk] = []
        preempted: list[Request] = []
        for request in list(self.running):
            if budget == 0:
                break
            if request not in self.running:
                continue  # preempted earlier in this loop to make room
            num_new = min(request.num_tokens - request.num_computed_tokens, budget)
            if not self._grow_or_preempt(request, request.num_computed_tokens + num_new, preempted):
                continue
            chunks.append(ScheduledChunk(request, request.num_computed_tokens, num_new))
            budget -= num_new
        while (self.waiting and budget > 0 and not preempted
               and len(self.running) < self.config.max_num_seqs):
            request = self.waiting[0]
            if not self.admission.may_admit(request):
                break
            num_new = min(request.num_tokens - request.num_computed_tokens, budget)
            borrowable = self.admission.num_borrowable_blocks(request)
            if not self.rmanager.can_grow(request.request_id, request.num_computed_tokens + num_new, borrowable):
                break
            self.rmanager.grow(request.request_id, request.num_computed_tokens + num_new, borrowable)
            self.waiting.popleft()
            request.status = RequestStatus.RUNNING
            self.running.append(request)
            chunks.append(ScheduledChunk(request, request.num_computed_tokens, num_new))
            budget -= num_new
        return SchedulerOutput(chunks)

    def _grow_or_preempt(self, request: Request, num_tokens: int, preempted: list[Request]) -> bool:
        """Make the request's table hold num_tokens, preempting later requests; False if it was preempted."""
        while not self.rmanager.can_grow(request.request_id, num_tokens,
                                         self.admission.num_borrowable_blocks(request)):
            victim = self.running[-1]
            self.preempt(victim)
            preempted.append(victim)
            if victim is request:
                return False
        self.rmanager.grow(request.request_id, num_tokens, self.admission.num_borrowable_blocks(request))
        return True

    def preempt(self, request: Request) -> None:
        """Free a running request's blocks and queue it first for recomputation."""
        self.running.remove(request)
        self.rmanager.free(request.request_id)
        self.num_preemptions += 1
        request.num_computed_tokens = 0
        request.status = RequestStatus.WAITING
        self.admission.on_preempt(request)
        self.waiting.appendleft(request)

    def remove(self, request_id: str) -> Request | None:
        """Take a request out of the queues wherever it is (an abort); its blocks are the caller's to free."""
        for queue in (self.waiting, self.running):
            for request in queue:
                if request.request_id == request_id:
                    queue.remove(request)
                    return request
        return None

    def finish(self, request: Request, reason: str) -> None:
        """Retire a request and give its blocks back."""
        request.status = RequestStatus.FINISHED
        request.finish_reason = reason
        self.running.remove(request)
        self.rmanager.free(request.request_id)
