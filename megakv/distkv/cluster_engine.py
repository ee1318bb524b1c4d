"""A DistKV cluster behind one front, its instances stepping independently (DistKV-LLM sections 4-5).

Each rank plays the roles its place gives it: every rank runs its instance's step plans
(megakv.distkv.instance_ranks) and answers other instances' micro-attentions from its KV
server; each instance's leader (TP rank 0) runs the instance's loop (megakv.distkv.instance_loop);
global rank 0, instance 0's leader, also hosts the gManager service and the front
(megakv.distkv.front), which offers the engine API: requests and aborts at any time, and each
request's outputs streamed back as they are generated.
"""
from __future__ import annotations

import ctypes
import sys
import traceback
from collections.abc import Callable

import torch

from megakv.checkpoint.format import CheckpointInfo
from megakv.config import EngineConfig
from megakv.distkv.control import ControlTraffic
from megakv.distkv.front import ClusterFront
from megakv.distkv.instance_loop import InstanceLoop
from megakv.distkv.instance_ranks import InstanceRanks
from megakv.distkv.policy import ClusterAdmission, cluster_kv_capacity
from megakv.distkv.remote_attention import KVServer
from megakv.engine.core import InstanceCore
from megakv.engine.limits import ContextLimit
from megakv.engine.llm_engine import generate
from megakv.engine.request import RequestOutput
from megakv.engine.sampling import SamplingParams
from megakv.engine.stats import EngineStats
from megakv.kvcache.rmanager import RManager
from megakv.parallel import state
from megakv.parallel.messaging import end_this_rank, members_fail_alone, split, world_comm

# prctl option setting the calling thread's timer slack, in nanoseconds (linux/prctl.h), and the slack the
# ranks ask for: a 50 us sleep then takes about 70 us instead of 120 (measured on the 2-vCPU VM).
PR_SET_TIMERSLACK = 29
# Tag of the leaders' free blocks, sent to the front for cluster_report.
REPORT_TAG = 13
TIMER_SLACK_NS = 1000


def _tighten_timer_slack() -> None:
    """Let a short sleep end on time: Linux adds up to 50 us of timer slack to each. Where prctl refuses,
    sleeps only run long; nothing breaks."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_TIMERSLACK, TIMER_SLACK_NS, 0, 0, 0)


def _end_rank_on_uncaught_exception(world) -> None:
    """Make an exception that escapes on this rank end it at once: the front's ends the job (the service is gone
    without it), another rank's ends only this rank where members fail alone (members_fail_alone), and the job
    otherwise.

    Otherwise the rank would not even exit: its KV server thread stays blocked in a receive that the
    process group's teardown waits for, and the other ranks would wait for it forever.
    """
    previous = sys.excepthook

    def hook(kind, value, traceback) -> None:
        previous(kind, value, traceback)
        _end_rank(world, f"failed ({kind.__name__}: {value})")

    sys.excepthook = hook


def _end_rank(world, cause: str) -> None:
    rank = world.Get_rank()
    if rank != 0 and members_fail_alone():
        print(f"megakv: rank {rank} {cause}: ending this rank; the cluster goes on without its instance",
              file=sys.stderr, flush=True)
        end_this_rank()
    print(f"megakv: rank {rank} {cause}: ending the job", file=sys.stderr, flush=True)
    world.Abort(1)


class ClusterEngine:
    """This rank's part of a DistKV cluster; on global rank 0 also the engine API (the front)."""

    def __init__(self, info: CheckpointInfo, config: EngineConfig, dtype: torch.dtype | None = None,
                 device: torch.device | None = None, count_traffic: bool = False) -> None:
        def admission(rmanager: RManager) -> ClusterAdmission:
            capacity = cluster_kv_capacity(rmanager.pool.num_blocks, state.get_num_instances(), config.distkv)
            return ClusterAdmission(rmanager, capacity.num_lendable_elsewhere)

        self.core = InstanceCore(info, config, dtype=dtype, device=device, admission=admission)
        self.model_config = info.model
        self.rmanager, self.scheduler, self.step_log = self.core.rmanager, self.core.scheduler, self.core.step_log
        self.world = world = world_comm()
        self.instance_id = state.get_instance_id()
        self.num_instances = state.get_num_instances()
        self.is_leader = state.get_tensor_model_parallel_rank() == 0
        self.is_front = world.Get_rank() == 0
        context_limit = ContextLimit(info.model.max_position_embeddings, config.cache.block_size,
                                     cluster_kv_capacity(self.rmanager.pool.num_blocks, self.num_instances,
                                                         config.distkv))
        instance_comm = split(world, self.instance_id, state.get_tensor_model_parallel_rank())
        self.leaders_comm = split(world, 0 if self.is_leader else None, self.instance_id)
        # The gManager service's own communicator: rank i is instance i's leader, and rank 0 the service.
        gmanager_comm = split(world, 0 if self.is_leader else None, self.instance_id)
        tp = state.get_tensor_model_parallel_world_size()
        cache = self.core.model_runner.kv_cache
        self.kv_server = KVServer(cache.key_cache, cache.value_cache, info.model.num_attention_heads // tp,
                                  info.model.num_kv_heads_per_partition(tp), info.model.head_dim,
                                  config.distkv.peer_timeout, self._kv_server_failed) \
            if self.num_instances > 1 else None
        _tighten_timer_slack()
        if self.kv_server is not None:
            _end_rank_on_uncaught_exception(world)
            if self.is_front and not members_fail_alone():
                print("megakv: a failed rank ends this whole job: launch with `mpirun --with-ft ulfm` (as "
                      "launch/serve.sh does) so that the cluster goes on without a failed instance",
                      file=sys.stderr, flush=True)
        self.ranks = InstanceRanks(instance_comm, self.core.model_runner, info.model, self.kv_server,
                                   2 * config.distkv.peer_timeout)
        self.loop = self.front = None
        if self.is_leader:
            traffic = ControlTraffic() if count_traffic else None
            self.loop = InstanceLoop(self.core, config, self.ranks, self.instance_id, self.num_instances,
                                     self.is_front, self.leaders_comm, gmanager_comm, traffic)
        if self.is_front:
            self.front = ClusterFront(self.loop, self.core, config, context_limit, self.num_instances,
                                      self.leaders_comm, self.loop.control_traffic)
        self._kv_server_stopped = False
        self._context_limit = context_limit

    # -- the engine API, on the front ------------------------------------------------------------------

    @property
    def context_limit(self) -> ContextLimit:
        """What one request may hold: on the front, less once instances fail (they lend nothing)."""
        return self.front.context_limit if self.front is not None else self._context_limit

    @property
    def failed_instances(self) -> list[int]:
        """Instances the gManager declared failed, in that order (on the front; [] elsewhere)."""
        return self.front.failed if self.front is not None else []

    def _require_front(self) -> ClusterFront:
        if self.front is None:
            raise RuntimeError("the engine API runs on global rank 0, the cluster's front")
        return self.front

    def add_request(self, prompt_ids: list[int], params: SamplingParams, request_id: str | None = None,
                    instance: int | None = None) -> str:
        """Validate a request and route it (to ``instance``, else by free KV room); returns its id."""
        return self._require_front().add_request(prompt_ids, params, request_id, instance)

    def abort(self, request_id: str) -> None:
        """Stop a request on its instance (before its next step) and release its blocks everywhere."""
        self._require_front().abort(request_id)

    def has_unfinished(self) -> bool:
        """True while a request runs anywhere in the cluster, has an output not yet returned, or blocks are
        still owed."""
        return self._require_front().has_unfinished()

    def set_waker(self, wake: Callable[[], None]) -> None:
        """Have ``wake`` called when the gManager declares an instance failed or instance 0's loop fails: the idle
        front is not stepped, and would hear of it only with the next request."""
        self._require_front().loop.wake = wake

    def step(self) -> list[RequestOutput]:
        """Collect what the instances reported (instance 0 steps on a thread of its own)."""
        return self._require_front().step()

    def stats(self) -> EngineStats:
        """Each instance's queues and pool, and the gManager's counters and ledger."""
        return self._require_front().stats()

    def shutdown(self) -> None:
        """Stop every instance: each leader leaves its loop after the step it is in, then every rank stops."""
        self._require_front().shutdown()
        self._stop_kv_server()

    def serve_forever(self) -> None:
        """Run this rank's roles (every rank but the front) until the front shuts the cluster down. A step that
        fails here (a tensor-parallel peer that did not answer in time, a fault) ends this rank alone where
        members fail alone: its instance is declared failed and the cluster goes on without it."""
        try:
            if self.loop is None:
                self.ranks.follow()
            else:
                self.loop.serve()
        except (ValueError, RuntimeError) as err:
            if members_fail_alone():
                traceback.print_exc()
                _end_rank(self.world, f"failed in its instance's step ({type(err).__name__}: {err})")
            raise
        self._stop_kv_server()

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

    # -- for tests and benchmarks: the leader's loop ---------------------------------------------------

    @property
    def control(self):
        """The leader's control plane (megakv.distkv.control.InstanceControl)."""
        return self.loop.control

    @property
    def before_step(self) -> Callable[[], None] | None:
        """Called before each step of this instance's leader: tests stall an instance with it."""
        return self.loop.before_step

    @before_step.setter
    def before_step(self, hook: Callable[[], None] | None) -> None:
        self.loop.before_step = hook

    # -- every rank -----------------------------------------------------------------------------------

    def _stop_kv_server(self) -> None:
        """Tell the other instances' KV servers that this rank asks nothing more, and wait for the same from
        them (after this rank's last step)."""
        if self.kv_server is not None and not self._kv_server_stopped:
            self.kv_server.stop()
        self._kv_server_stopped = True

    def _kv_server_failed(self, err: BaseException) -> None:
        _end_rank(self.world, f"could not serve its KV: {err!r}")

    def cluster_report(self) -> dict | None:
        """Ledger and pool state after serving (on the front; None elsewhere). Every live leader calls it."""
        if not self.is_leader:
            return None
        if not self.is_front:
            self.leaders_comm.send(self.rmanager.num_free_blocks, dest=0, tag=REPORT_TAG)
            return None
        free = {index: self.rmanager.num_free_blocks if index == self.instance_id
                else self.leaders_comm.recv(source=index, tag=REPORT_TAG)
                for index in self.front.live_instances}
        stats = self.stats()
        return {"instances": self.num_instances, "blocks_per_instance": self.rmanager.pool.num_blocks,
                "borrow_events": stats.num_borrow_events, "blocks_borrowed": stats.num_blocks_borrowed,
                "blocks_moved_by_dgfm": stats.num_blocks_moved, "blocks_swapped_by_dgfm": stats.num_blocks_swapped,
                "ledger_outstanding": stats.ledger_outstanding, "ledger_kept": stats.ledger_kept,
                "failed": list(self.front.failed),
                "free_blocks": free}
