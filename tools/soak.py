"""A cluster server under a long mixed load, with or without a killed instance: does it stay whole?

    python tools/soak.py [--model demo/ckpt] [--duration 600] [--max-requests 1000] [--kill-rank 2 --kill-at 120]

``megakv serve`` (``--instances`` instances of TP 1 under mpirun, pools of ``--num-blocks`` blocks of 16 tokens)
gets up to ``--max-requests`` requests for at most ``--duration`` seconds, ``--concurrency`` at a time: prompts of
random token ids, most short, a ``--long-fraction`` of them longer than one pool (they borrow), half streamed, a
tenth of the streams closed by the client after their first chunk (an abort). With ``--kill-rank``, that rank
(not 0: the front) gets SIGKILL ``--kill-at`` seconds in, and the cluster goes on without its instance.

Every ``--sample-every`` seconds it reads each rank's resident memory and open file descriptors from /proc. At
the end it waits until no request runs and reads /metrics and /health.

Prints one JSON object (also written to ``--output``): the requests completed, aborted and failed (with the
first errors; apart, those that the instances left after a failure cannot hold), each rank's memory and
descriptors after the warm-up (the first fifth of the run) and at the end, its memory at every sample, and whether
every live pool is whole (every block free, the ledger empty). A server that leaks shows memory that keeps
growing; one that loses blocks shows pools that are not whole.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from megakv.bench.cluster_server import Server, machine
from megakv.bench.server_metrics import scrape, total
from megakv.processes import session_pids

REPO_ROOT = Path(__file__).resolve().parent.parent
MODEL_NAME = "soak"
BLOCK_SIZE = 16
# Token ids every model has (the demo's vocabulary is 49,152; the tests' random model's 259).
VOCAB = 250
ERRORS_KEPT = 10
# How megakv names a failed instance in a refusal ("(instances [2] failed)") or an error event ("instance 2 failed,
# and the 2 instance(s) left can hold ...").
FAILURE_NAMED = re.compile(r"instances? \[?\d+(, \d+)*\]? failed")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=REPO_ROOT / "demo" / "ckpt")
    parser.add_argument("--instances", type=int, default=3)
    parser.add_argument("--num-blocks", type=int, default=24, help="blocks of 16 tokens per instance")
    parser.add_argument("--duration", type=float, default=600.0, help="seconds of load at most")
    parser.add_argument("--max-requests", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--long-fraction", type=float, default=0.1, help="share of prompts longer than one pool")
    parser.add_argument("--max-tokens", type=int, default=24, help="the most tokens a request generates")
    parser.add_argument("--kill-rank", type=int, help="SIGKILL this rank (not 0) during the run")
    parser.add_argument("--kill-at", type=float, default=60.0, help="seconds into the run")
    parser.add_argument("--peer-timeout", type=float, default=10.0)
    parser.add_argument("--sample-every", type=float, default=5.0)
    parser.add_argument("--request-timeout", type=float, default=120.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", type=Path)
    args = parser.parse_args()
    if args.kill_rank is not None and not 0 < args.kill_rank < args.instances:
        parser.error(f"--kill-rank must name a rank from 1 to {args.instances - 1}: rank 0 is the front")
    return args


def rank_pids(server: Server) -> dict[int, int]:
    """Global rank -> pid of each rank of the server that still runs (mpirun and its daemons left out)."""
    ranks = {}
    for pid in session_pids(server.proc.pid):
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        rank = next((int(entry.split(b"=", 1)[1]) for entry in environ if entry.startswith(b"OMPI_COMM_WORLD_RANK=")),
                    None)
        if rank is not None and b"serve" in argv:
            ranks[rank] = pid
    return ranks


def sample(pids: dict[int, int]) -> dict[int, dict[str, float]]:
    """Each rank's resident memory (MiB) and open file descriptors now."""
    figures = {}
    for rank, pid in pids.items():
        try:
            status = Path(f"/proc/{pid}/status").read_text()
            fds = len(os.listdir(f"/proc/{pid}/fd"))
        except OSError:  # the rank ended (it was killed)
            continue
        rss_kib = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS:"))
        figures[rank] = {"rss_mib": round(rss_kib / 1024, 1), "fds": fds}
    return figures


class Load:
    """The requests: each drawn from one seeded generator, sent ``concurrency`` at a time, outcomes counted."""

    def __init__(self, args: argparse.Namespace, url: str) -> None:
        self.args, self.url = args, url
        self.draw = random.Random(args.seed)
        self.pool_tokens = args.num_blocks * BLOCK_SIZE
        self.counts = {"sent": 0, "completed": 0, "aborted": 0, "failed": 0, "ended_by_instance_failure": 0}
        self.errors: list[str] = []

    def next_body(self) -> tuple[dict, bool]:
        """A request body, and whether the client closes it after its first chunk."""
        draw = self.draw
        if draw.random() < self.args.long_fraction:
            length = draw.randint(self.pool_tokens + BLOCK_SIZE, 2 * self.pool_tokens - self.args.max_tokens)
        else:
            length = draw.randint(8, self.pool_tokens // 4)
        stream = draw.random() < 0.5
        body = {"model": MODEL_NAME, "prompt": [draw.randrange(1, VOCAB) for _ in range(length)],
                "max_tokens": draw.randint(1, self.args.max_tokens), "temperature": 0, "ignore_eos": True,
                "stream": stream}
        return body, stream and draw.random() < 0.1

    def fail(self, reason: str) -> None:
        """Count a failed request; one that the instances left after a failure cannot hold, which megakv refuses
        or ends naming the failure, is counted apart."""
        if FAILURE_NAMED.search(reason):
            self.counts["ended_by_instance_failure"] += 1
        else:
            self.counts["failed"] += 1
        if len(self.errors) < ERRORS_KEPT:
            self.errors.append(reason)

    async def one(self, client: httpx.AsyncClient, body: dict, abort: bool) -> None:
        self.counts["sent"] += 1
        try:
            if not body["stream"]:
                response = await client.post(f"{self.url}/v1/completions", json=body)
                if response.status_code != 200:
                    self.fail(f"HTTP {response.status_code}: {response.text[:300]}")
                else:
                    self.counts["completed"] += 1
                return
            async with client.stream("POST", f"{self.url}/v1/completions", json=body) as response:
                if response.status_code != 200:
                    self.fail(f"HTTP {response.status_code}: {(await response.aread())[:300]!r}")
                    return
                async for line in response.aiter_lines():
                    if abort and line.startswith("data: "):
                        self.counts["aborted"] += 1
                        return
                    if line.startswith("data: ") and '"error"' in line:
                        self.fail(line[:300])
                        return
                    if line == "data: [DONE]":
                        self.counts["completed"] += 1
                        return
                self.fail("the stream ended without [DONE]")
        except httpx.HTTPError as err:
            self.fail(f"{type(err).__name__}: {err}")

    async def run(self, deadline: float) -> None:
        async with httpx.AsyncClient(timeout=self.args.request_timeout) as client:
            async def worker() -> None:
                while self.counts["sent"] < self.args.max_requests and time.monotonic() < deadline:
                    await self.one(client, *self.next_body())

            await asyncio.gather(*(worker() for _ in range(self.args.concurrency)))


async def soak(args: argparse.Namespace, server: Server) -> dict:
    """Run the load while sampling the ranks (and killing one, if asked); the report."""
    pids = rank_pids(server)
    started = time.monotonic()
    load = Load(args, server.url)
    run = asyncio.ensure_future(load.run(started + args.duration))
    samples: list[tuple[float, dict]] = []
    killed_at = None
    while not run.done():
        samples.append((time.monotonic() - started, sample(pids)))
        if args.kill_rank is not None and killed_at is None and time.monotonic() - started >= args.kill_at:
            os.kill(pids[args.kill_rank], signal.SIGKILL)
            killed_at = time.monotonic() - started
        await asyncio.wait([run], timeout=args.sample_every)
    await run
    elapsed = time.monotonic() - started
    samples.append((elapsed, sample(pids)))
    warm = next(figures for seconds, figures in samples if seconds >= elapsed / 5)
    last = samples[-1][1]
    ranks = {rank: {"after_warm_up": warm[rank], "end": last[rank],
                    "peak_rss_mib": max(figures[rank]["rss_mib"] for _, figures in samples if rank in figures),
                    "rss_mib_series": [[round(seconds), figures[rank]["rss_mib"]] for seconds, figures in samples
                                       if rank in figures]}
             for rank in sorted(last) if rank in warm}
    return {"seconds": round(elapsed, 1), "requests": load.counts, "errors": load.errors,
            "killed": None if killed_at is None else {"rank": args.kill_rank, "at_s": round(killed_at, 1)},
            "ranks": ranks}


def settle(server: Server) -> dict:
    """The cluster once it is idle: each live pool whole and the ledger empty but for the kept loans (a debtor's
    cached prefixes that no request holds), the failed instances."""
    deadline = time.monotonic() + 60
    while True:
        samples = scrape(server.url)
        busy = total(samples, "megakv:num_requests_running") + total(samples, "megakv:num_requests_waiting")
        kept = total(samples, "megakv:ledger_kept_blocks")
        held = total(samples, "megakv:kv_blocks_total") - total(samples, "megakv:kv_blocks_free") - kept
        outstanding = total(samples, "megakv:ledger_outstanding_blocks") - kept
        if (busy == 0 and held == 0 and outstanding == 0) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    health = httpx.get(f"{server.url}/health", timeout=10)
    return {"pools_whole": busy == 0 and held == 0 and outstanding == 0, "blocks_held": held,
            "ledger_outstanding_blocks": outstanding, "ledger_kept_blocks": kept,
            "failed_instances": health.json().get("failed_instances", []) if health.content else [],
            "instance_failures_total": total(samples, "megakv:instance_failures_total"),
            "requests_recomputed_total": total(samples, "megakv:requests_recomputed_total")}


def main() -> int:
    args = parse_args()
    if not (args.model / "megakv_config.json").exists():
        subprocess.run([sys.executable, str(REPO_ROOT / "tools" / "make_demo_model.py"), "--output", str(args.model)],
                       check=True)
    flags = ["--num-blocks", str(args.num_blocks), "--block-size", str(BLOCK_SIZE), "--max-num-batched-tokens",
             "128", "--peer-timeout", str(args.peer_timeout)]
    with tempfile.TemporaryDirectory() as folder:
        with Server.start(args.model, flags, args.instances, MODEL_NAME, Path(folder) / "server.log") as server:
            report = asyncio.run(soak(args, server))
            report["cluster"] = settle(server)
    report["setup"] = {key: getattr(args, key) for key in ("instances", "num_blocks", "duration", "max_requests",
                                                            "concurrency", "long_fraction", "max_tokens",
                                                            "peer_timeout", "seed")}
    report["environment"] = machine(REPO_ROOT)
    text = json.dumps(report, indent=2)
    print(text)
    if args.output is not None:
        args.output.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
