"""``megakv bench serve``: load an OpenAI-compatible server with timed arrivals and report what it delivered.

Follows ``vllm bench serve``: requests from a dataset are sent at the arrival times of
megakv.bench.arrivals, each streamed and timed token by token (megakv.bench.client), at
most ``--max-concurrency`` at a time; the figures (megakv.bench.results) print as a table
and go to ``--json``. Failed requests are counted and their errors kept.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import time
from datetime import datetime
from typing import Any

import httpx
from tqdm import tqdm

from megakv.bench.arrivals import arrival_offsets, check_rate
from megakv.bench.client import RequestResult, ServerAPI, send_streaming
from megakv.bench.datasets import (BenchRequest, LengthDistribution, document_requests, jsonl_requests,
                                   parse_length_distribution, random_requests, range_ratio_distribution,
                                   sharegpt_requests)
from megakv.bench.options import DEFAULT_RANDOM_INPUT_LEN, DEFAULT_RANDOM_OUTPUT_LEN
from megakv.bench.results import format_table, parse_goodput, parse_percentiles, summarize

ROUTES = {"completions": "/v1/completions", "chat": "/v1/chat/completions"}


def check_args(args: argparse.Namespace) -> None:
    """Raise ValueError naming the first flag whose value cannot run."""
    if args.num_prompts < 1:
        raise ValueError(f"--num-prompts must be at least 1, got {args.num_prompts}")
    check_rate(args.request_rate, args.burstiness)
    if args.max_concurrency is not None and args.max_concurrency < 1:
        raise ValueError(f"--max-concurrency must be at least 1, got {args.max_concurrency}")
    if not args.request_timeout > 0:
        raise ValueError(f"--request-timeout must be a positive number of seconds, got {args.request_timeout}")
    if not math.isfinite(args.temperature) or args.temperature < 0:
        raise ValueError(f"--temperature must be a finite number >= 0, got {args.temperature}")
    for flag in ("sharegpt_output_len", "jsonl_output_len"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise ValueError(f"--{flag.replace('_', '-')} must be at least 1, got {value}")
    generated = args.dataset in ("random", "documents")
    if generated and args.dataset_path is not None:
        raise ValueError(f"--dataset-path is for --dataset sharegpt or jsonl; --dataset {args.dataset} needs none")
    if not generated and args.dataset_path is None:
        raise ValueError(f"--dataset {args.dataset} needs --dataset-path FILE")
    if args.dataset == "random":
        random_lengths(args)
    if args.dataset == "documents":
        document_lengths(args)
    if not args.base_url.startswith(("http://", "https://")):
        raise ValueError(f"--base-url must start with http:// or https://, got {args.base_url!r}")
    if args.json is not None and not os.path.isdir(os.path.dirname(os.path.abspath(args.json))):
        raise ValueError(f"--json {args.json}: its folder does not exist")


def random_lengths(args: argparse.Namespace) -> tuple[LengthDistribution, LengthDistribution]:
    """The random dataset's prompt and output length distributions, from their flags."""
    lengths = []
    for side, default in (("input", DEFAULT_RANDOM_INPUT_LEN), ("output", DEFAULT_RANDOM_OUTPUT_LEN)):
        spec, length = getattr(args, f"{side}_len_dist"), getattr(args, f"random_{side}_len")
        if spec is not None and length is not None:
            raise ValueError(f"give --{side}-len-dist or --random-{side}-len, not both")
        if spec is not None:
            lengths.append(parse_length_distribution(spec, f"--{side}-len-dist"))
        else:
            lengths.append(range_ratio_distribution(default if length is None else length, args.random_range_ratio,
                                                    f"--random-{side}-len"))
    return lengths[0], lengths[1]


def document_lengths(args: argparse.Namespace) -> tuple[LengthDistribution, LengthDistribution]:
    """The documents dataset's document and output length distributions, from their flags."""
    for flag in ("input_len_dist", "random_input_len"):
        if getattr(args, flag) is not None:
            raise ValueError(f"--{flag.replace('_', '-')} is for --dataset random: documents take "
                             f"--document-len-dist and --question-len")
    for flag in ("questions_per_document", "question_len"):
        if getattr(args, flag) < 1:
            raise ValueError(f"--{flag.replace('_', '-')} must be at least 1, got {getattr(args, flag)}")
    return parse_length_distribution(args.document_len_dist, "--document-len-dist"), random_lengths(args)[1]


async def load_requests(api: ServerAPI, model: str, args: argparse.Namespace) -> list[BenchRequest]:
    """The benchmark's requests, from --dataset and its flags."""
    chat = args.endpoint == "chat"
    if args.dataset == "sharegpt":
        return await sharegpt_requests(api, model, args.dataset_path, args.num_prompts, args.seed,
                                       args.sharegpt_output_len)
    if args.dataset == "jsonl":
        return jsonl_requests(args.dataset_path, args.num_prompts, chat, args.jsonl_output_len)
    if args.dataset == "documents":
        documents, output_lengths = document_lengths(args)
        return await document_requests(api, model, args.num_prompts, documents, args.questions_per_document,
                                       args.question_len, output_lengths, args.seed, chat)
    input_lengths, output_lengths = random_lengths(args)
    return await random_requests(api, model, args.num_prompts, input_lengths, output_lengths, args.seed, chat)


def request_body(request: BenchRequest, model: str, args: argparse.Namespace) -> dict[str, Any]:
    """The streamed request's JSON body."""
    body: dict[str, Any] = {"model": model, "temperature": args.temperature, "stream": True,
                            "stream_options": {"include_usage": True}}
    if args.endpoint == "chat":
        prompt = request.prompt
        body["messages"] = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
        body["max_completion_tokens"] = request.output_len
    else:
        body["prompt"] = request.prompt
        body["max_tokens"] = request.output_len
    if args.ignore_eos:
        body["ignore_eos"] = True
    return body


async def send_all(client: httpx.AsyncClient, url: str, bodies: list[dict[str, Any]],
                   prompt_lens: list[int | None], offsets: list[float], max_concurrency: int | None,
                   progress: tqdm) -> tuple[list[RequestResult], float]:
    """Send each body at its offset (waiting for a free slot under max_concurrency); the results in the
    bodies' order and the seconds from the first send to the last answer."""
    slots = asyncio.Semaphore(max_concurrency or len(bodies))
    start = time.perf_counter()

    async def send(index: int) -> RequestResult:
        await asyncio.sleep(max(0.0, start + offsets[index] - time.perf_counter()))
        async with slots:
            result = await send_streaming(client, url, bodies[index], prompt_lens[index], start)
        progress.update(1)
        return result

    results = await asyncio.gather(*(send(index) for index in range(len(bodies))))
    return list(results), time.perf_counter() - start


async def benchmark(args: argparse.Namespace) -> dict[str, Any]:
    """Run the benchmark the flags describe; its results as a JSON-ready dict."""
    check_args(args)
    slos = parse_goodput(args.goodput)
    percentiles = parse_percentiles(args.metric_percentiles)
    # No pool limit: requests beyond --max-concurrency wait on the semaphore, never on a connection.
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    timeout = httpx.Timeout(args.request_timeout, pool=None)
    async with httpx.AsyncClient(timeout=timeout, limits=limits) as client:
        api = ServerAPI(client, args.base_url)
        model = args.model or await api.first_model()
        requests = await load_requests(api, model, args)
        offsets = arrival_offsets(len(requests), args.request_rate, args.burstiness, args.seed)
        bodies = [request_body(request, model, args) for request in requests]
        with tqdm(total=len(requests), disable=args.disable_tqdm, desc="requests") as progress:
            results, duration = await send_all(client, f"{api.base_url}{ROUTES[args.endpoint]}", bodies,
                                               [request.prompt_len for request in requests], offsets,
                                               args.max_concurrency, progress)
    figures = summarize(results, duration, slos, percentiles)
    settings = {"date": datetime.now().strftime("%Y%m%d-%H%M%S"), "base_url": args.base_url, "model_id": model,
                "endpoint": args.endpoint, "dataset": args.dataset, "num_prompts": args.num_prompts,
                # JSON has no infinity: an unlimited rate is written as the string "inf".
                "request_rate": args.request_rate if math.isfinite(args.request_rate) else "inf",
                "burstiness": args.burstiness, "max_concurrency": args.max_concurrency, "seed": args.seed,
                "goodput": slos or None, "max_tokens": [request.output_len for request in requests]}
    return {**settings, **figures}


def run_bench_serve(args: argparse.Namespace) -> int:
    """Entry point of ``megakv bench serve``: print the table, write --json; exit status 0."""
    result = asyncio.run(benchmark(args))
    print(format_table(result, parse_percentiles(args.metric_percentiles)), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0
