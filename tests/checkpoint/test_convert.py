"""Tests of the Hugging Face -> megakv converter against the weights of real transformers models."""
from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig, LlamaForCausalLM

from megakv.chat import ChatTemplate
from megakv.checkpoint.convert import convert_checkpoint
from megakv.checkpoint.format import CONFIG_FILE, CheckpointError, load_shard, read_checkpoint_info
from megakv.checkpoint.hf_config import model_config_from_hf
from megakv.config import ModelConfig

# Every test here starts subprocesses, servers or models: the full run's, not the quick one's.
pytestmark = pytest.mark.slow

REPO_ROOT = Path(__file__).resolve().parents[2]
CONVERT_TOOL = REPO_ROOT / "tools" / "convert_checkpoint.py"

# Fixture models: dimensions that catch layout bugs (several q heads per KV head, ffn != hidden,
# a vocabulary that needs padding at tp=2 and tp=4).
HF_MODELS = {
    "gqa": dict(num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False),
    "mha_tied": dict(num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=True),
}


def save_hf_model(folder: Path, seed: int, max_shard_size: str | None = None, **overrides) -> None:
    config = LlamaConfig(vocab_size=67, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         max_position_embeddings=128, initializer_range=0.2, bos_token_id=1, eos_token_id=2,
                         **overrides)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    if max_shard_size is None:
        model.save_pretrained(folder)
    else:
        model.save_pretrained(folder, max_shard_size=max_shard_size)


@pytest.fixture(scope="session")
def hf_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Hugging Face folders: GQA untied, MHA tied, and the GQA model saved as several files with an index."""
    root = tmp_path_factory.mktemp("hf")
    folders = {}
    for seed, (name, overrides) in enumerate(HF_MODELS.items()):
        folders[name] = root / name
        save_hf_model(folders[name], seed, **overrides)
    folders["gqa_sharded"] = root / "gqa_sharded"
    save_hf_model(folders["gqa_sharded"], 0, max_shard_size="20KB", **HF_MODELS["gqa"])
    assert (folders["gqa_sharded"] / "model.safetensors.index.json").is_file()
    return folders


@pytest.fixture(scope="session")
def converted(hf_models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """``converted(model, tp, dtype=None)``: the megakv checkpoint folder, converted once per session."""
    root = tmp_path_factory.mktemp("megakv")
    cache: dict[tuple[str, int, str | None], Path] = {}

    def get(model: str, tp: int, dtype: str | None = None) -> Path:
        key = (model, tp, dtype)
        if key not in cache:
            cache[key] = root / f"{model}-tp{tp}-{dtype}"
            convert_checkpoint("hf", hf_models[model], cache[key], tp, dtype=dtype)
        return cache[key]

    return get


def hf_state(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a Hugging Face folder, read with the safetensors library."""
    state: dict[str, torch.Tensor] = {}
    for file in sorted(folder.glob("*.safetensors")):
        state.update(load_file(file))
    return state


def load_all_shards(folder: Path) -> list[dict[str, torch.Tensor]]:
    info = read_checkpoint_info(folder)
    return [load_shard(info, rank) for rank in range(info.tensor_parallel_size)]


def heads(weight: torch.Tensor, head_dim: int, first: int, count: int) -> torch.Tensor:
    """Rows of heads first .. first+count-1 of a [num_heads*D, H] projection, via a per-head view."""
    return weight.view(-1, head_dim, weight.shape[-1])[first:first + count].reshape(-1, weight.shape[-1])


def expected_rank_layer(state: dict[str, torch.Tensor], layer: int, cfg: ModelConfig, tp: int,
                        rank: int) -> dict[str, torch.Tensor]:
    """Rank ``rank``'s tensors of one layer, spelled out from the HF weights and the format's contract."""
    hf = {name.split(f"model.layers.{layer}.")[1]: t for name, t in state.items()
          if name.startswith(f"model.layers.{layer}.")}
    d = cfg.head_dim
    num_q = cfg.num_attention_heads // tp
    if tp <= cfg.num_kv_heads:
        num_kv, first_kv = cfg.num_kv_heads // tp, rank * (cfg.num_kv_heads // tp)
    else:
        num_kv, first_kv = 1, rank // (tp // cfg.num_kv_heads)
    ffn = cfg.intermediate_size // tp
    o_proj = hf["self_attn.o_proj.weight"]
    return {
        "input_layernorm.weight": hf["input_layernorm.weight"],
        "self_attention.linear_qkv.weight": torch.cat([
            heads(hf["self_attn.q_proj.weight"], d, rank * num_q, num_q),
            heads(hf["self_attn.k_proj.weight"], d, first_kv, num_kv),
            heads(hf["self_attn.v_proj.weight"], d, first_kv, num_kv)]),
        "self_attention.linear_proj.weight": heads(o_proj.t().contiguous(), d, rank * num_q, num_q).t(),
        "pre_mlp_layernorm.weight": hf["post_attention_layernorm.weight"],
        "mlp.linear_fc1.weight": torch.cat([hf["mlp.gate_proj.weight"][rank * ffn:(rank + 1) * ffn],
                                            hf["mlp.up_proj.weight"][rank * ffn:(rank + 1) * ffn]]),
        "mlp.linear_fc2.weight": hf["mlp.down_proj.weight"][:, rank * ffn:(rank + 1) * ffn],
    }


def run_cli(*args: str | Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(CONVERT_TOOL), *map(str, args)], capture_output=True, text=True,
                          cwd=REPO_ROOT, timeout=120)


def assert_cli_error(proc: subprocess.CompletedProcess, fragment: str) -> None:
    """Exit code 2 and exactly one ``convert_checkpoint: error:`` line naming the problem, no traceback."""
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    error_lines = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert len(error_lines) == 1, proc.stderr
    assert error_lines[0].startswith("convert_checkpoint: error: ")
    assert fragment in error_lines[0], error_lines[0]


def leftovers(parent: Path, name: str) -> list[Path]:
    """The output folder or any temporary folder the converter made for it."""
    return sorted(parent.glob(f"{name}*"))


@pytest.mark.parametrize("model", ["gqa", "mha_tied", "gqa_sharded"])
@pytest.mark.parametrize("tp", [1, 2, 4])
def test_convert_hf_shards_follow_the_format(converted, hf_models, model: str, tp: int) -> None:
    state = hf_state(hf_models[model])
    shards = load_all_shards(converted(model, tp))
    cfg = read_checkpoint_info(converted(model, tp)).model
    rows = cfg.padded_vocab_size(tp) // tp
    for rank, shard in enumerate(shards):
        for layer in range(cfg.num_layers):
            for key, expected in expected_rank_layer(state, layer, cfg, tp, rank).items():
                assert torch.equal(shard[f"decoder.layers.{layer}.{key}"], expected), (rank, layer, key)
        assert torch.equal(shard["decoder.final_layernorm.weight"], state["model.norm.weight"])
        vocab_names = [("embedding.word_embeddings.weight", "model.embed_tokens.weight")]
        if not cfg.tie_word_embeddings:
            vocab_names.append(("output_layer.weight", "lm_head.weight"))
        for megakv_name, hf_name in vocab_names:
            real_rows = state[hf_name][rank * rows:(rank + 1) * rows]
            assert torch.equal(shard[megakv_name][:len(real_rows)], real_rows)
            assert not shard[megakv_name][len(real_rows):].any()
    assert ("output_layer.weight" in shards[0]) == (not cfg.tie_word_embeddings)


@pytest.mark.parametrize("model", ["gqa", "mha_tied"])
def test_convert_hf_tp2_identical_to_tp1(converted, model: str) -> None:
    (tp1,) = load_all_shards(converted(model, 1))
    tp2 = load_all_shards(converted(model, 2))
    cfg = read_checkpoint_info(converted(model, 1)).model
    d, vocab = cfg.head_dim, cfg.vocab_size
    q1, kv1 = cfg.num_attention_heads * d, cfg.num_kv_heads * d
    q2, kv2 = q1 // 2, kv1 // 2
    ffn2 = cfg.intermediate_size // 2
    for name, full in tp1.items():
        if name.endswith("layernorm.weight"):
            assert all(torch.equal(shard[name], full) for shard in tp2), name
        elif name.endswith("linear_qkv.weight"):
            parts = [shard[name].split([q2, kv2, kv2]) for shard in tp2]
            assert torch.equal(full, torch.cat([torch.cat([p[i] for p in parts]) for i in range(3)])), name
            assert full.shape[0] == q1 + 2 * kv1
        elif name.endswith("linear_fc1.weight"):
            parts = [shard[name].split([ffn2, ffn2]) for shard in tp2]
            assert torch.equal(full, torch.cat([torch.cat([p[i] for p in parts]) for i in range(2)])), name
        elif name.endswith(("linear_proj.weight", "linear_fc2.weight")):
            assert torch.equal(full, torch.cat([shard[name] for shard in tp2], dim=1)), name
        else:
            assert torch.equal(full[:vocab], torch.cat([shard[name] for shard in tp2])[:vocab]), name


def test_convert_hf_sharded_index_equals_single_file(converted) -> None:
    for single, sharded in zip(load_all_shards(converted("gqa", 2)), load_all_shards(converted("gqa_sharded", 2))):
        assert single.keys() == sharded.keys()
        assert all(torch.equal(single[name], sharded[name]) for name in single)


@pytest.mark.parametrize(("dtype", "torch_dtype"), [("bfloat16", torch.bfloat16), ("fp16", torch.float16)])
def test_convert_hf_dtype_conversion(converted, dtype: str, torch_dtype: torch.dtype) -> None:
    info = read_checkpoint_info(converted("gqa", 2, dtype))
    assert info.model.torch_dtype == torch_dtype
    reference = load_all_shards(converted("gqa", 2))
    for rank in range(2):
        shard = load_shard(info, rank)
        for name, tensor in shard.items():
            assert tensor.dtype == torch_dtype
            assert torch.equal(tensor, reference[rank][name].to(torch_dtype)), name


def test_convert_hf_config_round_trips(converted, hf_models) -> None:
    folder = converted("gqa", 2)
    raw = json.loads((folder / CONFIG_FILE).read_text())
    assert raw["format"] == "megakv" and raw["format_version"] == 1 and raw["tensor_parallel_size"] == 2
    hf_config = json.loads((hf_models["gqa"] / "config.json").read_text())
    expected = model_config_from_hf(hf_config)
    assert expected.num_kv_heads == 2 and expected.head_dim == 8 and expected.dtype == "float32"
    assert ModelConfig.from_dict(raw["model"]) == expected
    assert read_checkpoint_info(folder).model == expected
    bf16 = read_checkpoint_info(converted("gqa", 2, "bfloat16")).model
    assert bf16 == dataclasses.replace(expected, dtype="bfloat16")


def test_convert_hf_copies_tokenizer_files(converted, hf_models) -> None:
    folder = converted("gqa", 1)
    assert (folder / "generation_config.json").read_bytes() == \
        (hf_models["gqa"] / "generation_config.json").read_bytes()
    assert not (folder / "config.json").exists()


def test_convert_hf_keeps_the_chat_template(hf_models, tmp_path) -> None:
    source = tmp_path / "hf"
    shutil.copytree(hf_models["gqa"], source)
    template = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{{ eos_token }}{% endfor %}<assistant>"
    (source / "chat_template.jinja").write_text(template)
    (source / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>"}))
    convert_checkpoint("hf", source, tmp_path / "ckpt", 1)
    assert (tmp_path / "ckpt" / "chat_template.jinja").read_text() == template
    chat = ChatTemplate.from_checkpoint(tmp_path / "ckpt")
    assert chat.render([{"role": "user", "content": "hi"}]) == "<user>hi</s><assistant>"


def test_cli_converts_and_refuses_existing_output(hf_models, tmp_path: Path) -> None:
    output = tmp_path / "ckpt"
    proc = run_cli("--source", "hf", "--input", hf_models["mha_tied"], "--output", output, "--tp", "2")
    assert proc.returncode == 0, proc.stderr
    assert read_checkpoint_info(output).tensor_parallel_size == 2
    assert_cli_error(run_cli("--source", "hf", "--input", hf_models["mha_tied"], "--output", output, "--tp", "4"),
                     "pass --overwrite")
    assert read_checkpoint_info(output).tensor_parallel_size == 2
    proc = run_cli("--source", "hf", "--input", hf_models["mha_tied"], "--output", output, "--tp", "4",
                   "--overwrite")
    assert proc.returncode == 0, proc.stderr
    assert read_checkpoint_info(output).tensor_parallel_size == 4
    assert leftovers(tmp_path, "ckpt") == [output]


def test_cli_missing_input_folder(tmp_path: Path) -> None:
    proc = run_cli("--source", "hf", "--input", tmp_path / "nope", "--output", tmp_path / "out", "--tp", "1")
    assert_cli_error(proc, "does not exist")
    assert leftovers(tmp_path, "out") == []


def test_cli_input_without_config_json(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    proc = run_cli("--source", "hf", "--input", tmp_path / "empty", "--output", tmp_path / "out", "--tp", "1")
    assert_cli_error(proc, "no config.json")


def test_cli_tp_not_dividing_heads(hf_models, tmp_path: Path) -> None:
    proc = run_cli("--source", "hf", "--input", hf_models["gqa"], "--output", tmp_path / "out", "--tp", "3")
    assert_cli_error(proc, "tensor parallel size 3 does not divide num_attention_heads (4)")
    assert leftovers(tmp_path, "out") == []


def test_cli_unknown_dtype(hf_models, tmp_path: Path) -> None:
    proc = run_cli("--source", "hf", "--input", hf_models["gqa"], "--output", tmp_path / "out", "--tp", "1",
                   "--dtype", "float8")
    assert_cli_error(proc, "unknown dtype 'float8'")
    assert leftovers(tmp_path, "out") == []


def test_cli_failed_conversion_leaves_nothing(hf_models, tmp_path: Path) -> None:
    broken = tmp_path / "broken_hf"
    shutil.copytree(hf_models["gqa"], broken)
    state = load_file(broken / "model.safetensors")
    del state["model.layers.1.mlp.down_proj.weight"]
    save_file(state, broken / "model.safetensors", metadata={"format": "pt"})
    proc = run_cli("--source", "hf", "--input", broken, "--output", tmp_path / "out", "--tp", "2")
    assert_cli_error(proc, "has no tensor 'model.layers.1.mlp.down_proj.weight'")
    assert leftovers(tmp_path, "out") == []


def test_load_shard_reports_truncated_file(converted, tmp_path: Path) -> None:
    folder = tmp_path / "ckpt"
    shutil.copytree(converted("gqa", 2), folder)
    shard_path = folder / "model_tp01.safetensors"
    shard_path.write_bytes(shard_path.read_bytes()[:shard_path.stat().st_size // 2])
    info = read_checkpoint_info(folder)
    assert load_shard(info, 0)
    with pytest.raises(CheckpointError, match="checkpoint shard .*model_tp01.safetensors is corrupt"):
        load_shard(info, 1)
    shard_path.write_bytes(b"\x07")
    with pytest.raises(CheckpointError, match="is corrupt"):
        load_shard(info, 1)


def test_load_shard_names_missing_and_misshaped_tensors(converted, tmp_path: Path) -> None:
    folder = tmp_path / "ckpt"
    shutil.copytree(converted("gqa", 2), folder)
    info = read_checkpoint_info(folder)
    state = load_file(folder / "model_tp00.safetensors")
    save_file({k: v for k, v in state.items() if k != "decoder.layers.1.mlp.linear_fc1.weight"},
              folder / "model_tp00.safetensors")
    with pytest.raises(CheckpointError, match="missing tensor 'decoder.layers.1.mlp.linear_fc1.weight'"):
        load_shard(info, 0)
    save_file({**state, "extra.weight": torch.zeros(1)}, folder / "model_tp00.safetensors")
    with pytest.raises(CheckpointError, match="unexpected tensor 'extra.weight'"):
        load_shard(info, 0)
    bad_shape = {**state, "decoder.final_layernorm.weight": torch.zeros(3)}
    save_file(bad_shape, folder / "model_tp00.safetensors")
    with pytest.raises(CheckpointError, match=r"'decoder.final_layernorm.weight' has shape \(3,\), expected \(32,\)"):
        load_shard(info, 0)
    save_file({k: v.half() for k, v in state.items()}, folder / "model_tp00.safetensors")
    with pytest.raises(CheckpointError, match="is stored as F16, but the config says float32"):
        load_shard(info, 0)
    with pytest.raises(CheckpointError, match="rank 2 is outside 0..1"):
        load_shard(info, 2)


def test_read_checkpoint_info_errors(converted, tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="does not exist"):
        read_checkpoint_info(tmp_path / "nope")
    with pytest.raises(CheckpointError, match="not a megakv checkpoint .*tools/convert_checkpoint.py"):
        read_checkpoint_info(tmp_path)
    folder = tmp_path / "ckpt"
    shutil.copytree(converted("gqa", 2), folder)
    config_path = folder / CONFIG_FILE
    raw = json.loads(config_path.read_text())
    cases = [
        ("{not json", "is not valid JSON"),
        (json.dumps({**raw, "format": "other"}), "does not describe a megakv checkpoint"),
        (json.dumps({**raw, "format_version": 9}), "format_version 9"),
        (json.dumps({**raw, "model": {**raw["model"], "hidden_size": -1}}), "hidden_size must be a positive"),
        (json.dumps({**raw, "model": {**raw["model"], "colour": 1}}), "unknown keys colour"),
        (json.dumps({**raw, "tensor_parallel_size": 3}), "does not divide num_attention_heads"),
        (json.dumps({**raw, "tensor_parallel_size": 4}), "missing shard file model_tp02.safetensors"),
    ]
    for text, fragment in cases:
        config_path.write_text(text)
        with pytest.raises(CheckpointError, match=fragment):
            read_checkpoint_info(folder)
