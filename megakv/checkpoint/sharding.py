"""Tensor-parallel sharding of LLaMA weights into megakv's per-rank layout, and its inverse.

The layout follows Megatron-core's column/row parallel linears: ``linear_qkv``
and ``linear_fc1`` are split by output rows, ``linear_proj`` and ``linear_fc2``
by input columns, embeddings and the output layer by (padded) vocabulary rows.
Each rank's ``linear_qkv`` holds its q heads, then its k heads, then its v heads;
``linear_fc1`` holds its gate rows, then its up rows. When tp exceeds the number
of KV heads, each KV head is replicated on ``tp // num_kv_heads`` consecutive ranks.

Functions here are pure (no I/O) and take layer weights in canonical Hugging
Face shapes under the keys of :data:`LAYER_KEYS`.
"""
from __future__ import annotations

import torch

from megakv.config import ModelConfig

EMBEDDING = "embedding.word_embeddings.weight"
FINAL_NORM = "decoder.final_layernorm.weight"
OUTPUT_LAYER = "output_layer.weight"

# An unsharded layer, keyed as in Hugging Face LLaMA (q_proj is [Hq*D, H], down_proj [H, F], ...).
LAYER_KEYS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
              "input_layernorm", "post_attention_layernorm")

# One rank's layer, keyed relative to layer_prefix(i), in the order tensors are stored.
INPUT_NORM = "input_layernorm.weight"
LINEAR_QKV = "self_attention.linear_qkv.weight"
LINEAR_PROJ = "self_attention.linear_proj.weight"
PRE_MLP_NORM = "pre_mlp_layernorm.weight"
LINEAR_FC1 = "mlp.linear_fc1.weight"
LINEAR_FC2 = "mlp.linear_fc2.weight"
SHARD_LAYER_KEYS = (INPUT_NORM, LINEAR_QKV, LINEAR_PROJ, PRE_MLP_NORM, LINEAR_FC1, LINEAR_FC2)


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
    return {
        INPUT_NORM: (hidden,),
        LINEAR_QKV: ((num_q_heads + 2 * num_kv_heads) * head_dim, hidden),
        LINEAR_PROJ: (hidden, num_q_heads * head_dim),
        PRE_MLP_NORM: (hidden,),
        LINEAR_FC1: (2 * ffn, hidden),
        LINEAR_FC2: (hidden, ffn),
    }


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
    return {
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
    return {
        INPUT_NORM: full["input_layernorm"],
        LINEAR_QKV: torch.cat([full["q_proj"][q_rows], full["k_proj"][kv_rows], full["v_proj"][kv_rows]]),
        LINEAR_PROJ: full["o_proj"][:, q_rows],
        PRE_MLP_NORM: full["post_attention_layernorm"],
        LINEAR_FC1: torch.cat([full["gate_proj"][ffn_rows], full["up_proj"][ffn_rows]]),
        LINEAR_FC2: full["down_proj"][:, ffn_rows],
    }


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
    qkv = [shard[LINEAR_QKV].split([q_rows, kv_rows, kv_rows]) for shard in shards]
    fc1 = [shard[LINEAR_FC1].split([ffn, ffn]) for shard in shards]
    return {
        "q_proj": torch.cat([q for q, _, _ in qkv]),
        "k_proj": torch.cat([qkv[rank][1] for rank in kv_ranks]),
        "v_proj": torch.cat([qkv[rank][2] for rank in kv_ranks]),
        "o_proj": torch.cat([shard[LINEAR_PROJ] for shard in shards], dim=1),
        "gate_proj": torch.cat([gate for gate, _ in fc1]),
        "up_proj": torch.cat([up for _, up in fc1]),
        "down_proj": torch.cat([shard[LINEAR_FC2] for shard in shards], dim=1),
        "input_layernorm": shards[0][INPUT_NORM],
        "post_attention_layernorm": shards[0][PRE_MLP_NORM],
    }


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
