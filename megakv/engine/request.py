"""A generation request and its progress."""
from __future__ import annotations

import enum
from dataclasses import dataclass, field

from megakv.engine.sampling import SamplingParams


class RequestStatus(enum.Enum):
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

    @property
    def token_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def max_kv_tokens(self) -> int:
        """Tokens whose K/V the request may ever store (the last generated token is never fed back)."""
        return len(self.prompt_ids) + self.params.max_new_tokens - 1


@dataclass(frozen=True)
class RequestOutput:
    """The result of a finished request."""

    request_id: str
    prompt_ids: list[int]
    token_ids: list[int]
    finish_reason: str
