"""Shared fixtures: launching mpirun jobs from tests."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

BIN_DIR = Path(sys.executable).parent


def mpirun_command(num_ranks: int, argv: list[str]) -> list[str]:
    """The mpirun command line that starts ``num_ranks`` copies of ``argv`` on this machine."""
    return [str(BIN_DIR / "mpirun"), "--allow-run-as-root", "--oversubscribe", "--bind-to", "none",
            "-n", str(num_ranks), *argv]


@pytest.fixture
def run_mpi():
    """Run ``argv`` on ``num_ranks`` MPI ranks; fail the test with its output if it exits non-zero."""

    def run(num_ranks: int, argv: list[str], timeout: float = 300, check: bool = True) -> subprocess.CompletedProcess:
        env = dict(os.environ, OMP_NUM_THREADS="1")
        proc = subprocess.run(mpirun_command(num_ranks, argv), capture_output=True, text=True,
                              timeout=timeout, env=env)
        if check and proc.returncode != 0:
            pytest.fail(f"mpirun exited {proc.returncode}\nstdout:\n{proc.stdout[-4000:]}\n"
                        f"stderr:\n{proc.stderr[-4000:]}")
        return proc

    return run
