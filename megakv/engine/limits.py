"""What one request may hold, defined once: every entry point refuses the same requests with the same words.

The engine builds its ``ContextLimit`` when it starts; its own validation (``megakv generate``, the
engine API) and the HTTP server's read that one object. As in vLLM, a request holds
its prompt and every token it may generate (``max_model_len``), so the bound is the least of the
model's positions and the KV its instance and the cluster may give it.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class KVCapacity:
    """The most KV blocks one request may hold: its instance's pool plus what the other instances may lend."""

    num_local_blocks: int
    num_other_instances: int = 0
    # What each other instance may lend: its pool times lending_cap, rounded down.
    num_lendable_blocks_per_instance: int = 0
    lending_cap: float = 1.0
    # Instances of the cluster declared failed: they lend nothing.
    failed_instances: tuple[int, ...] = ()

    @property
    def num_lendable_elsewhere(self) -> int:
        """What the other instances may lend in all."""
        return self.num_other_instances * self.num_lendable_blocks_per_instance

    @property
    def num_blocks(self) -> int:
        return self.num_local_blocks + self.num_lendable_elsewhere

    def describe(self) -> str:
        """Where the blocks come from, for a request that needs more."""
        local = f"its instance holds {self.num_local_blocks}"
        if self.num_other_instances == 0:
            return local + self.failures
        noun = "instance" if self.num_other_instances == 1 else "instances"
        return f"{local} and the other {self.num_other_instances} {noun} may lend {self.num_lendable_elsewhere} " \
               f"(--lending-cap {self.lending_cap}){self.failures}"

    @property
    def failures(self) -> str:
        """The failed instances, in words after what the others hold; "" when none failed."""
        return f" (instances {list(self.failed_instances)} failed)" if self.failed_instances else ""


@dataclass(frozen=True)
class ContextLimit:
    """How many tokens (prompt and generated) one request may hold, and what sets that bound."""

    max_positions: int
    block_size: int
    capacity: KVCapacity

    @property
    def kv_tokens(self) -> int:
        """The tokens of KV one request may use."""
        return self.capacity.num_blocks * self.block_size

    @property
    def max_model_len(self) -> int:
        return min(self.max_positions, self.kv_tokens)

    @property
    def reason(self) -> str:
        """What sets max_model_len, in words."""
        if self.max_positions <= self.kv_tokens:
            return "the model's maximum position"
        blocks = f"{self.capacity.num_blocks} blocks of {self.block_size} tokens"
        if self.capacity.num_other_instances == 0:
            return f"the KV memory it may use: {blocks}, its instance's pool{self.capacity.failures}"
        return f"the KV memory it may use: {blocks}, as {self.capacity.describe()}"

    def check(self, num_prompt_tokens: int, max_new_tokens: int, field: str = "max_new_tokens") -> None:
        """Raise ValueError when a prompt of ``num_prompt_tokens`` and ``max_new_tokens`` (the request's field
        ``field``) can never be served."""
        total = num_prompt_tokens + max_new_tokens
        if total > self.max_model_len:
            raise ValueError(f"prompt ({num_prompt_tokens} tokens) + {field} ({max_new_tokens}) = {total} exceeds "
                             f"the {self.max_model_len} tokens a request may hold ({self.reason})")
