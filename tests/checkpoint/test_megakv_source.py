"""megakv -> megakv at another TP degree, and megakv -> Hugging Face -> megakv, checked bit for bit."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from transformers import LlamaForCausalLM

from megakv.checkpoint.convert import convert_checkpoint
from megakv.checkpoint.format import load_shard, read_checkpoint_info


def shards(folder) -> list[dict[str, torch.Tensor]]:
    info = read_checkpoint_info(folder)
    return [load_shard(info, rank) for rank in range(info.tensor_parallel_size)]


def assert_same_shards(folder, expected_folder) -> None:
    assert read_checkpoint_info(folder).model == read_checkpoint_info(expected_folder).model
    for got, expected in zip(shards(folder), shards(expected_folder), strict=True):
        assert got.keys() == expected.keys()
        for name in expected:
            assert torch.equal(got[name], expected[name]), name


# gqa: 2 KV heads, so tp=4 replicates them; mha: tied embeddings and llama3 RoPE scaling.
@pytest.mark.parametrize("kind, source_tp, target_tp", [("gqa", 2, 1), ("gqa", 1, 4), ("mha", 2, 4)])
def test_megakv_reshard_equals_direct_conversion(megakv_checkpoint, tmp_path, kind, source_tp, target_tp):
    out = tmp_path / "resharded"
    convert_checkpoint("megakv", megakv_checkpoint(kind, source_tp), out, target_tp)
    assert_same_shards(out, megakv_checkpoint(kind, target_tp))


@pytest.mark.parametrize("kind", ["gqa", "mha"])
def test_megakv_export_hf_round_trip_bit_exact(hf_llama, megakv_checkpoint, tmp_path, kind):
    exported = convert_checkpoint("megakv", megakv_checkpoint(kind, 2), tmp_path / "hf", None, to="hf")
    # The exported folder holds exactly the original Hugging Face tensors.
    original = load_file(hf_llama(kind) / "model.safetensors")
    got = load_file(exported / "model.safetensors")
    assert got.keys() == original.keys()
    for name in original:
        assert torch.equal(got[name], original[name]), name
    # transformers loads it and computes the original model's logits.
    prompt = torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6, 5, 3]])
    with torch.no_grad():
        expected = LlamaForCausalLM.from_pretrained(hf_llama(kind), dtype=torch.float32).eval()(prompt).logits
        logits = LlamaForCausalLM.from_pretrained(exported, dtype=torch.float32).eval()(prompt).logits
    assert torch.equal(logits, expected)
    # And back: megakv -> HF -> megakv is bit-exact.
    convert_checkpoint("hf", exported, tmp_path / "back", 2)
    assert_same_shards(tmp_path / "back", megakv_checkpoint(kind, 2))
