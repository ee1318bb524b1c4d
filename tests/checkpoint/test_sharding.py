"""Tests of megakv.checkpoint.sharding: layouts against explicit head indexing, and shard/unshard round trips."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from megakv.checkpoint.sharding import (EMBEDDING, LINEAR_FC1, LINEAR_FC1_BIAS, LINEAR_FC2_BIAS, LINEAR_PROJ_BIAS,
                                        LINEAR_QKV, LINEAR_QKV_BIAS, OUTPUT_LAYER, hf_layer_shapes, shard_layer,
                                        shard_shapes, shard_vocab, unshard_layer, unshard_vocab)
from megakv.config import ModelConfig

# name -> (num_attention_heads, num_kv_heads)
ATTENTION_KINDS = {"gqa": (8, 2), "mha": (4, 4), "mqa": (4, 1)}


def make_config(num_heads: int, num_kv_heads: int, tie: bool = False) -> ModelConfig:
    return ModelConfig(vocab_size=37, hidden_size=24, intermediate_size=40, num_layers=2,
                       num_attention_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=6,
                       max_position_embeddings=64, tie_word_embeddings=tie)


def random_layer(cfg: ModelConfig) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return {key: torch.randn(shape, generator=generator) for key, shape in hf_layer_shapes(cfg).items()}


def valid_cases() -> list[tuple[str, int]]:
    cases = []
    for kind, (num_heads, num_kv_heads) in ATTENTION_KINDS.items():
        for tp in (1, 2, 4):
            try:
                make_config(num_heads, num_kv_heads).check_tensor_parallel_size(tp)
            except ValueError:
                continue
            cases.append((kind, tp))
    return cases


@pytest.mark.parametrize(("kind", "tp"), valid_cases())
def test_shard_layer_unshard_is_identity(kind: str, tp: int) -> None:
    cfg = make_config(*ATTENTION_KINDS[kind])
    full = random_layer(cfg)
    shards = [shard_layer(full, cfg, tp, rank) for rank in range(tp)]
    restored = unshard_layer(shards, cfg)
    assert restored.keys() == full.keys()
    for key in full:
        assert torch.equal(restored[key], full[key]), key


@pytest.mark.parametrize(("kind", "tp"), valid_cases())
def test_shard_layer_shapes_match_shard_shapes(kind: str, tp: int) -> None:
    cfg = make_config(*ATTENTION_KINDS[kind])
    expected = shard_shapes(cfg, tp)
    for rank in range(tp):
        for key, tensor in shard_layer(random_layer(cfg), cfg, tp, rank).items():
            assert tuple(tensor.shape) == expected[f"decoder.layers.0.{key}"], key


def test_shard_layer_qkv_holds_rank_heads_in_q_k_v_order() -> None:
    cfg = make_config(8, 2)
    full = random_layer(cfg)
    d = cfg.head_dim
    rank1 = shard_layer(full, cfg, 2, 1)
    # tp=2: rank 1 has q heads 4..7 and kv head 1.
    expected = torch.cat([full["q_proj"][4 * d:8 * d], full["k_proj"][d:2 * d], full["v_proj"][d:2 * d]])
    assert torch.equal(rank1[LINEAR_QKV], expected)
    assert torch.equal(rank1["self_attention.linear_proj.weight"], full["o_proj"][:, 4 * d:8 * d])
    assert torch.equal(rank1[LINEAR_FC1], torch.cat([full["gate_proj"][20:40], full["up_proj"][20:40]]))
    assert torch.equal(rank1["mlp.linear_fc2.weight"], full["down_proj"][:, 20:40])


def test_shard_layer_replicates_kv_heads_when_tp_exceeds_them() -> None:
    cfg = make_config(8, 2)
    full = random_layer(cfg)
    d, tp = cfg.head_dim, 4
    for rank in range(tp):
        qkv = shard_layer(full, cfg, tp, rank)[LINEAR_QKV]
        kv_head = rank // 2
        assert torch.equal(qkv[2 * d:3 * d], full["k_proj"][kv_head * d:(kv_head + 1) * d])
        assert torch.equal(qkv[3 * d:], full["v_proj"][kv_head * d:(kv_head + 1) * d])


def test_shard_vocab_pads_with_zero_rows_and_unshards() -> None:
    cfg = make_config(4, 2)
    weight = torch.randn(cfg.vocab_size, cfg.hidden_size)
    shards = [shard_vocab(weight, cfg, 4, rank) for rank in range(4)]
    assert [tuple(s.shape) for s in shards] == [(10, cfg.hidden_size)] * 4
    assert torch.equal(shards[3][7:], torch.zeros(3, cfg.hidden_size))
    assert torch.equal(unshard_vocab(shards, cfg), weight)


def test_shard_shapes_order_and_tied_output() -> None:
    untied = list(shard_shapes(make_config(4, 2), 2))
    assert untied[0] == EMBEDDING and untied[-1] == OUTPUT_LAYER
    assert untied[-2] == "decoder.final_layernorm.weight"
    assert untied[1:7] == [f"decoder.layers.0.{key}" for key in (
        "input_layernorm.weight", "self_attention.linear_qkv.weight", "self_attention.linear_proj.weight",
        "pre_mlp_layernorm.weight", "mlp.linear_fc1.weight", "mlp.linear_fc2.weight")]
    assert OUTPUT_LAYER not in shard_shapes(make_config(4, 2, tie=True), 2)


def test_shard_layer_rejects_bad_inputs() -> None:
    cfg = make_config(4, 2)
    full = random_layer(cfg)
    with pytest.raises(ValueError, match="does not divide num_attention_heads"):
        shard_layer(full, cfg, 3, 0)
    with pytest.raises(ValueError, match="rank 2 is outside"):
        shard_layer(full, cfg, 2, 2)
    with pytest.raises(ValueError, match="'k_proj' has shape"):
        shard_layer({**full, "k_proj": full["k_proj"][:-1]}, cfg, 2, 0)


def test_shard_layer_biases_split_with_their_rows_and_replicate_row_parallel() -> None:
    """Column-parallel biases (QKV, fc1) follow their rows; row-parallel ones (proj, fc2) are whole on every rank."""
    cfg = dataclasses.replace(make_config(8, 2), qkv_bias=True, proj_bias=True, mlp_bias=True)
    full = random_layer(cfg)
    tp, head_dim, ffn = 2, cfg.head_dim, cfg.intermediate_size // 2
    for rank in range(tp):
        shard = shard_layer(full, cfg, tp, rank)
        q_rows = slice(rank * 4 * head_dim, (rank + 1) * 4 * head_dim)
        kv_rows = slice(rank * head_dim, (rank + 1) * head_dim)
        assert torch.equal(shard[LINEAR_QKV_BIAS], torch.cat([full["q_bias"][q_rows], full["k_bias"][kv_rows],
                                                              full["v_bias"][kv_rows]]))
        assert torch.equal(shard[LINEAR_FC1_BIAS], torch.cat([full["gate_bias"][rank * ffn:(rank + 1) * ffn],
                                                              full["up_bias"][rank * ffn:(rank + 1) * ffn]]))
        assert torch.equal(shard[LINEAR_PROJ_BIAS], full["o_bias"])
        assert torch.equal(shard[LINEAR_FC2_BIAS], full["down_bias"])
    restored = unshard_layer([shard_layer(full, cfg, tp, rank) for rank in range(tp)], cfg)
    assert restored.keys() == full.keys() and all(torch.equal(restored[key], full[key]) for key in full)
