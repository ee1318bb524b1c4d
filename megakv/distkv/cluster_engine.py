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

from dataclasses import dataclass, field

import torch
from mpi4py import MPI

from megakv.checkpoint.format import CheckpointInfo
from megakv.config import EngineConfig
from megakv.distkv.control import GMANAGER_INSTANCE, ControlNode, MPITransport
from megakv.distkv.gmanager import GManager
from megakv.distkv.messages import Transfer
from megakv.distkv.remote_attention import RemoteAttention, RemotePlan, ServedQueries, execute_transfers
from megakv.engine.llm_engine import LLMEngine
from megakv.engine.model_runner import StepInputs
from megakv.engine.request import Request, RequestOutput
from megakv.engine.sampling import SamplingParams
from megakv.engine.scheduler import SchedulerOutput
from megakv.parallel import state

# Steps in a row in which no instance could run anything before the cluster gives up.
MAX_STALLED_STEPS = 3


@dataclass
class StepPlan:
    """What the leader hands its TP ranks for one step."""

    inputs: StepInputs | None
    incoming: list[ServedQueries] = field(default_factory=list)
    transfers: list[Transfer] = field(default_factory=list)
    stop: bool = False


class ClusterEngine(LLMEngine):
    """An LLMEngine whose requests may borrow KV blocks from the other instances of the cluster."""

    def __init__(self, info: CheckpointInfo, config: EngineConfig, dtype: torch.dtype | None = None,
                 device: torch.device | None = None) -> None:
        super().__init__(info, config, dtype=dtype, device=device)
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
        self._stalled_steps = 0

    def kv_capacity_blocks(self) -> int:
        """This pool plus what every other instance may lend (same pool size and cap everywhere)."""
        pool = self.rmanager.pool.num_blocks
        return pool + (self.num_instances - 1) * int(self.config.distkv.lending_cap * pool)

    # -- the leader's side of a step ------------------------------------------------------------------

    def _schedule_step(self) -> tuple[SchedulerOutput, StepPlan]:
        scheduled = self.scheduler.schedule()
        self.control.run_round(num_reserved_blocks=len(self.scheduler.running))
        for chunk in scheduled.chunks:
            if self.rmanager.has_pending(chunk.request.request_id):
                # The cluster had less room than the estimate: retry the request later.
                self.scheduler.preempt(chunk.request)
        chunks = [chunk for chunk in scheduled.chunks if chunk.request in self.scheduler.running]
        scheduled = SchedulerOutput(chunks, scheduled.preempted)
        inputs = self.model_runner.prepare(scheduled) if chunks else None
        for chunk in chunks:
            chunk.request.block_instances.update(ref.instance_id
                                                 for ref in self.rmanager.block_table(chunk.request.request_id))
        for creditor, served in (inputs.served_by_creditor.items() if inputs else ()):
            self.transport.post(creditor, served)
        incoming = [message for message in self.transport.exchange() if isinstance(message, ServedQueries)]
        if inputs is not None:
            inputs.served_by_creditor = {}
        return scheduled, StepPlan(inputs, incoming, list(self.rmanager.transfers))

    def _cluster_is_done(self) -> bool:
        return self.leaders_comm.allreduce(not self.scheduler.has_unfinished(), op=MPI.LAND)

    def _check_progress(self, plan: StepPlan) -> None:
        progressed = self.leaders_comm.allreduce(plan.inputs is not None, op=MPI.LOR)
        self._stalled_steps = 0 if progressed else self._stalled_steps + 1
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
                    self.validate(prompt_ids, params)
                except ValueError as err:
                    outputs.append(RequestOutput(request_id, list(prompt_ids), [], "error", error=str(err)))
                    continue
                self.scheduler.add(Request(request_id, list(prompt_ids), params))
        while True:
            if self.is_leader:
                if self._cluster_is_done():
                    plan = StepPlan(None, stop=True)
                else:
                    scheduled, plan = self._schedule_step()
                    self._check_progress(plan)
                plan = self.instance_comm.bcast(plan, root=0)
            else:
                plan = self.instance_comm.bcast(None, root=0)
            if plan.stop:
                break
            logits = self._run_plan(plan)
            if self.is_leader and plan.inputs is not None:
                outputs.extend(self.postprocess(scheduled, self.model_runner.sample(scheduled, logits)))
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
