"""A DistKV cluster behind one front, its instances stepping independently (DistKV-LLM sections 4-5).

The front (global rank 0, also instance 0's leader, and host of the gManager service's thread) offers
the engine API: requests and aborts at any time, each request routed to the instance it names or to
the one with the most free KV room, and each request's outputs streamed back as they are generated.
Every instance's leader (TP rank 0) runs its own step loop: take the control messages that
arrived (new requests and aborts from the front; loans, returns, turns and recalls from the
gManager and the other instances), schedule its batch, recall lent blocks for a request of its
own that waited too long for them, tell the gManager what its requests need to borrow, pull
remote blocks home when its pool has room, or swap blocks with an instance whose requests hold
this pool's while this one's hold its (DGFM), hand the step to its TP ranks, and send the step's
outputs to the front. A step waits for no other instance, except, layer
by layer, for the KV servers of the instances holding its requests' blocks; those answer from
a thread of their own. An instance that offered a swap runs no step until its peer answers, once
the peer's current step ends. An instance with nothing to do sleeps until a message arrives.
"""
from __future__ import annotations

import ctypes
import dataclasses
import itertools
import sys
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from megakv.checkpoint.format import CheckpointInfo
from megakv.config import DistKVConfig, EngineConfig
from megakv.distkv.control import (GMANAGER_INSTANCE, GMANAGER_MESSAGES, GMANAGER_TAG, ControlTraffic, InstanceControl,
                                   Mailbox, Pacer, wait_quietly)
from megakv.distkv.gmanager import GManager
from megakv.distkv.gmanager_service import GManagerService
from megakv.distkv.messages import Left
from megakv.distkv.policy import ClusterAdmission
from megakv.distkv.prefix_routing import PrefixDirectory, prefix_holder
from megakv.distkv.remote_attention import KVLinkAttention, KVServer, fetch_blocks, read_blocks, write_blocks
from megakv.engine.core import InstanceCore
from megakv.engine.limits import ContextLimit, KVCapacity
from megakv.engine.llm_engine import generate
from megakv.engine.model_runner import StepInputs
from megakv.engine.request import Request, RequestOutput, RequestStatus, max_kv_tokens
from megakv.engine.sampling import SamplingParams
from megakv.engine.scheduler import SchedulerOutput
from megakv.engine.stats import EngineStats, InstanceStats
from megakv.kvcache.block_pool import num_blocks_for
from megakv.kvcache.prefix_cache import extend_block_hashes
from megakv.kvcache.rmanager import RManager, Transfer
from megakv.parallel import state
from megakv.parallel.kv_links import PeerGone
from megakv.parallel.messaging import split, world_comm

# The longest the front's step() waits for the other instances' outputs when its own has nothing to run:
# its caller (the server's engine loop) takes new requests between two steps.
FRONT_WAIT_SECONDS = 0.02
# How long a stopping leader waits for its last messages to leave.
FLUSH_SECONDS = 5.0
# prctl option setting the calling thread's timer slack, in nanoseconds (linux/prctl.h), and the slack the
# ranks ask for: a 50 us sleep then takes about 70 us instead of 120 (measured on the 2-vCPU VM).
PR_SET_TIMERSLACK = 29
TIMER_SLACK_NS = 1000
# Tag of the step plans a leader sends its TP ranks.
PLAN_TAG = 7


def _tighten_timer_slack() -> None:
    """Let a short sleep end on time: Linux adds up to 50 us of timer slack to each. Where prctl refuses,
    sleeps only run long; nothing breaks."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_TIMERSLACK, TIMER_SLACK_NS, 0, 0, 0)


def _abort_job_on_uncaught_exception(world) -> None:
    """Make an exception that escapes on this rank end the whole job.

    Otherwise the rank would not even exit: its KV server thread stays blocked in a receive that the
    process group's teardown waits for, and the other ranks would wait for it forever.
    """
    previous = sys.excepthook

    def hook(kind, value, traceback) -> None:
        previous(kind, value, traceback)
        print(f"megakv: rank {world.Get_rank()} failed ({kind.__name__}: {value}): ending the job",
              file=sys.stderr, flush=True)
        world.Abort(1)

    sys.excepthook = hook


@dataclass(frozen=True)
class Orders:
    """Front -> leader: new requests and aborts for its instance, or the end."""

    requests: list[Request] = field(default_factory=list)
    aborts: list[str] = field(default_factory=list)
    stop: bool = False


@dataclass(frozen=True)
class Progress:
    """Leader -> front, after a step with outputs (or when its queues changed): outputs and monitoring."""

    instance_id: int
    # Each output carries only its new tokens: the front keeps the prompt and the tokens so far.
    outputs: list[RequestOutput]
    num_free_blocks: int
    num_running: int
    num_waiting: int
    num_preemptions: int
    num_remote_micro_attentions: int
    num_recalled: int
    # Its last step ran nothing although it has unfinished requests: they wait for blocks or for their turn.
    blocked: bool = False
    # The leader's last message: it has stopped.
    stopped: bool = False
    # Prefix caching (see InstanceStats).
    num_cached_blocks: int = 0
    num_prefix_cache_queries: int = 0
    num_prefix_cache_hits: int = 0


def cluster_kv_capacity(pool_blocks: int, num_instances: int, distkv: DistKVConfig) -> KVCapacity:
    """The most blocks one request may hold: its pool of ``pool_blocks`` plus each other instance's lendable share
    (every instance has the same pool and lending cap)."""
    cap = distkv.lending_cap
    return KVCapacity(pool_blocks, num_instances - 1, int(cap * pool_blocks), cap)


class ClusterStalledError(RuntimeError):
    """No instance of the cluster can make progress (a bug: the gManager's queue always moves)."""


@dataclass
class StepPlan:
    """What the leader hands its TP ranks for one step."""

    inputs: StepInputs | None
    # DGFM: blocks to copy home before the step runs.
    pulls: list[Transfer] = field(default_factory=list)
    # DGFM swap, starting: copy the KV of these blocks of this peer out (and run no step until it answers).
    swap_out: tuple[int, list[int]] | None = None
    # DGFM swap, answered: write the KV copied out into these blocks, as (index among those copied out, block);
    # then drop it.
    swap_writes: list[tuple[int, int]] | None = None
    stop: bool = False


class ClusterEngine:
    """One instance of a DistKV cluster; on global rank 0 also the front that offers the engine API."""

    def __init__(self, info: CheckpointInfo, config: EngineConfig, dtype: torch.dtype | None = None,
                 device: torch.device | None = None, count_traffic: bool = False) -> None:
        def admission(rmanager: RManager) -> ClusterAdmission:
            capacity = cluster_kv_capacity(rmanager.pool.num_blocks, state.get_num_instances(), config.distkv)
            return ClusterAdmission(rmanager, capacity.num_lendable_elsewhere)

        self.core = InstanceCore(info, config, dtype=dtype, device=device, admission=admission)
        self.config = config
        self.model_config = info.model
        self.rmanager, self.scheduler = self.core.rmanager, self.core.scheduler
        self.model_runner, self.step_log = self.core.model_runner, self.core.step_log
        self.admission: ClusterAdmission = self.scheduler.admission
        self.context_limit = ContextLimit(info.model.max_position_embeddings, config.cache.block_size,
                                          cluster_kv_capacity(self.rmanager.pool.num_blocks,
                                                              state.get_num_instances(), config.distkv))
        self.world = world = world_comm()
        self.instance_id = state.get_instance_id()
        self.num_instances = state.get_num_instances()
        self.is_leader = state.get_tensor_model_parallel_rank() == 0
        self.is_front = world.Get_rank() == 0
        self.instance_comm = split(world, self.instance_id, state.get_tensor_model_parallel_rank())
        self.leaders_comm = split(world, 0 if self.is_leader else None, self.instance_id)
        # The gManager service's own communicator: rank i is instance i's leader, and rank 0 the service.
        gmanager_comm = split(world, 0 if self.is_leader else None, self.instance_id)
        self._pacer = Pacer()
        # Messages this leader posted to itself, and (on the front) the gManager service's answers to it.
        self._local_mail: deque[object] = deque()
        # What this leader sent on the control plane, and in how many steps (count_traffic only).
        self.control_traffic = ControlTraffic() if count_traffic and self.is_leader else None
        self.num_steps = 0
        # Called before each step of this instance's leader: tests stall an instance with it.
        self.before_step: Callable[[], None] | None = None
        if self.is_leader:
            self.mailbox = Mailbox(self.leaders_comm, self.control_traffic)
            self.gmanager_service = self.gmanager_mailbox = None
            if self.is_front:
                self.gmanager_service = GManagerService(
                    GManager([self.rmanager.num_lendable_blocks] * self.num_instances),
                    Mailbox(gmanager_comm, tag=GMANAGER_TAG), self._local_mail.append)
            else:
                self.gmanager_mailbox = Mailbox(gmanager_comm, self.control_traffic, GMANAGER_TAG)
            self.control = InstanceControl(self.rmanager, self._post, self._yield, self._give_turn, self._recall,
                                           self._swap_in, self._swapped)
        # Requests of this instance that a creditor recalled blocks from: never recalled again, so that a long
        # request is not preempted over and over.
        self._recalled: set[str] = set()
        # Requests preempted by a Recall since start, for monitoring.
        self.num_recalled = 0
        # Requests of this instance that waited for room it lent: since when (kept across the admissions and
        # preemptions of a chunked prefill that does not fit, until the request has computed its whole context),
        # and those that sent their one Recall.
        self._starving_since: dict[str, float] = {}
        self._recalled_for: set[str] = set()
        # DGFM swap this instance started: on every rank, the KV it copied out of the peer's blocks.
        self._swapped_out: torch.Tensor | None = None
        tp = state.get_tensor_model_parallel_world_size()
        cache = self.model_runner.kv_cache
        self.kv_server = KVServer(cache.key_cache, cache.value_cache, info.model.num_attention_heads // tp,
                                  info.model.num_kv_heads_per_partition(tp), info.model.head_dim,
                                  self._kv_server_failed) if self.num_instances > 1 else None
        _tighten_timer_slack()
        if self.kv_server is not None:
            _abort_job_on_uncaught_exception(world)
        self._stopping = False
        self._stopped = False
        # This instance's last step ran nothing although it has unfinished requests (see Progress.blocked).
        self._blocked = False
        # Counters last reported to the front, so that a leader reports only what changed.
        self._reported: tuple | None = None
        # The front's state: where each unfinished request runs, its copy of each (the other instances report
        # only new tokens), outputs for the caller of step(), each instance's last progress, and the leaders
        # that have not yet confirmed the stop.
        self._arrivals = itertools.count()
        self._request_counter = itertools.count()
        self._where: dict[str, int] = {}
        self._routed: dict[str, Request] = {}
        # Where the blocks of the prompts routed so far went, with prefix caching (the cluster's pools bound it).
        self._prefixes = PrefixDirectory(self.num_instances * self.rmanager.pool.num_blocks) \
            if config.cache.enable_prefix_caching else None
        self._ready: list[RequestOutput] = []
        self._progress: dict[int, Progress] = {}
        self._running_leaders: set[int] = set(range(1, self.num_instances))
        # When the front last saw the cluster move: a step of its own, a message, a new request or an abort.
        self._last_activity = time.monotonic()

    # -- the engine API, on the front ------------------------------------------------------------------

    def _require_front(self) -> None:
        if not self.is_front:
            raise RuntimeError("the engine API runs on global rank 0, the cluster's front")

    def add_request(self, prompt_ids: list[int], params: SamplingParams, request_id: str | None = None,
                    instance: int | None = None) -> str:
        """Validate a request and route it (to ``instance``, else by free KV room); returns its id."""
        self._require_front()
        if instance is not None and (isinstance(instance, bool) or not isinstance(instance, int)
                                     or not 0 <= instance < self.num_instances):
            raise ValueError(f"instance {instance!r} does not exist: the cluster has instances "
                             f"0 to {self.num_instances - 1}")
        if request_id is None:
            request_id = f"request-{next(self._request_counter)}"
        if request_id in self._where:
            raise ValueError(f"request id {request_id!r} is already in use")
        self.core.validate(prompt_ids, params, self.context_limit)
        request = Request(request_id, list(prompt_ids), params, arrival=next(self._arrivals))
        if self._prefixes is not None:
            extend_block_hashes(request.block_hashes, request.prompt_ids, len(request.prompt_ids),
                                self.rmanager.block_size, params.cache_salt)
        target = instance if instance is not None else self._route(request)
        if self._prefixes is not None:
            self._prefixes.record(request.block_hashes, target)
        self._last_activity = time.monotonic()
        self._where[request_id] = target
        self._routed[request_id] = request
        if target == self.instance_id:
            self.core.add(request)
        else:
            self._post(target, Orders(requests=[request]))
        return request_id

    def _route(self, request: Request) -> int:
        """With prefix caching, the instance that holds the longest cached prefix of the request, unless it is
        much busier than the others (megakv.distkv.prefix_routing); else the instance with the most free blocks
        as last reported, then the fewest cached blocks (whose prefixes a request here would push out), then the
        fewest requests routed to it."""
        pool = self.rmanager.pool.num_blocks
        free = [self.rmanager.num_free_blocks if index == self.instance_id else
                self._progress[index].num_free_blocks if index in self._progress else pool
                for index in range(self.num_instances)]
        cached = [self.rmanager.pool.num_cached_blocks if index == self.instance_id else
                  self._progress[index].num_cached_blocks if index in self._progress else 0
                  for index in range(self.num_instances)]
        load = Counter(self._where.values())
        if self._prefixes is not None:
            holder = prefix_holder(self._prefixes, request.block_hashes,
                                   [load[index] for index in range(self.num_instances)])
            if holder is not None:
                return holder
        return max(range(self.num_instances), key=lambda index: (free[index], -cached[index], -load[index], -index))

    def abort(self, request_id: str) -> None:
        """Stop a request on its instance (before its next step) and release its blocks everywhere."""
        self._require_front()
        self._last_activity = time.monotonic()
        target = self._where.get(request_id)
        if target == self.instance_id:
            self._abort_here(request_id)
        elif target is not None:
            self._post(target, Orders(aborts=[request_id]))

    def has_unfinished(self) -> bool:
        """True while a request runs anywhere in the cluster, has an output not yet returned, or blocks are
        still owed: an idle front stops stepping, and the ledger settles only while it steps."""
        owed = self.rmanager.has_returns or self.gmanager_service.is_busy or bool(self._local_mail)
        return bool(self._where) or bool(self._ready) or owed

    def step(self) -> list[RequestOutput]:
        """Run one step of the front's own instance and collect what the other instances reported; with
        nothing to run here, wait up to FRONT_WAIT_SECONDS for their messages."""
        self._require_front()
        self.gmanager_service.check()
        if self._instance_step():
            self._last_activity = time.monotonic()
        elif not self._ready:
            self._pacer.wait(self._has_mail, FRONT_WAIT_SECONDS)
            self._take_mail()
        self._check_stalled()
        ready, self._ready = self._ready, []
        for output in ready:
            if output.finished:
                self._where.pop(output.request_id, None)
                self._routed.pop(output.request_id, None)
        return ready

    def _check_stalled(self) -> None:
        """Raise ClusterStalledError once every instance holding unfinished requests has been waiting, and no
        message has moved, for ``stall_timeout`` seconds. An instance that has not reported waiting counts as
        busy: a long prefill step sends nothing until it ends."""
        quiet = time.monotonic() - self._last_activity
        if not self._where or quiet < self.config.distkv.stall_timeout:
            return
        holders = sorted(set(self._where.values()))
        progress = {index: self._progress_now() if index == self.instance_id else self._progress.get(index)
                    for index in holders}
        if any(report is None or not report.blocked for report in progress.values()):
            return
        waits = "; ".join(f"instance {index}: {report.num_running} running, {report.num_waiting} waiting"
                          for index, report in progress.items())
        raise ClusterStalledError(
            f"the cluster is stalled: {len(self._where)} unfinished request(s) and no progress for {quiet:.0f} s "
            f"({waits}; gManager: {self.gmanager_service.describe()})")

    def stats(self) -> EngineStats:
        """Each instance's queues and pool as last reported (this instance's as they are now), and the
        gManager's counters and ledger; blocks lent and borrowed are the ledger's debts."""
        self._require_front()
        service = self.gmanager_service
        with service.lock:
            gmanager = service.gmanager
            debts = {pair: n for pair, n in gmanager.debts.items() if n}
            counters = (gmanager.num_borrow_events, gmanager.num_blocks_borrowed, gmanager.num_blocks_moved,
                        gmanager.num_blocks_swapped, gmanager.outstanding())
        instances = []
        num_blocks = self.rmanager.pool.num_blocks
        for index in range(self.num_instances):
            if index == self.instance_id:
                progress = self._progress_now()
            else:
                progress = self._progress.get(index, Progress(index, [], num_blocks, 0, 0, 0, 0, 0))
            instances.append(InstanceStats(
                index, progress.num_running, progress.num_waiting, num_blocks=num_blocks,
                num_free_blocks=progress.num_free_blocks,
                num_lent_blocks=sum(n for (_, creditor), n in debts.items() if creditor == index),
                num_borrowed_blocks=sum(n for (debtor, _), n in debts.items() if debtor == index),
                num_preemptions=progress.num_preemptions,
                num_remote_micro_attentions=progress.num_remote_micro_attentions,
                num_recalled=progress.num_recalled, num_cached_blocks=progress.num_cached_blocks,
                num_prefix_cache_queries=progress.num_prefix_cache_queries,
                num_prefix_cache_hits=progress.num_prefix_cache_hits))
        return EngineStats(instances, *counters)

    def shutdown(self) -> None:
        """Stop every instance: each leader leaves its loop after the step it is in, then every rank stops."""
        self._require_front()
        for index in self._running_leaders:
            self._post(index, Orders(stop=True))
        while self._running_leaders:
            wait_quietly(self._has_mail)
            self._take_mail()
        self._stop()

    def serve_forever(self) -> None:
        """Run this instance (every rank but the front) until the front shuts the cluster down."""
        if not self.is_leader:
            while self._follow_plan():
                pass
            self._stop_kv_server()
            return
        while not self._stopping:
            if not self._instance_step() and not self._stopping:
                self._pacer.wait(self._has_mail, self._recall_due_in())
        self._report(final=True)
        self._stop()

    def generate(self, prompts: list[list[int]], params: list[SamplingParams],
                 instances: list[int | None] | None = None) -> list[RequestOutput]:
        """Serve a batch to completion and stop the cluster: the outputs on the front, [] elsewhere."""
        if not self.is_front:
            self.serve_forever()
            return []
        try:
            return generate(self, prompts, params, instances)
        finally:
            self.shutdown()

    # -- the leader ------------------------------------------------------------------------------------

    def _post(self, instance_id: int, message: object) -> None:
        if isinstance(message, GMANAGER_MESSAGES):
            if self.gmanager_service is not None:
                self.gmanager_service.submit(message)
            else:
                self.gmanager_mailbox.post(GMANAGER_INSTANCE, message)
        elif instance_id == self.instance_id:
            self._local_mail.append(message)
        else:
            self.mailbox.post(instance_id, message)

    def _has_mail(self) -> bool:
        return (bool(self._local_mail) or self.mailbox.has_mail()
                or (self.gmanager_mailbox is not None and self.gmanager_mailbox.has_mail()))

    def _take_mail(self) -> bool:
        """Handle every message that has arrived; True if there was one."""
        handled = False
        while True:
            messages = [self._local_mail.popleft() for _ in range(len(self._local_mail))]
            messages += self.mailbox.receive()
            if self.gmanager_mailbox is not None:
                messages += self.gmanager_mailbox.receive()
            if not messages:
                return handled
            handled = True
            self._pacer.saw_message()
            for message in messages:
                self._handle(message)

    def _handle(self, message: object) -> None:
        self._last_activity = time.monotonic()
        if isinstance(message, Orders):
            for request in message.requests:
                self.core.add(request)
            for request_id in message.aborts:
                self._abort_here(request_id)
            self._stopping = self._stopping or message.stop
        elif isinstance(message, Progress):
            self._progress[message.instance_id] = message
            self._ready.extend(self._restore(output) for output in message.outputs)
            if message.stopped:
                self._running_leaders.discard(message.instance_id)
        else:
            self.control.handle(message)

    def _yield(self, request_id: str) -> bool:
        """The gManager's Yield (Scheduler.yield_blocks): a yielded request gives up any turn it held."""
        if not self.scheduler.yield_blocks(request_id):
            return False
        self.admission.forget(request_id)
        return True

    def _give_turn(self, request_id: str) -> bool:
        """The gManager's Turn: the request that yielded is admitted before anyone else. False if it is not
        waiting for its turn (it did not yield, or it ended)."""
        if not self.scheduler.give_turn(request_id):
            return False
        self.admission.give_turn(request_id)
        return True

    def _recall(self, creditor: int, num_blocks: int) -> int:
        """A creditor's Recall: preempt the latest requests holding its blocks, none recalled before, until
        ``num_blocks`` of them are free; returns how many were freed. A preempted request waits first in line and
        recomputes, as after any preemption."""
        freed = 0
        holders = [request for request in self.scheduler.running if request.request_id not in self._recalled
                   and creditor in self.rmanager.block_counts(request.request_id)]
        for request in sorted(holders, key=lambda request: request.arrival, reverse=True):
            if freed >= num_blocks:
                break
            freed += self.rmanager.block_counts(request.request_id)[creditor]
            self._recalled.add(request.request_id)
            self.num_recalled += 1
            self.scheduler.preempt(request, RequestStatus.RECALLED)
        return freed

    def _swap_in(self, moves: list[Transfer]) -> None:
        """A peer's Swap: copy its blocks' KV now, between two steps. Later, the blocks could be freed (the request
        aborted, yielded or recalled) and lent again before the copy overwrote them."""
        self._run_now(StepPlan(None, moves))

    def _swapped(self, writes: list[tuple[int, int]]) -> None:
        """The answer to this instance's Swap: write the KV copied out now, for the same reason."""
        self._run_now(StepPlan(None, swap_writes=writes))

    def _start_swap(self) -> None:
        """DGFM without room: with an instance that holds blocks of this one's requests while its requests hold
        blocks of this pool, exchange them, so that both requests' KV comes home and no free block is needed.
        Every TP rank copies its heads' KV of the peer's blocks out; then the peer may overwrite them."""
        peer = self.rmanager.swap_partner()
        if peer is None or not self.config.distkv.max_moves_per_step:
            return
        block_ids = self.rmanager.begin_swap(peer, self.config.distkv.max_moves_per_step)
        self._run_now(StepPlan(None, swap_out=(peer, block_ids)))
        self.control.offer_swap(peer, block_ids)

    def _starving_head(self) -> tuple[Request, int, int, int] | None:
        """The first request waiting here, if lent room keeps it waiting and a recall would let it in: it fits this
        pool to its last token, has not recalled yet, and would be admitted with the blocks that the largest
        debtor holds. Returns it with that debtor, the blocks it lacks and the blocks it needs to its last token.

        Only a request that never borrows recalls: one that outgrows the pool would borrow, and could then be asked
        to yield while its reservation kept the gManager's first borrower waiting for this pool."""
        rmanager, waiting = self.rmanager, self.scheduler.waiting
        head = waiting[0] if waiting else None
        debtor = rmanager.largest_debtor()
        if head is None or debtor is None or head.request_id in self._recalled_for:
            return None
        free = rmanager.num_free_blocks
        need = num_blocks_for(head.num_tokens, rmanager.block_size)
        lifetime = num_blocks_for(max_kv_tokens(len(head.prompt_ids), head.params.max_new_tokens),
                                  rmanager.block_size)
        if lifetime > rmanager.pool.num_blocks or not free < need <= free + len(rmanager.lent_to(debtor)):
            return None
        return head, debtor, need - free, lifetime

    def _recall_for_starving(self) -> None:
        """Lending must not starve the lender: a starving head (``_starving_head``) that has waited
        ``recall_after`` seconds asks its debtor for the blocks it lacks."""
        if self._starving_since:
            for request in self.scheduler.running:
                if request.num_computed_tokens == request.num_tokens:
                    self._starving_since.pop(request.request_id, None)
        starving = self._starving_head()
        if starving is None:
            return
        head, debtor, num_lacking, lifetime = starving
        since = self._starving_since.setdefault(head.request_id, time.monotonic())
        if (time.monotonic() - since >= self.config.distkv.recall_after
                and self.control.recall(head.request_id, debtor, num_lacking, lifetime)):
            self._recalled_for.add(head.request_id)

    def _recall_due_in(self) -> float | None:
        """Seconds until this instance recalls lent blocks for its first waiting request; None if it will not
        before a message comes (the answer to a Recall in flight is one)."""
        starving = self._starving_head()
        if starving is None or self.control.awaiting_recall or self.rmanager.swapping:
            return None
        since = self._starving_since.get(starving[0].request_id, time.monotonic())
        return max(0.0, since + self.config.distkv.recall_after - time.monotonic())

    def _abort_here(self, request_id: str) -> None:
        aborted = self.core.abort(request_id)
        if aborted is not None:
            self._finished(aborted.request_id)
            self._report_outputs([aborted])

    def _finished(self, request_id: str) -> None:
        self.control.forget(request_id)
        self.admission.forget(request_id)
        self._recalled.discard(request_id)
        self._recalled_for.discard(request_id)
        self._starving_since.pop(request_id, None)

    def _arrivals_here(self) -> dict[str, int]:
        return {request.request_id: request.arrival for request in self.scheduler.unfinished()}

    def _instance_step(self) -> bool:
        """One step of this instance; False when it had nothing to run (it only took its messages)."""
        self._take_mail()
        if self._stopping:
            return False
        if self.rmanager.swapping:
            # A swap awaits the peer's answer: a step would read blocks the peer is overwriting.
            self.control.sync(self._arrivals_here())
            return False
        if self.before_step is not None:
            self.before_step()
        rmanager, scheduler = self.rmanager, self.scheduler
        scheduled = scheduler.schedule()
        self._recall_for_starving()
        # Blocks freed since a request went PENDING serve it before any creditor does.
        spare = rmanager.num_free_blocks - sum(not rmanager.has_pending(r.request_id) for r in scheduler.running)
        for request in scheduler.running:
            spare -= rmanager.fill_pending_locally(request.request_id, spare)
        self.control.sync(self._arrivals_here())
        ready = SchedulerOutput([chunk for chunk in scheduled.chunks
                                 if not rmanager.has_pending(chunk.request.request_id)])
        pulls = self._plan_pulls()
        if not ready.chunks and not pulls:
            self._blocked = scheduler.has_unfinished()
            self._report()
            self._start_swap()
            return False
        if self._blocked:
            # Before a step that may be long: the front must not take this instance for a stalled one.
            self._blocked = False
            self._report()
        started = time.perf_counter()
        for chunk in ready.chunks:
            chunk.request.block_instances.update(rmanager.block_counts(chunk.request.request_id))
        plan = StepPlan(self.model_runner.prepare(ready) if ready.chunks else None, pulls)
        logits = self._run_now(plan)
        outputs = []
        if plan.inputs is not None:
            self.num_steps += 1
            outputs = self.core.postprocess(ready, self.model_runner.sample(ready, logits))
            self.step_log.append((ready.num_tokens, time.perf_counter() - started))
            for output in outputs:
                if output.finished:
                    self._finished(output.request_id)
        self.control.sync(self._arrivals_here())
        self._report_outputs(outputs)
        if not pulls:
            self._start_swap()
        return plan.inputs is not None

    def _plan_pulls(self) -> list[Transfer]:
        """DGFM: move remote blocks home while the pool has room beyond one block per running request and no
        request here waits for blocks."""
        rmanager = self.rmanager
        room = rmanager.num_free_blocks - len(self.scheduler.running)
        if room <= 0 or rmanager.num_pending_blocks or not rmanager.num_borrowed_blocks:
            return []
        return rmanager.pull_home(min(room, self.config.distkv.max_moves_per_step))

    def _progress_now(self, outputs: list[RequestOutput] | None = None, final: bool = False) -> Progress:
        return Progress(self.instance_id, outputs or [], self.rmanager.num_free_blocks, len(self.scheduler.running),
                        self.scheduler.num_waiting, self.scheduler.num_preemptions,
                        self.model_runner.num_remote_micro_attentions, self.num_recalled, self._blocked,
                        stopped=final, num_cached_blocks=self.rmanager.pool.num_cached_blocks,
                        num_prefix_cache_queries=self.scheduler.num_prefix_cache_queries,
                        num_prefix_cache_hits=self.scheduler.num_prefix_cache_hits)

    def _report_outputs(self, outputs: list[RequestOutput]) -> None:
        """Outputs go to the front: directly on the front, in a Progress elsewhere.

        A Progress carries only each step's new tokens: with the prompt and every token so far, a long request
        would send its whole context to the front every step.
        """
        if self.is_front:
            self._ready.extend(outputs)
        else:
            self._report([dataclasses.replace(output, prompt_ids=[], token_ids=[]) for output in outputs])

    def _report(self, outputs: list[RequestOutput] | None = None, final: bool = False) -> None:
        """Send the front a Progress when there are outputs, the queues changed, or this is the last one."""
        if self.is_front:
            return
        progress = self._progress_now(outputs, final)
        counters = dataclasses.astuple(dataclasses.replace(progress, outputs=[]))
        if outputs or final or counters != self._reported:
            self._reported = counters
            self._post(0, progress)

    def _restore(self, output: RequestOutput) -> RequestOutput:
        """The front's full output from another instance's delta (see _report_outputs)."""
        request = self._routed[output.request_id]
        request.output_ids.extend(output.new_token_ids)
        return dataclasses.replace(output, prompt_ids=request.prompt_ids, token_ids=list(request.output_ids))

    # -- every rank -----------------------------------------------------------------------------------

    def _follow_plan(self) -> bool:
        """A TP rank other than the leader: run the leader's next plan; False once it says stop."""
        wait_quietly(lambda: self.instance_comm.iprobe(source=0, tag=PLAN_TAG))
        plan = self.instance_comm.recv(source=0, tag=PLAN_TAG)
        if plan.stop:
            return False
        self._run_plan(plan)
        return True

    def _run_now(self, plan: StepPlan) -> torch.Tensor | None:
        """The leader: hand the plan to this instance's other TP ranks and run it."""
        for tp_rank in range(1, self.instance_comm.Get_size()):
            self.instance_comm.send(plan, dest=tp_rank, tag=PLAN_TAG)
        return self._run_plan(plan)

    def _run_plan(self, plan: StepPlan) -> torch.Tensor | None:
        cache = self.model_runner.kv_cache
        if plan.swap_writes is not None:
            if plan.swap_writes:
                write_blocks(self._swapped_out[:, :, [index for index, _ in plan.swap_writes]],
                             [block_id for _, block_id in plan.swap_writes], cache.key_cache, cache.value_cache)
            self._swapped_out = None
        if plan.swap_out is not None:
            peer, block_ids = plan.swap_out
            self._swapped_out = read_blocks(self.kv_server.links, peer, block_ids, cache.key_cache)
            if self.instance_comm.Get_size() > 1:
                # The peer overwrites the blocks once it has the Swap: every TP rank must have copied them out.
                dist.barrier(state.get_tensor_model_parallel_group())
        if plan.pulls:
            fetch_blocks(self.kv_server.links, plan.pulls, cache.key_cache, cache.value_cache)
            if plan.inputs is None and self.instance_comm.Get_size() > 1:
                # The leader hands the moved blocks back after this step: every TP rank must have copied them.
                dist.barrier(state.get_tensor_model_parallel_group())
        if plan.inputs is None:
            return None
        if plan.inputs.outgoing:
            config, tp = self.model_config, state.get_tensor_model_parallel_world_size()
            plan.inputs.metadata.remote = KVLinkAttention(self.kv_server, plan.inputs.outgoing,
                                                          plan.inputs.served_by_creditor,
                                                          config.num_attention_heads // tp, config.head_dim)
        return self.model_runner.forward(plan.inputs)

    def _stop(self) -> None:
        """The leader's end: its TP ranks stop, its last messages leave, then its KV server stops."""
        self._stopping = True
        for tp_rank in range(1, self.instance_comm.Get_size()):
            self.instance_comm.send(StepPlan(None, stop=True), dest=tp_rank, tag=PLAN_TAG)
        if self.gmanager_service is not None:
            self.gmanager_service.stop(FLUSH_SECONDS)
        else:
            self.gmanager_mailbox.post(GMANAGER_INSTANCE, Left(self.instance_id))
            self.gmanager_mailbox.flush(FLUSH_SECONDS)
        self.mailbox.flush(FLUSH_SECONDS)
        self._stop_kv_server()

    def _stop_kv_server(self) -> None:
        if self.kv_server is not None and not self._stopped:
            self.kv_server.stop()
        self._stopped = True

    def _kv_server_failed(self, err: BaseException) -> None:
        cause = f"{err}: ending this rank" if isinstance(err, PeerGone) else f"the KV server failed: {err!r}"
        print(f"megakv: rank {self.world.Get_rank()}: {cause}", file=sys.stderr, flush=True)
        self.world.Abort(1)

    def cluster_report(self) -> dict | None:
        """Ledger and pool state after serving (on the front; None elsewhere). Every leader calls it."""
        if not self.is_leader:
            return None
        free = self.leaders_comm.gather(self.rmanager.num_free_blocks, root=0)
        if not self.is_front:
            return None
        stats = self.stats()
        return {"instances": self.num_instances, "blocks_per_instance": self.rmanager.pool.num_blocks,
                "borrow_events": stats.num_borrow_events, "blocks_borrowed": stats.num_blocks_borrowed,
                "blocks_moved_by_dgfm": stats.num_blocks_moved, "blocks_swapped_by_dgfm": stats.num_blocks_swapped,
                "ledger_outstanding": stats.ledger_outstanding,
                "free_blocks": dict(enumerate(free))}
