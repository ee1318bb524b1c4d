"""Real ``megakv serve`` processes for the tests, and reading their /metrics.

Every server runs on 127.0.0.1 and a free port; each wait on it is bounded in time.
"""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from megakv.bench.server_metrics import Sample, scrape, total
from megakv.processes import free_port, kill_session

ROOT = Path(__file__).resolve().parents[2]
MEGAKV = str(Path(sys.executable).with_name("megakv"))
# A ChatML-like template written as plain text: the byte-level tokenizer has no special tokens for it.
CHAT_TEMPLATE = ("{% for message in messages %}{{ '<|' + message['role'] + '|>' + message['content'] + '\\n' }}"
                 "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}")
STARTUP_SECONDS = 120
SHUTDOWN_SECONDS = 30



class ServerProcess:
    """A running ``megakv serve`` (or mpirun of it) whose output is collected as it comes."""

    def __init__(self, proc: subprocess.Popen, port: int, host: str = "127.0.0.1") -> None:
        self.proc = proc
        self.url = f"http://{host}:{port}"
        self.lines: list[str] = []
        self._readers = [threading.Thread(target=self._read, args=(pipe,), daemon=True)
                         for pipe in (proc.stdout, proc.stderr) if pipe is not None]
        for reader in self._readers:
            reader.start()

    def _read(self, pipe) -> None:
        for line in pipe:
            self.lines.append(line)

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def wait_ready(self) -> None:
        """Poll /health until the server answers (fail with its output if it dies or takes too long)."""
        deadline = time.monotonic() + STARTUP_SECONDS
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"server exited {self.proc.returncode} while starting:\n{self.output[-4000:]}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        pytest.fail(f"server not ready after {STARTUP_SECONDS} s:\n{self.output[-4000:]}")

    def ready(self) -> ServerProcess:
        """wait_ready, killing every process of the server if it fails; the server."""
        try:
            self.wait_ready()
        except BaseException:
            self.kill()
            raise
        return self

    def front_pid(self) -> int:
        """The pid of the process that serves HTTP (rank 0), as uvicorn logs it."""
        match = re.search(r"megakv serve: .* \(pid (\d+)\)", self.output)
        assert match, self.output
        return int(match.group(1))

    def stop(self, sig: int = signal.SIGTERM) -> int:
        """Signal the HTTP process and wait for the whole job to end; its exit status."""
        os.kill(self.front_pid(), sig)
        try:
            self.proc.wait(timeout=SHUTDOWN_SECONDS)
        except subprocess.TimeoutExpired:
            pytest.fail(f"server still running {SHUTDOWN_SECONDS} s after signal {sig}:\n{self.output[-4000:]}")
        for reader in self._readers:
            reader.join(timeout=5)
        return self.proc.returncode

    def kill(self) -> None:
        """SIGKILL every process of the server's session (it was started in one of its own): mpirun puts each
        rank in a process group of its own, and an idle rank 0 outlives a killed mpirun."""
        kill_session(self.proc.pid)
        self.proc.wait()


def serve_flags(checkpoint: Path, port: int, *flags: str) -> list[str]:
    """The options of ``megakv serve`` (or launch/serve.py) on ``port``. In fp32 unless ``flags`` say otherwise:
    the tests compare with Hugging Face fp32, and ``--dtype auto`` picks bf16 on CPUs with bf16 arithmetic."""
    return ["--model", str(checkpoint), "--port", str(port), "--log-level", "warning", "--dtype", "float32", *flags]


def serve_argv(checkpoint: Path, port: int, *flags: str) -> list[str]:
    """The ``megakv serve`` command line on ``port``."""
    return [MEGAKV, "serve", *serve_flags(checkpoint, port, *flags)]


def spawn_server(checkpoint: Path, *flags: str) -> ServerProcess:
    """A ready one-process server."""
    port = free_port()
    proc = subprocess.Popen(serve_argv(checkpoint, port, *flags), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=dict(os.environ, OMP_NUM_THREADS="1"), start_new_session=True)
    return ServerProcess(proc, port).ready()


def wait_for_failed_instances(server: ServerProcess, instances: list[int], timeout: float) -> dict:
    """/health's body once it names ``instances`` failed (a healthy server's has no body); each poll is bounded,
    for the front may be busy."""
    health: dict = {}
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            response = httpx.get(f"{server.url}/health", timeout=2)
            health = response.json() if response.content else {}
        except httpx.TransportError:
            pass
        if health.get("failed_instances") == instances:
            return health
        time.sleep(0.1)
    pytest.fail(f"/health did not name instances {instances} failed within {timeout} s: {health}\n"
                f"{server.output[-4000:]}")


def wait_for_idle_pools(url: str, timeout: float = 30) -> list[Sample]:
    """Scrape until no request runs or waits and every pool is whole (blocks back everywhere but the kept loans,
    each debtor's cached prefixes that no request holds); the samples."""
    deadline = time.monotonic() + timeout
    while True:
        samples = scrape(url)
        busy = total(samples, "megakv:num_requests_running") + total(samples, "megakv:num_requests_waiting")
        kept = total(samples, "megakv:ledger_kept_blocks")
        leaked = total(samples, "megakv:kv_blocks_total") - total(samples, "megakv:kv_blocks_free") - kept
        if busy == 0 and leaked == 0 and total(samples, "megakv:ledger_outstanding_blocks") == kept:
            return samples
        if time.monotonic() > deadline:
            pytest.fail(f"pools not whole after {timeout} s: {samples}")
        time.sleep(0.2)
