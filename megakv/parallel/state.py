"""Process groups: tensor parallelism inside an instance, DistAttention across instances.

Ranks are laid out instance-major: instance ``i`` owns global ranks
``[i * tp, (i + 1) * tp)``. Besides Megatron's tensor-parallel group, each TP
rank ``t`` belongs to the DistAttention groups of rank ``t`` of every instance
(DistKV-LLM section 5): a remote micro-attention for the heads of shard ``t``
runs on rank ``t`` of the instance holding the blocks, while the MLP
all-reduces only inside its own instance. There are two DistAttention groups,
one carrying queries to the instances that hold the blocks and one carrying
their answers back: each instance answers in a thread of its own while its main
thread runs its own steps, and a group per direction keeps those two threads off
each other's messages.

Before :func:`initialize_model_parallel` every getter answers as a single
process (world size 1, rank 0, group None), so single-process code needs no setup.
"""
from __future__ import annotations

import atexit
import os
import socket
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.distributed.distributed_c10d import _set_pg_timeout

from megakv.processes import free_port

# Any one of these means mpirun (Open MPI, MPICH/Hydra or a PMIx launcher) started us.
MPI_LAUNCH_VARIABLES = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMI_RANK", "PMIX_RANK", "MPI_LOCALNRANKS")
MPI_LOCAL_RANK_VARIABLES = ("OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID", "PMIX_LOCAL_RANK")


@dataclass(frozen=True)
class DistributedEnv:
    """Who this process is, as its launcher told it."""

    rank: int
    world_size: int
    local_rank: int
    # "mpi" (mpirun), "env" (deepspeed / torchrun variables) or "single".
    launcher: str
    device: torch.device


@dataclass
class _ParallelState:
    """Everything initialize_model_parallel decided; the defaults describe a single process."""

    tp_size: int = 1
    tp_rank: int = 0
    tp_group: dist.ProcessGroup | None = None
    # Global rank of TP rank 0 of this instance.
    tp_src_rank: int = 0
    instance_id: int = 0
    num_instances: int = 1
    dist_attention_group: dist.ProcessGroup | None = None
    initialized: bool = False
    # True when init_distributed created the default group, so destroy_model_parallel owns it.
    created_process_group: bool = False


_state = _ParallelState()
# Whether this rank has learnt that another rank of the job failed (see note_failed_peer).
_peer_failed = False


class RankLocalError(RuntimeError):
    """An error only some ranks saw (a rank's own shard, a failed connection): each reports its own, and the job
    is aborted, since the other ranks may be waiting for this one in a collective."""

    rank_local = True


def note_failed_peer() -> None:
    """This rank has learnt that another rank of the job failed: it will end without MPI_Finalize, a fence over
    every rank, which Open MPI 5.0 under ULFM now and then leaves waiting for the failed one forever."""
    global _peer_failed
    _peer_failed = True


def _finalize_mpi() -> None:
    from mpi4py import MPI

    if not _peer_failed and MPI.Is_initialized() and not MPI.Is_finalized():
        MPI.Finalize()


def is_mpi_launch() -> bool:
    """True when mpirun started this process."""
    return any(variable in os.environ for variable in MPI_LAUNCH_VARIABLES)


def _default_device(local_rank: int) -> torch.device:
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def host_address() -> str:
    """An address of this host that other hosts can reach."""
    address = socket.gethostbyname(socket.gethostname())
    if not address.startswith("127."):
        return address
    # Debian maps the hostname to 127.0.1.1; ask the kernel which interface routes outwards
    # (connecting a UDP socket sends nothing).
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.connect(("10.255.255.255", 1))
            return sock.getsockname()[0]
    except OSError:
        return address


def _mpi_rendezvous(comm) -> str:
    """The tcp:// address of rank 0, agreed over MPI: loopback when every rank is on one host."""
    single_host = len(set(comm.allgather(socket.gethostname()))) == 1
    endpoint = None
    if comm.Get_rank() == 0:
        endpoint = ("127.0.0.1" if single_host else host_address(), free_port(""))
    host, port = comm.bcast(endpoint, root=0)
    return f"tcp://{host}:{port}"


def check_layout(world_size: int, tp: int, num_instances: int) -> None:
    """Refuse a world that is not ``num_instances`` instances of ``tp`` ranks each."""
    if tp < 1 or num_instances < 1:
        raise ValueError(f"--tp ({tp}) and --instances ({num_instances}) must both be at least 1")
    if world_size != tp * num_instances:
        raise ValueError(f"world size {world_size} does not fit --tp {tp} x --instances {num_instances}: "
                         f"launch {tp * num_instances} ranks")


def init_distributed(backend: str | None = None, layout: tuple[int, int] | None = None) -> DistributedEnv:
    """Create the default process group from mpirun, the deepspeed/torchrun variables, or not at all.

    ``layout`` (tp, instances) is checked against the launcher's world size first, so a wrong rank count is
    refused by every rank alike before any rank waits for another.
    """
    if dist.is_initialized():
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        return DistributedEnv(dist.get_rank(), dist.get_world_size(), local_rank, "env", _default_device(local_rank))
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    if is_mpi_launch():
        import mpi4py  # imported only under mpirun: MPI_Init is slow and noisy elsewhere

        mpi4py.rc.finalize = False
        from mpi4py import MPI
        atexit.register(_finalize_mpi)

        comm = MPI.COMM_WORLD
        rank, world_size = comm.Get_rank(), comm.Get_size()
        local_rank = next((int(os.environ[v]) for v in MPI_LOCAL_RANK_VARIABLES if v in os.environ), 0)
        launcher, init_method = "mpi", _mpi_rendezvous(comm)
    elif "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        launcher, init_method = "env", "env://"
    else:
        return DistributedEnv(0, 1, 0, "single", _default_device(0))
    if layout is not None:
        check_layout(world_size, *layout)
    device = _default_device(local_rank)
    # One rank needs no group: every collective short-circuits at world size 1.
    if world_size > 1:
        try:
            dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world_size)
        except RuntimeError as err:
            raise RankLocalError(f"[rank {rank}] could not join the process group at {init_method}: {err}") from err
        _state.created_process_group = True
    return DistributedEnv(rank, world_size, local_rank, launcher, device)


def instance_ranks(instance_id: int, tp: int) -> list[int]:
    """Global ranks of one instance's tensor-parallel group."""
    return list(range(instance_id * tp, (instance_id + 1) * tp))


def dist_attention_ranks(tp_rank: int, tp: int, num_instances: int) -> list[int]:
    """Global ranks of the DistAttention group of TP rank ``tp_rank``: that rank of every instance."""
    return [instance_id * tp + tp_rank for instance_id in range(num_instances)]


def initialize_model_parallel(tensor_model_parallel_size: int = 1, num_instances: int = 1) -> None:
    """Build the TP group of every instance and the DistAttention group of every TP rank."""
    tp = tensor_model_parallel_size
    if _state.initialized:
        raise RuntimeError("model parallel state is already initialized: call destroy_model_parallel() first")
    world_size = dist.get_world_size() if dist.is_initialized() else 1
    rank = dist.get_rank() if dist.is_initialized() else 0
    check_layout(world_size, tp, num_instances)
    _state.tp_size, _state.num_instances = tp, num_instances
    _state.instance_id, _state.tp_rank = divmod(rank, tp)
    _state.tp_src_rank = _state.instance_id * tp
    _state.initialized = True
    if world_size == 1:
        return
    try:
        _create_groups(tp, num_instances)
    except RuntimeError as err:
        raise RankLocalError(f"[rank {rank}] could not create the tensor-parallel and DistAttention groups: "
                             f"{err}") from err


def _create_groups(tp: int, num_instances: int) -> None:
    # new_group is collective: every rank creates every group, in the same order.
    for instance_id in range(num_instances):
        group = dist.new_group(instance_ranks(instance_id, tp))
        if instance_id == _state.instance_id:
            _state.tp_group = group
    # Gloo whatever the default backend: the group only sets up the KV links (megakv.parallel.kv_links), which
    # carry the micro-attentions.
    for tp_rank in range(tp):
        group = dist.new_group(dist_attention_ranks(tp_rank, tp, num_instances), backend="gloo")
        if tp_rank == _state.tp_rank:
            _state.dist_attention_group = group


def bound_tensor_parallel_waits(seconds: float) -> None:
    """Make every later collective of this rank's tensor-parallel group raise once it has waited ``seconds`` for a
    peer. A group takes its timeout when it is made; start-up, where the ranks load their shards each at its own
    pace, keeps torch's default (torch's own _set_pg_timeout changes it afterwards). Gloo's groups only: NCCL's
    watchdog would not raise but end the process, and would count a long kernel as a wait."""
    if _state.tp_group is not None and _state.tp_size > 1 and dist.get_backend(_state.tp_group) == "gloo":
        _set_pg_timeout(timedelta(seconds=seconds), _state.tp_group)


def model_parallel_is_initialized() -> bool:
    """Whether initialize_model_parallel has run (and destroy_model_parallel has not since)."""
    return _state.initialized


def destroy_model_parallel() -> None:
    """Drop every group, and the default process group if init_distributed created it."""
    global _state
    if dist.is_initialized():
        if _state.created_process_group:
            # Destroying the default group also destroys every group made with new_group.
            dist.destroy_process_group()
        else:
            for group in (_state.tp_group, _state.dist_attention_group):
                if group is not None:
                    dist.destroy_process_group(group)
    _state = _ParallelState()
# Whether this rank has learnt that another rank of the job failed (see note_failed_peer).
_peer_failed = False


def get_tensor_model_parallel_group() -> dist.ProcessGroup | None:
    """This instance's tensor-parallel group (None in a single process)."""
    return _state.tp_group


def get_tensor_model_parallel_rank() -> int:
    """This rank's index inside its instance's tensor-parallel group."""
    return _state.tp_rank


def get_tensor_model_parallel_world_size() -> int:
    """The tensor-parallel degree of every instance."""
    return _state.tp_size


def get_tensor_model_parallel_src_rank() -> int:
    """Global rank of TP rank 0 of this instance."""
    return _state.tp_src_rank


def get_instance_id() -> int:
    """Which instance this rank belongs to."""
    return _state.instance_id


def get_num_instances() -> int:
    """How many model instances the world holds."""
    return _state.num_instances


def get_dist_attention_group() -> dist.ProcessGroup | None:
    """The same TP rank of every instance, whose KV links carry queries to the blocks (None in a single
    process)."""
    return _state.dist_attention_group


def get_dist_attention_rank() -> int:
    """This rank's index in its DistAttention group, which is its instance id."""
    return _state.instance_id


def get_dist_attention_world_size() -> int:
    """The DistAttention group size, which is the number of instances."""
    return _state.num_instances
