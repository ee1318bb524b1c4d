"""Writing any source checkpoint as a Hugging Face folder (``--to hf``): LLaMA, or Mistral / Qwen2 where needed.

The folder holds ``config.json`` (transformers 5.x field names, with the 4.x
``rope_theta`` beside them) and one ``model.safetensors`` written tensor by tensor
with :class:`SafetensorsWriter`, one layer in memory at a time, so that
``AutoModelForCausalLM.from_pretrained`` loads it. A sliding window needs Mistral (or Qwen2 with biases), Q/K/V
biases without an output bias need Qwen2; a model no one of the three classes can hold is refused.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from tqdm import tqdm

from megakv.checkpoint.hf import HF_CONFIG_FILE, HF_LAYER_NAMES, HF_WEIGHTS_FILE
from megakv.checkpoint.safetensors_writer import SafetensorsWriter
from megakv.checkpoint.sharding import hf_layer_shapes
from megakv.config import ModelConfig


def _architecture_fields(cfg: ModelConfig) -> dict[str, Any]:
    """The model type and the fields of it that hold ``cfg``'s biases and window; ValueError when none can."""
    qwen2_like = cfg.qkv_bias and not cfg.proj_bias and not cfg.mlp_bias
    if qwen2_like:
        window = cfg.sliding_window is not None
        # Qwen2 slides from layer max_window_layers on: 0 makes every layer slide, as megakv does.
        return {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "use_sliding_window": window,
                "sliding_window": cfg.sliding_window, "max_window_layers": 0 if window else cfg.num_layers}
    if cfg.sliding_window is not None:
        if cfg.qkv_bias or cfg.proj_bias or cfg.mlp_bias:
            raise ValueError(f"no Hugging Face class holds a sliding window ({cfg.sliding_window}) with these "
                             f"biases (qkv {cfg.qkv_bias}, output {cfg.proj_bias}, mlp {cfg.mlp_bias})")
        return {"architectures": ["MistralForCausalLM"], "model_type": "mistral",
                "sliding_window": cfg.sliding_window}
    if cfg.qkv_bias != cfg.proj_bias:
        raise ValueError("no Hugging Face class holds an output projection bias without Q/K/V biases")
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "attention_bias": cfg.qkv_bias,
            "mlp_bias": cfg.mlp_bias}


def hf_config_dict(cfg: ModelConfig) -> dict[str, Any]:
    """The ``config.json`` of a Hugging Face causal LM with ``cfg``'s hyper-parameters."""
    rope_parameters = {"rope_type": "default", **(cfg.rope_scaling or {}), "rope_theta": cfg.rope_theta}
    eos = list(cfg.eos_token_ids)
    return {
        **_architecture_fields(cfg),
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim,
        "max_position_embeddings": cfg.max_position_embeddings,
        "rms_norm_eps": cfg.rms_norm_eps,
        "rope_parameters": rope_parameters,
        "rope_theta": cfg.rope_theta,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "hidden_act": cfg.hidden_act,
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": eos[0] if len(eos) == 1 else (eos or None),
        "dtype": cfg.dtype,
    }


def hf_tensor_plan(cfg: ModelConfig) -> list[tuple[str, tuple[int, ...]]]:
    """Hugging Face names and shapes of every tensor, in the order they are written."""
    vocab = (cfg.vocab_size, cfg.hidden_size)
    plan = [("model.embed_tokens.weight", vocab)]
    shapes = hf_layer_shapes(cfg)
    for layer_index in range(cfg.num_layers):
        plan += [(f"model.layers.{layer_index}.{HF_LAYER_NAMES[key]}", shape) for key, shape in shapes.items()]
    plan.append(("model.norm.weight", (cfg.hidden_size,)))
    if not cfg.tie_word_embeddings:
        plan.append(("lm_head.weight", vocab))
    return plan


def write_hf_folder(reader: Any, cfg: ModelConfig, folder: Path, progress: bool) -> None:
    """Write ``reader``'s weights (a convert.SourceReader) into ``folder`` as a Hugging Face model, in ``cfg.dtype``."""
    config = hf_config_dict(cfg)
    dtype = cfg.torch_dtype
    plan = [(name, shape, dtype) for name, shape in hf_tensor_plan(cfg)]
    with SafetensorsWriter(folder / HF_WEIGHTS_FILE, plan, metadata={"format": "pt"}) as writer:
        writer.write("model.embed_tokens.weight", reader.embedding().to(dtype))
        for layer_index in tqdm(range(cfg.num_layers), desc="exporting", unit="layer", file=sys.stderr,
                                disable=not progress):
            layer = reader.layer(layer_index)
            for key in hf_layer_shapes(cfg):
                writer.write(f"model.layers.{layer_index}.{HF_LAYER_NAMES[key]}", layer[key].to(dtype).contiguous())
        writer.write("model.norm.weight", reader.final_norm().to(dtype))
        lm_head = reader.lm_head()
        if lm_head is not None:
            writer.write("lm_head.weight", lm_head.to(dtype))
    with open(folder / HF_CONFIG_FILE, "w") as f:
        json.dump(config, f, indent=2)
        f.write("\n")
