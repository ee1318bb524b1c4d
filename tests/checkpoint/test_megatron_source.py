"""Megatron -> megakv: megakv's logits on the converted checkpoint equal megatron-core's own forward pass.

The fixtures are written by megatron-core at TP=2 (see conftest.py). Pipeline-parallel
and legacy Megatron-LM checkpoints are rewritten from them file by file, the way those
layouts store the same weights, so the same Megatron logits stay the oracle.
"""
from __future__ import annotations

import argparse
import re
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

from framework_oracle import check_matches_framework
from megakv.checkpoint.convert import convert_checkpoint
from megakv.checkpoint.format import CheckpointError
from megakv.checkpoint.options import SourceOptions

pytestmark = [pytest.mark.mpi, pytest.mark.slow]

RANK_PATH = "iter_0000010/mp_rank_{:02d}/model_optim_rng.pt"


def load_rank(legacy_root: Path, tp_rank: int) -> dict[str, Any]:
    with torch.serialization.safe_globals([argparse.Namespace]):
        return torch.load(legacy_root / RANK_PATH.format(tp_rank), weights_only=True)


def save_rank(root: Path, rank_dir: str, state: dict[str, Any]) -> None:
    (root / "iter_0000010" / rank_dir).mkdir(parents=True, exist_ok=True)
    torch.save(state, root / "iter_0000010" / rank_dir / "model_optim_rng.pt")
    (root / "latest_checkpointed_iteration.txt").write_text("10")


@pytest.mark.parametrize("layout", ["legacy", "torch_dist"])
@pytest.mark.parametrize("variant", ["halves_untied", "interleaved_tied"])
def test_megatron_logits_equal_megatron_tp1(megatron_fixture, tmp_path, variant, layout):
    fixture = megatron_fixture(variant)
    info = convert_checkpoint("megatron", fixture / layout, tmp_path / "out", 1)
    assert info.model.tie_word_embeddings == (variant == "interleaved_tied")
    assert (info.model.num_attention_heads, info.model.num_kv_heads) == (8, 2)
    check_matches_framework(info, fixture)


def test_megatron_iteration_flag_and_iteration_folder(megatron_fixture, tmp_path):
    fixture = megatron_fixture("halves_untied")
    info = convert_checkpoint("megatron", fixture / "legacy", tmp_path / "a", 1, options=SourceOptions(iteration=10))
    check_matches_framework(info, fixture)
    info = convert_checkpoint("megatron", fixture / "legacy" / "iter_0000010", tmp_path / "b", 1)
    check_matches_framework(info, fixture)
    with pytest.raises(CheckpointError, match="no iter_0000020 folder"):
        convert_checkpoint("megatron", fixture / "legacy", tmp_path / "c", 1, options=SourceOptions(iteration=20))


def test_megatron_pipeline_stages_merge(megatron_fixture, tmp_path):
    """TP=2 x PP=2: stage 0 holds the embedding and layers 0-1, stage 1 layers 2-3 (numbered 0-1 locally)."""
    fixture = megatron_fixture("halves_untied")
    root = tmp_path / "pp2"
    for tp_rank in range(2):
        state = load_rank(fixture / "legacy", tp_rank)
        state["args"].pipeline_model_parallel_size = 2
        stages: list[dict[str, Any]] = [{}, {}]
        for name, tensor in state["model"].items():
            match = re.match(r"decoder\.layers\.(\d+)\.(.*)", name)
            if match:
                layer = int(match[1])
                stages[layer // 2][f"decoder.layers.{layer % 2}.{match[2]}"] = tensor
            else:
                stages[0 if name.startswith("embedding") else 1][name] = tensor
        for stage, model in enumerate(stages):
            save_rank(root, f"mp_rank_{tp_rank:02d}_{stage:03d}", dict(state, model=model))
    check_matches_framework(convert_checkpoint("megatron", root, tmp_path / "out", 1), fixture)


MEGATRON_LM_NAMES = [
    (r"embedding\.word_embeddings\.weight", "language_model.embedding.word_embeddings.weight"),
    (r"decoder\.layers\.(\d+)\.input_layernorm\.weight", r"language_model.encoder.layers.\1.input_norm.weight"),
    (r"decoder\.layers\.(\d+)\.self_attention\.linear_qkv\.weight",
     r"language_model.encoder.layers.\1.self_attention.query_key_value.weight"),
    (r"decoder\.layers\.(\d+)\.self_attention\.linear_proj\.weight",
     r"language_model.encoder.layers.\1.self_attention.dense.weight"),
    (r"decoder\.layers\.(\d+)\.pre_mlp_layernorm\.weight",
     r"language_model.encoder.layers.\1.post_attention_norm.weight"),
    (r"decoder\.layers\.(\d+)\.mlp\.linear_fc1\.weight", r"language_model.encoder.layers.\1.mlp.dense_h_to_4h.weight"),
    (r"decoder\.layers\.(\d+)\.mlp\.linear_fc2\.weight", r"language_model.encoder.layers.\1.mlp.dense_4h_to_h.weight"),
    (r"decoder\.final_layernorm\.weight", "language_model.encoder.final_norm.weight"),
    (r"output_layer\.weight", "language_model.output_layer.weight"),
]


def test_megatron_lm_legacy_names(megatron_fixture, tmp_path):
    """Legacy (non-core) Megatron-LM names, nested as its state_dict_for_save_checkpoint nests them."""
    fixture = megatron_fixture("halves_untied")
    root = tmp_path / "megatron-lm"
    for tp_rank in range(2):
        state = load_rank(fixture / "legacy", tp_rank)
        encoder: dict[str, torch.Tensor] = {}
        language_model: dict[str, Any] = {"embedding": {"word_embeddings": {}}, "encoder": encoder}
        for name, tensor in state["model"].items():
            if name.endswith("_extra_state"):
                continue
            new_name = next(re.sub(p, r, name) for p, r in MEGATRON_LM_NAMES if re.fullmatch(p, name))
            if new_name.startswith("language_model.embedding"):
                language_model["embedding"]["word_embeddings"]["weight"] = tensor
            elif new_name.startswith("language_model.encoder."):
                encoder[new_name.removeprefix("language_model.encoder.")] = tensor
            else:
                language_model["output_layer"] = {"weight": tensor}
        save_rank(root, f"mp_rank_{tp_rank:02d}", dict(state, model={"language_model": language_model}))
    check_matches_framework(convert_checkpoint("megatron", root, tmp_path / "out", 1), fixture)


def test_megatron_without_args_needs_model_args(megatron_fixture, tmp_path):
    fixture = megatron_fixture("interleaved_tied")
    root = tmp_path / "no-args"
    for tp_rank in range(2):
        state = load_rank(fixture / "legacy", tp_rank)
        del state["args"]
        save_rank(root, f"mp_rank_{tp_rank:02d}", state)
    with pytest.raises(CheckpointError, match="num_attention_heads.*--model-arg num_attention_heads="):
        convert_checkpoint("megatron", root, tmp_path / "out", 1)
    # Only what the shapes cannot tell: heads, query groups, rotary layout.
    model_args = {"num_attention_heads": 8, "num_query_groups": 2, "rotary_interleaved": True,
                  "norm_epsilon": 1e-5}
    info = convert_checkpoint("megatron", root, tmp_path / "out", 1, options=SourceOptions(model_args=model_args))
    check_matches_framework(info, fixture)


def test_megatron_dtype_flag(megatron_fixture, tmp_path):
    info = convert_checkpoint("megatron", megatron_fixture("halves_untied") / "torch_dist", tmp_path / "out", 2,
                              dtype="bfloat16")
    assert info.model.dtype == "bfloat16"
    shutil.rmtree(tmp_path / "out")
