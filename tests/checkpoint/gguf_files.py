"""Test helper: llama.cpp-style GGUF files written with the gguf package's GGUFWriter from Hugging Face weights.

What llama.cpp's convert_hf_to_gguf.py does for a LLaMA, spelled out on its own:
its tensor names, its permutation of the query and key rows, the ``llama.*``
metadata. :func:`write_llama_gguf` returns the weights as the file stores them,
dequantized and in Hugging Face names and layout: the reference a converted
model must reproduce.
"""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import gguf
import numpy as np
import torch
from gguf import GGMLQuantizationType

TOP_LEVEL_NAMES = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
                   "lm_head.weight": "output.weight"}
LAYER_NAMES = {"self_attn.q_proj.weight": "attn_q.weight", "self_attn.k_proj.weight": "attn_k.weight",
               "self_attn.v_proj.weight": "attn_v.weight", "self_attn.o_proj.weight": "attn_output.weight",
               "mlp.gate_proj.weight": "ffn_gate.weight", "mlp.up_proj.weight": "ffn_up.weight",
               "mlp.down_proj.weight": "ffn_down.weight", "input_layernorm.weight": "attn_norm.weight",
               "post_attention_layernorm.weight": "ffn_norm.weight"}
# Types whose quantizer the gguf package does not implement: their bytes are drawn at random.
RANDOM_BYTES_TYPES = (GGMLQuantizationType.Q4_K, GGMLQuantizationType.Q5_K, GGMLQuantizationType.Q6_K)


def llama_cpp_permute(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """convert_hf_to_gguf.py's LlamaModel.permute of a [num_heads*D, H] query or key weight."""
    return (weight.reshape(num_heads, 2, weight.shape[0] // num_heads // 2, *weight.shape[1:])
            .swapaxes(1, 2).reshape(weight.shape))


def gguf_name(hf_name: str) -> str:
    """llama.cpp's name of a Hugging Face LLaMA tensor."""
    if hf_name in TOP_LEVEL_NAMES:
        return TOP_LEVEL_NAMES[hf_name]
    _, _, index, rest = hf_name.split(".", 3)
    return f"blk.{index}.{LAYER_NAMES[rest]}"


def encode(values: np.ndarray, qtype: GGMLQuantizationType, seed: int) -> np.ndarray:
    """The stored form of ``values`` as ``qtype``; for the random-bytes types, random blocks of that shape."""
    if qtype not in RANDOM_BYTES_TYPES:
        return gguf.quants.quantize(values, qtype)
    byte_shape = gguf.quant_shape_to_byte_shape(values.shape, qtype)
    # Bytes below 0x3c keep every float16 scale in a block finite and under 1.
    return np.random.default_rng(seed).integers(0, 0x3c, size=byte_shape, dtype=np.uint8)


def write_llama_gguf(path: Path, state: dict[str, torch.Tensor], config: dict,
                     type_of: Callable[[str], GGMLQuantizationType], architecture: str = "llama",
                     metadata: dict | None = None) -> dict[str, torch.Tensor]:
    """Write ``state`` (HF names) as a llama.cpp GGUF; return the stored weights dequantized, in HF layout."""
    writer = gguf.GGUFWriter(path, architecture)
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(config["num_attention_heads"])
    writer.add_head_count_kv(config["num_key_value_heads"])
    writer.add_rope_freq_base(config["rope_theta"])
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_rope_dimension_count(config["hidden_size"] // config["num_attention_heads"])
    writer.add_vocab_size(config["vocab_size"])
    for key, value in (metadata or {}).items():
        getattr(writer, f"add_{key}")(value)
    stored = {}
    for seed, (name, tensor) in enumerate(state.items()):
        values = tensor.float().numpy()
        num_heads = {"q_proj": config["num_attention_heads"], "k_proj": config["num_key_value_heads"]}.get(
            name.split(".")[-2])
        if num_heads is not None:
            values = llama_cpp_permute(values, num_heads)
        qtype = type_of(name) if values.ndim == 2 else GGMLQuantizationType.F32
        if qtype == GGMLQuantizationType.I32:
            # An integer matrix: a type no converter can dequantize, for the error tests (no reference).
            writer.add_tensor(gguf_name(name), values.astype(np.int32))
            continue
        data = encode(values, qtype, seed)
        writer.add_tensor(gguf_name(name), data, raw_dtype=qtype)
        dequantized = gguf.quants.dequantize(data, qtype).reshape(values.shape)
        if num_heads is not None:
            # Row-wise quantization commutes with the row permutation: invert the latter on the result.
            inverse = llama_cpp_permute(np.arange(values.shape[0]), num_heads)
            dequantized = dequantized[np.argsort(inverse)]
        stored[name] = torch.from_numpy(np.array(dequantized, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return stored
