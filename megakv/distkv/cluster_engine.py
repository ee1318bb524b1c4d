"""One instance of a DistKV cluster, stepping in lockstep with the others (DistKV-LLM sections 4-5).

Every step, on each instance's leader (TP rank 0): schedule the instance's own
batch (local blocks first, the rest PENDING), run the control round with the
other leaders (heartbeats, gManager grants, lending, returns, DGFM moves),
tell each creditor which micro-attentions to run for it, and hand the step to
the instance's TP ranks. Then every rank copies the DGFM-moved blocks and runs
the forward pass, answering other instances' queries layer by layer; an
instance with no tokens of its own still serves the blocks it lends.
"""
from __future__ import annotations

import ctypes
import sys
import time
from dataclasses import dataclass, field

import torch
from mpi4py import MPI

from megakv.checkpoint.format import CheckpointInfo
from megakv.config import EngineConfig
from megakv.distkv.control import GMANAGER_INSTANCE, ControlNode, MPITransport
from megakv.distkv.gmanager import GManager
from megakv.distkv.messages import Transfer
from megakv.distkv.remote_attention import RemoteAttention, RemotePlan, ServedQueries, execute_transfers
from megakv.engine.core import InstanceCore
from megakv.engine.model_runner import StepInputs
from megakv.engine.request import Request, RequestOutput
from megakv.engine.sampling import SamplingParams
from megakv.engine.scheduler import SchedulerOutput
from megakv.parallel import state

# How long a leader that finished its step early sleeps between checks on the others.
IDLE_POLL_SECONDS = 50e-6
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


@dataclass(frozen=True)
class LeaderStatus:
    """What each leader tells the others at the start of a step."""

    unfinished: bool
    # Whether this instance ran tokens of its own in the previous step.
    ran_last_step: bool
    # Whether a request of this instance is waiting for room the cluster could not lend.
    has_requests_waiting_for_room: bool
    # Blocks to borrow or to hand back: the control round must run.
    needs_round: bool
    num_lendable_blocks: int
    holds_remote_blocks: bool
    # Free blocks beyond one per running request: room to pull blocks home.
    free_room: int
    # The micro-attentions this instance's batch asks of each creditor (when no round is due).
    served: dict[int, ServedQueries]


@dataclass
class StepPlan:
    """What the leader hands its TP ranks for one step."""

    inputs: StepInputs | None
    incoming: list[ServedQueries] = field(default_factory=list)
    transfers: list[Transfer] = field(default_factory=list)
    stop: bool = False


class ClusterEngine:
    """One instance of a cluster: its core, whose requests may borrow KV blocks from the other instances."""

    def __init__(self, info: CheckpointInfo, config: EngineConfig, dtype: torch.dtype | None = None,
                 device: torch.device | None = None) -> None:
        self.core = InstanceCore(info, config, dtype=dtype, device=device)
        self.config = config
        self.model_config = info.model
        self.rmanager, self.scheduler = self.core.rmanager, self.core.scheduler
        self.model_runner, self.step_log = self.core.model_runner, self.core.step_log
        world = MPI.COMM_WORLD
        self.instance_id = state.get_instance_id()
        self.num_instances = state.get_num_instances()
        self.is_leader = state.get_tensor_model_parallel_rank() == 0
        self.instance_comm = world.Split(color=self.instance_id, key=state.get_tensor_model_parallel_rank())
        self.leaders_comm = world.Split(color=0 if self.is_leader else MPI.UNDEFINED, key=self.instance_id)
        self.gmanager = None
        if self.is_leader:
            self.transport = MPITransport(self.leaders_comm)
            if self.instance_id == GMANAGER_INSTANCE:
                self.gmanager = GManager(self.num_instances, config.distkv.max_moves_per_step)
            self.control = ControlNode(self.rmanager, self.transport, self.gmanager,
                                       config.distkv.max_moves_per_step)
        _tighten_timer_slack()
        self._stalled_steps = 0
        # Starts True: the first step has not had the chance to run anything yet.
        self._ran_last_step = True

    def kv_capacity_blocks(self) -> int:
        """This pool plus what every other instance may lend (same pool size and cap everywhere)."""
        pool = self.rmanager.pool.num_blocks
        return pool + (self.num_instances - 1) * int(self.config.distkv.lending_cap * pool)

    # -- the leader's side of a step ------------------------------------------------------------------

    @property
    def _num_reserved_blocks(self) -> int:
        """Free blocks kept for the running requests' next growth: one each."""
        return len(self.scheduler.running)

    def _status(self, inputs: StepInputs | None) -> LeaderStatus:
        rmanager, scheduler = self.rmanager, self.scheduler
        waiting_for_room = any(r.waits_for_room for r in (*scheduler.waiting, *scheduler.running))
        return LeaderStatus(unfinished=scheduler.has_unfinished(), ran_last_step=self._ran_last_step,
                            has_requests_waiting_for_room=waiting_for_room,
                            needs_round=bool(rmanager.pending_needs() or rmanager.has_returns),
                            num_lendable_blocks=rmanager.num_lendable_blocks,
                            holds_remote_blocks=bool(rmanager.remote_block_counts()),
                            free_room=rmanager.num_free_blocks - self._num_reserved_blocks,
                            served=inputs.served_by_creditor if inputs is not None else {})

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
        # Wait for the other leaders without spinning: MPI's blocking collectives busy-poll, which takes
        # a core from the instances still computing (the CPU cluster shares a few cores).
        barrier = self.leaders_comm.Ibarrier()
        while not barrier.Test():
            time.sleep(IDLE_POLL_SECONDS)
        statuses = self.leaders_comm.allgather(self._status(inputs))
        if not any(status.unfinished for status in statuses):
            return scheduled, StepPlan(None, stop=True)
        self._check_progress(statuses)
        # Requests the cluster could not lend to go one instance at a time, lowest id first, so that
        # two of them never keep preempting each other.
        self.scheduler.hold_requests_waiting_for_room = any(
            status.has_requests_waiting_for_room for status in statuses[:self.instance_id])
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
        return scheduled, StepPlan(inputs, incoming, list(self.rmanager.transfers))

    def _check_progress(self, statuses: list[LeaderStatus]) -> None:
        self._stalled_steps = 0 if any(status.ran_last_step for status in statuses) else self._stalled_steps + 1
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

    def serve(self, requests: list[tuple[str, list[int], SamplingParams]]) -> list[RequestOutput]:
        """Serve this instance's requests (given on the leader) until the whole cluster is done.

        A request that can never fit, even borrowing from every instance, is answered with an error
        and the others go on. Returns this instance's outputs (on the leader; [] elsewhere).
        """
        outputs: list[RequestOutput] = []
        if self.is_leader:
            for request_id, prompt_ids, params in requests:
                try:
                    self.core.validate(prompt_ids, params, self.kv_capacity_blocks())
                except ValueError as err:
                    outputs.append(RequestOutput(request_id, list(prompt_ids), [], [], "error", error=str(err)))
                    continue
                self.scheduler.add(Request(request_id, list(prompt_ids), params))
        while True:
            started = time.perf_counter()
            if self.is_leader:
                scheduled, plan = self._schedule_step()
                if self.instance_comm.Get_size() > 1:
                    # Pickling the plan's tensors costs close to a millisecond: skip it without TP peers.
                    self.instance_comm.bcast(plan, root=0)
            else:
                plan = self.instance_comm.bcast(None, root=0)
            if plan.stop:
                break
            logits = self._run_plan(plan)
            if self.is_leader and plan.inputs is not None:
                progress = self.core.postprocess(scheduled, self.model_runner.sample(scheduled, logits))
                outputs.extend(output for output in progress if output.finished)
                self.step_log.append((scheduled.num_tokens, time.perf_counter() - started))
        if self.is_leader:
            # One more round hands the last finished requests' blocks back to their creditors.
            self.control.run_round()
        return outputs

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
