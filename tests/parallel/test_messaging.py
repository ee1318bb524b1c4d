"""SocketComm, the communicator of ranks that no mpirun started: real processes, set up as the deepspeed and
torchrun launchers set them up (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT)."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from megakv.processes import free_port, kill_session

WORKER = Path(__file__).with_name("messaging_worker.py")
NUM_RANKS = 3
TIMEOUT_SECONDS = 120


def start_ranks(num_ranks: int, *args: str) -> list[subprocess.Popen]:
    port = str(free_port())
    return [subprocess.Popen([sys.executable, str(WORKER), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, start_new_session=True,
                             env=dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(num_ranks),
                                      MASTER_ADDR="127.0.0.1", MASTER_PORT=port, OMP_NUM_THREADS="1"))
            for rank in range(num_ranks)]


def wait_all(procs: list[subprocess.Popen]) -> list[tuple[str, str]]:
    """Each process's (stdout, stderr); whatever still runs after TIMEOUT_SECONDS is killed."""
    deadline = time.monotonic() + TIMEOUT_SECONDS
    outputs = []
    for proc in procs:
        try:
            outputs.append(proc.communicate(timeout=max(deadline - time.monotonic(), 1)))
        except subprocess.TimeoutExpired:
            kill_session(proc.pid)
            outputs.append(proc.communicate())
    return outputs


@pytest.mark.slow
def test_socket_comm_matches_tags_and_sources_keeps_order_gathers_splits_and_refuses_strangers():
    procs = start_ranks(3)
    outputs = wait_all(procs)
    report = "\n".join(f"rank {rank} exited {proc.returncode}:\n{stderr[-2000:]}"
                       for rank, (proc, (_, stderr)) in enumerate(zip(procs, outputs)))
    for rank, (proc, (stdout, _)) in enumerate(zip(procs, outputs)):
        assert proc.returncode == 0 and stdout == f"rank {rank} ok\n", report


@pytest.mark.slow
def test_socket_comm_rank_waiting_on_a_killed_peer_ends_naming_it():
    (waiting, dead) = start_ranks(2, "--die")
    (_, stderr), _ = wait_all([waiting, dead])
    assert dead.returncode == 3
    assert waiting.returncode == 1, stderr[-2000:]
    assert "megakv: rank 0: rank 1 is gone (its connection closed without a goodbye" in stderr
