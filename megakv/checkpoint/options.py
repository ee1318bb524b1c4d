"""Options a source reader may need beyond the input folder (``--iteration``, ``--tag``, overrides)."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class SourceOptions:
    """Per-source choices from the command line; each reader reads only the fields it understands."""

    # Megatron: which iter_XXXXXXX folder to read (default: latest_checkpointed_iteration.txt).
    iteration: int | None = None
    # DeepSpeed: which tag folder to read (default: the ``latest`` file).
    tag: str | None = None
    # Megatron: hyper-parameters by Megatron-LM argument name, supplied or overriding the checkpoint's ``args``.
    model_args: dict[str, Any] = field(default_factory=dict)
    # DeepSpeed: the Hugging Face config.json of the wrapped model (default: looked for beside the checkpoint).
    hf_config: Path | None = None


def parse_model_arg(text: str) -> tuple[str, Any]:
    """Parse one ``NAME=VALUE`` override: integers, floats, true/false, else the string."""
    name, sep, raw = text.partition("=")
    if not sep or not name:
        raise ValueError(f"model argument {text!r} must look like NAME=VALUE (e.g. num_query_groups=8)")
    lowered = raw.lower()
    if lowered in ("true", "false"):
        return name.replace("-", "_"), lowered == "true"
    for parse in (int, float):
        try:
            return name.replace("-", "_"), parse(raw)
        except ValueError:
            pass
    return name.replace("-", "_"), raw
