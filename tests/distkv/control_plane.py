"""Helpers for tests of the control plane over InProcessCluster: delivery in any order a network allows, and the
bookkeeping invariants at rest. A cluster here is any object with ``rmanagers``, ``gmanager``, ``control`` (the
InProcessCluster) and ``arrivals`` (request id -> arrival)."""
from __future__ import annotations

import random
from collections import Counter
from collections.abc import Callable

from hypothesis import strategies as st

from megakv.config import SchedulerConfig
from megakv.distkv.control import GMANAGER_MESSAGES
from megakv.distkv.in_process import InProcessCluster
from megakv.distkv.messages import sender_of
from megakv.distkv.policy import ClusterAdmission
from megakv.engine.request import FINISHED, TRANSITIONS, Request, RequestStatus
from megakv.engine.sampling import SamplingParams
from megakv.engine.scheduler import Scheduler
from megakv.kvcache.block_pool import BlockPool, num_blocks_for
from megakv.kvcache.rmanager import RManager

# Statuses of a request in its scheduler's waiting queue.
QUEUED = {RequestStatus.WAITING, RequestStatus.PREEMPTED, RequestStatus.RECALLED}


class ScheduledCluster:
    """Instances whose schedulers answer the gManager's Yields and Turns, the creditors' Recalls and a failed
    instance's lost blocks as the cluster engine does. With ``prefix_caching``, the schedulers cache the blocks
    their requests fill, as the engine core does, and requests share prompt prefixes (every prompt counts up
    from 0), so blocks of one pool or lent ones are shared, kept and recalled."""

    def __init__(self, pool_sizes: list[int], block_size: int, prefix_caching: bool = False) -> None:
        self.rmanagers = [RManager(i, BlockPool(size), block_size) for i, size in enumerate(pool_sizes)]
        self.admissions = [ClusterAdmission(rm, sum(pool_sizes) - rm.pool.num_blocks) for rm in self.rmanagers]
        self.schedulers = [Scheduler(SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=16), rm, admission,
                                     prefix_caching) for rm, admission in zip(self.rmanagers, self.admissions)]
        self.control = InProcessCluster(self.rmanagers, self._yield, self._turn, self._recall, self._lost)
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

    def _recall(self, instance: int, creditor: int, num_blocks: int) -> None:
        scheduler, freed = self.schedulers[instance], 0
        for request in reversed([r for r in scheduler.running if creditor in self.rmanagers[instance].block_counts(
                r.request_id)]):
            if freed >= num_blocks:
                break
            freed += self.rmanagers[instance].block_counts(request.request_id)[creditor]
            scheduler.preempt(request, RequestStatus.RECALLED)

    def _lost(self, instance: int, request_ids: list[str]) -> None:
        for request_id in request_ids:
            request = self.schedulers[instance].find(request_id)
            assert request is not None and request.status == RequestStatus.RUNNING, f"{request_id} holds blocks"
            self.schedulers[instance].preempt(request)

    def fail(self, failed: int, rerun_on: int) -> None:
        """Instance ``failed`` dies and the gManager declares it; the front runs its unfinished requests again on
        ``rerun_on``, from their prompts and the tokens they had produced."""
        self.control.fail(failed)
        for request_id, (instance, request) in list(self.requests.items()):
            if instance == failed and request.status not in FINISHED:
                rerun = Request(request_id, request.prompt_ids, request.params, list(request.output_ids),
                                arrival=request.arrival)
                self.requests[request_id] = (rerun_on, rerun)
                self.history[request_id] = [RequestStatus.WAITING]
                self.schedulers[rerun_on].add(rerun)

    @property
    def live_instances(self) -> list[int]:
        return self.gmanager.live_instances

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
            scheduler.cache_computed_blocks(request)
            if not chunk.samples_next_token:
                continue
            request.output_ids.append(0)
            if stop:
                self._finish(instance, request, RequestStatus.FINISHED_STOPPED)
                stop = False
            elif len(request.output_ids) >= request.params.max_new_tokens:
                self._finish(instance, request, RequestStatus.FINISHED_LENGTH)
        self.control.nodes[instance].sync(self.arrivals)

    def _finish(self, instance: int, request: Request, status: RequestStatus) -> None:
        """As the instance loop: the request ends, and its control plane and admission forget it."""
        self.schedulers[instance].finish(request, status)
        self.control.nodes[instance].forget(request.request_id)
        self.admissions[instance].forget(request.request_id)

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
            self._check_cached_content(self.rmanagers[instance], request)

    @staticmethod
    def _check_cached_content(rm: RManager, request: Request) -> None:
        """Every cached block in a request's table holds the content of the request's own tokens there."""
        for index, ref in enumerate(rm.block_table(request.request_id)[:len(request.block_hashes)]):
            block_hash = (rm.pool._hash_of.get(ref.block_id) if ref.instance_id == rm.instance_id
                          else rm._remote_hash_of.get(ref))
            assert block_hash in (None, request.block_hashes[index]), \
                f"{request.request_id} holds a block of other content at {index}"


def check_invariants(cluster) -> None:
    """At rest (nothing in flight): every block of a live instance has one owner (requests of one instance may
    share a cached block; a debtor may keep a cached loan that no request holds), loans match tables, the ledger
    matches both, and no table or cache points to a failed instance."""
    failed = getattr(cluster.gmanager, "failed", [])
    rmanagers = [rm for rm in cluster.rmanagers if rm.instance_id not in failed]
    for rm in rmanagers:
        for request_id in rm.request_ids:
            assert not set(rm.block_counts(request_id)) & set(failed), f"{request_id} holds a failed instance's block"
        assert not {ref.instance_id for ref in rm._remote_hash_of} & set(failed), "a failed instance's block cached"
    for creditor in rmanagers:
        # block of the creditor's pool -> (the instance holding it, what holds it there)
        owners: dict[int, tuple[int, list[str]]] = {}
        for rm in rmanagers:
            holders: dict[int, list[str]] = {}
            for request_id in rm.request_ids:
                table = rm.block_table(request_id)
                assert rm.block_counts(request_id) == Counter(ref.instance_id for ref in table), "stale counts"
                for ref in table:
                    if ref.instance_id == creditor.instance_id:
                        holders.setdefault(ref.block_id, []).append(request_id)
                        if rm is not creditor:
                            assert ref.block_id in creditor.lent_to(rm.instance_id), "remote block not on loan"
            # Blocks of a request that yielded while messages were delivered go back with the next sync.
            for block_id in rm._returns.get(creditor.instance_id, []):
                holders.setdefault(block_id, []).append("returning")
            for ref in rm._kept:
                if ref.instance_id == creditor.instance_id:
                    holders.setdefault(ref.block_id, []).append("kept")
            for block_id, names in holders.items():
                assert block_id not in owners, f"block {block_id} owned by instances {owners[block_id][0]} and " \
                                               f"{rm.instance_id}"
                owners[block_id] = (rm.instance_id, names)
                if len(names) > 1:
                    cached = (creditor.pool._hash_of if rm is creditor else
                              {ref.block_id for ref in rm._remote_hash_of if ref.instance_id == creditor.instance_id})
                    assert block_id in cached and not {"returning", "kept"} & set(names), \
                        f"block {block_id} shared by {names} but not cached"
                if rm is creditor:
                    assert creditor.pool._ref_counts[block_id] == len(names), f"block {block_id}: wrong hold count"
        for debtor, lent in creditor._lent.items():
            assert lent <= set(owners), "a lent block is owned by nobody"
        for block_id in range(creditor.pool.num_blocks):
            assert creditor.pool.is_free(block_id) == (block_id not in owners), f"block {block_id} leaked"
    for debtor in rmanagers:
        counts = debtor.remote_block_counts()
        # The running totals that scheduling reads agree with a rescan of the tables.
        assert debtor.num_borrowed_blocks == sum(counts.values()), "stale borrowed count"
        assert debtor.num_pending_blocks == sum(debtor.pending_needs().values()), "stale pending count"
        kept = debtor.kept_counts()
        for creditor in rmanagers:
            if creditor is not debtor:
                pair = debtor.instance_id, creditor.instance_id
                expected = counts.get(creditor.instance_id, 0)
                assert cluster.gmanager.debts[pair] == expected, "ledger drift"
                assert len(creditor.lent_to(debtor.instance_id)) == expected
                assert cluster.gmanager.kept.get(pair, 0) == kept.get(creditor.instance_id, 0), "kept loans drift"


def channel(destination: int, message: object) -> tuple:
    """(sender, receiver) of a queued control message; "g" is the gManager. Messages on one channel arrive in
    the order they were sent (MPI's and TCP's guarantee), those on different channels in any order."""
    receiver = "g" if isinstance(message, GMANAGER_MESSAGES) else destination
    sender = sender_of(message)
    return ("g" if sender is None else sender), receiver


def deliver_at(cluster, index: int) -> None:
    """Deliver the queued message at ``index`` ahead of the others; what it causes is queued last."""
    queue = cluster.control.queue
    entry = queue[index]
    del queue[index]
    queue.appendleft(entry)
    cluster.control.deliver_one()


def drawn(data) -> Callable[[list[int]], int]:
    """A chooser for deliver_in_any_order that hypothesis draws (and shrinks)."""
    return lambda heads: data.draw(st.sampled_from(heads))


def deliver_in_any_order(cluster, choose: Callable[[list[int]], int], max_messages: int = 10_000) -> None:
    """Deliver up to ``max_messages`` queued messages (and those they cause), each time the oldest of the channel
    ``choose`` picks among the channels' oldest (their queue indices); all of them unless the bound stops it
    first."""
    queue = cluster.control.queue
    for _ in range(max_messages):
        if not queue:
            return
        heads: dict[tuple, int] = {}
        for index, (destination, message) in enumerate(queue):
            heads.setdefault(channel(destination, message), index)
        deliver_at(cluster, choose(sorted(heads.values())))
    if max_messages == 10_000:
        raise AssertionError("the control plane did not settle")


def quiesce(cluster, choose: Callable[[list[int]], int]) -> None:
    """Sync every instance and deliver, until a sync sends nothing."""
    for _ in range(100):
        for node in cluster.control.nodes:
            if node.instance_id not in cluster.gmanager.failed:
                node.sync(cluster.arrivals)
        if not cluster.control.queue:
            return
        deliver_in_any_order(cluster, choose)
    raise AssertionError("the instances kept telling the gManager something new")


def run_random_operations(cluster: ScheduledCluster, rng: random.Random, operations: list[str], num_ops: int) -> None:
    """Apply ``num_ops`` operations drawn from ``operations`` to random live instances, messages crossing in any
    order, and check every request's status after each. A "fail" kills a live instance other than the front's
    (while more than two live) and runs its requests again on another."""
    # The longest request fits the cluster, borrowing from the other instances.
    capacity = sum(rm.pool.num_blocks for rm in cluster.rmanagers) * cluster.rmanagers[0].block_size
    for _ in range(num_ops):
        live = cluster.live_instances
        op, instance, amount = rng.choice(operations), rng.choice(live), rng.randint(1, 64)
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
                need = num_blocks_for(head.num_tokens, rmanager.block_size)
                cluster.control.nodes[instance].recall(head.request_id, debtor, amount % 4 + 1, need,
                                                       kept_only=amount % 2 == 0)
        elif op == "abort" and scheduler.unfinished():
            cluster.abort(rng.choice(scheduler.unfinished()).request_id)
        elif op == "deliver":
            deliver_in_any_order(cluster, rng.choice, amount)
        elif op == "fail" and len(live) > 2 and instance != 0:
            cluster.fail(instance, rng.choice([other for other in live if other != instance]))
        cluster.check_statuses()


def hand_back_kept_loans(cluster, choose: Callable[[list[int]], int]) -> None:
    """With no request left: the gManager is not busy for kept loans; once every debtor hands them back (as when
    the gManager wants room), the ledger is empty."""
    quiesce(cluster, choose)
    assert not cluster.gmanager.is_busy, cluster.gmanager.describe()
    assert sum(cluster.gmanager.debts.values()) == sum(cluster.gmanager.kept.values())
    for rm in cluster.rmanagers:
        if rm.instance_id in cluster.gmanager.live_instances:
            rm.drop_kept()
    quiesce(cluster, choose)
    assert cluster.gmanager.outstanding() == {} and not cluster.gmanager.kept_loans()


def end_every_request(cluster: ScheduledCluster, rng: random.Random) -> None:
    """Let the control plane settle and check the bookkeeping, abort every request, and check that every live
    pool is whole and the ledger empty once the kept loans go back."""
    quiesce(cluster, rng.choice)
    cluster.check_statuses()
    check_invariants(cluster)
    for request_id in list(cluster.requests):
        cluster.abort(request_id)
    quiesce(cluster, rng.choice)
    cluster.check_statuses()
    check_invariants(cluster)
    assert all(request.status in FINISHED for _, request in cluster.requests.values())
    hand_back_kept_loans(cluster, rng.choice)
    check_invariants(cluster)
    assert all(cluster.rmanagers[instance].pool.num_free_blocks == cluster.rmanagers[instance].pool.num_blocks
               for instance in cluster.live_instances)
