"""``megakv generate``: load a checkpoint on every rank, serve the prompts, print the results."""
from __future__ import annotations

import argparse
import json
import sys

from megakv.checkpoint.format import read_checkpoint_info
from megakv.cli import UsageError, engine_config, read_prompts, resolve_options
from megakv.config import parse_dtype
from megakv.engine.llm_engine import LLMEngine
from megakv.engine.request import RequestOutput
from megakv.engine.sampling import SamplingParams
from megakv.parallel import state
from megakv.tokenizer import TextTokenizer


class RankLocalError(RuntimeError):
    """An error only this rank saw (its own shard, say): every rank reports its own."""

    rank_local = True


def tokenize(specs, tokenizer: TextTokenizer | None, model_dir: str) -> list[list[int]]:
    prompts = []
    for spec in specs:
        if spec.prompt_ids is not None:
            prompts.append(spec.prompt_ids)
        elif tokenizer is None:
            raise UsageError(f"checkpoint {model_dir} has no tokenizer.json: pass token ids with --prompt-ids")
        else:
            prompts.append(tokenizer.encode(spec.text))
    return prompts


def sampling_params(options: dict, overrides: dict) -> SamplingParams:
    merged = {key: overrides.get(key, options[key]) for key in
              ("max_new_tokens", "temperature", "top_k", "top_p", "seed")}
    return SamplingParams(ignore_eos=bool(options["ignore_eos"]), **merged)


def format_output(output: RequestOutput, tokenizer: TextTokenizer | None) -> dict:
    record = {"prompt_ids": output.prompt_ids, "token_ids": output.token_ids, "finish_reason": output.finish_reason}
    if tokenizer is not None:
        record["text"] = tokenizer.decode(output.token_ids)
    return record


def describe(record: dict) -> str:
    """A human-readable account of one result."""
    lines = [f"prompt ({len(record['prompt_ids'])} tokens) -> {len(record['token_ids'])} new tokens, "
             f"finish_reason={record['finish_reason']}",
             f"  token_ids: {record['token_ids']}"]
    if "text" in record:
        lines.append(f"  text: {record['text']!r}")
    return "\n".join(lines)


def run_generate(args: argparse.Namespace) -> None:
    """Validate everything that can be checked before a process group exists, then serve."""
    options = resolve_options(args)
    config = engine_config(options)
    info = read_checkpoint_info(args.model)
    tp = config.parallel.tensor_parallel_size
    info.model.check_tensor_parallel_size(tp)
    if info.tensor_parallel_size != tp:
        raise UsageError(f"checkpoint {args.model} is sharded for tp={info.tensor_parallel_size}, not --tp {tp}: "
                         f"pass --tp {info.tensor_parallel_size} or reshard it with tools/convert_checkpoint.py")
    dtype = parse_dtype(options["dtype"]) if options["dtype"] else info.model.torch_dtype
    tokenizer = TextTokenizer.from_checkpoint(args.model)
    specs = read_prompts(args)
    prompts = tokenize(specs, tokenizer, args.model)
    params = [sampling_params(options, spec.overrides) for spec in specs]

    env = state.init_distributed()
    try:
        state.initialize_model_parallel(config.parallel.tensor_parallel_size, config.parallel.num_instances)
        try:
            engine = LLMEngine(info, config, dtype=dtype, device=env.device)
        except (ValueError, RuntimeError, OSError) as err:
            raise RankLocalError(f"[rank {env.rank}] {err}") from err
        outputs = engine.generate(prompts, params)
        if env.rank == 0:
            for output in outputs:
                record = format_output(output, tokenizer)
                if args.json:
                    print(json.dumps(record), flush=True)
                else:
                    print(describe(record), flush=True)
    finally:
        state.destroy_model_parallel()
