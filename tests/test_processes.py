"""megakv.processes: killing a job's session leaves nothing behind that stops a later mpirun from starting."""
from __future__ import annotations

import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from megakv import processes
from megakv.processes import free_port, kill_session, run_session, session_pids

MPIRUN = [str(Path(sys.executable).with_name("mpirun")), "--allow-run-as-root", "--oversubscribe", "--bind-to",
          "none"]


def wait_until(condition, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


@pytest.mark.mpi
def test_kill_session_removes_the_killed_mpiruns_session_directory():
    # A stale ompi.<pid> makes the next mpirun that gets this pid fail to start (seen in CI).
    proc = subprocess.Popen([*MPIRUN, "-n", "2", "sleep", "600"], start_new_session=True)
    session_dir = Path(tempfile.gettempdir()) / f"ompi.{proc.pid}"
    wait_until(lambda: session_dir.exists() and len(session_pids(proc.pid)) >= 3)
    kill_session(proc.pid)
    proc.wait(timeout=30)
    wait_until(lambda: not session_pids(proc.pid), timeout=10)
    assert not session_dir.exists()


@pytest.mark.mpi
def test_run_session_kills_the_whole_job_past_its_timeout_after_its_stacks_are_printed(tmp_path):
    # Each rank writes its session id (mpirun's pid) to a file, then sleeps past the timeout.
    rank = (f"import os, time; open(os.path.join({str(tmp_path)!r}, str(os.getpid())), 'w')"
            ".write(str(os.getsid(0))); time.sleep(600)")
    started = time.monotonic()
    with pytest.raises(subprocess.TimeoutExpired) as timed_out:
        run_session([*MPIRUN, "-n", "2", sys.executable, "-c", rank], timeout=15)
    assert time.monotonic() - started < 45
    # Before the kill, the ranks printed where they hung.
    assert "Fatal Python error: Aborted" in timed_out.value.stderr
    assert 'File "<string>", line 1 in <module>' in timed_out.value.stderr
    sessions = {int(path.read_text()) for path in tmp_path.iterdir()}
    assert len(sessions) == 1
    session = sessions.pop()
    wait_until(lambda: not session_pids(session), timeout=10)
    assert not (Path(tempfile.gettempdir()) / f"ompi.{session}").exists()


def test_run_session_returns_status_and_output():
    proc = run_session([sys.executable, "-c", "import sys; print('out'); print('err', file=sys.stderr); "
                        "sys.exit(3)"], timeout=60)
    assert (proc.returncode, proc.stdout, proc.stderr) == (3, "out\n", "err\n")


def test_free_port_draws_below_the_kernels_ephemeral_range(tmp_path, monkeypatch):
    # Any process's own ephemeral socket may take a port of that range between free_port and the bind.
    ranges = tmp_path / "ip_local_port_range"
    ranges.write_text("32768\t60999\n")
    monkeypatch.setattr(processes, "EPHEMERAL_PORT_RANGE", ranges)
    ports = {free_port() for _ in range(20)}
    assert all(processes.LOWEST_DRAWN_PORT <= port < 32768 for port in ports) and len(ports) > 1


def test_free_port_lets_the_kernel_pick_where_no_drawn_port_is_free(tmp_path, monkeypatch):
    kernel_range = processes.EPHEMERAL_PORT_RANGE.read_text().split()
    ranges = tmp_path / "ip_local_port_range"
    monkeypatch.setattr(processes, "EPHEMERAL_PORT_RANGE", ranges)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        # The only port to draw from is taken.
        monkeypatch.setattr(processes, "LOWEST_DRAWN_PORT", taken.getsockname()[1])
        ranges.write_text(f"{taken.getsockname()[1] + 1} 60999\n")
        port = free_port()
        assert port != taken.getsockname()[1]
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", port))
    # No room below the range, or no range to read.
    monkeypatch.setattr(processes, "LOWEST_DRAWN_PORT", 10000)
    ranges.write_text("1024 65535\n")
    assert int(kernel_range[0]) <= free_port() <= int(kernel_range[1])
    monkeypatch.setattr(processes, "EPHEMERAL_PORT_RANGE", tmp_path / "missing")
    assert int(kernel_range[0]) <= free_port() <= int(kernel_range[1])
