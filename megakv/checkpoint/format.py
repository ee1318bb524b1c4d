"""The megakv checkpoint folder: its config file, per-rank shard files, and validated loading.

Layout (format_version 1)::

    megakv_config.json     {"format": "megakv", "format_version": 1,
                            "tensor_parallel_size": tp, "model": ModelConfig.to_dict()}
    model_tp00.safetensors one file per TP rank, names and shapes as in sharding.shard_shapes
    tokenizer.json, ...    copied from the source model when present (chat_template.jinja too)

``model.dtype`` is the dtype the tensors are stored in.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from megakv.checkpoint.safetensors_writer import SAFETENSORS_DTYPES
from megakv.checkpoint.sharding import shard_shapes
from megakv.config import ModelConfig

CONFIG_FILE = "megakv_config.json"
FORMAT_NAME = "megakv"
FORMAT_VERSION = 1
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"
TOKENIZER_FILES = ("tokenizer.json", TOKENIZER_CONFIG_FILE, "special_tokens_map.json", "tokenizer.model",
                   "generation_config.json", CHAT_TEMPLATE_FILE)
# The special tokens a tokenizer_config.json names, and a chat template may refer to.
SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "pad_token")


class CheckpointError(ValueError):
    """A checkpoint folder that is missing, malformed or inconsistent."""


def shard_file_name(rank: int) -> str:
    """File name of TP rank ``rank``'s shard."""
    return f"model_tp{rank:02d}.safetensors"


@dataclass(frozen=True)
class CheckpointInfo:
    """What ``megakv_config.json`` says about a checkpoint folder."""

    model: ModelConfig
    tensor_parallel_size: int
    path: Path

    def shard_path(self, rank: int) -> Path:
        """Path of TP rank ``rank``'s shard file."""
        return self.path / shard_file_name(rank)


def write_checkpoint_config(directory: str | os.PathLike, cfg: ModelConfig, tp: int) -> None:
    """Write ``megakv_config.json`` for a checkpoint of ``cfg`` sharded over ``tp`` ranks."""
    cfg.check_tensor_parallel_size(tp)
    content = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, "tensor_parallel_size": tp,
               "model": cfg.to_dict()}
    with open(Path(directory) / CONFIG_FILE, "w") as f:
        json.dump(content, f, indent=2)
        f.write("\n")


def read_checkpoint_info(path: str | os.PathLike) -> CheckpointInfo:
    """Read and validate a checkpoint folder's config; raise CheckpointError naming the problem."""
    folder = Path(path)
    if not folder.is_dir():
        raise CheckpointError(f"checkpoint folder {folder} does not exist")
    config_path = folder / CONFIG_FILE
    if not config_path.is_file():
        raise CheckpointError(f"{folder} is not a megakv checkpoint (no {CONFIG_FILE}): "
                              f"convert it first with tools/convert_checkpoint.py")
    try:
        with open(config_path) as f:
            raw = json.load(f)
    except (OSError, UnicodeDecodeError) as err:
        raise CheckpointError(f"cannot read {config_path}: {err}") from None
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{config_path} is not valid JSON: {err}") from None
    if not isinstance(raw, dict) or raw.get("format") != FORMAT_NAME:
        raise CheckpointError(f"{config_path} does not describe a megakv checkpoint "
                              f"(expected \"format\": \"{FORMAT_NAME}\")")
    if raw.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{config_path} has format_version {raw.get('format_version')!r}; this megakv "
                              f"reads version {FORMAT_VERSION}: convert the checkpoint again")
    tp = raw.get("tensor_parallel_size")
    if not isinstance(tp, int) or isinstance(tp, bool) or tp <= 0:
        raise CheckpointError(f"{config_path}: tensor_parallel_size must be a positive integer, got {tp!r}")
    if not isinstance(raw.get("model"), dict):
        raise CheckpointError(f"{config_path}: \"model\" must be a mapping of model hyper-parameters")
    try:
        model = ModelConfig.from_dict(raw["model"])
        model.check_tensor_parallel_size(tp)
    except ValueError as err:
        raise CheckpointError(f"{config_path}: {err}") from None
    info = CheckpointInfo(model=model, tensor_parallel_size=tp, path=folder)
    for rank in range(tp):
        if not info.shard_path(rank).is_file():
            raise CheckpointError(f"checkpoint {folder} is missing shard file {shard_file_name(rank)} "
                                  f"(tensor_parallel_size is {tp})")
    return info


def load_shard(info: CheckpointInfo, tp_rank: int, device: str = "cpu") -> dict[str, torch.Tensor]:
    """Load TP rank ``tp_rank``'s tensors, checking names, shapes and dtypes against the config."""
    if not 0 <= tp_rank < info.tensor_parallel_size:
        raise CheckpointError(f"tensor parallel rank {tp_rank} is outside 0..{info.tensor_parallel_size - 1} "
                              f"of checkpoint {info.path}")
    path = info.shard_path(tp_rank)
    expected = shard_shapes(info.model, info.tensor_parallel_size)
    expected_dtype = SAFETENSORS_DTYPES[info.model.torch_dtype]
    try:
        with safe_open(path, framework="pt", device=device) as shard:
            names = set(shard.keys())
            missing = [name for name in expected if name not in names]
            if missing:
                raise CheckpointError(f"checkpoint shard {path} is missing tensor {missing[0]!r}"
                                      + (f" and {len(missing) - 1} more" if len(missing) > 1 else ""))
            unexpected = sorted(names - set(expected))
            if unexpected:
                raise CheckpointError(f"checkpoint shard {path} has unexpected tensor {unexpected[0]!r}")
            for name, shape in expected.items():
                stored = shard.get_slice(name)
                if tuple(stored.get_shape()) != shape:
                    raise CheckpointError(f"checkpoint shard {path}: tensor {name!r} has shape "
                                          f"{tuple(stored.get_shape())}, expected {shape} for "
                                          f"tp={info.tensor_parallel_size}")
                if stored.get_dtype() != expected_dtype:
                    raise CheckpointError(f"checkpoint shard {path}: tensor {name!r} is stored as "
                                          f"{stored.get_dtype()}, but the config says {info.model.dtype}")
            return {name: shard.get_tensor(name) for name in expected}
    except (SafetensorError, OSError) as err:
        raise CheckpointError(f"checkpoint shard {path} is corrupt: {err}") from None
