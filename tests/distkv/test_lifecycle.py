"""A DistKV cluster's life under mpirun: idle without burning CPU; a killed front, or a stall, ends the job."""
from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

import pytest

# Every test here starts subprocesses, servers or models: the full run's, not the quick one's.
pytestmark = pytest.mark.slow

WORKER = Path(__file__).with_name("lifecycle_worker.py")
NUM_RANKS = 2
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def wait_for(path: Path, proc, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            pytest.fail(f"the job ended early ({proc.returncode}):\n{proc.communicate()[1][-3000:]}")
        assert time.monotonic() < deadline, f"{path.name} did not appear within {timeout} s"
        time.sleep(0.1)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (all its threads), from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def rank_pids(folder: Path) -> list[int]:
    return [int((folder / f"pid-{rank}").read_text()) for rank in range(NUM_RANKS)]


@pytest.mark.mpi
def test_idle_cluster_uses_almost_no_cpu(megakv_checkpoint, start_mpi, tmp_path):
    proc = start_mpi(NUM_RANKS, [sys.executable, str(WORKER), str(megakv_checkpoint("gqa", 1)), str(tmp_path)])
    wait_for(tmp_path / "idle", proc, timeout=120)
    pids = rank_pids(tmp_path)
    time.sleep(0.5)
    before = [cpu_seconds(pid) for pid in pids]
    time.sleep(5.0)
    per_rank = [cpu_seconds(pid) - start for pid, start in zip(pids, before)]
    used = sum(per_rank)
    (tmp_path / "done").touch()
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr[-3000:]
    print(f"idle cluster: {used:.3f} s of CPU in 5 s, by rank {[round(seconds, 3) for seconds in per_rank]}")
    assert used < 0.05 * 5.0, f"the idle cluster used {used:.2f} s of CPU in 5 s"


@pytest.mark.mpi
def test_killed_front_ends_the_job_naming_it(megakv_checkpoint, start_mpi, tmp_path):
    # Members fail alone (tests/distkv/test_fault_tolerance.py), but not the front: the service is gone with it.
    (tmp_path / "busy").touch()
    proc = start_mpi(NUM_RANKS, [sys.executable, str(WORKER), str(megakv_checkpoint("gqa", 1)), str(tmp_path)])
    wait_for(tmp_path / "pid-1", proc, timeout=120)
    time.sleep(3.0)
    assert proc.poll() is None
    os.kill(int((tmp_path / "pid-0").read_text()), signal.SIGKILL)
    killed = time.monotonic()
    _, stderr = proc.communicate(timeout=60)
    print(f"killed front: the job ended {time.monotonic() - killed:.1f} s later with status {proc.returncode}")
    assert time.monotonic() - killed < 30
    assert "megakv: instance 1: the front and gManager (rank 0) failed: ending this instance" in stderr, \
        stderr[-3000:]


@pytest.mark.mpi
def test_a_stalled_cluster_says_so_and_ends_the_job(megakv_checkpoint, run_mpi):
    # The planted bug: the gManager never lends, so the request longer than its pool waits forever while the
    # other instance finishes its own.
    started = time.monotonic()
    proc = run_mpi(2, [sys.executable, str(Path(__file__).with_name("stall_worker.py")),
                       str(megakv_checkpoint("gqa", 1)), "2", "3"], timeout=120, check=False)
    assert proc.returncode != 0
    assert time.monotonic() - started < 90
    assert "the cluster is stalled: 1 unfinished request(s) and no progress for" in proc.stderr, proc.stderr
    assert "instance 0: 1 running, 0 waiting" in proc.stderr
    assert "request-0 of instance 0 needs 4" in proc.stderr
