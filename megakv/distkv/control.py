"""The control round of one step: heartbeats, grants, lending, returns and DGFM, over a transport.

The round is bulk-synchronous: every instance runs the same phases, and between
phases the transport delivers what each posted. The MPI transport does that with
one all-to-all among the instances' leader ranks; the in-process transport lets
unit tests run a whole cluster in one process.
"""
from __future__ import annotations

import pickle
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from megakv.distkv.gmanager import GManager
from megakv.distkv.messages import (ClusterView, Grant, Heartbeat, LendReply, LendRequest, MovePlan,
                                    ReturnBlocks)
from megakv.distkv.rmanager import RManager

if TYPE_CHECKING:
    from mpi4py import MPI

GMANAGER_INSTANCE = 0


class Transport(Protocol):
    """Bulk-synchronous messaging among instances."""

    def post(self, instance_id: int, message: object) -> None: ...

    def exchange(self) -> list:
        """Deliver everything posted in this phase; returns what was addressed to this instance."""


class ControlNode:
    """One instance's side of the control round: its rManager, and the gManager on instance 0."""

    def __init__(self, rmanager: RManager, transport: Transport, gmanager: GManager | None = None,
                 max_moves_per_step: int = 8) -> None:
        self.rmanager = rmanager
        self.transport = transport
        self.gmanager = gmanager
        self.max_moves_per_step = max_moves_per_step

    def phases(self, num_reserved_blocks: int = 0) -> list:
        """The phases of one round, each taking the messages delivered to this instance."""
        rmanager, transport = self.rmanager, self.transport

        def send_heartbeat(_: list) -> None:
            returns = rmanager.take_returns()
            for creditor, block_ids in returns.items():
                transport.post(creditor, ReturnBlocks(rmanager.instance_id, block_ids))
            returned = {creditor: len(block_ids) for creditor, block_ids in returns.items()}
            transport.post(GMANAGER_INSTANCE, rmanager.heartbeat(returned, self.max_moves_per_step,
                                                                 num_reserved_blocks))

        def settle_and_plan(inbox: list) -> None:
            for message in inbox:
                if isinstance(message, ReturnBlocks):
                    rmanager.take_back(message.debtor, message.block_ids)
            if self.gmanager is not None:
                beats = [message for message in inbox if isinstance(message, Heartbeat)]
                for instance_id, messages in self.gmanager.on_heartbeats(beats).items():
                    for message in messages:
                        transport.post(instance_id, message)

        def ask_creditors(inbox: list) -> None:
            rmanager.transfers = []
            for message in inbox:
                if isinstance(message, MovePlan):
                    rmanager.apply_moves(message.relocations)
                elif isinstance(message, ClusterView):
                    rmanager.borrowable_estimate = message.borrowable
                elif isinstance(message, Grant):
                    transport.post(message.creditor,
                                   LendRequest(rmanager.instance_id, message.request_id, message.num_blocks))

        def lend(inbox: list) -> None:
            for message in inbox:
                if isinstance(message, LendRequest):
                    block_ids = rmanager.lend(message.debtor, message.num_blocks)
                    transport.post(message.debtor, LendReply(rmanager.instance_id, message.request_id, block_ids))

        def receive_loans(inbox: list) -> None:
            for message in inbox:
                if isinstance(message, LendReply):
                    rmanager.fill_pending(message.request_id, message.creditor, message.block_ids)

        return [send_heartbeat, settle_and_plan, ask_creditors, lend, receive_loans]

    def run_round(self, num_reserved_blocks: int = 0) -> None:
        """Run every phase, exchanging messages in between (each instance calls this in lockstep)."""
        inbox: list = []
        phases = self.phases(num_reserved_blocks)
        for index, phase in enumerate(phases):
            phase(inbox)
            inbox = self.transport.exchange() if index < len(phases) - 1 else []


class InProcessCluster:
    """A whole cluster's control plane in one process, for tests: a fake transport per instance."""

    def __init__(self, rmanagers: list[RManager], max_moves_per_step: int = 8) -> None:
        self._posted: dict[int, list] = defaultdict(list)
        self.gmanager = GManager(len(rmanagers), max_moves_per_step)
        self.nodes = [ControlNode(rm, _InProcessTransport(self, rm.instance_id),
                                  self.gmanager if rm.instance_id == GMANAGER_INSTANCE else None,
                                  max_moves_per_step) for rm in rmanagers]

    def run_round(self, num_reserved_blocks: dict[int, int] | None = None) -> None:
        """Every instance runs phase k before any runs phase k + 1, as in lockstep."""
        reserved = num_reserved_blocks or {}
        phase_lists = [node.phases(reserved.get(node.rmanager.instance_id, 0)) for node in self.nodes]
        inboxes: dict[int, list] = defaultdict(list)
        for index in range(len(phase_lists[0])):
            for node, phases in zip(self.nodes, phase_lists):
                phases[index](inboxes[node.rmanager.instance_id])
            inboxes, self._posted = self._posted, defaultdict(list)


class _InProcessTransport:
    def __init__(self, cluster: InProcessCluster, instance_id: int) -> None:
        self._cluster = cluster
        self.instance_id = instance_id

    def post(self, instance_id: int, message: object) -> None:
        self._cluster._posted[instance_id].append(message)

    def exchange(self) -> list:
        raise RuntimeError("the in-process cluster delivers messages itself")


@dataclass
class ControlTraffic:
    """Control messages one leader received from the others, and their pickled bytes (for benchmarks)."""

    num_messages: int = 0
    num_bytes: int = 0

    def record(self, messages: Iterable[object]) -> None:
        """Count messages that arrived from other instances."""
        for message in messages:
            self.num_messages += 1
            self.num_bytes += len(pickle.dumps(message))


class MPITransport:
    """Bulk-synchronous messaging among the instances' leader ranks over an mpi4py communicator."""

    def __init__(self, comm: MPI.Comm, traffic: ControlTraffic | None = None) -> None:
        self.comm = comm
        self.traffic = traffic
        self._outbox: list[list] = [[] for _ in range(comm.Get_size())]

    def post(self, instance_id: int, message: object) -> None:
        self._outbox[instance_id].append(message)

    def exchange(self) -> list:
        received = self.comm.alltoall(self._outbox)
        self._outbox = [[] for _ in range(self.comm.Get_size())]
        if self.traffic is not None:
            self.traffic.record(message for sender, messages in enumerate(received) if sender != self.comm.Get_rank()
                                for message in messages)
        return [message for messages in received for message in messages]
