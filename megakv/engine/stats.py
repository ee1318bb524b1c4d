"""A read-only snapshot of an engine's queues and KV pools, for monitoring (the server's /metrics)."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class InstanceStats:
    """One instance's requests and rBlock pool."""

    instance_id: int
    # Requests in the running batch, and queued ones (new, or preempted to wait for room).
    num_running: int
    num_waiting: int
    num_blocks: int
    num_free_blocks: int
    # Blocks of this pool held by other instances' requests, and blocks this instance's requests hold elsewhere.
    num_lent_blocks: int = 0
    num_borrowed_blocks: int = 0
    # Requests preempted (blocks freed, recomputed later) since start.
    num_preemptions: int = 0
    # Micro-attentions this instance's steps asked of other instances since start: one per request chunk and
    # creditor instance in a step (all layers together).
    num_remote_micro_attentions: int = 0
    # Requests of this instance preempted because a creditor recalled its blocks (megakv.distkv), since start.
    num_recalled: int = 0
    # Prefix caching: blocks whose content is cached (held or free; of the pool, or borrowed), and the prompt
    # tokens looked up and found at admission since start.
    num_cached_blocks: int = 0
    num_prefix_cache_queries: int = 0
    num_prefix_cache_hits: int = 0


@dataclass(frozen=True)
class EngineStats:
    """Every instance's stats and the cluster's counters (zero on one instance)."""

    instances: list[InstanceStats]
    num_borrow_events: int = 0
    num_blocks_borrowed: int = 0
    num_blocks_moved: int = 0
    # Of those, the blocks moved by DGFM swaps between two instances holding each other's blocks.
    num_blocks_swapped: int = 0
    # Blocks owed in the gManager's ledger, as "debtor->creditor": blocks (empty when every debt is settled), and
    # of them the kept loans: blocks a debtor keeps for their cached prefix while none of its requests holds them.
    ledger_outstanding: dict[str, int] = field(default_factory=dict)
    ledger_kept: dict[str, int] = field(default_factory=dict)
    # Instances the gManager declared failed (dead, hung or cut off), in that order, and the requests that ran
    # again on other instances because theirs failed.
    failed_instances: list[int] = field(default_factory=list)
    num_requests_recomputed: int = 0
