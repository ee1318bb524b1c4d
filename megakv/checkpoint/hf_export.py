"""Writing any source checkpoint as a Hugging Face LLaMA folder (``--to hf``).

The folder holds ``config.json`` (transformers 5.x field names, with the 4.x
``rope_theta`` beside them) and one ``model.safetensors`` written tensor by tensor
with :class:`SafetensorsWriter`, one layer in memory at a time, so that
``LlamaForCausalLM.from_pretrained`` loads it.
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


def hf_config_dict(cfg: ModelConfig) -> dict[str, Any]:
    """The ``config.json`` of a LlamaForCausalLM with ``cfg``'s hyper-parameters."""
    rope_parameters = {"rope_type": "default", **(cfg.rope_scaling or {}), "rope_theta": cfg.rope_theta}
    eos = list(cfg.eos_token_ids)
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
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
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
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
        plan += [(f"model.layers.{layer_index}.{name}", shapes[key]) for key, name in HF_LAYER_NAMES.items()]
    plan.append(("model.norm.weight", (cfg.hidden_size,)))
    if not cfg.tie_word_embeddings:
        plan.append(("lm_head.weight", vocab))
    return plan


def write_hf_folder(reader: Any, cfg: ModelConfig, folder: Path, progress: bool) -> None:
    """Write ``reader``'s weights (a convert.SourceReader) into ``folder`` as a Hugging Face LLaMA, in ``cfg.dtype``."""
    dtype = cfg.torch_dtype
    plan = [(name, shape, dtype) for name, shape in hf_tensor_plan(cfg)]
    with SafetensorsWriter(folder / HF_WEIGHTS_FILE, plan, metadata={"format": "pt"}) as writer:
        writer.write("model.embed_tokens.weight", reader.embedding().to(dtype))
        for layer_index in tqdm(range(cfg.num_layers), desc="exporting", unit="layer", file=sys.stderr,
                                disable=not progress):
            layer = reader.layer(layer_index)
            for key, name in HF_LAYER_NAMES.items():
                writer.write(f"model.layers.{layer_index}.{name}", layer[key].to(dtype).contiguous())
        writer.write("model.norm.weight", reader.final_norm().to(dtype))
        lm_head = reader.lm_head()
        if lm_head is not None:
            writer.write("lm_head.weight", lm_head.to(dtype))
    with open(folder / HF_CONFIG_FILE, "w") as f:
        json.dump(hf_config_dict(cfg), f, indent=2)
        f.write("\n")
