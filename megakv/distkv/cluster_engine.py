"""A DistKV cluster behind one front, its instances stepping in lockstep (DistKV-LLM sections 4-5).

The front (global rank 0, also instance 0's leader) offers the engine API: requests and aborts
at any time, each request routed to the instance it names or to the one with the most free KV
room, and each request's outputs streamed back as they are generated. Every step, on each
instance's leader (TP rank 0): schedule the instance's own batch (local blocks first, the rest
PENDING), exchange a status with the other leaders (it carries the front's new requests and
aborts out and each instance's outputs back), run the control round when blocks must be
borrowed, returned or moved (heartbeats, gManager grants, lending, returns, DGFM), tell each
creditor which micro-attentions to run for it, and hand the step to the instance's TP ranks.
Then every rank copies the DGFM-moved blocks and runs the forward pass, answering other
instances' queries layer by layer; an instance with no tokens of its own still serves the
blocks it lends. The other ranks follow the front's steps until it shuts the cluster down.
"""
from __future__ import annotations

import ctypes
import dataclasses
import itertools
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from mpi4py import MPI

from megakv.checkpoint.format import CheckpointInfo
from megakv.config import EngineConfig
from megakv.distkv.control import GMANAGER_INSTANCE, ControlNode, ControlTraffic, MPITransport
from megakv.distkv.gmanager import GManager
from megakv.distkv.messages import Transfer
from megakv.distkv.policy import ClusterAdmission
from megakv.distkv.remote_attention import RemoteAttention, RemotePlan, ServedQueries, execute_transfers
from megakv.engine.core import InstanceCore, KVCapacity
from megakv.engine.llm_engine import generate
from megakv.engine.model_runner import StepInputs
from megakv.engine.request import Request, RequestOutput
from megakv.engine.sampling import SamplingParams
from megakv.engine.scheduler import SchedulerOutput
from megakv.engine.stats import EngineStats, InstanceStats
from megakv.parallel import state

# How long a rank that finished its step early sleeps between checks on the others. After
# BACKOFF_AFTER_SECONDS of waiting (the others are not about to finish a step: the cluster is idle, or
# runs a long prefill) the sleep doubles up to the second bound, so that a long wait takes almost no
# CPU; a shorter wait keeps the short sleep, which oversleeps the others' step by little.
IDLE_POLL_SECONDS = 50e-6
MAX_IDLE_POLL_SECONDS = 5e-3
BACKOFF_AFTER_SECONDS = 0.02
# prctl option setting the calling thread's timer slack, in nanoseconds (linux/prctl.h), and the slack the
# leaders ask for: a 50 us sleep then takes about 70 us instead of 120 (measured on the 2-vCPU VM).
PR_SET_TIMERSLACK = 29
TIMER_SLACK_NS = 1000
# Steps in a row in which no instance could run anything before the cluster gives up.
MAX_STALLED_STEPS = 4


def _tighten_timer_slack() -> None:
    """Let a short sleep end on time: Linux adds up to 50 us of timer slack to each, which the leaders'
    wait for one another would pay every step. Where prctl refuses, sleeps only run long; nothing breaks."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_TIMERSLACK, TIMER_SLACK_NS, 0, 0, 0)


# MPI tag of the step plans a leader sends its TP ranks.
PLAN_TAG = 7


def wait_quietly(done: Callable[[], bool]) -> None:
    """Wait until ``done()`` without spinning: MPI's blocking calls busy-poll, which takes a core from the
    instances still computing (the CPU cluster shares a few cores) and burns one while the cluster is idle."""
    pause = IDLE_POLL_SECONDS
    backoff_at = time.monotonic() + BACKOFF_AFTER_SECONDS
    while not done():
        time.sleep(pause)
        if time.monotonic() > backoff_at:
            pause = min(2 * pause, MAX_IDLE_POLL_SECONDS)


@dataclass(frozen=True)
class FrontOrders:
    """What the front adds to its status: new requests and aborts for each instance, or the end."""

    # (instance, request) in arrival order.
    routed: list[tuple[int, Request]] = field(default_factory=list)
    # (instance, request id).
    aborts: list[tuple[int, str]] = field(default_factory=list)
    stop: bool = False


@dataclass(frozen=True)
class LeaderStatus:
    """What each leader tells the others at the start of a step."""

    unfinished: bool
    # Whether this instance ran tokens of its own in the previous step.
    ran_last_step: bool
    # Arrival of this instance's oldest unfinished request waiting for room (megakv.distkv.policy).
    oldest_waiting_for_room: int | None
    # Free blocks of this instance's pool (the front routes by them).
    num_free_blocks: int
    # Requests of this instance's running batch and queue (for the front's stats).
    num_running: int
    num_waiting: int
    # Outputs of this instance's requests since its last status (for the front).
    outputs: list[RequestOutput]
    # Blocks to borrow or to hand back: the control round must run.
    needs_round: bool
    num_lendable_blocks: int
    holds_remote_blocks: bool
    # Free blocks beyond one per running request: room to pull blocks home.
    free_room: int
    # The micro-attentions this instance's batch asks of each creditor (when no round is due).
    served: dict[int, ServedQueries]
    # Set by the front only.
    orders: FrontOrders | None = None
    # This instance's counters since start (for the front's stats).
    num_preemptions: int = 0
    num_remote_micro_attentions: int = 0


@dataclass
class StepPlan:
    """What the leader hands its TP ranks for one step."""

    inputs: StepInputs | None
    incoming: list[ServedQueries] = field(default_factory=list)
    transfers: list[Transfer] = field(default_factory=list)
    stop: bool = False
    # The front's orders of this step (on the leader; aborts apply once the step has run).
    orders: FrontOrders | None = None


class ClusterEngine:
    """One instance of a DistKV cluster; on global rank 0 also the front that offers the engine API."""

    def __init__(self, info: CheckpointInfo, config: EngineConfig, dtype: torch.dtype | None = None,
                 device: torch.device | None = None, count_traffic: bool = False) -> None:
        self.admission = ClusterAdmission()
        self.core = InstanceCore(info, config, dtype=dtype, device=device, admission=self.admission)
        self.config = config
        self.model_config = info.model
        self.rmanager, self.scheduler = self.core.rmanager, self.core.scheduler
        self.model_runner, self.step_log = self.core.model_runner, self.core.step_log
        world = MPI.COMM_WORLD
        self.instance_id = state.get_instance_id()
        self.num_instances = state.get_num_instances()
        self.is_leader = state.get_tensor_model_parallel_rank() == 0
        self.is_front = world.Get_rank() == 0
        self.instance_comm = world.Split(color=self.instance_id, key=state.get_tensor_model_parallel_rank())
        self.leaders_comm = world.Split(color=0 if self.is_leader else MPI.UNDEFINED, key=self.instance_id)
        self.gmanager = None
        # What this leader received of the control plane, and in how many steps (count_traffic only).
        self.control_traffic = ControlTraffic() if count_traffic and self.is_leader else None
        self.num_steps = 0
        if self.is_leader:
            self.transport = MPITransport(self.leaders_comm, self.control_traffic)
            if self.instance_id == GMANAGER_INSTANCE:
                self.gmanager = GManager(self.num_instances, config.distkv.max_moves_per_step)
            self.control = ControlNode(self.rmanager, self.transport, self.gmanager,
                                       config.distkv.max_moves_per_step)
        _tighten_timer_slack()
        self._stalled_steps = 0
        # Starts True: the first step has not had the chance to run anything yet.
        self._ran_last_step = True
        # This leader's outputs not yet reported to the front.
        self._unreported: list[RequestOutput] = []
        self._stopped = False
        # The front's state: what to send out with the next status, where each unfinished request runs,
        # outputs for the caller of step(), and the last statuses (the router reads them).
        self._arrivals = itertools.count()
        self._request_counter = itertools.count()
        self._orders = FrontOrders()
        self._where: dict[str, int] = {}
        # The front's copy of each unfinished request: the other instances report only each step's new tokens,
        # and the front rebuilds the outputs' prompt and tokens so far from it.
        self._routed: dict[str, Request] = {}
        self._ready: list[RequestOutput] = []
        self._statuses: list[LeaderStatus] | None = None

    def kv_capacity(self) -> KVCapacity:
        """This pool plus what every other instance may lend (same pool size and cap everywhere)."""
        pool = self.rmanager.pool.num_blocks
        cap = self.config.distkv.lending_cap
        return KVCapacity(pool, self.num_instances - 1, int(cap * pool), cap)

    def kv_capacity_blocks(self) -> int:
        """The most blocks one request may ever hold, as a count."""
        return self.kv_capacity().num_blocks

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
        self.core.validate(prompt_ids, params, self.kv_capacity())
        target = instance if instance is not None else self._route()
        request = Request(request_id, list(prompt_ids), params, arrival=next(self._arrivals))
        self._orders.routed.append((target, request))
        self._where[request_id] = target
        self._routed[request_id] = request
        return request_id

    def _route(self) -> int:
        """The instance with the most free blocks at the last exchange, then the fewest requests routed to it."""
        pool = self.rmanager.pool.num_blocks
        free = [status.num_free_blocks for status in self._statuses] if self._statuses else [pool] * self.num_instances
        load = Counter(self._where.values())
        return max(range(self.num_instances), key=lambda index: (free[index], -load[index], -index))

    def abort(self, request_id: str) -> None:
        """Stop a request on its instance (in the next step) and release its blocks everywhere."""
        self._require_front()
        if request_id in self._where:
            self._orders.aborts.append((self._where[request_id], request_id))

    def has_unfinished(self) -> bool:
        """True while a request runs anywhere in the cluster, has an output not yet returned, or finished leaving
        blocks to hand back or borrow: an idle front stops stepping, and those go home only in a step."""
        owed = self.rmanager.has_returns or any(status.needs_round for status in self._statuses or ())
        return bool(self._where) or bool(self._ready) or owed

    def step(self) -> list[RequestOutput]:
        """Run one cluster step; returns the outputs that reached the front (instance 0's of this step, the
        other instances' of their previous one)."""
        self._require_front()
        self._cluster_step()
        ready, self._ready = self._ready, []
        for output in ready:
            if output.finished:
                self._where.pop(output.request_id, None)
                self._routed.pop(output.request_id, None)
        return ready

    def stats(self) -> EngineStats:
        """Each instance's queues and pool as of the last exchange (this instance's as they are now), and the
        gManager's counters and ledger; blocks lent and borrowed are the ledger's debts."""
        self._require_front()
        debts = {pair: n for pair, n in self.gmanager.debts.items() if n}
        instances = []
        num_blocks = self.rmanager.pool.num_blocks
        for index in range(self.num_instances):
            if index == self.instance_id:
                running, waiting, free = len(self.scheduler.running), len(self.scheduler.waiting), \
                    self.rmanager.num_free_blocks
                preemptions, micro_attentions = self.scheduler.num_preemptions, \
                    self.model_runner.num_remote_micro_attentions
            elif self._statuses is not None:
                status = self._statuses[index]
                running, waiting, free = status.num_running, status.num_waiting, status.num_free_blocks
                preemptions, micro_attentions = status.num_preemptions, status.num_remote_micro_attentions
            else:
                running, waiting, free = 0, 0, num_blocks
                preemptions, micro_attentions = 0, 0
            instances.append(InstanceStats(
                index, running, waiting, num_blocks=num_blocks, num_free_blocks=free,
                num_lent_blocks=sum(n for (_, creditor), n in debts.items() if creditor == index),
                num_borrowed_blocks=sum(n for (debtor, _), n in debts.items() if debtor == index),
                num_preemptions=preemptions, num_remote_micro_attentions=micro_attentions))
        return EngineStats(instances, self.gmanager.num_borrow_events, self.gmanager.num_blocks_borrowed,
                           self.gmanager.num_blocks_moved, self.gmanager.outstanding())

    def shutdown(self) -> None:
        """End the cluster's step loop: every rank leaves serve_forever after one more step."""
        self._require_front()
        self._orders = FrontOrders(self._orders.routed, self._orders.aborts, stop=True)
        while not self._stopped:
            self._cluster_step()

    def serve_forever(self) -> None:
        """Follow the front's steps (every rank but the front) until it shuts the cluster down."""
        while not self._stopped:
            self._cluster_step()

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

    # -- the leader's side of a step ------------------------------------------------------------------

    @property
    def _num_reserved_blocks(self) -> int:
        """Free blocks kept for the running requests' next growth: one each."""
        return len(self.scheduler.running)

    def _status(self, inputs: StepInputs | None) -> LeaderStatus:
        rmanager, scheduler = self.rmanager, self.scheduler
        outputs, self._unreported = self._unreported, []
        orders = None
        if self.is_front:
            orders, self._orders = self._orders, FrontOrders()
        return LeaderStatus(unfinished=scheduler.has_unfinished(), ran_last_step=self._ran_last_step,
                            oldest_waiting_for_room=ClusterAdmission.oldest_waiting_for_room(
                                (*scheduler.waiting, *scheduler.running)),
                            num_free_blocks=rmanager.num_free_blocks, num_running=len(scheduler.running),
                            num_waiting=len(scheduler.waiting), outputs=outputs,
                            num_preemptions=scheduler.num_preemptions,
                            num_remote_micro_attentions=self.model_runner.num_remote_micro_attentions,
                            needs_round=bool(rmanager.pending_needs() or rmanager.has_returns),
                            num_lendable_blocks=rmanager.num_lendable_blocks,
                            holds_remote_blocks=bool(rmanager.remote_block_counts()),
                            free_room=rmanager.num_free_blocks - self._num_reserved_blocks,
                            served=inputs.served_by_creditor if inputs is not None else {}, orders=orders)

    def _report(self, outputs: list[RequestOutput]) -> None:
        """Outputs of this instance go to the front: directly on the front, with the next status elsewhere.

        A status carries only each step's new tokens: with the prompt and every token so far, a long request
        would send its whole context to the front every step.
        """
        if self.is_front:
            self._ready.extend(outputs)
        else:
            self._unreported.extend(dataclasses.replace(output, prompt_ids=[], token_ids=[]) for output in outputs)

    def _restore(self, output: RequestOutput) -> RequestOutput:
        """The front's full output from another instance's delta (see _report)."""
        request = self._routed[output.request_id]
        request.output_ids.extend(output.new_token_ids)
        return dataclasses.replace(output, prompt_ids=request.prompt_ids, token_ids=list(request.output_ids))

    def _take_requests(self, orders: FrontOrders) -> None:
        """Queue the requests routed here."""
        for instance, request in orders.routed:
            if instance == self.instance_id:
                self.core.add(request)

    def _take_aborts(self, orders: FrontOrders) -> None:
        """Apply the aborts aimed here, after the step that may have run those requests."""
        for instance, request_id in orders.aborts:
            if instance == self.instance_id:
                aborted = self.core.abort(request_id)
                if aborted is not None:
                    self._report([aborted])

    def _round_needed(self, statuses: list[LeaderStatus]) -> bool:
        """A control round is due for borrowing, returns, or DGFM moves that could happen."""
        if any(status.needs_round for status in statuses):
            return True
        if self.config.distkv.max_moves_per_step == 0:
            return False
        debtors = [status for status in statuses if status.holds_remote_blocks]
        return len(debtors) >= 2 or any(status.free_room > 0 for status in debtors)

    def _schedule_step(self) -> tuple[SchedulerOutput, StepPlan]:
        """Schedule, agree with the other leaders on what this step needs, and build the plan.

        Usually one small all-gather per step carries everything (including the queries each
        creditor must answer); the control round and a second exchange run only when blocks
        must be borrowed, returned or moved.
        """
        scheduled = self.scheduler.schedule()
        ready = scheduled.chunks and not self.rmanager.pending_needs()
        inputs = self.model_runner.prepare(scheduled) if ready else None
        wait_quietly(self.leaders_comm.Ibarrier().Test)
        statuses = self.leaders_comm.allgather(self._status(inputs))
        self.num_steps += 1
        if self.control_traffic is not None:
            self.control_traffic.record(status for index, status in enumerate(statuses) if index != self.instance_id)
        orders = statuses[0].orders
        if self.is_front:
            self._statuses = statuses
            for status in statuses[1:]:
                self._ready.extend(self._restore(output) for output in status.outputs)
        if orders.stop:
            return scheduled, StepPlan(None, stop=True)
        self._check_progress(statuses)
        self.admission.update(status.oldest_waiting_for_room for status in statuses)
        self.rmanager.borrowable_estimate = sum(status.num_lendable_blocks for index, status in enumerate(statuses)
                                                if index != self.instance_id)
        self.rmanager.transfers = []
        if not self._round_needed(statuses):
            incoming = [status.served[self.instance_id] for status in statuses if self.instance_id in status.served]
        else:
            self.control.run_round(num_reserved_blocks=self._num_reserved_blocks)
            for chunk in scheduled.chunks:
                if self.rmanager.has_pending(chunk.request.request_id):
                    # The cluster had less room than the estimate: retry the request later.
                    chunk.request.waits_for_room = True
                    self.scheduler.preempt(chunk.request)
            scheduled = SchedulerOutput([chunk for chunk in scheduled.chunks
                                         if chunk.request in self.scheduler.running])
            inputs = self.model_runner.prepare(scheduled) if scheduled.chunks else None
            for creditor, served in (inputs.served_by_creditor.items() if inputs else ()):
                self.transport.post(creditor, served)
            incoming = [message for message in self.transport.exchange() if isinstance(message, ServedQueries)]
        for chunk in scheduled.chunks:
            chunk.request.block_instances.update(self.rmanager.block_counts(chunk.request.request_id))
        if inputs is not None:
            inputs.served_by_creditor = {}
        self._ran_last_step = inputs is not None
        # New requests join after this step's schedule: they run from the next step.
        self._take_requests(orders)
        return scheduled, StepPlan(inputs, incoming, list(self.rmanager.transfers), orders=orders)

    def _check_progress(self, statuses: list[LeaderStatus]) -> None:
        progressing = any(status.ran_last_step for status in statuses)
        idle = not any(status.unfinished for status in statuses)
        self._stalled_steps = 0 if progressing or idle else self._stalled_steps + 1
        if self._stalled_steps >= MAX_STALLED_STEPS:
            raise RuntimeError("the cluster made no progress: waiting requests fit in no instance's pool")

    # -- every rank -----------------------------------------------------------------------------------

    def _run_plan(self, plan: StepPlan) -> torch.Tensor | None:
        key_cache, value_cache = self.model_runner.kv_cache.key_cache, self.model_runner.kv_cache.value_cache
        execute_transfers(plan.transfers, key_cache, value_cache, self.instance_id)
        remote_plan = RemotePlan(plan.inputs.outgoing if plan.inputs else [], plan.incoming)
        if remote_plan.is_empty:
            return self.model_runner.forward(plan.inputs) if plan.inputs else None
        config, tp = self.model_config, state.get_tensor_model_parallel_world_size()
        remote = RemoteAttention(remote_plan, config.num_attention_heads // tp, config.num_kv_heads_per_partition(tp),
                                 config.head_dim, key_cache.dtype, key_cache.device)
        if plan.inputs is not None:
            plan.inputs.metadata.remote = remote
            return self.model_runner.forward(plan.inputs)
        with torch.inference_mode():
            for layer_index in range(config.num_layers):
                remote.serve_only(layer_index, key_cache[layer_index], value_cache[layer_index],
                                  config.head_dim ** -0.5)
        return None

    def _cluster_step(self) -> None:
        """One lockstep step of this rank: the leader plans it, its TP ranks run it, the leader reports."""
        started = time.perf_counter()
        if self.is_leader:
            scheduled, plan = self._schedule_step()
            # Pickling the plan's tensors costs close to a millisecond: there is none without TP peers.
            peer_plan = dataclasses.replace(plan, orders=None)
            for tp_rank in range(1, self.instance_comm.Get_size()):
                self.instance_comm.send(peer_plan, dest=tp_rank, tag=PLAN_TAG)
        else:
            wait_quietly(lambda: self.instance_comm.iprobe(source=0, tag=PLAN_TAG))
            plan = self.instance_comm.recv(source=0, tag=PLAN_TAG)
        if plan.stop:
            if self.is_leader:
                # One more round hands the last finished requests' blocks back to their creditors.
                self.control.run_round()
            self._stopped = True
            return
        logits = self._run_plan(plan)
        if not self.is_leader:
            return
        if plan.inputs is not None:
            self._report(self.core.postprocess(scheduled, self.model_runner.sample(scheduled, logits)))
            self.step_log.append((scheduled.num_tokens, time.perf_counter() - started))
        self._take_aborts(plan.orders)

    def cluster_report(self) -> dict | None:
        """Ledger and pool state after serving (on the gManager's rank; None elsewhere)."""
        if not self.is_leader:
            return None
        free = self.leaders_comm.gather(self.rmanager.num_free_blocks, root=0)
        if self.gmanager is None:
            return None
        return {"instances": self.num_instances, "blocks_per_instance": self.rmanager.pool.num_blocks,
                "borrow_events": self.gmanager.num_borrow_events,
                "blocks_borrowed": self.gmanager.num_blocks_borrowed,
                "blocks_moved_by_dgfm": self.gmanager.num_blocks_moved,
                "ledger_outstanding": self.gmanager.outstanding(),
                "free_blocks": dict(enumerate(free))}
