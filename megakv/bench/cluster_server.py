"""``megakv serve`` started for a benchmark: one process or a cluster under mpirun, on a free loopback port,
stopped the way an operator stops it, and its /metrics counters once it is idle.

Used by the benchmark tools under tools/, which compare servers of different settings on the same requests.
"""
from __future__ import annotations

import contextlib
import itertools
import os
import platform
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from megakv.bench.server_metrics import scrape, total
from megakv.processes import free_port, kill_session, mpirun_command

BIN_DIR = Path(sys.executable).parent
STARTUP_SECONDS = 300
# Starts of a server whose port another process took first (see Server.start).
PORT_ATTEMPTS = 3
SHUTDOWN_SECONDS = 30
IDLE_SECONDS = 60


class ServerFailed(RuntimeError):
    """The server stopped answering, or kept requests it no longer serves: it failed during a run."""


class Server:
    """``megakv serve --model MODEL FLAGS`` named ``model_name``: ``instances`` ranks under mpirun, or one process."""

    def __init__(self, model: Path, flags: list[str], instances: int, model_name: str, log_path: Path) -> None:
        self.url = f"http://127.0.0.1:{free_port()}"
        argv = [str(BIN_DIR / "megakv"), "serve", "--model", str(model), "--instances", str(instances), *flags,
                "--port", self.url.rsplit(":", 1)[1], "--served-model-name", model_name, "--log-level", "warning"]
        if instances > 1:
            argv = mpirun_command(instances, argv)
        self.log_path = log_path
        with open(log_path, "w") as log:
            # A session of its own, so that every rank can be found and ended.
            self.proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                         env=dict(os.environ, OMP_NUM_THREADS="1"))

    @classmethod
    def start(cls, model: Path, flags: list[str], instances: int, model_name: str, log_path: Path) -> Server:
        """A server that answers /health. The port is free when chosen (free_port), but another process may still
        bind it before the server does: then the server starts again on another, at most PORT_ATTEMPTS times."""
        for attempt in itertools.count(1):
            server = cls(model, flags, instances, model_name, log_path)
            try:
                return server.wait_ready()
            except RuntimeError:
                if attempt == PORT_ATTEMPTS or "Address already in use" not in server.log():
                    raise
                print(f"port {server.url.rsplit(':', 1)[1]} was taken before the server bound it: starting it "
                      f"again on another", file=sys.stderr, flush=True)

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def wait_ready(self) -> Server:
        """Poll /health until the server answers; RuntimeError with its log if it exits or takes too long."""
        deadline = time.monotonic() + STARTUP_SECONDS
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"megakv serve exited {self.proc.returncode} while starting:\n{self.log()}")
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return self
            time.sleep(0.5)
        self.kill()
        raise RuntimeError(f"megakv serve did not answer /health within {STARTUP_SECONDS} s:\n{self.log()}")

    def stop(self) -> None:
        """SIGTERM to rank 0, which stops the whole cluster cleanly; SIGKILL to what still runs after that."""
        match = re.search(r"megakv serve: .*\(pid (\d+)\)", self.log())
        if match and self.proc.poll() is None:
            os.kill(int(match.group(1)), signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=SHUTDOWN_SECONDS)
        self.kill()

    def log(self) -> str:
        return self.log_path.read_text()[-4000:]

    def failure(self) -> str:
        """megakv's own line saying why the server stopped (the log's last line if there is none)."""
        lines = self.log_path.read_text().splitlines() or ["(empty log)"]
        return next((line for line in lines if line.startswith("megakv") and ("failed" in line or "error" in line)),
                    lines[-1])

    def kill(self) -> None:
        """SIGKILL every process of the server's session: mpirun puts each rank in a process group of its own."""
        kill_session(self.proc.pid)
        self.proc.wait()

    def counters(self, names: dict[str, str]) -> dict[str, float]:
        """The /metrics counters ``names`` (metric -> label), once no request runs or waits (at most
        IDLE_SECONDS)."""
        deadline = time.monotonic() + IDLE_SECONDS
        while True:
            try:
                samples = scrape(self.url)
            except httpx.HTTPError as err:
                raise ServerFailed(f"the server no longer answers ({err}): {self.failure()}") from None
            busy = total(samples, "megakv:num_requests_running") + total(samples, "megakv:num_requests_waiting")
            if busy == 0:
                return {label: total(samples, name) for name, label in names.items()}
            if time.monotonic() > deadline:
                raise ServerFailed(f"the server stalled: {busy:.0f} requests still running or waiting {IDLE_SECONDS} s "
                                   f"after the benchmark's last answer")
            time.sleep(0.2)


def machine(repo_root: Path) -> dict:
    """What a benchmark's figures were measured on: the CPU, its cores, Python, and the checkout's commit."""
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    commit = subprocess.run(["git", "describe", "--always", "--dirty"], capture_output=True, text=True,
                            cwd=repo_root).stdout.strip()
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(), "commit": commit}
