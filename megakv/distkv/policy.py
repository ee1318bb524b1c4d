"""Cluster admission policy (DistKV-LLM section 4.3): first come, first served for requests that wait for room.

When the cluster cannot hold every request that wants room, the gManager serves
borrowers in arrival order and asks later ones that hold blocks without making
progress to yield them (megakv.distkv.gmanager): two long prompts on two instances
whose pools hold one of them would otherwise wait for each other forever. A request
that yielded waits for its turn outside its instance's queue.

Only a request that its own instance could not hold even with the whole pool
borrows, whether to be admitted or to grow; one that fits waits for local room, or
is preempted, as it would be on an independent instance. Borrowed blocks cost a
remote micro-attention in every later step of the instance's batch, and they crowd
the creditor's own requests, so lending pays only where it lets a request run at
all; and a creditor whose own request waits too long for the room it lent recalls
it (megakv.distkv.instance_loop). The scheduler consults the policy through ``may_admit``,
``num_borrowable_blocks`` and ``on_preempt``.
"""
from __future__ import annotations

from collections.abc import Sequence

from megakv.config import DistKVConfig
from megakv.engine.limits import KVCapacity
from megakv.engine.request import Request
from megakv.kvcache.block_pool import num_blocks_for
from megakv.kvcache.rmanager import RManager


class ClusterAdmission:
    """Admission on one instance of a cluster, where the gManager orders the requests that wait for room.

    While a running request of this instance waits for borrowed blocks, no one new is admitted: the pool's
    free blocks go to that request first. Only a request that the gManager gave its turn (it yielded its
    blocks to an earlier request, and is now first in line) is admitted regardless.
    """

    def __init__(self, rmanager: RManager, num_lendable_elsewhere: int) -> None:
        self._rmanager = rmanager
        # What the other instances may lend in all: their pools times the lending cap.
        self._num_lendable_elsewhere = num_lendable_elsewhere
        self._turns: set[str] = set()

    def give_turn(self, request_id: str) -> None:
        """The gManager's Turn for a request that yielded."""
        self._turns.add(request_id)

    def forget(self, request_id: str) -> None:
        """The request ended."""
        self._turns.discard(request_id)

    def may_admit(self, request: Request) -> bool:
        """Whether the scheduler may admit this waiting request now."""
        return request.request_id in self._turns or not self._rmanager.num_pending_blocks

    def num_borrowable_blocks(self, request: Request) -> int:
        """How many blocks beyond its pool's free ones the request may take now: what the cluster could still
        lend, for a request longer than this whole pool or one whose turn it is (the gManager serves it first);
        none for any other."""
        rmanager = self._rmanager
        if (request.request_id not in self._turns
                and num_blocks_for(request.num_tokens, rmanager.block_size) <= rmanager.pool.num_blocks):
            return 0
        return rmanager.num_borrowable_blocks(self._num_lendable_elsewhere)

    def on_preempt(self, request: Request) -> None:
        """The scheduler gave the request's blocks back: it waits its turn in this instance's queue (one that
        holds a gManager turn keeps it)."""


def cluster_kv_capacity(pool_blocks: int, num_instances: int, distkv: DistKVConfig,
                        failed: Sequence[int] = ()) -> KVCapacity:
    """The most blocks one request may hold: its pool of ``pool_blocks`` plus each other live instance's lendable
    share (every instance has the same pool and lending cap), of ``num_instances`` of which ``failed`` are out."""
    cap = distkv.lending_cap
    return KVCapacity(pool_blocks, num_instances - 1 - len(failed), int(cap * pool_blocks), cap, tuple(failed))
