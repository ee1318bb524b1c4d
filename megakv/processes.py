"""The processes of a job started in a session of its own (``start_new_session``): mpirun and its ranks.

mpirun puts each rank in a process group of its own, and an idle rank 0 outlives a killed mpirun, so a
launcher that must stop a whole job, or check that nothing of it is left, looks the job up by session.
"""
from __future__ import annotations

import contextlib
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path


# The kernel hands out ports of this range on its own: to a bind to port 0 and to every outgoing connection. A
# port found free there can be taken by any process's ephemeral socket (mpirun's own listeners, say) before the
# caller binds it, so free_port draws below it.
EPHEMERAL_PORT_RANGE = Path("/proc/sys/net/ipv4/ip_local_port_range")
# Below this are the ports that well-known services are configured on.
LOWEST_DRAWN_PORT = 10000
DRAWS = 100
# How long the processes of a job past its timeout have to print their stacks before they are killed.
HANG_DUMP_SECONDS = 3.0
_draw = random.SystemRandom()


def mpirun_command(num_ranks: int, argv: Sequence[str]) -> list[str]:
    """The mpirun (of this Python's environment) that starts ``num_ranks`` copies of ``argv`` on this machine as
    launch/serve.sh does: ranks may share cores, and one whose instance fails leaves the others running (ULFM)."""
    return [str(Path(sys.executable).parent / "mpirun"), "--allow-run-as-root", "--oversubscribe", "--bind-to",
            "none", "--with-ft", "ulfm", "-n", str(num_ranks), *argv]


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on ``host`` that nobody listens on now ("" for every interface), drawn at random between
    LOWEST_DRAWN_PORT and the kernel's ephemeral range; where the range leaves no room there, or no drawn port
    is free, one the kernel picks."""
    try:
        lowest_ephemeral = int(EPHEMERAL_PORT_RANGE.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        lowest_ephemeral = LOWEST_DRAWN_PORT
    ports = range(LOWEST_DRAWN_PORT, lowest_ephemeral)
    for _ in range(DRAWS if ports else 0):
        port = _draw.choice(ports)
        with socket.socket() as sock:
            try:
                sock.bind((host, port))
            except OSError:
                continue
            return port
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def session_pids(session_id: int) -> list[int]:
    """The processes of a session that still run (zombies excluded), from /proc."""
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            # After the command name in parentheses: state, ppid, pgrp, session.
            state, _, _, session = stat.read_text().rsplit(")", 1)[1].split()[:4]
        except OSError:  # the process ended while the list was read
            continue
        if int(session) == session_id and state != "Z":
            pids.append(int(stat.parent.name))
    return pids


def kill_session(session_id: int) -> None:
    """SIGKILL every process of the session that still runs, and remove what a killed mpirun leaves behind.

    Open MPI's mpirun keeps a session directory, ``ompi.<pid>``, in the temporary directory and removes it when
    it exits; killed, it cannot. A later mpirun that gets the same pid then refuses to start ("The PMIx
    server's listener thread failed to start"). The job's session was started by its mpirun, so that pid is
    the session id.
    """
    for pid in session_pids(session_id):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    shutil.rmtree(Path(tempfile.gettempdir()) / f"ompi.{session_id}", ignore_errors=True)


def run_session(argv: Sequence[str], timeout: float, env: Mapping[str, str] | None = None
                ) -> subprocess.CompletedProcess:
    """Run ``argv`` in a session of its own and capture its output as text, like ``subprocess.run``; past
    ``timeout`` seconds every process of the session is killed and ``subprocess.TimeoutExpired`` raised.

    A job that hangs says where: its Python processes run with faulthandler on, and get SIGABRT, which makes
    each print every thread's stack, HANG_DUMP_SECONDS before the kill; the exception carries all the output.
    """
    env = dict(os.environ if env is None else env, PYTHONFAULTHANDLER="1")
    with subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                          start_new_session=True) as proc:
        try:
            stdout, stderr = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            # The session's leader (mpirun) is left alone: it would kill its ranks before they have printed.
            for pid in session_pids(proc.pid):
                if pid != proc.pid:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGABRT)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(HANG_DUMP_SECONDS)
            kill_session(proc.pid)
            stdout, stderr = proc.communicate()
            raise subprocess.TimeoutExpired(proc.args, timeout, stdout, stderr) from None
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


