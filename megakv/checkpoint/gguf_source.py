"""Reading a llama.cpp GGUF file of a LLaMA-architecture model one tensor at a time (``--source gguf``).

The ``gguf`` package memory-maps the file, so only the tensor being converted is
in memory: a 70B file converts on a machine with less memory than the model.
Each tensor is dequantized with ``gguf.quants.dequantize`` (every type the package
implements: F32, F16, BF16, Q8_0, Q4_0, Q4_1, the K-quants, ...). Hyper-parameters
come from the ``llama.*`` metadata; tensor names are llama.cpp's
(``blk.N.attn_q.weight``, ...). llama.cpp's converter permutes the rows of the
query and key weights so that RoPE rotates interleaved pairs; megakv rotates
halves, as Hugging Face does, so :func:`unpermute_rows` undoes it.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch
from gguf.quants import dequantize

from megakv.checkpoint.format import CheckpointError
from megakv.checkpoint.gguf_tokenizer import write_gguf_tokenizer
from megakv.checkpoint.options import SourceOptions
from megakv.checkpoint.sharding import hf_layer_shapes
from megakv.config import ModelConfig

ARCHITECTURE = "llama"

# Canonical layer key -> llama.cpp name relative to "blk.N.".
GGUF_LAYER_NAMES = {
    "q_proj": "attn_q.weight",
    "k_proj": "attn_k.weight",
    "v_proj": "attn_v.weight",
    "o_proj": "attn_output.weight",
    "gate_proj": "ffn_gate.weight",
    "up_proj": "ffn_up.weight",
    "down_proj": "ffn_down.weight",
    "input_layernorm": "attn_norm.weight",
    "post_attention_layernorm": "ffn_norm.weight",
}
EMBEDDING_NAME = "token_embd.weight"
FINAL_NORM_NAME = "output_norm.weight"
OUTPUT_NAME = "output.weight"

# Stored types of the matrices -> the dtype a conversion keeps by default (anything quantized: float32).
FLOAT_TYPE_DTYPES = {"F16": "float16", "BF16": "bfloat16"}


def unpermute_rows(weight: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Undo llama.cpp's per-head row permutation of a [num_heads*D, H] query or key weight."""
    rows, columns = weight.shape
    head_dim = rows // num_heads
    # llama.cpp stored rows (head, half, pair) as (head, pair, half): swap them back.
    return weight.reshape(num_heads, head_dim // 2, 2, columns).transpose(1, 2).reshape(rows, columns)


def _open(path: Path) -> Any:
    """The ``gguf`` package's memory-mapped reader, with its parse errors turned into CheckpointError."""
    try:
        return gguf.GGUFReader(path)
    except ValueError as err:
        unknown_type = re.search(r"(\d+)\)? is not a valid GGMLQuantizationType", str(err))
        if unknown_type:
            raise CheckpointError(f"GGUF file {path} has a tensor of unknown type {unknown_type.group(1)} "
                                  f"(no ggml type that the gguf package knows has that id)") from None
        raise CheckpointError(f"cannot read GGUF file {path}: it is truncated or corrupt ({err})") from None
    except (IndexError, OSError, TypeError, KeyError) as err:
        raise CheckpointError(f"cannot read GGUF file {path}: it is truncated or corrupt ({err})") from None


class GGUFReader:
    """A LLaMA-architecture GGUF file, dequantized tensor by tensor into Hugging Face layouts."""

    def __init__(self, path: str | os.PathLike, options: SourceOptions | None = None) -> None:
        self.path = Path(path)
        if not self.path.exists():
            raise CheckpointError(f"GGUF file {self.path} does not exist")
        if self.path.is_dir():
            raise CheckpointError(f"{self.path} is a folder: --source gguf reads one .gguf file")
        self._reader = _open(self.path)
        self._tensors = {tensor.name: tensor for tensor in self._reader.tensors}
        architecture = self.metadata("general.architecture")
        if architecture != ARCHITECTURE:
            raise CheckpointError(f"GGUF file {self.path} holds a {architecture!r} model: megakv reads "
                                  f"LLaMA-architecture GGUF files (general.architecture = {ARCHITECTURE!r})")
        try:
            self.config = self._read_config()
        except ValueError as err:
            raise CheckpointError(f"GGUF file {self.path}: {err}") from None
        self._check_tensor_names()
        self._check_tensor_types()

    def metadata(self, key: str, default: Any = None) -> Any:
        """The value of metadata field ``key`` (strings decoded, arrays as lists), or ``default``."""
        field = self._reader.fields.get(key)
        return default if field is None else field.contents()

    def _arch(self, key: str, default: Any = None) -> Any:
        return self.metadata(f"{ARCHITECTURE}.{key}", default)

    def _require(self, key: str) -> Any:
        value = self._arch(key)
        if value is None:
            raise ValueError(f"metadata {ARCHITECTURE}.{key} is missing")
        return value

    def _read_config(self) -> ModelConfig:
        """The model hyper-parameters from the ``llama.*`` and ``tokenizer.ggml.*`` metadata."""
        if self._arch("expert_count", 0):
            raise ValueError(f"it is a mixture-of-experts model ({ARCHITECTURE}.expert_count = "
                             f"{self._arch('expert_count')}), which megakv does not serve")
        if EMBEDDING_NAME not in self._tensors:
            raise ValueError(f"it has no tensor {EMBEDDING_NAME!r}")
        hidden = int(self._require("embedding_length"))
        num_heads = int(self._require("attention.head_count"))
        head_dim = int(self._arch("attention.key_length", hidden // num_heads))
        if int(self._arch("attention.value_length", head_dim)) != head_dim:
            raise ValueError(f"attention.value_length {self._arch('attention.value_length')} differs from "
                             f"key_length {head_dim}")
        rope_dims = int(self._arch("rope.dimension_count", head_dim))
        if rope_dims != head_dim:
            raise ValueError(f"rope.dimension_count {rope_dims} is not head_dim {head_dim}: partial rotary "
                             f"embeddings are not supported")
        special_ids = [self.metadata(f"tokenizer.ggml.{name}_token_id") for name in ("eos", "eot", "eom")]
        bos = self.metadata("tokenizer.ggml.bos_token_id")
        return ModelConfig(
            # The embedding's row count, not llama.vocab_size: older files lack the key, none lack the tensor.
            vocab_size=int(self._tensors[EMBEDDING_NAME].shape[1]),
            hidden_size=hidden,
            intermediate_size=int(self._require("feed_forward_length")),
            num_layers=int(self._require("block_count")),
            num_attention_heads=num_heads,
            num_kv_heads=int(self._arch("attention.head_count_kv", num_heads)),
            head_dim=head_dim,
            max_position_embeddings=int(self._require("context_length")),
            rms_norm_eps=float(self._arch("attention.layer_norm_rms_epsilon", 1e-5)),
            rope_theta=float(self._arch("rope.freq_base", 10000.0)),
            rope_scaling=self._rope_scaling(),
            tie_word_embeddings=OUTPUT_NAME not in self._tensors,
            dtype=self._default_dtype(),
            bos_token_id=None if bos is None else int(bos),
            eos_token_ids=tuple(dict.fromkeys(int(i) for i in special_ids if i is not None)),
        )

    def _rope_scaling(self) -> dict[str, Any] | None:
        """RoPE scaling as in a Hugging Face config: None, or linear with its factor."""
        if "rope_freqs.weight" in self._tensors:
            raise ValueError("it scales RoPE by per-frequency factors (tensor 'rope_freqs.weight', LLaMA 3.1 "
                             "style), which this converter cannot map: convert the Hugging Face model instead")
        scaling_type, factor = self._arch("rope.scaling.type"), self._arch("rope.scaling.factor")
        # Files from before rope.scaling.type name a linear factor on its own.
        if scaling_type is None and self._arch("rope.scale_linear") is not None:
            scaling_type, factor = "linear", self._arch("rope.scale_linear")
        if scaling_type in (None, "none") or factor in (None, 1.0):
            return None
        if scaling_type != "linear":
            raise ValueError(f"rope.scaling.type {scaling_type!r} is not supported (supported: none, linear)")
        return {"rope_type": "linear", "factor": float(factor)}

    def _default_dtype(self) -> str:
        """float16 or bfloat16 when every matrix is stored so; float32 otherwise (quantized, mixed)."""
        matrix_types = {tensor.tensor_type.name for tensor in self._tensors.values() if len(tensor.shape) == 2}
        if len(matrix_types) == 1:
            return FLOAT_TYPE_DTYPES.get(matrix_types.pop(), "float32")
        return "float32"

    def _expected_names(self) -> list[str]:
        names = [EMBEDDING_NAME, FINAL_NORM_NAME]
        if not self.config.tie_word_embeddings:
            names.append(OUTPUT_NAME)
        for layer_index in range(self.config.num_layers):
            names.extend(f"blk.{layer_index}.{name}" for name in GGUF_LAYER_NAMES.values())
        return names

    def _check_tensor_names(self) -> None:
        """Raise CheckpointError naming the first missing or unexpected tensor, before anything is written."""
        expected = self._expected_names()
        missing = [name for name in expected if name not in self._tensors]
        if missing:
            raise CheckpointError(f"GGUF file {self.path} has no tensor {missing[0]!r}"
                                  + (f" (and {len(missing) - 1} more missing)" if len(missing) > 1 else ""))
        unexpected = sorted(set(self._tensors) - set(expected))
        if unexpected:
            raise CheckpointError(f"GGUF file {self.path} has tensor {unexpected[0]!r}, which a LLaMA model "
                                  f"does not have: this converter cannot map it")

    def _check_tensor_types(self) -> None:
        """Raise CheckpointError naming a tensor whose type the gguf package cannot dequantize, before any work."""
        first_of_type = {}
        for tensor in self._tensors.values():
            first_of_type.setdefault(tensor.tensor_type, tensor)
        for qtype, tensor in first_of_type.items():
            try:
                # One row is enough to learn whether the type is implemented.
                dequantize(tensor.data[:1], qtype)
            except NotImplementedError:
                raise CheckpointError(f"GGUF file {self.path}: tensor {tensor.name!r} has type {qtype.name}, which "
                                      f"the gguf package cannot dequantize") from None

    def tensor(self, name: str, shape: tuple[int, ...]) -> torch.Tensor:
        """Tensor ``name`` dequantized to float32 in PyTorch's row-major layout, checked against ``shape``."""
        stored = self._tensors[name]
        values = dequantize(stored.data, stored.tensor_type)
        # GGUF lists dimensions fastest-first: [H, vocab] there is [vocab, H] here.
        values = values.astype(np.float32, copy=False).reshape(tuple(int(n) for n in reversed(stored.shape)))
        if tuple(values.shape) != shape:
            raise CheckpointError(f"GGUF tensor {name!r} has shape {tuple(values.shape)}, expected {shape} from "
                                  f"the file's metadata")
        # F32 tensors come back as read-only views of the memory map: copy those out.
        return torch.from_numpy(values if values.flags.writeable else values.copy())

    def embedding(self) -> torch.Tensor:
        """The [vocab_size, H] token embedding."""
        return self.tensor(EMBEDDING_NAME, (self.config.vocab_size, self.config.hidden_size))

    def layer(self, layer_index: int) -> dict[str, torch.Tensor]:
        """Layer ``layer_index``'s weights under the canonical keys of ``sharding.LAYER_KEYS``."""
        if not 0 <= layer_index < self.config.num_layers:
            raise ValueError(f"layer {layer_index} is outside 0..{self.config.num_layers - 1}")
        shapes = hf_layer_shapes(self.config)
        weights = {key: self.tensor(f"blk.{layer_index}.{name}", shapes[key])
                   for key, name in GGUF_LAYER_NAMES.items()}
        weights["q_proj"] = unpermute_rows(weights["q_proj"], self.config.num_attention_heads)
        weights["k_proj"] = unpermute_rows(weights["k_proj"], self.config.num_kv_heads)
        return weights

    def final_norm(self) -> torch.Tensor:
        """The [H] final RMSNorm weight."""
        return self.tensor(FINAL_NORM_NAME, (self.config.hidden_size,))

    def lm_head(self) -> torch.Tensor | None:
        """The [vocab_size, H] output layer, or None when it is tied to the embedding."""
        if self.config.tie_word_embeddings:
            return None
        return self.tensor(OUTPUT_NAME, (self.config.vocab_size, self.config.hidden_size))

    def write_tokenizer(self, folder: Path) -> None:
        """Write the file's tokenizer and chat template into ``folder``; nothing when it has no tokenizer."""
        if self.metadata("tokenizer.ggml.model") is not None:
            write_gguf_tokenizer(self.path, folder, self.metadata("tokenizer.chat_template"))

    def close(self) -> None:
        """Drop the memory map (the file closes once no tensor refers to it)."""
        self._tensors = {}
        self._reader = None
