"""Reading a Hugging Face LLaMA folder (``config.json`` plus safetensors weights) one layer at a time.

Weights come from ``model.safetensors`` or from the files listed in
``model.safetensors.index.json``; tensors are fetched lazily by name through
``safe_open`` so a converter holds one layer in memory. Tensor names follow
transformers' ``LlamaForCausalLM`` (``model.layers.N.self_attn.q_proj.weight``, ...).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from types import TracebackType
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from megakv.checkpoint.format import CheckpointError
from megakv.checkpoint.hf_config import model_config_from_hf
from megakv.checkpoint.sharding import hf_layer_shapes
from megakv.config import ModelConfig

HF_CONFIG_FILE = "config.json"
HF_WEIGHTS_FILE = "model.safetensors"
HF_INDEX_FILE = "model.safetensors.index.json"

HF_GENERATION_CONFIG_FILE = "generation_config.json"

# Canonical layer key -> Hugging Face name relative to "model.layers.N." (the biases only when the model has them).
HF_LAYER_NAMES = {
    "q_proj": "self_attn.q_proj.weight",
    "k_proj": "self_attn.k_proj.weight",
    "v_proj": "self_attn.v_proj.weight",
    "o_proj": "self_attn.o_proj.weight",
    "gate_proj": "mlp.gate_proj.weight",
    "up_proj": "mlp.up_proj.weight",
    "down_proj": "mlp.down_proj.weight",
    "input_layernorm": "input_layernorm.weight",
    "post_attention_layernorm": "post_attention_layernorm.weight",
    "q_bias": "self_attn.q_proj.bias",
    "k_bias": "self_attn.k_proj.bias",
    "v_bias": "self_attn.v_proj.bias",
    "o_bias": "self_attn.o_proj.bias",
    "gate_bias": "mlp.gate_proj.bias",
    "up_bias": "mlp.up_proj.bias",
    "down_bias": "mlp.down_proj.bias",
}


def _read_json(path: Path, what: str) -> Any:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, UnicodeDecodeError) as err:
        raise CheckpointError(f"cannot read {what} {path}: {err}") from None
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{what} {path} is not valid JSON: {err}") from None


class HFNamedWeights:
    """The pieces of a model stored under Hugging Face LLaMA names, read through ``tensor(name, shape)``.

    Shared by the readers of every source that holds an HF-named state dict (HF folders, DeepSpeed).
    """

    config: ModelConfig

    def tensor(self, name: str, shape: tuple[int, ...]) -> torch.Tensor:
        """The tensor called ``name``, checked against ``shape``."""
        raise NotImplementedError

    def embedding(self) -> torch.Tensor:
        """The [vocab_size, H] token embedding."""
        return self.tensor("model.embed_tokens.weight", (self.config.vocab_size, self.config.hidden_size))

    def layer(self, layer_index: int) -> dict[str, torch.Tensor]:
        """Layer ``layer_index``'s weights under the canonical keys of ``sharding.LAYER_KEYS``."""
        if not 0 <= layer_index < self.config.num_layers:
            raise ValueError(f"layer {layer_index} is outside 0..{self.config.num_layers - 1}")
        shapes = hf_layer_shapes(self.config)
        prefix = f"model.layers.{layer_index}."
        return {key: self.tensor(prefix + HF_LAYER_NAMES[key], shape) for key, shape in shapes.items()}

    def final_norm(self) -> torch.Tensor:
        """The [H] final RMSNorm weight."""
        return self.tensor("model.norm.weight", (self.config.hidden_size,))

    def lm_head(self) -> torch.Tensor | None:
        """The [vocab_size, H] output layer, or None when it is tied to the embedding."""
        if self.config.tie_word_embeddings:
            return None
        return self.tensor("lm_head.weight", (self.config.vocab_size, self.config.hidden_size))


class HFReader(HFNamedWeights):
    """A Hugging Face LLaMA checkpoint folder, read lazily tensor by tensor."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        if not self.path.is_dir():
            raise CheckpointError(f"input folder {self.path} does not exist")
        config_path = self.path / HF_CONFIG_FILE
        if not config_path.is_file():
            raise CheckpointError(f"{self.path} is not a Hugging Face model folder: it has no {HF_CONFIG_FILE}")
        hf_config = _read_json(config_path, "Hugging Face config")
        if not isinstance(hf_config, dict):
            raise CheckpointError(f"Hugging Face config {config_path} must hold a JSON object")
        generation_path = self.path / HF_GENERATION_CONFIG_FILE
        generation = _read_json(generation_path, "generation config") if generation_path.is_file() else None
        if generation is not None and not isinstance(generation, dict):
            raise CheckpointError(f"generation config {generation_path} must hold a JSON object")
        try:
            self.config = model_config_from_hf(hf_config, generation)
        except ValueError as err:
            raise CheckpointError(f"{config_path}: {err}") from None
        self._file_of_tensor = self._index_weights()
        self._open_files: dict[str, Any] = {}

    def _index_weights(self) -> dict[str, str]:
        """Map every tensor name to the safetensors file (relative to the folder) that holds it."""
        index_path = self.path / HF_INDEX_FILE
        if index_path.is_file():
            index = _read_json(index_path, "safetensors index")
            weight_map = index.get("weight_map") if isinstance(index, dict) else None
            if not isinstance(weight_map, dict):
                raise CheckpointError(f"safetensors index {index_path} has no \"weight_map\"")
            for file_name in sorted(set(weight_map.values())):
                if not (self.path / file_name).is_file():
                    raise CheckpointError(f"{index_path} lists weight file {file_name}, which is missing")
            return weight_map
        if (self.path / HF_WEIGHTS_FILE).is_file():
            with self._safe_open(HF_WEIGHTS_FILE) as weights:
                return {name: HF_WEIGHTS_FILE for name in weights.keys()}
        raise CheckpointError(f"{self.path} has no {HF_WEIGHTS_FILE} or {HF_INDEX_FILE} (only safetensors "
                              f"weights are read: re-save the model with save_pretrained)")

    def _safe_open(self, file_name: str) -> Any:
        try:
            return safe_open(self.path / file_name, framework="pt")
        except (SafetensorError, OSError) as err:
            raise CheckpointError(f"weight file {self.path / file_name} is corrupt: {err}") from None

    def tensor(self, name: str, shape: tuple[int, ...]) -> torch.Tensor:
        """Load one tensor by its Hugging Face name, checking its shape."""
        file_name = self._file_of_tensor.get(name)
        if file_name is None:
            raise CheckpointError(f"Hugging Face checkpoint {self.path} has no tensor {name!r}")
        if file_name not in self._open_files:
            self._open_files[file_name] = self._safe_open(file_name)
        weights = self._open_files[file_name]
        try:
            stored_shape = tuple(weights.get_slice(name).get_shape())
            if stored_shape != shape:
                raise CheckpointError(f"Hugging Face tensor {name!r} has shape {stored_shape}, expected {shape} "
                                      f"from {HF_CONFIG_FILE}")
            return weights.get_tensor(name)
        except SafetensorError as err:
            raise CheckpointError(f"cannot read tensor {name!r} from {self.path / file_name}: {err}") from None

    def close(self) -> None:
        """Release the open weight files."""
        self._open_files.clear()

    def __enter__(self) -> HFReader:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.close()
