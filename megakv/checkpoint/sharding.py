"""Tensor-parallel sharding of LLaMA weights into megakv's per-rank layout, and its inverse.

The layout follows Megatron-core's column/row parallel linears: ``linear_qkv``
and ``linear_fc1`` are split by output rows, ``linear_proj`` and ``linear_fc2``
by input columns, embeddings and the output layer by (padded) vocabulary rows.
Each rank's ``linear_qkv`` holds its q heads, then its k heads, then its v heads;
``linear_fc1`` holds its gate rows, then its up rows. When tp exceeds the number
of KV heads, each KV head is replicated on ``tp // num_kv_heads`` consecutive ranks.
Biases follow their weights' rows: column-parallel biases are split, the row-parallel
ones (``linear_proj``, ``linear_fc2``) are whole on every rank and added once, after the reduction.

Functions here are pure (no I/O) and take layer weights in canonical Hugging
Face shapes under the keys of :data:`LAYER_KEYS`.
"""
from __future__ import annotations

import torch

from megakv.config import ModelConfig

EMBEDDING = "embedding.word_embeddings.weight"
FINAL_NORM = "decoder.final_layernorm.weight"
OUTPUT_LAYER = "output_layer.weight"

# An unsharded layer, keyed as in Hugging Face LLaMA (q_proj is [Hq*D, H], down_proj [H, F], ...),
# with the biases the config enables (q_bias is [Hq*D], o_bias [H], ...).
LAYER_KEYS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
              "input_layernorm", "post_attention_layernorm",
              "q_bias", "k_bias", "v_bias", "o_bias", "gate_bias", "up_bias", "down_bias")

# One rank's layer, keyed relative to layer_prefix(i), in the order tensors are stored.
INPUT_NORM = "input_layernorm.weight"
LINEAR_QKV = "self_attention.linear_qkv.weight"
LINEAR_PROJ = "self_attention.linear_proj.weight"
PRE_MLP_NORM = "pre_mlp_layernorm.weight"
LINEAR_FC1 = "mlp.linear_fc1.weight"
LINEAR_FC2 = "mlp.linear_fc2.weight"
LINEAR_QKV_BIAS = "self_attention.linear_qkv.bias"
LINEAR_PROJ_BIAS = "self_attention.linear_proj.bias"
LINEAR_FC1_BIAS = "mlp.linear_fc1.bias"
LINEAR_FC2_BIAS = "mlp.linear_fc2.bias"


def layer_prefix(layer_index: int) -> str:
    """Prefix of layer ``layer_index``'s tensor names in a megakv shard."""
    return f"decoder.layers.{layer_index}."


def layer_shard_shapes(cfg: ModelConfig, tp: int) -> dict[str, tuple[int, ...]]:
    """Shapes of one rank's layer tensors, keyed relative to :func:`layer_prefix`."""
    cfg.check_tensor_parallel_size(tp)
    hidden, head_dim = cfg.hidden_size, cfg.head_dim
    num_q_heads = cfg.num_attention_heads // tp
    num_kv_heads = cfg.num_kv_heads_per_partition(tp)
    ffn = cfg.intermediate_size // tp
    shapes = {
        INPUT_NORM: (hidden,),
        LINEAR_QKV: ((num_q_heads + 2 * num_kv_heads) * head_dim, hidden),
        LINEAR_PROJ: (hidden, num_q_heads * head_dim),
        PRE_MLP_NORM: (hidden,),
        LINEAR_FC1: (2 * ffn, hidden),
        LINEAR_FC2: (hidden, ffn),
    }
    if cfg.qkv_bias:
        shapes[LINEAR_QKV_BIAS] = ((num_q_heads + 2 * num_kv_heads) * head_dim,)
    if cfg.proj_bias:
        shapes[LINEAR_PROJ_BIAS] = (hidden,)
    if cfg.mlp_bias:
        shapes[LINEAR_FC1_BIAS] = (2 * ffn,)
        shapes[LINEAR_FC2_BIAS] = (hidden,)
    return shapes


def shard_shapes(cfg: ModelConfig, tp: int) -> dict[str, tuple[int, ...]]:
    """Names and shapes of every tensor in one rank's shard, in storage order."""
    vocab_per_rank = cfg.padded_vocab_size(tp) // tp
    shapes = {EMBEDDING: (vocab_per_rank, cfg.hidden_size)}
    layer_shapes = layer_shard_shapes(cfg, tp)
    for layer_index in range(cfg.num_layers):
        prefix = layer_prefix(layer_index)
        shapes.update({prefix + key: shape for key, shape in layer_shapes.items()})
    shapes[FINAL_NORM] = (cfg.hidden_size,)
    if not cfg.tie_word_embeddings:
        shapes[OUTPUT_LAYER] = (vocab_per_rank, cfg.hidden_size)
    return shapes


def hf_layer_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Shapes of an unsharded layer under :data:`LAYER_KEYS` (Hugging Face layout)."""
    hidden, head_dim, ffn = cfg.hidden_size, cfg.head_dim, cfg.intermediate_size
    shapes = {
        "q_proj": (cfg.num_attention_heads * head_dim, hidden),
        "k_proj": (cfg.num_kv_heads * head_dim, hidden),
        "v_proj": (cfg.num_kv_heads * head_dim, hidden),
        "o_proj": (hidden, cfg.num_attention_heads * head_dim),
        "gate_proj": (ffn, hidden),
        "up_proj": (ffn, hidden),
        "down_proj": (hidden, ffn),
        "input_layernorm": (hidden,),
        "post_attention_layernorm": (hidden,),
    }
    if cfg.qkv_bias:
        shapes.update(q_bias=(cfg.num_attention_heads * head_dim,), k_bias=(cfg.num_kv_heads * head_dim,),
                      v_bias=(cfg.num_kv_heads * head_dim,))
    if cfg.proj_bias:
        shapes["o_bias"] = (hidden,)
    if cfg.mlp_bias:
        shapes.update(gate_bias=(ffn,), up_bias=(ffn,), down_bias=(hidden,))
    return shapes


def _kv_head_range(cfg: ModelConfig, tp: int, rank: int) -> tuple[int, int]:
    """First and one-past-last KV head held by ``rank``."""
    if tp <= cfg.num_kv_heads:
        per_rank = cfg.num_kv_heads // tp
        return rank * per_rank, (rank + 1) * per_rank
    replicas = tp // cfg.num_kv_heads
    return rank // replicas, rank // replicas + 1


def _check_rank(tp: int, rank: int) -> None:
    if not 0 <= rank < tp:
        raise ValueError(f"tensor parallel rank {rank} is outside 0..{tp - 1}")


def _check_weights(weights: dict[str, torch.Tensor], expected: dict[str, tuple[int, ...]], what: str) -> None:
    """Raise ValueError naming the first missing or mis-shaped tensor."""
    for key, shape in expected.items():
        if key not in weights:
            raise ValueError(f"{what} are missing {key!r}")
        if tuple(weights[key].shape) != shape:
            raise ValueError(f"{what}: {key!r} has shape {tuple(weights[key].shape)}, expected {shape}")


def shard_layer(full: dict[str, torch.Tensor], cfg: ModelConfig, tp: int, rank: int) -> dict[str, torch.Tensor]:
    """Rank ``rank``'s megakv tensors of one layer (keys relative to :func:`layer_prefix`)."""
    cfg.check_tensor_parallel_size(tp)
    _check_rank(tp, rank)
    _check_weights(full, hf_layer_shapes(cfg), "layer weights")
    head_dim = cfg.head_dim
    q_per_rank = cfg.num_attention_heads // tp * head_dim
    kv_start, kv_end = _kv_head_range(cfg, tp, rank)
    kv_rows = slice(kv_start * head_dim, kv_end * head_dim)
    ffn = cfg.intermediate_size // tp
    ffn_rows = slice(rank * ffn, (rank + 1) * ffn)
    q_rows = slice(rank * q_per_rank, (rank + 1) * q_per_rank)
    shard = {
        INPUT_NORM: full["input_layernorm"],
        LINEAR_QKV: torch.cat([full["q_proj"][q_rows], full["k_proj"][kv_rows], full["v_proj"][kv_rows]]),
        LINEAR_PROJ: full["o_proj"][:, q_rows],
        PRE_MLP_NORM: full["post_attention_layernorm"],
        LINEAR_FC1: torch.cat([full["gate_proj"][ffn_rows], full["up_proj"][ffn_rows]]),
        LINEAR_FC2: full["down_proj"][:, ffn_rows],
    }
    if cfg.qkv_bias:
        shard[LINEAR_QKV_BIAS] = torch.cat([full["q_bias"][q_rows], full["k_bias"][kv_rows], full["v_bias"][kv_rows]])
    if cfg.proj_bias:
        shard[LINEAR_PROJ_BIAS] = full["o_bias"]
    if cfg.mlp_bias:
        shard[LINEAR_FC1_BIAS] = torch.cat([full["gate_bias"][ffn_rows], full["up_bias"][ffn_rows]])
        shard[LINEAR_FC2_BIAS] = full["down_bias"]
    return shard


def unshard_layer(shards: list[dict[str, torch.Tensor]], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Inverse of :func:`shard_layer`: every rank's layer tensors, in rank order, back to :data:`LAYER_KEYS`."""
    tp = len(shards)
    cfg.check_tensor_parallel_size(tp)
    expected = layer_shard_shapes(cfg, tp)
    for rank, shard in enumerate(shards):
        _check_weights(shard, expected, f"rank {rank}'s layer weights")
    head_dim = cfg.head_dim
    q_rows = cfg.num_attention_heads // tp * head_dim
    kv_rows = cfg.num_kv_heads_per_partition(tp) * head_dim
    ffn = cfg.intermediate_size // tp
    # Replicated KV heads appear on tp // num_kv_heads consecutive ranks: keep the first copy.
    kv_ranks = range(0, tp, max(1, tp // cfg.num_kv_heads))

    def split_qkv(name: str) -> list[tuple[torch.Tensor, ...]]:
        return [shard[name].split([q_rows, kv_rows, kv_rows]) for shard in shards]

    def join_qkv(parts: list[tuple[torch.Tensor, ...]], prefix: str) -> dict[str, torch.Tensor]:
        return {f"q_{prefix}": torch.cat([q for q, _, _ in parts]),
                f"k_{prefix}": torch.cat([parts[rank][1] for rank in kv_ranks]),
                f"v_{prefix}": torch.cat([parts[rank][2] for rank in kv_ranks])}

    def join_fc1(name: str, suffix: str) -> dict[str, torch.Tensor]:
        parts = [shard[name].split([ffn, ffn]) for shard in shards]
        return {f"gate_{suffix}": torch.cat([gate for gate, _ in parts]),
                f"up_{suffix}": torch.cat([up for _, up in parts])}

    full = {
        **join_qkv(split_qkv(LINEAR_QKV), "proj"),
        "o_proj": torch.cat([shard[LINEAR_PROJ] for shard in shards], dim=1),
        **join_fc1(LINEAR_FC1, "proj"),
        "down_proj": torch.cat([shard[LINEAR_FC2] for shard in shards], dim=1),
        "input_layernorm": shards[0][INPUT_NORM],
        "post_attention_layernorm": shards[0][PRE_MLP_NORM],
    }
    if cfg.qkv_bias:
        full.update(join_qkv(split_qkv(LINEAR_QKV_BIAS), "bias"))
    if cfg.proj_bias:
        full["o_bias"] = shards[0][LINEAR_PROJ_BIAS]
    if cfg.mlp_bias:
        full.update(join_fc1(LINEAR_FC1_BIAS, "bias"))
        full["down_bias"] = shards[0][LINEAR_FC2_BIAS]
    return full


def shard_vocab(weight: torch.Tensor, cfg: ModelConfig, tp: int, rank: int) -> torch.Tensor:
    """Rank ``rank``'s rows of a [vocab_size, H] embedding or output layer, zero-padded to an even split."""
    _check_rank(tp, rank)
    if tuple(weight.shape) != (cfg.vocab_size, cfg.hidden_size):
        raise ValueError(f"vocabulary weight has shape {tuple(weight.shape)}, "
                         f"expected {(cfg.vocab_size, cfg.hidden_size)}")
    rows_per_rank = cfg.padded_vocab_size(tp) // tp
    start, end = rank * rows_per_rank, (rank + 1) * rows_per_rank
    shard = weight[start:min(end, cfg.vocab_size)]
    num_padding_rows = rows_per_rank - shard.shape[0]
    if num_padding_rows:
        shard = torch.cat([shard, shard.new_zeros(num_padding_rows, cfg.hidden_size)])
    return shard


def unshard_vocab(shards: list[torch.Tensor], cfg: ModelConfig) -> torch.Tensor:
    """Inverse of :func:`shard_vocab`: the [vocab_size, H] weight without padding rows."""
    if not shards:
        raise ValueError("unshard_vocab needs at least one shard")
    rows_per_rank = cfg.padded_vocab_size(len(shards)) // len(shards)
    for rank, shard in enumerate(shards):
        if tuple(shard.shape) != (rows_per_rank, cfg.hidden_size):
            raise ValueError(f"rank {rank}'s vocabulary shard has shape {tuple(shard.shape)}, "
                             f"expected {(rows_per_rank, cfg.hidden_size)}")
    return torch.cat(shards)[:cfg.vocab_size]
