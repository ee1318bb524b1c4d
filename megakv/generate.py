"""``megakv generate``: load a checkpoint on every rank, serve the prompts, print the results."""
from __future__ import annotations

import argparse
import json
import sys

from megakv.chat import ChatTemplate
from megakv.engine.llm_engine import LLMEngine
from megakv.engine.request import RequestOutput
from megakv.engine.sampling import SamplingParams
from megakv.options import (PROMPT_OVERRIDES, PromptSpec, UsageError, engine_config, read_prompts, resolve_options,
                            server_config)
from megakv.parallel import state
from megakv.parallel.state import RankLocalError
from megakv.startup import chat_stop_token_ids, check_kv_pool_fits, open_checkpoint, run_dtype
from megakv.tokenizer import TextTokenizer


def tokenize(specs: list[PromptSpec], tokenizer: TextTokenizer | None, chat: ChatTemplate | None,
             model_dir: str) -> list[list[int]]:
    """Token ids of every prompt; text prompts need the checkpoint's tokenizer, chats its template too."""
    prompts = []
    for spec in specs:
        if spec.error is not None:
            # A rejected line: its record shows the ids it gave, if they were valid.
            prompts.append(spec.prompt_ids or [])
        elif spec.prompt_ids is not None:
            prompts.append(spec.prompt_ids)
        elif tokenizer is None:
            raise UsageError(f"checkpoint {model_dir} has no tokenizer.json: pass token ids with --prompt-ids")
        elif spec.messages is None:
            prompts.append(tokenizer.encode(spec.text))
        elif chat is None:
            raise UsageError(f"checkpoint {model_dir} has no chat template (chat_template.jinja, or chat_template "
                             f"in tokenizer_config.json): pass the prompt text with --prompt")
        else:
            # As transformers' apply_chat_template: the template writes every special token itself.
            prompts.append(tokenizer.encode(chat.render(spec.messages), add_special_tokens=False))
    return prompts


def sampling_params(options: dict, overrides: dict, stop_token_ids: tuple[int, ...]) -> SamplingParams:
    """A request's sampling parameters: its own overrides over the command's options."""
    merged = {key: overrides.get(key, options[key]) for key in PROMPT_OVERRIDES}
    return SamplingParams(ignore_eos=options["ignore_eos"], stop_token_ids=stop_token_ids, **merged)


def request_params(specs: list[PromptSpec], options: dict, chat_stop_ids: tuple[int, ...],
                   num_instances: int) -> list[SamplingParams | str]:
    """Each prompt's sampling parameters, or why its prompts-file line cannot be served ("FILE:LINE: ...")."""
    # The command's own values first: a bad flag or YAML value is one error for the whole run.
    sampling_params(options, {}, ())
    params: list[SamplingParams | str] = []
    for spec in specs:
        if spec.error is not None:
            params.append(spec.error)
        elif spec.instance is not None and spec.instance >= num_instances:
            params.append(f"{spec.where}: instance {spec.instance} does not exist (--instances {num_instances})")
        else:
            try:
                params.append(sampling_params(options, spec.overrides,
                                              chat_stop_ids if spec.messages is not None else ()))
            except ValueError as err:
                # Only prompts-file lines carry overrides.
                params.append(f"{spec.where}: {err}")
    return params


def format_output(output: RequestOutput, tokenizer: TextTokenizer | None) -> dict:
    record = {"prompt_ids": output.prompt_ids, "token_ids": output.token_ids, "finish_reason": output.finish_reason,
              "num_cached_tokens": output.num_cached_tokens}
    if output.error is not None:
        record["error"] = output.error
    if output.placement is not None:
        record.update(num_local_blocks=output.placement.num_local_blocks,
                      num_remote_blocks=output.placement.num_remote_blocks,
                      block_instances=output.placement.instances)
    if tokenizer is not None:
        record["text"] = tokenizer.decode(output.token_ids)
    return record


def describe(record: dict) -> str:
    """A human-readable account of one result."""
    served_by = f" on instance {record['instance']}" if "instance" in record else ""
    lines = [f"prompt ({len(record['prompt_ids'])} tokens){served_by} -> {len(record['token_ids'])} new tokens, "
             f"finish_reason={record['finish_reason']}",
             f"  token_ids: {record['token_ids']}"]
    if "block_instances" in record:
        lines.append(f"  KV blocks: {record['num_local_blocks']} local, {record['num_remote_blocks']} remote; "
                     f"held by instances {record['block_instances']}")
    if "text" in record:
        lines.append(f"  text: {record['text']!r}")
    return "\n".join(lines)


def run_generate(args: argparse.Namespace) -> int:
    """Validate what can be checked before a process group exists, then serve; returns the exit status.

    The status is 2 when every request was rejected, 1 when some were (the others were served), else 0.
    """
    options = resolve_options(args)
    config = engine_config(options)
    # Unused here, but checked: a config file that megakv serve would refuse is refused by both commands.
    server_config(options)
    info, requested_dtype = open_checkpoint(args.model, options, config)
    tokenizer = TextTokenizer.from_checkpoint(args.model)
    specs = read_prompts(args)
    chat = ChatTemplate.from_checkpoint(args.model) if any(spec.messages for spec in specs) else None
    prompts = tokenize(specs, tokenizer, chat, args.model)
    num_instances = config.parallel.num_instances
    params = request_params(specs, options, chat_stop_token_ids(tokenizer, chat), num_instances)
    served = [index for index, value in enumerate(params) if isinstance(value, SamplingParams)]

    env = state.init_distributed(layout=(config.parallel.tensor_parallel_size, num_instances))
    try:
        state.initialize_model_parallel(config.parallel.tensor_parallel_size, num_instances)
        dtype = run_dtype(requested_dtype, info, env.device)
        engine_class = LLMEngine
        if num_instances > 1:
            from megakv.distkv.cluster_engine import ClusterEngine
            engine_class = ClusterEngine
        try:
            check_kv_pool_fits(args, info, config, dtype, env.device)
            engine = engine_class(info, config, dtype=dtype, device=env.device)
        except (ValueError, RuntimeError, OSError) as err:
            raise RankLocalError(f"[rank {env.rank}] {err}") from err
        served_prompts, served_params = [prompts[i] for i in served], [params[i] for i in served]
        if num_instances == 1:
            outputs, report = engine.generate(served_prompts, served_params), None
        else:
            try:
                outputs = engine.generate(served_prompts, served_params, [specs[i].instance for i in served])
            except (ValueError, RuntimeError) as err:
                # Raised on some ranks only (the leaders, say): the others must be stopped too.
                raise RankLocalError(f"[rank {env.rank}] {err}") from err
            report = engine.cluster_report()
        if num_instances == 1 or env.rank == 0:
            # Only the cluster's front has outputs; every rank of one instance has them all.
            outputs = in_prompt_order(outputs, prompts, params)
        if env.rank == 0:
            print_outputs(outputs, tokenizer, report, args.json)
    finally:
        state.destroy_model_parallel()
    num_errors = sum(output.error is not None for output in outputs)
    return 0 if num_errors == 0 else 2 if num_errors == len(outputs) else 1


def in_prompt_order(outputs: list[RequestOutput], prompts: list[list[int]],
                    params: list[SamplingParams | str]) -> list[RequestOutput]:
    """The served requests' outputs with the rejected prompts-file lines put back in their places."""
    served = iter(outputs)
    return [next(served) if isinstance(value, SamplingParams) else
            RequestOutput(f"rejected-{index}", prompts[index], [], [], "error", error=value)
            for index, value in enumerate(params)]


def print_outputs(outputs: list[RequestOutput], tokenizer: TextTokenizer | None, report: dict | None,
                  as_json: bool) -> None:
    """Print each request's result in prompt order (errors also on stderr), then the cluster report."""
    for index, output in enumerate(outputs):
        record = format_output(output, tokenizer)
        if report is not None and output.instance is not None:
            record["instance"] = output.instance
        if output.error is not None:
            where = f"request {index}: " if len(outputs) > 1 else ""
            print(f"megakv: error: {where}{output.error}", file=sys.stderr, flush=True)
        print(json.dumps(record) if as_json else describe(record), flush=True)
    if report is not None:
        print(json.dumps({"cluster": report}) if as_json else f"cluster: {json.dumps(report)}", flush=True)
