"""Continuous batching with chunked prefill over the rBlock pool.

Every step has a token budget. Running requests go first (a decode costs one
token, an unfinished prefill its next chunk), then waiting requests are
admitted while budget, batch slots and blocks last. Blocks are taken as the
requests grow; when the pool runs dry the most recently admitted request is
preempted (its blocks freed, its tokens recomputed later), as in vLLM. With
prefix caching, an admitted request starts with the cached blocks of its
prompt's longest cached prefix and computes only the rest; the blocks its
computed tokens fill are recorded for later requests.

The scheduler is the only editor of its queues, and every change of a request's
status is one of RequestStatus's transitions, made here (as vLLM v1's scheduler
owns RequestStatus): the engine and the cluster's control plane ask for a
preemption, a yield, a turn, an abort or a finish, and the scheduler moves the
request and frees its blocks.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Protocol

from megakv.config import SchedulerConfig
from megakv.engine.request import TRANSITIONS, Request, RequestStatus
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
        # Requests that yielded their blocks to the gManager's first borrower, by id, until their turn.
        self.yielded: dict[str, Request] = {}
        # Requests preempted since start, for monitoring.
        self.num_preemptions = 0
        # Prompt tokens looked up in the prefix cache at admission, and those found, since start (vLLM's counts).
        self.num_prefix_cache_queries = 0
        self.num_prefix_cache_hits = 0

    def add(self, request: Request) -> None:
        """Queue a new request."""
        self.waiting.append(request)

    def has_unfinished(self) -> bool:
        """True while any request waits, runs, or awaits its turn."""
        return bool(self.waiting or self.running or self.yielded)

    @property
    def num_waiting(self) -> int:
        """Requests not running: queued, or awaiting their turn."""
        return len(self.waiting) + len(self.yielded)

    def unfinished(self) -> list[Request]:
        """Every request here that has not finished."""
        return [*self.running, *self.waiting, *self.yielded.values()]

    def find(self, request_id: str) -> Request | None:
        """The unfinished request with this id, wherever it is."""
        return next((request for request in self.unfinished() if request.request_id == request_id), None)

    def _move(self, request: Request, status: RequestStatus) -> None:
        assert status in TRANSITIONS[request.status], \
            f"request {request.request_id} cannot go from {request.status.name} to {status.name}"
        request.status = status

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
            self._move(request, RequestStatus.RUNNING)
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
        refs = self.rmanager.cached_prefix(request.block_hashes[:num_lookup])
        if refs:
            self.rmanager.share_cached(request.request_id, refs)
        request.num_computed_tokens = request.num_cached_blocks = len(refs)
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

    def preempt(self, request: Request, status: RequestStatus = RequestStatus.PREEMPTED) -> None:
        """Free a running request's blocks and queue it first for recomputation (``status``: PREEMPTED, or
        RECALLED when the instance that lent it blocks wants them back)."""
        self._free_running(request)
        self._move(request, status)
        self.admission.on_preempt(request)
        self.waiting.appendleft(request)

    def _free_running(self, request: Request) -> None:
        self.running.remove(request)
        self.rmanager.free(request.request_id)
        self.num_preemptions += 1
        request.num_computed_tokens = request.num_cached_blocks = 0

    def yield_blocks(self, request_id: str) -> bool:
        """The gManager's Yield: a request that waits for borrowed blocks, or for room, gives its blocks back and
        leaves the queue until its turn (give_turn), so that the requests behind it are not held up. False for
        one that runs without waiting (its pool filled its need meanwhile) or is not here."""
        request = self.find(request_id)
        if request is None or request.status == RequestStatus.YIELDED:
            return request is not None
        if request.status == RequestStatus.RUNNING:
            if not self.rmanager.has_pending(request_id):
                return False
            self._free_running(request)
        else:
            self.waiting.remove(request)
        self._move(request, RequestStatus.YIELDED)
        self.yielded[request_id] = request
        return True

    def give_turn(self, request_id: str) -> bool:
        """The gManager's Turn: the request that yielded goes first in the queue. False if it had not yielded
        (or has ended)."""
        request = self.yielded.pop(request_id, None)
        if request is None:
            return False
        self._move(request, RequestStatus.WAITING)
        self.waiting.appendleft(request)
        return True

    def abort(self, request_id: str) -> Request | None:
        """Stop a request wherever it is and free its blocks; None if it is not here."""
        request = self.find(request_id)
        if request is None:
            return None
        if request.status == RequestStatus.RUNNING:
            self.running.remove(request)
        elif request.status == RequestStatus.YIELDED:
            del self.yielded[request_id]
        else:
            self.waiting.remove(request)
        self.rmanager.free(request_id)
        self._move(request, RequestStatus.FINISHED_ABORTED)
        return request

    def finish(self, request: Request, status: RequestStatus) -> None:
        """Retire a running request that stopped, reached its length or failed, and give its blocks back."""
        self._move(request, status)
        self.running.remove(request)
        self.rmanager.free(request.request_id)
