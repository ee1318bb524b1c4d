"""A whole DistKV cluster's control plane in one process (DistKV-LLM section 4.3), without MPI.

The same ``InstanceControl`` and ``GManager`` state machines as on a real cluster, with their messages
kept in one queue and delivered on demand, so that a test (or a simulation of many instances) can
interleave them in any order and check the bookkeeping after each.
"""
from __future__ import annotations

from collections import deque
from collections.abc import Callable

from megakv.distkv.control import GMANAGER_MESSAGES, InstanceControl
from megakv.distkv.gmanager import GManager
from megakv.kvcache.rmanager import RManager


class InProcessCluster:
    """A whole cluster's control plane in one process, for tests: messages queue until ``deliver``."""

    def __init__(self, rmanagers: list[RManager], on_yield: Callable[[int, str], bool],
                 on_turn: Callable[[int, str], bool], on_recall: Callable[[int, int, int], None],
                 on_lost: Callable[[int, list[str]], None] | None = None) -> None:
        """The callbacks are InstanceControl's, each with the instance it is called on first. A DGFM swap moves
        no KV here."""
        self.queue: deque[tuple[int, object]] = deque()
        self.gmanager = GManager([rm.num_lendable_blocks for rm in rmanagers])
        self.nodes = [InstanceControl(rm, self._post, lambda rid, i=rm.instance_id: on_yield(i, rid),
                                      lambda rid, i=rm.instance_id: on_turn(i, rid),
                                      lambda creditor, n, i=rm.instance_id: on_recall(i, creditor, n),
                                      lambda moves: None, lambda writes: None,
                                      lambda request_ids, i=rm.instance_id: on_lost and on_lost(i, request_ids))
                      for rm in rmanagers]

    def _post(self, instance_id: int, message: object) -> None:
        if isinstance(message, GMANAGER_MESSAGES) or instance_id not in self.gmanager.failed:
            self.queue.append((instance_id, message))

    def fail(self, instance_id: int) -> None:
        """The instance dies: what was sent to it is lost, what it sent may still arrive, and the gManager
        declares it failed."""
        self.queue = deque(entry for entry in self.queue
                           if isinstance(entry[1], GMANAGER_MESSAGES) or entry[0] != instance_id)
        self.queue.extend(self.gmanager.fail_instance(instance_id))

    def deliver_one(self) -> None:
        """Deliver the oldest queued message."""
        instance_id, message = self.queue.popleft()
        if not isinstance(message, GMANAGER_MESSAGES) and instance_id in self.gmanager.failed:
            return  # it is dead
        if isinstance(message, GMANAGER_MESSAGES):
            self.queue.extend(self.gmanager.handle(message))
        else:
            self.nodes[instance_id].handle(message)

    def deliver(self, max_messages: int = 10_000) -> None:
        """Deliver queued messages (and those they cause) until none is left."""
        for _ in range(max_messages):
            if not self.queue:
                return
            self.deliver_one()
        raise RuntimeError(f"the control plane did not settle within {max_messages} messages")
