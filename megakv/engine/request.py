"""A generation request and its progress."""
from __future__ import annotations

import enum
from dataclasses import dataclass, field

from megakv.engine.sampling import SamplingParams, TokenLogprobs


class RequestStatus(enum.Enum):
    """Where a request is in its life; the scheduler makes every transition (``TRANSITIONS``)."""

    # In the queue, never admitted (or admitted again on the gManager's turn after it yielded).
    WAITING = "waiting"
    # In the batch: it holds blocks, some perhaps still promised by a creditor.
    RUNNING = "running"
    # Its blocks were freed for another request of its instance; it waits first in line to recompute.
    PREEMPTED = "preempted"
    # Preempted because the instance that lent it blocks recalled them for a request of its own.
    RECALLED = "recalled"
    # It gave its blocks up for the gManager's first borrower and waits outside the queue for its turn.
    YIELDED = "yielded"
    FINISHED_STOPPED = "stop"
    FINISHED_LENGTH = "length"
    FINISHED_ABORTED = "abort"
    # Its sampling failed (the output's error says why).
    FINISHED_ERROR = "error"

    @property
    def is_finished(self) -> bool:
        return self in FINISHED

    @property
    def finish_reason(self) -> str | None:
        """The OpenAI finish_reason of a finished request ("stop", "length", "abort", "error"), else None."""
        return self.value if self.is_finished else None


FINISHED = frozenset({RequestStatus.FINISHED_STOPPED, RequestStatus.FINISHED_LENGTH, RequestStatus.FINISHED_ABORTED,
                      RequestStatus.FINISHED_ERROR})
_QUEUED = (RequestStatus.WAITING, RequestStatus.PREEMPTED, RequestStatus.RECALLED)
# Every legal transition: a request leaves the queue only to run, yield or be aborted; a running one is
# preempted, recalled, yields, or finishes in any way; one that yielded comes back on its turn.
TRANSITIONS: dict[RequestStatus, frozenset[RequestStatus]] = {
    **{status: frozenset({RequestStatus.RUNNING, RequestStatus.YIELDED, RequestStatus.FINISHED_ABORTED})
       for status in _QUEUED},
    RequestStatus.RUNNING: frozenset({RequestStatus.PREEMPTED, RequestStatus.RECALLED, RequestStatus.YIELDED,
                                      *FINISHED}),
    RequestStatus.YIELDED: frozenset({RequestStatus.WAITING, RequestStatus.FINISHED_ABORTED}),
    **{status: frozenset() for status in FINISHED},
}


def max_kv_tokens(num_prompt_tokens: int, max_new_tokens: int) -> int:
    """The most tokens whose KV a request ever holds: its last generated token is never fed back."""
    return num_prompt_tokens + max_new_tokens - 1


@dataclass
class Request:
    """One prompt being generated; its KV covers the first ``num_computed_tokens`` tokens."""

    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    output_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    status: RequestStatus = RequestStatus.WAITING
    # Instances that have held blocks of this request.
    block_instances: set[int] = field(default_factory=set)
    # Order of arrival at the engine's front (cluster-wide): the gManager serves borrowers in this order.
    arrival: int = 0
    # When params ask for prompt logprobs: entry i is prompt token i + 1's, as computed so far.
    prompt_logprobs: list[TokenLogprobs] = field(default_factory=list)
    # Prefix caching (megakv.kvcache.prefix_cache): the hashes of the request's full blocks computed so far, how
    # many of its blocks are recorded in the cache, and how many prompt tokens its first admission found cached.
    block_hashes: list[bytes] = field(default_factory=list)
    num_cached_blocks: int = 0
    num_cached_tokens: int = 0

    @property
    def token_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)


@dataclass(frozen=True)
class Placement:
    """Where a request's KV lived: blocks at the end, and every instance that ever held one."""

    num_local_blocks: int
    num_remote_blocks: int
    instances: list[int]


@dataclass(frozen=True)
class RequestOutput:
    """A request's progress after one step: its new tokens, and at the end why it finished and where its KV was.

    The ``new_token_ids`` of a request's outputs, concatenated, are its final ``token_ids``.
    """

    request_id: str
    prompt_ids: list[int]
    # Every token generated so far.
    token_ids: list[int]
    # The tokens generated in this step.
    new_token_ids: list[int]
    # None while the request runs; then "stop", "length", "abort", or "error" for a request that could not
    # be served (see error).
    finish_reason: str | None = None
    # Set on the last output of a request that held blocks.
    placement: Placement | None = None
    error: str | None = None
    # The instance that serves the request.
    instance: int | None = None
    # Logprobs of new_token_ids, one each, when the request's params ask for them.
    new_logprobs: list[TokenLogprobs] | None = None
    # On a request's first output, when its params ask for them: the logprobs of every prompt token after the
    # first (the first has no context to be predicted from).
    prompt_logprobs: list[TokenLogprobs] | None = None
    # Prompt tokens whose KV a cached prefix gave, not computed for this request.
    num_cached_tokens: int = 0

    @property
    def finished(self) -> bool:
        """True on a request's last output."""
        return self.finish_reason is not None
