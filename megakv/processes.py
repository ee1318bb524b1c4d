"""The processes of a job started in a session of its own (``start_new_session``): mpirun and its ranks.

mpirun puts each rank in a process group of its own, and an idle rank 0 outlives a killed mpirun, so a
launcher that must stop a whole job, or check that nothing of it is left, looks the job up by session.
"""
from __future__ import annotations

import contextlib
import os
import signal
from pathlib import Path


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
    """SIGKILL every process of the session that still runs."""
    for pid in session_pids(session_id):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
