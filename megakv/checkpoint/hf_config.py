"""Reading a Hugging Face ``config.json`` (LLaMA, Mistral, Qwen2) into a ModelConfig, refusing what megakv cannot serve.

Every field either maps onto ModelConfig, is known not to change the forward pass
(bookkeeping, training-only or sampling defaults), or stops the conversion with a
ValueError naming it: a field the model would use but megakv would ignore would
give wrong tokens without a word. ``generation_config.json``'s EOS ids replace
``config.json``'s, as ``transformers``' ``generate`` does.
"""
from __future__ import annotations

from typing import Any

from megakv.config import ACTIVATIONS, DTYPES, ROPE_KEYS, ModelConfig

MODEL_TYPES = ("llama", "mistral", "qwen2")
# HF names of ACTIVATIONS' functions (transformers maps "swish" to SiLU too).
ACTIVATION_ALIASES = {"swish": "silu"}

# Fields read below, for every model type.
READ_FIELDS = frozenset({
    "model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "max_position_embeddings", "rms_norm_eps", "rope_theta", "rope_scaling",
    "rope_parameters", "tie_word_embeddings", "dtype", "torch_dtype", "bos_token_id", "eos_token_id", "hidden_act",
})
# Fields of one model type only.
TYPE_FIELDS = {
    "llama": frozenset({"attention_bias", "mlp_bias"}),
    "mistral": frozenset({"sliding_window", "layer_types"}),
    "qwen2": frozenset({"sliding_window", "use_sliding_window", "max_window_layers", "layer_types"}),
}
# Fields that leave inference unchanged: bookkeeping, training only (dropout is off in eval mode,
# pretraining_tp only split training matmuls), or defaults for sampling.
NEUTRAL_FIELDS = frozenset({
    "_name_or_path", "architectures", "transformers_version", "chunk_size_feed_forward", "id2label", "label2id",
    "is_encoder_decoder", "output_attentions", "output_hidden_states", "problem_type", "return_dict",
    "use_return_dict", "torchscript", "use_bfloat16", "tokenizer_class", "initializer_range", "use_cache",
    "pad_token_id", "sep_token_id", "decoder_start_token_id", "attention_dropout", "pretraining_tp",
    "max_length", "min_length", "do_sample", "num_beams", "temperature", "top_k", "top_p",
})


def _refuse(field: str, value: Any, why: str = "") -> ValueError:
    return ValueError(f"unsupported field {field}={value!r}" + (f": {why}" if why else ""))


def _check_fields(hf: dict[str, Any], model_type: str) -> None:
    """Raise ValueError naming the first field megakv would ignore although the model uses it."""
    known = READ_FIELDS | TYPE_FIELDS[model_type] | NEUTRAL_FIELDS
    for field in sorted(hf):
        if field not in known:
            raise _refuse(field, hf[field], f"megakv does not implement it for model_type {model_type!r}")


def _rope(hf: dict[str, Any]) -> tuple[float, dict[str, Any] | None]:
    """(rope_theta, rope_scaling or None) from transformers 5.x ``rope_parameters`` or 4.x fields."""
    rope = dict(hf.get("rope_parameters") or {})
    rope_theta = rope.pop("rope_theta", hf.get("rope_theta", 10000.0))
    if not rope and hf.get("rope_scaling"):
        rope = dict(hf["rope_scaling"])
    if "type" in rope and "rope_type" not in rope:
        rope["rope_type"] = rope.pop("type")
    if rope.get("partial_rotary_factor", 1.0) != 1.0:
        raise _refuse("rope_parameters.partial_rotary_factor", rope["partial_rotary_factor"])
    rope.pop("partial_rotary_factor", None)
    rope_type = rope.get("rope_type", "default")
    if rope_type not in ROPE_KEYS:
        raise _refuse("rope_parameters.rope_type", rope_type, f"megakv serves {', '.join(ROPE_KEYS)}")
    unknown = sorted(set(rope) - ROPE_KEYS[rope_type] - {"rope_type"})
    if unknown:
        raise _refuse(f"rope_parameters.{unknown[0]}", rope[unknown[0]], f"rope type {rope_type!r} does not read it")
    if rope_type == "default":
        return float(rope_theta), None
    if rope["rope_type"] in ("llama3", "yarn"):
        # transformers' default: the context the model was trained at is max_position_embeddings.
        rope.setdefault("original_max_position_embeddings", hf.get("max_position_embeddings", 2048))
    return float(rope_theta), rope


def _sliding_window(hf: dict[str, Any], model_type: str) -> int | None:
    """The window every layer uses, or None; a window on some layers only is refused."""
    window = hf.get("sliding_window")
    if model_type == "qwen2":
        if not hf.get("use_sliding_window", False):
            window = None
        elif hf.get("max_window_layers", 28) != 0:
            # Qwen2 slides only from layer max_window_layers on: per-layer windows are not implemented.
            raise _refuse("use_sliding_window", True, f"Qwen2 slides only from layer "
                          f"{hf.get('max_window_layers', 28)} on, and per-layer windows are not implemented")
    if model_type == "llama":
        window = None
    layer_types = set(hf.get("layer_types") or ())
    expected = {"sliding_attention"} if window is not None else {"full_attention"}
    if layer_types - expected:
        raise _refuse("layer_types", sorted(layer_types), "every layer must use the same attention")
    if window is not None and window >= hf.get("max_position_embeddings", 2048):
        # A window as long as every position masks nothing.
        return None
    return window


def _eos_ids(eos: Any, where: str) -> tuple[int, ...]:
    eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))
    if not all(isinstance(token_id, int) and not isinstance(token_id, bool) for token_id in eos_ids):
        raise ValueError(f"{where} eos_token_id must be an integer or a list of integers, got {eos!r}")
    return eos_ids


def model_config_from_hf(hf: dict[str, Any], generation: dict[str, Any] | None = None) -> ModelConfig:
    """The ModelConfig of a Hugging Face ``config.json`` (transformers 4.x or 5.x field names).

    ``generation`` is the model's ``generation_config.json``, whose EOS ids take precedence.
    """
    model_type = hf.get("model_type", "llama")
    if model_type not in MODEL_TYPES:
        raise ValueError(f"unsupported model_type {model_type!r}: megakv reads {', '.join(MODEL_TYPES)}")
    missing = [k for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                           "num_attention_heads") if k not in hf]
    if missing:
        raise ValueError(f"Hugging Face config is missing {', '.join(missing)}")
    _check_fields(hf, model_type)
    hidden_act = hf.get("hidden_act", "silu")
    hidden_act = ACTIVATION_ALIASES.get(hidden_act, hidden_act)
    if hidden_act not in ACTIVATIONS:
        raise _refuse("hidden_act", hf["hidden_act"], f"megakv serves {', '.join(ACTIVATIONS)}")
    rope_theta, rope_scaling = _rope(hf)
    eos_ids = _eos_ids(hf.get("eos_token_id"), "config.json")
    if generation is not None and "eos_token_id" in generation:
        eos_ids = _eos_ids(generation["eos_token_id"], "generation_config.json")
    num_heads = hf["num_attention_heads"]
    dtype = hf.get("dtype") or hf.get("torch_dtype") or "float32"
    attention_bias = bool(hf.get("attention_bias", False))
    return ModelConfig(
        vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"],
        intermediate_size=hf["intermediate_size"],
        num_layers=hf["num_hidden_layers"],
        num_attention_heads=num_heads,
        num_kv_heads=hf.get("num_key_value_heads") or num_heads,
        head_dim=hf.get("head_dim") or hf["hidden_size"] // num_heads,
        max_position_embeddings=hf.get("max_position_embeddings", 2048),
        rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
        rope_theta=rope_theta,
        rope_scaling=rope_scaling,
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        dtype=dtype if dtype in DTYPES else "float32",
        bos_token_id=hf.get("bos_token_id"),
        eos_token_ids=eos_ids,
        hidden_act=hidden_act,
        # Qwen2 always has Q/K/V biases and no output bias; LLaMA's attention_bias sets both.
        qkv_bias=model_type == "qwen2" or attention_bias,
        proj_bias=attention_bias,
        mlp_bias=bool(hf.get("mlp_bias", False)),
        sliding_window=_sliding_window(hf, model_type),
    )
