"""Megatron's weight layout and hyper-parameters, mapped to megakv's unsharded Hugging Face-like layer.

Pure functions (no I/O), shared by the legacy per-rank and the ``torch_dist``
readers in :mod:`megakv.checkpoint.megatron`. The layout facts (checked against
megatron-core 0.16, see ``shared/CHECKPOINTS.md``):

- ``linear_qkv`` is grouped by KV group: ``[num_groups, q_per_group + 2, head_dim, hidden]``,
  each group holding its queries, then its key, then its value. TP ranks hold whole
  groups, so rank shards concatenate on dim 0.
- ``linear_fc1`` on each TP rank is ``[gate_shard; up_shard]``; the full gate is every
  rank's first half. ``torch_dist`` stores it as ``[all gates; all ups]``.
- ``rotary_interleaved=True`` rotates pairs (2i, 2i+1); megakv, like Hugging Face and
  Megatron's default, rotates (i, i + D/2): q and k rows are permuted per head.
"""
from __future__ import annotations

from typing import Any

import torch

from megakv.checkpoint.format import CheckpointError
from megakv.config import ModelConfig

# Canonical Megatron piece of one layer -> accepted names relative to the layer prefix
# (megatron-core local spec, Transformer Engine fused norms, legacy Megatron-LM).
LAYER_PIECES: dict[str, tuple[str, ...]] = {
    "input_norm": ("input_layernorm.weight", "self_attention.linear_qkv.layer_norm_weight", "input_norm.weight"),
    "qkv": ("self_attention.linear_qkv.weight", "self_attention.query_key_value.weight"),
    "proj": ("self_attention.linear_proj.weight", "self_attention.dense.weight"),
    "pre_mlp_norm": ("pre_mlp_layernorm.weight", "mlp.linear_fc1.layer_norm_weight", "post_attention_norm.weight",
                     "post_attention_layernorm.weight"),
    "fc1": ("mlp.linear_fc1.weight", "mlp.dense_h_to_4h.weight"),
    "fc2": ("mlp.linear_fc2.weight", "mlp.dense_4h_to_h.weight"),
}
# Prefixes of layer N's names (megatron-core, legacy Megatron-LM); torch_dist stacks layers under the same
# prefixes without the index.
LAYER_PREFIXES = ("decoder.layers.", "language_model.encoder.layers.")
EMBEDDING_NAMES = ("embedding.word_embeddings.weight", "language_model.embedding.word_embeddings.weight")
FINAL_NORM_NAMES = ("decoder.final_layernorm.weight", "language_model.encoder.final_norm.weight",
                    "language_model.encoder.final_layernorm.weight")
OUTPUT_NAMES = ("output_layer.weight", "language_model.output_layer.weight")

# Hyper-parameters megakv needs, by Megatron-LM argument name.
REQUIRED_ARGS = ("num_layers", "hidden_size", "num_attention_heads", "ffn_hidden_size", "padded_vocab_size")
# llama3 RoPE scaling constants Megatron applies with --use-rope-scaling (megatron.core rope_utils).
MEGATRON_LLAMA3_SCALING = {"rope_type": "llama3", "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                           "original_max_position_embeddings": 8192}


def model_config_from_args(args: dict[str, Any], dtype: str) -> ModelConfig:
    """Build megakv's ModelConfig from Megatron-LM ``args`` (merged with user overrides)."""
    missing = [name for name in REQUIRED_ARGS if args.get(name) is None]
    if missing:
        raise CheckpointError(f"the Megatron checkpoint does not state {', '.join(missing)}: supply them with "
                              + " ".join(f"--model-arg {name}=..." for name in missing))
    if args.get("swiglu") is False or args.get("gated_linear_unit") is False:
        raise CheckpointError("the Megatron checkpoint has a plain (non-gated) MLP; megakv reads LLaMA models "
                              "with SwiGLU (--swiglu)")
    if args.get("add_bias_linear") is True or args.get("add_qkv_bias") is True:
        raise CheckpointError("the Megatron checkpoint has linear biases; megakv reads bias-free LLaMA models")
    if args.get("normalization", "RMSNorm") != "RMSNorm":
        raise CheckpointError(f"the Megatron checkpoint uses {args['normalization']}; megakv needs RMSNorm")
    if args.get("position_embedding_type", "rope") != "rope":
        raise CheckpointError(f"the Megatron checkpoint uses {args['position_embedding_type']} position "
                              f"embeddings; megakv needs rope")
    num_heads = args["num_attention_heads"]
    num_groups = args.get("num_query_groups") if args.get("group_query_attention", True) else None
    rope_scaling = None
    if args.get("use_rope_scaling"):
        rope_scaling = dict(MEGATRON_LLAMA3_SCALING, factor=float(args.get("rope_scaling_factor", 8.0)))
    epsilon = args.get("norm_epsilon", args.get("layernorm_epsilon", 1e-5))
    try:
        return ModelConfig(
            vocab_size=args["padded_vocab_size"],
            hidden_size=args["hidden_size"],
            intermediate_size=args["ffn_hidden_size"],
            num_layers=args["num_layers"],
            num_attention_heads=num_heads,
            num_kv_heads=num_groups or num_heads,
            head_dim=args.get("kv_channels") or args["hidden_size"] // num_heads,
            max_position_embeddings=args.get("max_position_embeddings") or args.get("seq_length") or 4096,
            rms_norm_eps=float(epsilon),
            rope_theta=float(args.get("rotary_base", 10000)),
            rope_scaling=rope_scaling,
            tie_word_embeddings=not args.get("untie_embeddings_and_output_weights", False),
            dtype=dtype,
        )
    except ValueError as err:
        raise CheckpointError(f"Megatron hyper-parameters: {err}") from None


def checkpoint_dtype(args: dict[str, Any]) -> str:
    """The dtype the training run kept its weights in (``--bf16`` / ``--fp16`` / ``params_dtype``)."""
    if args.get("bf16"):
        return "bfloat16"
    if args.get("fp16"):
        return "float16"
    params_dtype = args.get("params_dtype")
    return {torch.bfloat16: "bfloat16", torch.float16: "float16"}.get(params_dtype, "float32")


def find_piece(tensors: dict[str, Any], prefix: str, piece: str) -> str:
    """The name under which ``tensors`` holds ``piece`` of the layer at ``prefix``; CheckpointError if none."""
    for name in LAYER_PIECES[piece]:
        if prefix + name in tensors:
            return prefix + name
    raise CheckpointError(f"the Megatron checkpoint has no {piece} weight under {prefix!r} "
                          f"(looked for {', '.join(LAYER_PIECES[piece])})")


def merge_rank_pieces(ranks: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """One layer's TP-rank pieces (in rank order) -> unsharded pieces, fc1 as ``[all gates; all ups]``."""
    fc1 = [rank["fc1"].chunk(2) for rank in ranks]  # each rank: [gate_shard; up_shard]
    return {
        "input_norm": ranks[0]["input_norm"],
        "qkv": torch.cat([rank["qkv"] for rank in ranks]),
        "proj": torch.cat([rank["proj"] for rank in ranks], dim=1),
        "pre_mlp_norm": ranks[0]["pre_mlp_norm"],
        "fc1": torch.cat([gate for gate, _ in fc1] + [up for _, up in fc1]),
        "fc2": torch.cat([rank["fc2"] for rank in ranks], dim=1),
    }


def deinterleave_rotary(weight: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Reorder each head's rows from interleaved pairs (2i, 2i+1) to halves (i, i + D/2)."""
    hidden = weight.shape[-1]
    per_head = weight.reshape(-1, head_dim // 2, 2, hidden)  # [heads, D/2, pair, H]
    return per_head.transpose(1, 2).reshape(-1, hidden)  # [heads * D, H], pair-major within a head


def layer_from_pieces(pieces: dict[str, torch.Tensor], cfg: ModelConfig,
                      rotary_interleaved: bool) -> dict[str, torch.Tensor]:
    """Unsharded Megatron pieces of one layer -> megakv's canonical keys (Hugging Face layout)."""
    hidden, head_dim, ffn = cfg.hidden_size, cfg.head_dim, cfg.intermediate_size
    num_groups = cfg.num_kv_heads
    q_per_group = cfg.num_attention_heads // num_groups
    expected = {
        "input_norm": (hidden,),
        "qkv": ((cfg.num_attention_heads + 2 * num_groups) * head_dim, hidden),
        "proj": (hidden, cfg.num_attention_heads * head_dim),
        "pre_mlp_norm": (hidden,),
        "fc1": (2 * ffn, hidden),
        "fc2": (hidden, ffn),
    }
    for piece, shape in expected.items():
        if tuple(pieces[piece].shape) != shape:
            raise CheckpointError(
                f"Megatron weight {piece} has shape {tuple(pieces[piece].shape)}, but the hyper-parameters "
                f"(hidden {hidden}, heads {cfg.num_attention_heads}, query groups {num_groups}, head dim "
                f"{head_dim}, ffn {ffn}) need {shape}: fix them with --model-arg NAME=VALUE")
    grouped = pieces["qkv"].reshape(num_groups, q_per_group + 2, head_dim, hidden)  # [G, q/G + 2, D, H]
    query = grouped[:, :q_per_group].reshape(-1, hidden)  # [Hq * D, H]
    key = grouped[:, q_per_group].reshape(-1, hidden)  # [G * D, H]
    value = grouped[:, q_per_group + 1].reshape(-1, hidden)
    if rotary_interleaved:
        query, key = deinterleave_rotary(query, head_dim), deinterleave_rotary(key, head_dim)
    gate, up = pieces["fc1"].chunk(2)
    return {
        "q_proj": query.contiguous(),
        "k_proj": key.contiguous(),
        "v_proj": value.contiguous(),
        "o_proj": pieces["proj"],
        "gate_proj": gate,
        "up_proj": up,
        "down_proj": pieces["fc2"],
        "input_layernorm": pieces["input_norm"],
        "post_attention_layernorm": pieces["pre_mlp_norm"],
    }
