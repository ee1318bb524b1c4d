"""The ``megakv`` command line: ``megakv generate``.

Options come from flags, then a YAML ``--config`` file, then defaults (a flag
wins over the file). Launched as one process, under ``mpirun`` or under the
``deepspeed`` launcher; rank 0 prints the results.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass
from typing import Any

from megakv.chat import check_messages
from megakv.config import CacheConfig, DistKVConfig, EngineConfig, ParallelConfig, SchedulerConfig, load_yaml

# Option name -> default, for every option that may also be set in a YAML config.
DEFAULTS: dict[str, Any] = {
    "tp": 1,
    "instances": 1,
    "dtype": None,
    "max_new_tokens": 32,
    "temperature": 0.0,
    "top_k": 0,
    "top_p": 1.0,
    "seed": None,
    "ignore_eos": False,
    "block_size": 16,
    "num_blocks": None,
    "kv_cache_memory_gb": 1.0,
    "max_num_seqs": 64,
    "max_num_batched_tokens": 512,
    "lending_cap": 1.0,
    "max_moves_per_step": 8,
}


# Other spellings accepted for an option in YAML files.
OPTION_ALIASES = {"kv_blocks_per_instance": "num_blocks"}


class UsageError(ValueError):
    """A problem with the command line or its inputs."""


def build_parser() -> argparse.ArgumentParser:
    """The ``megakv`` argument parser."""
    parser = argparse.ArgumentParser(prog="megakv", description="megakv: distributed-KV LLM inference")
    commands = parser.add_subparsers(dest="command", required=True)
    gen = commands.add_parser("generate", help="generate tokens for one or more prompts")
    gen.add_argument("--model", required=True, help="megakv checkpoint folder (tools/convert_checkpoint.py)")
    gen.add_argument("--config", help="YAML file of options (same names as the flags, with _ or -)")
    prompts = gen.add_mutually_exclusive_group(required=True)
    prompts.add_argument("--prompt-ids", help="comma-separated prompt token ids, e.g. 1,2,3")
    prompts.add_argument("--prompt", help="prompt text (needs a tokenizer in the checkpoint)")
    prompts.add_argument("--chat", help="a user message, rendered with the checkpoint's chat template")
    prompts.add_argument("--prompts-file", help="JSONL: one {\"prompt_ids\": [...]}, {\"prompt\": \"...\"} or "
                                                "{\"messages\": [{\"role\": ..., \"content\": ...}]} per line, "
                                                "optional max_new_tokens and instance")
    gen.add_argument("--json", action="store_true", help="print one JSON object per prompt")
    gen.add_argument("--tp", type=int, help="tensor-parallel ranks per instance (default 1)")
    gen.add_argument("--instances", type=int, help="serving instances (default 1)")
    gen.add_argument("--dtype", help="float32, bfloat16 or float16 (default: the checkpoint's)")
    gen.add_argument("--max-new-tokens", type=int, help="tokens to generate per prompt (default 32)")
    gen.add_argument("--temperature", type=float, help="0 for greedy decoding (default 0)")
    gen.add_argument("--top-k", type=int, help="sample among the k most likely tokens (0: off)")
    gen.add_argument("--top-p", type=float, help="nucleus sampling threshold (1: off)")
    gen.add_argument("--seed", type=int, help="sampling seed")
    gen.add_argument("--ignore-eos", action="store_true", default=None, help="do not stop at EOS")
    gen.add_argument("--block-size", type=int, help="tokens per rBlock (default 16)")
    gen.add_argument("--num-blocks", "--kv-blocks-per-instance", dest="num_blocks", type=int,
                     help="rBlocks in each instance's pool (default: as many as fit in --kv-cache-memory-gb)")
    gen.add_argument("--kv-cache-memory-gb", type=float, help="KV pool budget per rank in GiB (default 1)")
    gen.add_argument("--max-num-seqs", type=int, help="requests per step (default 64)")
    gen.add_argument("--max-num-batched-tokens", type=int,
                     help="token budget per step; longer prompts prefill in chunks of this size (default 512)")
    gen.add_argument("--lending-cap", type=float,
                     help="fraction of an instance's pool it may lend to other instances, 0 to 1 (default 1)")
    gen.add_argument("--max-moves-per-step", type=int,
                     help="DGFM: blocks moved home (cycle swaps, pulls) per step at most (default 8)")
    return parser


def resolve_options(args: argparse.Namespace) -> dict[str, Any]:
    """Merge flags over the YAML config over defaults; unknown YAML keys are an error."""
    from_file = load_yaml(args.config) if args.config else {}
    from_file = {OPTION_ALIASES.get(key, key): value for key, value in from_file.items()}
    unknown = sorted(set(from_file) - set(DEFAULTS))
    if unknown:
        raise UsageError(f"config file {args.config}: unknown option(s) {', '.join(unknown)} "
                         f"(known: {', '.join(sorted(DEFAULTS))})")
    options = dict(DEFAULTS, **from_file)
    options.update({key: getattr(args, key) for key in DEFAULTS if getattr(args, key) is not None})
    if not isinstance(options["ignore_eos"], bool):
        raise UsageError(f"ignore_eos must be true or false, got {options['ignore_eos']!r}")
    return options


@dataclass(frozen=True)
class PromptSpec:
    """One prompt as given by the user, before tokenisation."""

    prompt_ids: list[int] | None
    text: str | None
    overrides: dict[str, Any]
    # The instance that serves the request (None: round robin).
    instance: int | None = None
    # A conversation to render with the checkpoint's chat template (instead of prompt_ids or text).
    messages: list[dict[str, str]] | None = None


PROMPT_OVERRIDES = ("max_new_tokens", "temperature", "top_k", "top_p", "seed")
# The ways a prompts-file line gives its prompt: exactly one per line.
PROMPT_KINDS = ("prompt_ids", "prompt", "messages")


def read_prompts(args: argparse.Namespace) -> list[PromptSpec]:
    """The prompts of --prompt-ids, --prompt or --prompts-file, checked line by line."""
    if args.prompt_ids is not None:
        try:
            ids = [int(part) for part in args.prompt_ids.split(",") if part.strip()]
        except ValueError:
            raise UsageError(f"--prompt-ids must be comma-separated integers, got {args.prompt_ids!r}") from None
        return [PromptSpec(ids, None, {})]
    if args.prompt is not None:
        return [PromptSpec(None, args.prompt, {})]
    if args.chat is not None:
        return [PromptSpec(None, None, {}, messages=[{"role": "user", "content": args.chat}])]
    try:
        with open(args.prompts_file) as f:
            lines = [(number, line) for number, line in enumerate(f, 1) if line.strip()]
    except OSError as err:
        raise UsageError(f"cannot read --prompts-file {args.prompts_file}: {err.strerror}") from None
    specs = []
    for number, line in lines:
        where = f"{args.prompts_file}:{number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise UsageError(f"{where}: not valid JSON ({err.msg})") from None
        if not isinstance(record, dict) or sum(key in record for key in PROMPT_KINDS) != 1:
            raise UsageError(f"{where}: each line needs exactly one of {', '.join(PROMPT_KINDS)}")
        unknown = sorted(set(record) - {*PROMPT_KINDS, "instance", *PROMPT_OVERRIDES})
        if unknown:
            raise UsageError(f"{where}: unknown key(s) {', '.join(unknown)}")
        ids = record.get("prompt_ids")
        if ids is not None and (not isinstance(ids, list) or not all(isinstance(t, int) for t in ids)):
            raise UsageError(f"{where}: prompt_ids must be a list of integers")
        messages = record.get("messages")
        if messages is not None:
            check_messages(messages, where)
        instance = record.get("instance")
        if instance is not None and (not isinstance(instance, int) or instance < 0):
            raise UsageError(f"{where}: instance must be an integer >= 0")
        specs.append(PromptSpec(ids, record.get("prompt"), {k: record[k] for k in PROMPT_OVERRIDES if k in record},
                                instance, messages))
    if not specs:
        raise UsageError(f"--prompts-file {args.prompts_file} holds no prompt")
    return specs


def engine_config(options: dict[str, Any]) -> EngineConfig:
    """The engine's configuration from the resolved options (each part validates its own keys)."""
    return EngineConfig(
        cache=CacheConfig(block_size=options["block_size"], num_blocks=options["num_blocks"],
                          kv_cache_memory_gb=options["kv_cache_memory_gb"]),
        scheduler=SchedulerConfig(max_num_seqs=options["max_num_seqs"],
                                  max_num_batched_tokens=options["max_num_batched_tokens"]),
        parallel=ParallelConfig(tensor_parallel_size=options["tp"], num_instances=options["instances"]),
        distkv=DistKVConfig(lending_cap=options["lending_cap"], max_moves_per_step=options["max_moves_per_step"]),
    )


def launcher_rank() -> int:
    """This process's global rank as the launcher tells it, before any process group exists."""
    for variable in ("OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK", "RANK"):
        if variable in os.environ:
            return int(os.environ[variable])
    return 0


def abort_other_ranks(status: int) -> None:
    """Stop every rank of an MPI job: the others may be waiting in a collective this rank never reaches."""
    if "mpi4py.MPI" in sys.modules:
        from mpi4py import MPI

        if MPI.Is_initialized() and MPI.COMM_WORLD.Get_size() > 1:
            MPI.COMM_WORLD.Abort(status)


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``megakv`` console command."""
    args = build_parser().parse_args(argv)
    try:
        from megakv.generate import run_generate
        status = run_generate(args)
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
