"""The tensor-parallel ranks of one cluster instance: the leader decides, every rank runs the same plan.

The instance's leader (TP rank 0) schedules, talks to the control plane and samples; for each
step it hands a ``StepPlan`` (the model inputs, with each creditor's share of the attention,
and the DGFM copies to make first) to its other TP ranks, which run nothing but plans. Each
rank copies the KV of its own heads and runs the forward pass over its shard, its KV links
reaching the same TP rank of the other instances (DistKV-LLM section 4.2).
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from megakv.config import ModelConfig
from megakv.distkv.control import wait_quietly
from megakv.distkv.remote_attention import KVLinkAttention, KVServer, fetch_blocks, read_blocks, write_blocks
from megakv.engine.model_runner import ModelRunner, StepInputs
from megakv.kvcache.rmanager import Transfer
from megakv.parallel import state

# Tag of the step plans a leader sends its TP ranks.
PLAN_TAG = 7


@dataclass
class StepPlan:
    """What the leader hands its TP ranks for one step."""

    inputs: StepInputs | None
    # DGFM: blocks to copy home before the step runs (pulls, and the moves of a peer's swap).
    pulls: list[Transfer] = field(default_factory=list)
    # DGFM swap, starting: copy the KV of these blocks of this peer out (and run no step until it answers).
    swap_out: tuple[int, list[int]] | None = None
    # DGFM swap, answered: write the KV copied out into these blocks, as (index among those copied out, block);
    # then drop it.
    swap_writes: list[tuple[int, int]] | None = None
    # Instances declared failed since the last plan: every rank shuts its links with them.
    shut: list[int] = field(default_factory=list)
    stop: bool = False


class TensorParallelPeerTimeout(RuntimeError):
    """Another TP rank of this instance did not take its part of a step in time: the instance cannot go on."""


class InstanceRanks:
    """This rank's part of its instance's steps: the leader's hand-off of each plan, and running it.

    A hung rank holds the others of its instance, and nothing else would notice (its leader's heartbeats go
    on): every wait on another TP rank of the instance (a plan's hand-off, a collective) gives up after
    ``tp_timeout`` seconds, and the rank that waited raises. A live peer may itself be waiting up to the peer
    timeout for another instance before it joins: the cluster gives twice that.
    """

    def __init__(self, instance_comm, model_runner: ModelRunner, model_config: ModelConfig,
                 kv_server: KVServer | None, tp_timeout: float) -> None:
        self.instance_comm = instance_comm
        self.tp_timeout = tp_timeout
        state.bound_tensor_parallel_waits(tp_timeout)
        self.model_runner = model_runner
        self.model_config = model_config
        self.kv_server = kv_server
        # DGFM swap this instance started: the KV this rank copied out of the peer's blocks.
        self._swapped_out: torch.Tensor | None = None
        # The instances that failed to answer a rank of this instance during the last plan, as every rank agrees.
        self.failed_creditors: list[int] = []

    def run_now(self, plan: StepPlan) -> torch.Tensor | None:
        """The leader: hand the plan to this instance's other TP ranks and run it; the logits of its sampled
        rows, or None without inputs."""
        self._hand(plan)
        return self.run(plan)

    def stop_followers(self) -> None:
        """The leader: the other TP ranks leave their loop (a hung one is left behind)."""
        try:
            self._hand(StepPlan(None, stop=True))
        except TensorParallelPeerTimeout as err:
            print(f"megakv: {err}: stopping without it", file=sys.stderr, flush=True)

    def _hand(self, plan: StepPlan) -> None:
        """Send the plan to the other TP ranks; TensorParallelPeerTimeout if one has not taken it within the
        bound (a large plan waits for its receiver)."""
        sends = [self.instance_comm.isend(plan, dest=tp_rank, tag=PLAN_TAG)
                 for tp_rank in range(1, self.instance_comm.Get_size())]
        if not wait_quietly(lambda: all(send.Test() for send in sends), self.tp_timeout):
            raise TensorParallelPeerTimeout(
                f"instance {state.get_instance_id()}: a tensor-parallel rank did not take its step plan within "
                f"{self.tp_timeout:g} s (twice --peer-timeout): it hung or was cut off")

    def follow(self) -> None:
        """A TP rank other than the leader: run the leader's plans until it says stop."""
        while True:
            wait_quietly(lambda: self.instance_comm.iprobe(source=0, tag=PLAN_TAG))
            plan = self.instance_comm.recv(source=0, tag=PLAN_TAG)
            if plan.stop:
                return
            self.run(plan)

    def run(self, plan: StepPlan) -> torch.Tensor | None:
        """Every rank: the plan's copies, then its forward pass over this rank's shard; the logits, or None
        without inputs. Sets ``failed_creditors``."""
        cache = self.model_runner.kv_cache
        tp_group_size = self.instance_comm.Get_size()
        for instance in plan.shut:
            state.note_failed_peer()
            self.kv_server.links.shut(instance)
        failed: set[int] = set()
        if plan.swap_writes is not None:
            if plan.swap_writes:
                write_blocks(self._swapped_out[:, :, [index for index, _ in plan.swap_writes]],
                             [block_id for _, block_id in plan.swap_writes], cache.key_cache, cache.value_cache)
            self._swapped_out = None
        if plan.swap_out is not None:
            peer, block_ids = plan.swap_out
            self._swapped_out = read_blocks(self.kv_server.links, peer, block_ids, cache.key_cache)
            if self._swapped_out is None:
                failed.add(peer)
            if tp_group_size > 1:
                # The peer overwrites the blocks once it has the Swap: every TP rank must have copied them out.
                dist.barrier(state.get_tensor_model_parallel_group())
        if plan.pulls:
            failed |= fetch_blocks(self.kv_server.links, plan.pulls, cache.key_cache, cache.value_cache)
            if plan.inputs is None and tp_group_size > 1:
                # The leader hands the moved blocks back after this step: every TP rank must have copied them.
                dist.barrier(state.get_tensor_model_parallel_group())
        logits = None
        if plan.inputs is not None:
            remote = None
            if plan.inputs.outgoing:
                config, tp = self.model_config, state.get_tensor_model_parallel_world_size()
                remote = KVLinkAttention(self.kv_server, plan.inputs.outgoing, plan.inputs.served_by_creditor,
                                         config.num_attention_heads // tp, config.head_dim)
                plan.inputs.metadata.remote = remote
            logits = self.model_runner.forward(plan.inputs)
            if remote is not None:
                failed |= remote.failed
        asked_others = plan.swap_out is not None or plan.pulls or (plan.inputs is not None and plan.inputs.outgoing)
        if asked_others and tp_group_size > 1:
            failed = self._agree(failed)
        self.failed_creditors = sorted(failed)
        return logits

    def _agree(self, failed: set[int]) -> set[int]:
        """The instances that failed any TP rank of this one: each rank saw only its own links."""
        seen = torch.zeros(state.get_num_instances(), dtype=torch.int32)
        seen[list(failed)] = 1
        dist.all_reduce(seen, op=dist.ReduceOp.MAX, group=state.get_tensor_model_parallel_group())
        return set(seen.nonzero().flatten().tolist())
