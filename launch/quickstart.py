"""The quickstart's demo run: start the demo cluster, ask it through the openai client, stop it with SIGTERM.

    .venv/bin/python launch/quickstart.py [--config configs/demo.yaml] [--model demo/ckpt]

Run by launch/quickstart.sh once the environment and the demo model exist. The cluster is
``megakv serve`` under mpirun (launch/serve.sh, ranks = instances x tp of the config) on a free
loopback port. Each chat of configs/demo_prompts.jsonl is streamed back; its last chunk carries
``kv_placement`` (asked for with megakv's ``return_kv_placement`` field), which says where the
request's KV blocks lived. The cluster's DistKV counters come from /metrics. SIGTERM to rank 0
stops the server, then every rank; the exit status is 1 if the cluster did not start or stop cleanly.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
from openai import OpenAI

from megakv.bench.server_metrics import scrape, total
from megakv.processes import kill_session, session_pids

ROOT = Path(__file__).resolve().parents[1]
# Loading the model on every rank, and on a first run building the CPU attention op (30-40 s), come first.
STARTUP_SECONDS = 600
SHUTDOWN_SECONDS = 30
# How long the cluster may take to hand every borrowed block home (but the kept loans) once the last answer is in.
SETTLE_SECONDS = 30


class Cluster:
    """``megakv serve`` under mpirun, its output echoed and kept."""

    def __init__(self, config: Path, model: str | None) -> None:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        command = ["bash", str(ROOT / "launch" / "serve.sh"), str(config), "--port", str(port),
                   "--log-level", "warning", *(["--model", model] if model else [])]
        print(f"$ {' '.join(command[1:])}", flush=True)
        # A session of its own: mpirun puts each rank in a process group of its own, but all stay in its session.
        self.proc = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     start_new_session=True)
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._echo, daemon=True)
        self._reader.start()

    def _echo(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line)
            print(f"  server| {line}", end="", flush=True)

    def wait_ready(self) -> None:
        """Poll /health until it answers 200; RuntimeError if the job ends or takes too long."""
        deadline = time.monotonic() + STARTUP_SECONDS
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited with status {self.proc.returncode} while starting")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"the server did not answer /health within {STARTUP_SECONDS} s")

    def front_pid(self) -> int:
        """The pid of rank 0, which serves HTTP, from its startup line."""
        for line in self.lines:
            match = re.search(r"megakv serve: serving .*\(pid (\d+)\)", line)
            if match:
                return int(match.group(1))
        raise RuntimeError("the server did not print its pid")

    def stop(self) -> None:
        """SIGTERM to rank 0, then check that mpirun ended with status 0 and no rank outlived it."""
        pid = self.front_pid()
        os.kill(pid, signal.SIGTERM)
        start = time.monotonic()
        try:
            status = self.proc.wait(timeout=SHUTDOWN_SECONDS)
        except subprocess.TimeoutExpired:
            raise RuntimeError(f"the cluster still runs {SHUTDOWN_SECONDS} s after SIGTERM to rank 0") from None
        self._reader.join(timeout=5)
        if status != 0:
            raise RuntimeError(f"mpirun exited with status {status} after SIGTERM to rank 0")
        left = session_pids(self.proc.pid)
        if left:
            raise RuntimeError(f"processes {left} of the job still run after mpirun exited")
        print(f"stopped: SIGTERM to rank 0 (pid {pid}); every rank exited, then mpirun with status 0, "
              f"{time.monotonic() - start:.1f} s later", flush=True)

    def kill(self) -> None:
        """SIGKILL to every process of the job that still runs."""
        kill_session(self.proc.pid)
        self.proc.wait()


def ask(client: OpenAI, model: str, record: dict) -> None:
    """Stream one chat of the prompts file; print the question, the answer and where its KV blocks lived."""
    question = record["messages"][-1]["content"]
    shown = question if len(question) <= 80 else f"{question[:60]}... ({len(question)} characters)"
    print(f"\nuser: {shown!r}", flush=True)
    print("assistant: ", end="", flush=True)
    placement, usage = None, None
    for chunk in client.chat.completions.create(
            model=model, messages=record["messages"], max_tokens=record.get("max_new_tokens"), temperature=0,
            stream=True, stream_options={"include_usage": True}, extra_body={"return_kv_placement": True}):
        for choice in chunk.choices:
            print(choice.delta.content or "", end="", flush=True)
            placement = (choice.model_extra or {}).get("kv_placement") or placement
        usage = chunk.usage or usage
    print(flush=True)
    print(f"  {usage.prompt_tokens} prompt + {usage.completion_tokens} generated tokens; served by instance "
          f"{placement['instance']}; KV blocks: {placement['num_local_blocks']} in its own pool, "
          f"{placement['num_remote_blocks']} borrowed; held by instances {placement['block_instances']}", flush=True)


def report_cluster(url: str) -> None:
    """Print the cluster's DistKV counters once every borrowed block is home but the kept loans (borrowed blocks of
    cached prefixes that no request holds), or after SETTLE_SECONDS."""
    deadline = time.monotonic() + SETTLE_SECONDS
    while True:
        samples = scrape(url)
        kept = total(samples, "megakv:ledger_kept_blocks")
        settled = total(samples, "megakv:ledger_outstanding_blocks") == kept and \
            total(samples, "megakv:kv_blocks_free") + kept == total(samples, "megakv:kv_blocks_total")
        if settled or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    pools = sorted((int(sample.labels["instance"]), sample.value) for sample in samples
                   if sample.name == "megakv:kv_blocks_free")
    free = [f"{value:.0f}" for _, value in pools]
    print(f"\ncluster (/metrics): {total(samples, 'megakv:borrow_events_total'):.0f} borrow events, "
          f"{total(samples, 'megakv:blocks_borrowed_total'):.0f} blocks borrowed, "
          f"{total(samples, 'megakv:remote_micro_attentions_total'):.0f} remote micro-attentions, "
          f"{total(samples, 'megakv:dgfm_blocks_moved_total'):.0f} blocks moved by DGFM; now "
          f"{total(samples, 'megakv:ledger_outstanding_blocks'):.0f} blocks owed in the ledger ({kept:.0f} of them "
          f"kept loans: borrowed blocks of cached prefixes that no request holds), free blocks per instance "
          f"{', '.join(free)} of {total(samples, 'megakv:kv_blocks_total') / len(free):.0f}", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "demo.yaml")
    parser.add_argument("--model", help="the checkpoint (default: model: in the config)")
    parser.add_argument("--prompts-file", type=Path, default=ROOT / "configs" / "demo_prompts.jsonl")
    args = parser.parse_args()
    records = [json.loads(line) for line in args.prompts_file.read_text().splitlines() if line.strip()]
    cluster = Cluster(args.config, args.model)
    try:
        cluster.wait_ready()
        client = OpenAI(base_url=f"{cluster.url}/v1", api_key="unused", timeout=300, max_retries=0)
        model = client.models.list().data[0].id
        for record in records:
            ask(client, model, record)
        report_cluster(cluster.url)
        cluster.stop()
    except RuntimeError as err:
        print(f"quickstart: error: {err}", file=sys.stderr, flush=True)
        return 1
    finally:
        cluster.kill()
    return 0


if __name__ == "__main__":
    sys.exit(main())
