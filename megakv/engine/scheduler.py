"""Continuous batching with chunked prefill over the rBlock pool.

Every step has a token budget. Running requests go first (a decode costs one
token, an unfinished prefill its next chunk), then waiting requests are
admitted while budget, batch slots and blocks last. Blocks are taken as the
requests grow; when the pool runs dry the most recently admitted request is
preempted (its blocks freed, its tokens recomputed later), as in vLLM. With
prefix caching, an admitted request starts with the cached blocks of its
prompt's longest cached prefix and computes only the rest; the blocks its
computed tokens fill are recorded for later requests.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Protocol

from megakv.config import SchedulerConfig
from megakv.engine.request import Request, RequestStatus
from megakv.kvcache.prefix_cache import extend_block_hashes
from megakv.kvcache.rmanager import RManager


class AdmissionPolicy(Protocol):
    """Who may be admitted, consulted by the scheduler (LocalAdmission below; megakv.distkv.policy for a cluster)."""

    def may_admit(self, request: Request) -> bool: ...

    def num_borrowable_blocks(self, request: Request) -> int: ...

    def on_preempt(self, request: Request) -> None: ...


class LocalAdmission:
    """One instance alone: every request may be admitted, and a preempted one simply waits its turn."""

    def may_admit(self, request: Request) -> bool:
        """Whether the scheduler may admit this waiting request now."""
        return True

    def num_borrowable_blocks(self, request: Request) -> int:
        """How many blocks beyond its pool's free ones the request may take now: one instance has no others."""
        return 0

    def on_preempt(self, request: Request) -> None:
        """The scheduler gave the request's blocks back."""


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

    def __init__(self, config: SchedulerConfig, rmanager: RManager, admission: AdmissionPolicy,
                 prefix_caching: bool = False) -> None:
        self.config = config
        self.rmanager = rmanager
        self.admission = admission
        self.prefix_caching = prefix_caching
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        # Requests preempted since start, for monitoring.
        self.num_preemptions = 0
        # Prompt tokens looked up in the prefix cache at admission, and those found, since start (vLLM's counts).
        self.num_prefix_cache_queries = 0
        self.num_prefix_cache_hits = 0

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
            num_cached = self._reuse_cached_prefix(request)
            num_new = min(request.num_tokens - request.num_computed_tokens, budget)
            borrowable = self.admission.num_borrowable_blocks(request)
            if not self.rmanager.can_grow(request.request_id, request.num_computed_tokens + num_new, borrowable):
                self._release(request)
                break
            self.num_prefix_cache_queries += len(request.prompt_ids) if num_cached is not None else 0
            self.num_prefix_cache_hits += num_cached or 0
            self.rmanager.grow(request.request_id, request.num_computed_tokens + num_new, borrowable)
            self.waiting.popleft()
            request.status = RequestStatus.RUNNING
            self.running.append(request)
            chunks.append(ScheduledChunk(request, request.num_computed_tokens, num_new))
            budget -= num_new
        return SchedulerOutput(chunks)

    def _reuse_cached_prefix(self, request: Request) -> int | None:
        """Give a request about to be admitted the cached blocks of its prompt's longest cached prefix; the
        prompt tokens they hold (None when the request does not look: caching is off, or it wants the logits of
        every prompt token). At least the prompt's last token is always computed, for the logits of the next."""
        if not self.prefix_caching or request.params.prompt_logprobs is not None or request.num_computed_tokens:
            return None
        block_size = self.rmanager.block_size
        # A prompt cached whole still computes its last block: its last token's logits give the next token.
        num_lookup = (len(request.prompt_ids) - 1) // block_size
        if len(request.block_hashes) < num_lookup:
            extend_block_hashes(request.block_hashes, request.prompt_ids, num_lookup * block_size, block_size,
                                request.params.cache_salt)
        block_ids = self.rmanager.cached_prefix(request.block_hashes[:num_lookup])
        if block_ids:
            self.rmanager.share_cached(request.request_id, block_ids)
        request.num_computed_tokens = request.num_cached_blocks = len(block_ids)
        request.num_computed_tokens *= block_size
        if not request.output_ids:
            request.num_cached_tokens = request.num_computed_tokens
        return request.num_computed_tokens

    def _release(self, request: Request) -> None:
        """A request that was not admitted after all lets go of the cached blocks it was given."""
        self.rmanager.free(request.request_id)
        request.num_computed_tokens = request.num_cached_blocks = 0

    def cache_computed_blocks(self, request: Request) -> None:
        """Record in the prefix cache the request's blocks that its computed tokens filled."""
        block_size = self.rmanager.block_size
        num_full = request.num_computed_tokens // block_size
        if not self.prefix_caching or num_full <= request.num_cached_blocks:
            return
        if len(request.block_hashes) < num_full:
            extend_block_hashes(request.block_hashes, request.prompt_ids + request.output_ids,
                                num_full * block_size, block_size, request.params.cache_salt)
        self.rmanager.cache_blocks(request.request_id, request.block_hashes[:num_full], request.num_cached_blocks)
        request.num_cached_blocks = num_full

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
        request.num_computed_tokens = request.num_cached_blocks = 0
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
