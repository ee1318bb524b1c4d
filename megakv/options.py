"""What ``megakv generate`` and ``megakv serve`` are asked to do: options (flags over a YAML config over
defaults) and prompts.

Read by ``megakv.generate`` and ``megakv.server.launch``; the command line itself is ``megakv.cli``.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
from dataclasses import dataclass
from typing import Any

from megakv.chat import check_messages
from megakv.config import (PEER_TIMEOUT_SECONDS, RECALL_AFTER_SECONDS, CacheConfig, DistKVConfig, EngineConfig,
                           ParallelConfig, SchedulerConfig, ServerConfig, load_yaml)

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
    "enable_prefix_caching": True,
    "max_num_seqs": 64,
    "max_num_batched_tokens": 512,
    "lending_cap": 1.0,
    "max_moves_per_step": 8,
    "stall_timeout": 60.0,
    "recall_after": RECALL_AFTER_SECONDS,
    "peer_timeout": PEER_TIMEOUT_SECONDS,
}

# The server's settings: flags of megakv serve, keys of any config (megakv generate checks them, and has no use
# for them, so that one file describes a deployment).
SERVER_DEFAULTS: dict[str, Any] = {field.name: field.default for field in dataclasses.fields(ServerConfig)}

# Other spellings accepted for an option in YAML files.
OPTION_ALIASES = {"kv_blocks_per_instance": "num_blocks"}
# What a YAML config may also give besides DEFAULTS, with the type it must have, where the command has the flag.
COMMAND_KEYS: dict[str, type] = {"model": str, "json": bool, "prompts_file": str}
PROMPT_FLAGS = ("prompt_ids", "prompt", "chat", "prompts_file")


class UsageError(ValueError):
    """A problem with the command line or its inputs."""


def complete_from_config(args: argparse.Namespace) -> argparse.Namespace:
    """The arguments with the checkpoint, --json and prompts file taken from --config where no flag gave them."""
    from_file = load_yaml(args.config) if args.config else {}
    values = dict(vars(args))
    for key, kind in COMMAND_KEYS.items():
        if key not in from_file or key not in values:
            continue
        if not isinstance(from_file[key], kind):
            expected = "true or false" if kind is bool else "a string"
            raise UsageError(f"config file {args.config}: {key} must be {expected}, got {from_file[key]!r}")
        given_by_flag = any(values.get(flag) is not None for flag in PROMPT_FLAGS) if key == "prompts_file" \
            else values[key] not in (None, False)
        if not given_by_flag:
            values[key] = from_file[key]
    if values["model"] is None:
        raise UsageError("no checkpoint: pass --model DIR (or model: DIR in the --config file)")
    if args.command == "generate" and all(values[flag] is None for flag in PROMPT_FLAGS):
        raise UsageError("no prompt: pass --prompt-ids, --prompt, --chat or --prompts-file "
                         "(or prompts_file: FILE in the --config file)")
    return argparse.Namespace(**values)


def resolve_options(args: argparse.Namespace) -> dict[str, Any]:
    """Merge flags over the YAML config over defaults; unknown YAML keys are an error."""
    from_file = load_yaml(args.config) if args.config else {}
    from_file = {OPTION_ALIASES.get(key, key): value for key, value in from_file.items()}
    # The checkpoint, --json and prompts file were taken by complete_from_config.
    known = {*DEFAULTS, *SERVER_DEFAULTS}
    unknown = sorted(set(from_file) - known - {key for key in COMMAND_KEYS if hasattr(args, key)})
    if unknown:
        raise UsageError(f"config file {args.config}: unknown option(s) {', '.join(unknown)} "
                         f"(known: {', '.join(sorted(known))})")
    options = {**DEFAULTS, **SERVER_DEFAULTS, **{key: value for key, value in from_file.items() if key in known}}
    options.update({key: getattr(args, key) for key in known if getattr(args, key, None) is not None})
    if not isinstance(options["ignore_eos"], bool):
        raise UsageError(f"ignore_eos must be true or false, got {options['ignore_eos']!r}")
    return options


def _from_config_file(args: argparse.Namespace) -> dict[str, Any]:
    if not args.config:
        return {}
    return {OPTION_ALIASES.get(name, name): value for name, value in load_yaml(args.config).items()}


def option_source(args: argparse.Namespace, key: str) -> str:
    """Where an option's value came from, for an error message: its flag, the config file's key, or the default."""
    if getattr(args, key, None) is not None:
        return f"--{key.replace('_', '-')} {getattr(args, key)}"
    from_file = _from_config_file(args)
    if key in from_file:
        return f"{key}: {from_file[key]} in {args.config}"
    return f"the default {key.replace('_', '-')} {DEFAULTS[key] if key in DEFAULTS else SERVER_DEFAULTS[key]}"


def is_set(args: argparse.Namespace, key: str) -> bool:
    """True when a flag or the config file gives the option (not its default)."""
    return getattr(args, key, None) is not None or key in _from_config_file(args)


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
    # Where the prompt came from, for error messages: "FILE:LINE" of a prompts file, else the flag.
    where: str = ""
    # Why a prompts-file line cannot be served ("FILE:LINE: ..."): it is answered as a rejected request.
    error: str | None = None


PROMPT_OVERRIDES = ("max_new_tokens", "temperature", "top_k", "top_p", "seed")
# The ways a prompts-file line gives its prompt: exactly one per line.
PROMPT_KINDS = ("prompt_ids", "prompt", "messages")


def read_prompts(args: argparse.Namespace) -> list[PromptSpec]:
    """The prompts of --prompt-ids, --prompt or --prompts-file, checked line by line.

    A prompts-file line that is valid JSON but not a valid prompt becomes a spec with ``error`` set, so that
    it is answered as a rejected request while the other lines are served.
    """
    if args.prompt_ids is not None:
        try:
            ids = [int(part) for part in args.prompt_ids.split(",") if part.strip()]
        except ValueError:
            raise UsageError(f"--prompt-ids must be comma-separated integers, got {args.prompt_ids!r}") from None
        return [PromptSpec(ids, None, {}, where="--prompt-ids")]
    if args.prompt is not None:
        return [PromptSpec(None, args.prompt, {}, where="--prompt")]
    if args.chat is not None:
        return [PromptSpec(None, None, {}, messages=[{"role": "user", "content": args.chat}], where="--chat")]
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
        try:
            specs.append(prompt_spec(record, where))
        except ValueError as err:
            ids = record.get("prompt_ids") if isinstance(record, dict) else None
            ids = ids if isinstance(ids, list) and all(_is_int(t) for t in ids) else None
            specs.append(PromptSpec(ids, None, {}, where=where, error=str(err)))
    if not specs:
        raise UsageError(f"--prompts-file {args.prompts_file} holds no prompt")
    return specs


def _is_int(value: Any) -> bool:
    """True for an int that is not a bool: JSON's true must not pass as 1."""
    return isinstance(value, int) and not isinstance(value, bool)


def prompt_spec(record: Any, where: str) -> PromptSpec:
    """The prompt of one prompts-file line; ValueError names the line and its problem."""
    if not isinstance(record, dict) or sum(key in record for key in PROMPT_KINDS) != 1:
        raise UsageError(f"{where}: each line needs exactly one of {', '.join(PROMPT_KINDS)}")
    unknown = sorted(set(record) - {*PROMPT_KINDS, "instance", *PROMPT_OVERRIDES})
    if unknown:
        raise UsageError(f"{where}: unknown key(s) {', '.join(unknown)}")
    ids = record.get("prompt_ids")
    if ids is not None and (not isinstance(ids, list) or not all(_is_int(t) for t in ids)):
        raise UsageError(f"{where}: prompt_ids must be a list of integers, got {ids!r}")
    messages = record.get("messages")
    if messages is not None:
        check_messages(messages, where)
    instance = record.get("instance")
    if instance is not None and (not _is_int(instance) or instance < 0):
        raise UsageError(f"{where}: instance must be an integer >= 0, got {instance!r}")
    return PromptSpec(ids, record.get("prompt"), {k: record[k] for k in PROMPT_OVERRIDES if k in record},
                      instance, messages, where)


def engine_config(options: dict[str, Any]) -> EngineConfig:
    """The engine's configuration from the resolved options (each part validates its own keys)."""
    return EngineConfig(
        cache=CacheConfig(block_size=options["block_size"], num_blocks=options["num_blocks"],
                          kv_cache_memory_gb=options["kv_cache_memory_gb"],
                          enable_prefix_caching=options["enable_prefix_caching"]),
        scheduler=SchedulerConfig(max_num_seqs=options["max_num_seqs"],
                                  max_num_batched_tokens=options["max_num_batched_tokens"]),
        parallel=ParallelConfig(tensor_parallel_size=options["tp"], num_instances=options["instances"]),
        distkv=DistKVConfig(lending_cap=options["lending_cap"], max_moves_per_step=options["max_moves_per_step"],
                            stall_timeout=options["stall_timeout"], recall_after=options["recall_after"],
                            peer_timeout=options["peer_timeout"]),
    )


def server_config(options: dict[str, Any]) -> ServerConfig:
    """The server's settings from the resolved options (validated by ServerConfig)."""
    return ServerConfig(**{key: options[key] for key in SERVER_DEFAULTS})
