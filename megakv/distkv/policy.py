"""Cluster admission policy (DistKV-LLM section 4.3): first come, first served for requests that wait for room.

A request that had to give its blocks back because neither its instance nor the
cluster could hold its growth is marked as waiting for room. Such requests run one
at a time across the cluster, oldest arrival first: two of them admitted together
on different instances would grow into each other's memory and preempt each other
forever (seen with two long prompts on two instances whose pools hold one of them).
Requests that never ran out of room are not held. The scheduler consults the
policy through ``may_admit`` and ``on_preempt``; the cluster engine tells it, every
step, the oldest such request of the whole cluster.
"""
from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol


class Request(Protocol):
    """What the policy reads of a request (megakv.engine.request.Request)."""

    arrival: int
    waits_for_room: bool


class LocalAdmission:
    """One instance alone: every request may be admitted, and a preempted one simply waits its turn."""

    def may_admit(self, request: Request) -> bool:
        """Whether the scheduler may admit this waiting request now."""
        return True

    def on_preempt(self, request: Request) -> None:
        """The scheduler gave the request's blocks back."""


class ClusterAdmission:
    """Requests that waited for room run in arrival order across the cluster (see the module docstring)."""

    def __init__(self) -> None:
        # Arrival of the oldest unfinished request waiting for room anywhere in the cluster, as of the last
        # status exchange; None when there is none.
        self._oldest_waiting_for_room: int | None = None

    @staticmethod
    def oldest_waiting_for_room(requests: Iterable[Request]) -> int | None:
        """The arrival of the oldest of ``requests`` (one instance's unfinished ones) that waits for room."""
        return min((request.arrival for request in requests if request.waits_for_room), default=None)

    def update(self, oldest_by_instance: Iterable[int | None]) -> None:
        """Take the cluster-wide oldest from every instance's report of its own."""
        self._oldest_waiting_for_room = min((arrival for arrival in oldest_by_instance if arrival is not None),
                                            default=None)

    def may_admit(self, request: Request) -> bool:
        """A request waiting for room goes only when it is the oldest such request of the cluster."""
        oldest = self._oldest_waiting_for_room
        return not request.waits_for_room or oldest is None or request.arrival <= oldest

    def on_preempt(self, request: Request) -> None:
        """Losing its blocks for lack of room marks the request: it now waits its turn in the cluster."""
        request.waits_for_room = True
        if self._oldest_waiting_for_room is None or request.arrival < self._oldest_waiting_for_room:
            self._oldest_waiting_for_room = request.arrival
