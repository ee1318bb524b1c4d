"""Reading a DeepSpeed checkpoint of a Hugging Face LLaMA one layer at a time (``--source deepspeed``).

Layout (``engine.save_checkpoint``): ``CKPT_ROOT/latest`` names the tag folder
(``global_stepN``, or ``--tag``), which holds ``mp_rank_00_model_states.pt`` (the
wrapped module's state dict under ``module``) and, with ZeRO, the optimizer
partitions ``*zero_pp_rank_R_mp_rank_00_optim_states.pt`` (ZeRO-3 names its module file
``zero_pp_rank_0_mp_rank_00_model_states.pt``). With ZeRO the fp32 master
weights are the truth (stage 3 leaves ``module`` empty), so they are rebuilt by
DeepSpeed's own ``zero_to_fp32`` in lazy mode: each tensor materialises only when
its layer is read. Without ZeRO the module file is opened with ``mmap=True``.

The model's hyper-parameters come from the Hugging Face ``config.json`` found in the
tag folder or the checkpoint root, or named with ``--hf-config``.
"""
from __future__ import annotations

import contextlib
import json
import os
import sys
from pathlib import Path
from typing import Any

import torch

from megakv.checkpoint.format import CheckpointError
from megakv.checkpoint.hf import HF_CONFIG_FILE, HFNamedWeights
from megakv.checkpoint.hf_config import model_config_from_hf
from megakv.checkpoint.options import SourceOptions
from megakv.config import ModelConfig

LATEST_FILE = "latest"
MODEL_STATES = "mp_rank_{:02d}_model_states.pt"
ZERO3_MODEL_STATES = "zero_pp_rank_0_mp_rank_00_model_states.pt"  # ZeRO-3 writes one per data-parallel rank
ZERO_OPTIM_PATTERN = "*zero_pp_rank_*_optim_states.pt"


def model_states_file(folder: Path) -> Path | None:
    """The module-states file of a tag folder (ZeRO-0/1/2 or ZeRO-3 naming), or None."""
    return next((folder / name for name in (MODEL_STATES.format(0), ZERO3_MODEL_STATES)
                 if (folder / name).is_file()), None)


def tag_folder(root: Path, tag: str | None) -> Path:
    """The tag folder to read: ``--tag``, else the one named in ``latest``."""
    if not root.is_dir():
        raise CheckpointError(f"input folder {root} does not exist")
    if tag is None:
        if model_states_file(root) is not None:
            return root
        if not (root / LATEST_FILE).is_file():
            raise CheckpointError(f"{root} is not a DeepSpeed checkpoint: looked for a '{LATEST_FILE}' file and "
                                  f"TAG/{MODEL_STATES.format(0)} (pass --tag when there is no '{LATEST_FILE}')")
        tag = (root / LATEST_FILE).read_text().strip()
    folder = root / tag
    if model_states_file(folder) is None:
        raise CheckpointError(f"DeepSpeed checkpoint {root} is missing rank file {tag}/{MODEL_STATES.format(0)}")
    return folder


class DeepSpeedReader(HFNamedWeights):
    """A DeepSpeed checkpoint whose module is a Hugging Face LlamaForCausalLM."""

    def __init__(self, path: str | os.PathLike, options: SourceOptions) -> None:
        root = Path(path)
        self.path = tag_folder(root, options.tag)
        self.config = self._read_config(root, options.hf_config)
        states = torch.load(model_states_file(self.path), map_location="cpu", mmap=True, weights_only=False)
        if states.get("mp_world_size", 1) != 1:
            raise CheckpointError(f"DeepSpeed checkpoint {self.path} is model-parallel "
                                  f"(mp_world_size={states['mp_world_size']}); megakv reads DeepSpeed checkpoints "
                                  f"of a whole Hugging Face module (use --source megatron for Megatron-DeepSpeed)")
        if any(self.path.glob(ZERO_OPTIM_PATTERN)):
            from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

            # Lazy: each entry materialises with .contiguous() when its layer is read. Its progress prints
            # go to stderr so stdout stays the converter's own.
            with contextlib.redirect_stdout(sys.stderr):
                self._weights = get_fp32_state_dict_from_zero_checkpoint(str(self.path.parent),
                                                                         tag=self.path.name, lazy_mode=True)
        else:
            self._weights = states["module"]
        self._weights = {name.removeprefix("module."): weight for name, weight in self._weights.items()}

    @staticmethod
    def _read_config(root: Path, hf_config: Path | None) -> ModelConfig:
        candidates = [hf_config] if hf_config else [root / HF_CONFIG_FILE, root.parent / HF_CONFIG_FILE]
        config_path = next((p for p in candidates if p.is_file()), None)
        if config_path is None:
            raise CheckpointError(f"no Hugging Face {HF_CONFIG_FILE} for DeepSpeed checkpoint {root}: put the "
                                  f"model's config.json beside it or pass --hf-config FILE "
                                  f"(looked for {', '.join(map(str, candidates))})")
        try:
            with open(config_path) as f:
                raw: Any = json.load(f)
            return model_config_from_hf(raw)
        except (OSError, ValueError) as err:
            raise CheckpointError(f"{config_path}: {err}") from None

    def tensor(self, name: str, shape: tuple[int, ...]) -> torch.Tensor:
        """The fp32 (or module-dtype, without ZeRO) weight ``name``, checking its shape."""
        if name not in self._weights:
            raise CheckpointError(f"DeepSpeed checkpoint {self.path} has no weight {name!r}")
        weight = self._weights[name].contiguous()
        if tuple(weight.shape) != shape:
            raise CheckpointError(f"DeepSpeed weight {name!r} has shape {tuple(weight.shape)}, expected {shape} "
                                  f"from {HF_CONFIG_FILE}")
        return weight

    def close(self) -> None:
        """Drop the (memory-mapped or lazy) weights."""
        self._weights = {}
