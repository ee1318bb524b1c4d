"""The request status machine: the scheduler makes every transition, in any sequence of what a cluster does.

Two instances, each a real Scheduler with the cluster's admission policy over its rManager, and the
control plane in one process with messages crossing in any order a network allows: requests arrive, are
scheduled (borrowing what their pool lacks), receive loans, yield and get their turn (from the gManager),
are preempted, recalled by a creditor, aborted, and finish. After every operation each request's status
is where the scheduler keeps it, and every status change was a legal one; at rest every block is accounted
for, and at the end every pool is whole.
"""
from __future__ import annotations

import random

import pytest
from control_plane import check_invariants, deliver_in_any_order, quiesce

from megakv.config import SchedulerConfig
from megakv.distkv.in_process import InProcessCluster
from megakv.distkv.policy import ClusterAdmission
from megakv.engine.request import FINISHED, TRANSITIONS, Request, RequestStatus
from megakv.engine.sampling import SamplingParams
from megakv.engine.scheduler import Scheduler
from megakv.kvcache.block_pool import BlockPool, num_blocks_for
from megakv.kvcache.rmanager import RManager

BLOCK_SIZE = 4
QUEUED = {RequestStatus.WAITING, RequestStatus.PREEMPTED, RequestStatus.RECALLED}


class ScheduledCluster:
    """Two instances whose schedulers answer the gManager's Yields and Turns and the creditors' Recalls as the
    cluster engine does."""

    def __init__(self, pool_sizes: list[int]) -> None:
        self.rmanagers = [RManager(i, BlockPool(size), BLOCK_SIZE) for i, size in enumerate(pool_sizes)]
        self.admissions = [ClusterAdmission(rm, sum(pool_sizes) - rm.pool.num_blocks) for rm in self.rmanagers]
        self.schedulers = [Scheduler(SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=16), rm, admission)
                           for rm, admission in zip(self.rmanagers, self.admissions)]
        self.control = InProcessCluster(self.rmanagers, self._yield, self._turn, self._recall)
        self.gmanager = self.control.gmanager
        self.requests: dict[str, tuple[int, Request]] = {}
        self.arrivals: dict[str, int] = {}
        # request id -> its status after each change the schedulers made, checked against TRANSITIONS
        self.history: dict[str, list[RequestStatus]] = {}
        for scheduler in self.schedulers:
            scheduler._move = self._recorder(scheduler._move)

    def _recorder(self, move):
        def recorded(request: Request, status: RequestStatus) -> None:
            history = self.history.setdefault(request.request_id, [RequestStatus.WAITING])
            assert status in TRANSITIONS[history[-1]], f"{request.request_id}: {history[-1].name} -> {status.name}"
            history.append(status)
            move(request, status)
        return recorded

    def _yield(self, instance: int, request_id: str) -> bool:
        if not self.schedulers[instance].yield_blocks(request_id):
            return False
        self.admissions[instance].forget(request_id)
        return True

    def _turn(self, instance: int, request_id: str) -> bool:
        if not self.schedulers[instance].give_turn(request_id):
            return False
        self.admissions[instance].give_turn(request_id)
        return True

    def _recall(self, instance: int, creditor: int, num_blocks: int) -> int:
        scheduler, freed = self.schedulers[instance], 0
        for request in reversed([r for r in scheduler.running if creditor in self.rmanagers[instance].block_counts(
                r.request_id)]):
            if freed >= num_blocks:
                break
            freed += self.rmanagers[instance].block_counts(request.request_id)[creditor]
            scheduler.preempt(request, RequestStatus.RECALLED)
        return freed

    def add(self, instance: int, num_tokens: int, max_new_tokens: int) -> None:
        request_id = f"r{len(self.requests)}"
        request = Request(request_id, list(range(num_tokens)), SamplingParams(max_new_tokens=max_new_tokens),
                          arrival=len(self.requests))
        self.requests[request_id] = (instance, request)
        self.arrivals[request_id] = request.arrival
        self.schedulers[instance].add(request)

    def step(self, instance: int, stop: bool) -> None:
        """One step of the instance: its chunks that hold all their blocks run; a request that reaches its
        length finishes, and with ``stop`` the first to sample stops."""
        scheduler, rmanager = self.schedulers[instance], self.rmanagers[instance]
        for chunk in scheduler.schedule().chunks:
            request = chunk.request
            if rmanager.has_pending(request.request_id):
                continue
            request.num_computed_tokens += chunk.num_tokens
            if not chunk.samples_next_token:
                continue
            request.output_ids.append(0)
            if stop:
                scheduler.finish(request, RequestStatus.FINISHED_STOPPED)
                stop = False
            elif len(request.output_ids) >= request.params.max_new_tokens:
                scheduler.finish(request, RequestStatus.FINISHED_LENGTH)
        self.control.nodes[instance].sync(self.arrivals)

    def abort(self, request_id: str) -> None:
        instance, _ = self.requests[request_id]
        if self.schedulers[instance].abort(request_id) is not None:
            self.control.nodes[instance].forget(request_id)
            self.admissions[instance].forget(request_id)

    def check_statuses(self) -> None:
        """Each request is where its status says, and its status is the last the scheduler gave it (nothing
        else wrote it)."""
        for request_id, (instance, request) in self.requests.items():
            scheduler = self.schedulers[instance]
            assert request.status == self.history.get(request_id, [RequestStatus.WAITING])[-1]
            in_waiting, in_running = request in scheduler.waiting, request in scheduler.running
            in_yielded = scheduler.yielded.get(request_id) is request
            assert (in_waiting, in_running, in_yielded) == (request.status in QUEUED,
                                                            request.status == RequestStatus.RUNNING,
                                                            request.status == RequestStatus.YIELDED), \
                f"{request_id} is {request.status.name} but waiting={in_waiting} running={in_running} " \
                f"yielded={in_yielded}"
            if request.status in FINISHED or request.status == RequestStatus.YIELDED:
                assert not self.rmanagers[instance].block_table(request_id), f"{request_id} still holds blocks"


OPERATIONS = ["add"] * 2 + ["step"] * 8 + ["deliver"] * 2 + ["preempt", "recall", "abort", "stop"]


@pytest.mark.parametrize("seed", range(40))
def test_request_status_changes_only_by_legal_transitions_and_matches_the_queues(seed):
    rng = random.Random(seed)
    pool_sizes = [rng.randint(3, 8), rng.randint(3, 8)]
    cluster = ScheduledCluster(pool_sizes)
    # The longest request fits the cluster, borrowing from the other instance.
    capacity = sum(pool_sizes) * BLOCK_SIZE
    for _ in range(300):
        op, instance, amount = rng.choice(OPERATIONS), rng.randint(0, 1), rng.randint(1, 64)
        scheduler, rmanager = cluster.schedulers[instance], cluster.rmanagers[instance]
        if op == "add" and len(scheduler.unfinished()) < 6:
            cluster.add(instance, min(amount, capacity - 4), rng.randint(1, 6))
        elif op in ("step", "stop"):
            cluster.step(instance, stop=op == "stop")
            deliver_in_any_order(cluster, rng.choice, amount)
        elif op == "preempt" and scheduler.running:
            scheduler.preempt(rng.choice(scheduler.running))
        elif op == "recall":
            debtor = rmanager.largest_debtor()
            head = scheduler.waiting[0] if scheduler.waiting else None
            if head is not None and debtor is not None:
                need = num_blocks_for(head.num_tokens, BLOCK_SIZE)
                cluster.control.nodes[instance].recall(head.request_id, debtor, amount % 4 + 1, need)
        elif op == "abort" and scheduler.unfinished():
            cluster.abort(rng.choice(scheduler.unfinished()).request_id)
        elif op == "deliver":
            deliver_in_any_order(cluster, rng.choice, amount)
        cluster.check_statuses()
    quiesce(cluster, rng.choice)
    cluster.check_statuses()
    check_invariants(cluster)
    for request_id in list(cluster.requests):
        cluster.abort(request_id)
    quiesce(cluster, rng.choice)
    cluster.check_statuses()
    check_invariants(cluster)
    assert all(request.status in FINISHED for _, request in cluster.requests.values())
    assert cluster.gmanager.outstanding() == {} and not cluster.gmanager.is_busy
    assert all(rm.pool.num_free_blocks == rm.pool.num_blocks for rm in cluster.rmanagers)
