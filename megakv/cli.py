"""The ``megakv`` command line: ``megakv generate``, ``megakv serve`` and ``megakv bench serve``.

Options come from flags, then a YAML ``--config`` file, then defaults (a flag
wins over the file). Launched as one process, under ``mpirun`` or under the
``deepspeed`` launcher; rank 0 prints the results, or serves HTTP.
"""
from __future__ import annotations

import argparse
import os
import sys

from megakv.bench.options import add_bench_serve_options


def add_engine_options(parser: argparse.ArgumentParser) -> None:
    """The checkpoint, parallelism, sampling, KV cache, scheduler and DistKV options shared by every command."""
    parser.add_argument("--model", help="megakv checkpoint folder (tools/convert_checkpoint.py); "
                                        "or model: in --config")
    parser.add_argument("--config", help="YAML file of options (same names as the flags, with _ or -)")
    parser.add_argument("--tp", type=int, help="tensor-parallel ranks per instance (default 1)")
    parser.add_argument("--instances", type=int, help="serving instances (default 1)")
    parser.add_argument("--dtype", help="float32, bfloat16, float16 or auto (default auto: the checkpoint's, but "
                                        "bfloat16 for a float32 checkpoint on a CPU with avx512_bf16 or AMX)")
    parser.add_argument("--max-new-tokens", type=int,
                        help="tokens to generate per prompt (default 32); serve: for requests without max_tokens "
                             "(default: vLLM's, 16 for completions and the room left for chat)")
    parser.add_argument("--temperature", type=float, help="0 for greedy decoding (default 0)")
    parser.add_argument("--top-k", type=int, help="sample among the k most likely tokens (0: off)")
    parser.add_argument("--top-p", type=float, help="nucleus sampling threshold (1: off)")
    parser.add_argument("--seed", type=int, help="sampling seed")
    parser.add_argument("--ignore-eos", action="store_true", default=None, help="do not stop at EOS")
    parser.add_argument("--block-size", type=int, help="tokens per rBlock (default 16)")
    parser.add_argument("--num-blocks", "--kv-blocks-per-instance", dest="num_blocks", type=int,
                        help="rBlocks in each instance's pool (default: as many as fit in --kv-cache-memory-gb)")
    parser.add_argument("--kv-cache-memory-gb", type=float, help="KV pool budget per rank in GiB (default 1)")
    parser.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=None,
                        help="reuse the KV of a prompt's full blocks that an earlier request computed (default on)")
    parser.add_argument("--max-num-seqs", type=int, help="requests per step (default 64)")
    parser.add_argument("--max-num-batched-tokens", type=int,
                        help="token budget per step; longer prompts prefill in chunks of this size (default 512)")
    parser.add_argument("--lending-cap", type=float,
                        help="fraction of an instance's pool it may lend to other instances, 0 to 1 (default 1)")
    parser.add_argument("--max-moves-per-step", type=int,
                        help="DGFM: blocks moved home per step at most (default 8)")
    parser.add_argument("--stall-timeout", type=float,
                        help="seconds with unfinished requests, every instance holding them waiting and no "
                             "message moving, after which the cluster is declared stalled and stops (default 60)")
    parser.add_argument("--peer-timeout", type=float,
                        help="seconds another instance may leave a remote micro-attention, a block copy or its "
                             "heartbeat unanswered before it is declared failed and its requests run again "
                             "elsewhere (default 10)")
    parser.add_argument("--recall-after", type=float,
                        help="seconds a request that fits its own instance's pool waits for room while that pool "
                             "lends blocks, before the instance recalls them, preempting the request that borrowed "
                             "them (once at most); inf: never (default 0.1)")


def build_parser() -> argparse.ArgumentParser:
    """The ``megakv`` argument parser."""
    parser = argparse.ArgumentParser(prog="megakv", description="megakv: distributed-KV LLM inference")
    commands = parser.add_subparsers(dest="command", required=True)
    gen = commands.add_parser("generate", help="generate tokens for one or more prompts")
    add_engine_options(gen)
    # Not required: a --config file may give prompts_file.
    prompts = gen.add_mutually_exclusive_group()
    prompts.add_argument("--prompt-ids", help="comma-separated prompt token ids, e.g. 1,2,3")
    prompts.add_argument("--prompt", help="prompt text (needs a tokenizer in the checkpoint)")
    prompts.add_argument("--chat", help="a user message, rendered with the checkpoint's chat template")
    prompts.add_argument("--prompts-file", help="JSONL: one {\"prompt_ids\": [...]}, {\"prompt\": \"...\"} or "
                                                "{\"messages\": [{\"role\": ..., \"content\": ...}]} per line, "
                                                "optional max_new_tokens and instance")
    gen.add_argument("--json", action="store_true", help="print one JSON object per prompt")
    serve = commands.add_parser("serve", help="an OpenAI-compatible HTTP server (rank 0) over the engine or cluster; "
                                              "the sampling options are the defaults of requests that do not set them")
    add_engine_options(serve)
    # No defaults here: a flag wins over the --config file, which wins over megakv.config.ServerConfig's defaults.
    serve.add_argument("--host", help="address to listen on (default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port to listen on; 0: any free port (default 8000)")
    serve.add_argument("--served-model-name", help="the model's name in the API (default: the --model path)")
    serve.add_argument("--log-level", help="uvicorn's log level: critical, error, warning, info or debug "
                                           "(default info)")
    serve.add_argument("--max-request-bytes", type=int,
                       help="the largest request body accepted; larger ones get HTTP 413 (default 32 MiB)")
    serve.add_argument("--max-prompts-per-request", type=int,
                       help="the most prompts one completion request may hold (default 4096)")
    serve.add_argument("--max-choices-per-request", type=int,
                       help="the most choices (prompts x n) one request may ask for (default 4096)")
    serve.add_argument("--max-request-tokens", type=int,
                       help="the most prompt tokens plus max_tokens, summed over a request's choices "
                            "(default 4194304)")
    bench = commands.add_parser("bench", help="benchmarks")
    bench_commands = bench.add_subparsers(dest="bench_command", required=True)
    add_bench_serve_options(bench_commands.add_parser(
        "serve", help="load an OpenAI-compatible server (vllm bench serve's flags) and report throughput, "
                      "latencies and goodput"))
    return parser


def launcher_rank() -> int:
    """This process's global rank as the launcher tells it, before any process group exists."""
    for variable in ("OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK", "RANK"):
        if variable in os.environ:
            return int(os.environ[variable])
    return 0


def abort_other_ranks(status: int) -> None:
    """Stop every rank of the job: the others may be waiting in a collective this rank never reaches. Under
    mpirun, MPI aborts the job; under deepspeed or torchrun, the launcher stops the others once this rank has
    exited, which it does at once (its KV server thread may be blocked in a receive that exit would wait for)."""
    if "mpi4py.MPI" in sys.modules:
        from mpi4py import MPI

        if MPI.Is_initialized() and MPI.COMM_WORLD.Get_size() > 1:
            MPI.COMM_WORLD.Abort(status)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``megakv`` console command."""
    args = build_parser().parse_args(argv)
    try:
        # Imported here, not above: they load torch, which a --help or a bad flag need not wait for.
        if args.command == "bench":
            from megakv.bench.serve import run_bench_serve

            status = run_bench_serve(args)
        else:
            from megakv.options import complete_from_config

            args = complete_from_config(args)
            if args.command == "serve":
                from megakv.server.launch import run_serve as run
            else:
                from megakv.generate import run_generate as run
            status = run(args)
    except (ValueError, RuntimeError, OSError) as err:
        rank_local = getattr(err, "rank_local", False)
        if launcher_rank() == 0 or rank_local:
            print(f"megakv: error: {err}", file=sys.stderr, flush=True)
        if rank_local:
            abort_other_ranks(2)
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit(130)
    sys.exit(status)
