"""A generation request and its progress."""
from __future__ import annotations

import enum
from dataclasses import dataclass, field

from megakv.engine.sampling import SamplingParams


class RequestStatus(enum.Enum):
    """Where a request is in its life."""

    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class Request:
    """One prompt being generated; its KV covers the first ``num_computed_tokens`` tokens."""

    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    output_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    status: RequestStatus = RequestStatus.WAITING
    # "stop" (an EOS token) or "length" (max_new_tokens or the model's maximum position).
    finish_reason: str | None = None
    # Instances that have held blocks of this request.
    block_instances: set[int] = field(default_factory=set)
    # Set when the cluster could not lend the blocks it needed: such requests are admitted in a
    # cluster-wide order (see megakv.distkv.cluster_engine) so that two cannot starve each other.
    waits_for_room: bool = False

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
    """The result of a finished (or rejected) request."""

    request_id: str
    prompt_ids: list[int]
    token_ids: list[int]
    # "stop", "length", or "error" for a request that could not be served (see error).
    finish_reason: str
    placement: Placement | None = None
    error: str | None = None
