"""Model variants served exactly: biases, activations, Qwen2, YaRN, Mistral's sliding window, generation_config EOS.

Each variant is a random-weight Hugging Face model saved offline, converted by the real converter, and
decoded greedily by megakv and by transformers' ``generate``, which must give the same tokens.
"""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from megakv.checkpoint.convert import convert_checkpoint
from megakv.checkpoint.format import load_shard, read_checkpoint_info
from megakv.config import CacheConfig, EngineConfig, SchedulerConfig
from megakv.engine.llm_engine import LLMEngine
from megakv.engine.sampling import SamplingParams

# Every test here starts subprocesses, servers or models: the full run's, not the quick one's.
pytestmark = pytest.mark.slow

MEGAKV = str(Path(sys.executable).with_name("megakv"))
MAX_NEW_TOKENS = 24
# One prompt shorter than the window below, the others spanning it many times over and several prefill chunks.
PROMPT_LENGTHS = [5, 41, 150]
WINDOW = 20

# name -> (model_type, shape, config fields beyond the shape). The shapes are conftest's HF_MODEL_KINDS: "gqa"
# (head_dim 8, the torch attention path) or "gqa64" (head_dim 64, the C++ CPU decode op).
VARIANTS = {
    "attention_bias": ("llama", "gqa", dict(attention_bias=True)),
    "mlp_bias": ("llama", "gqa", dict(mlp_bias=True)),
    "gelu": ("llama", "gqa", dict(hidden_act="gelu")),
    "gelu_pytorch_tanh": ("llama", "gqa", dict(hidden_act="gelu_pytorch_tanh")),
    "relu": ("llama", "gqa", dict(hidden_act="relu")),
    "qwen2": ("qwen2", "gqa", dict(tie_word_embeddings=True, rope_parameters={"rope_type": "default",
                                                                              "rope_theta": 1e6})),
    "yarn": ("llama", "gqa", dict(rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                                                   "original_max_position_embeddings": 64})),
    "yarn_mscale": ("llama", "gqa64", dict(rope_parameters={
        "rope_type": "yarn", "rope_theta": 10000.0, "factor": 8.0, "original_max_position_embeddings": 128,
        "beta_fast": 16, "beta_slow": 2, "mscale": 0.9, "mscale_all_dim": 0.5, "truncate": False})),
    "mistral_window": ("mistral", "gqa", dict(sliding_window=WINDOW)),
    "mistral_window64": ("mistral", "gqa64", dict(sliding_window=WINDOW)),
}


@pytest.fixture(scope="session")
def variant_model(make_hf, tmp_path_factory):
    """name -> folder of that variant saved by transformers, built once per session."""
    cache: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in cache:
            model_type, kind, fields = VARIANTS[name]
            cache[name] = make_hf(tmp_path_factory.mktemp(f"hf-{name}"), model_type, kind, **fields)
        return cache[name]

    return get


@pytest.fixture(scope="session")
def variant_checkpoint(variant_model, convert_hf, tmp_path_factory):
    """(name, tp) -> that variant converted to megakv."""
    cache: dict[tuple[str, int], Path] = {}

    def get(name: str, tp: int) -> Path:
        if (name, tp) not in cache:
            cache[name, tp] = convert_hf(variant_model(name), tmp_path_factory.mktemp(f"ckpt-{name}") / f"tp{tp}",
                                         tp)
        return cache[name, tp]

    return get


def prompts_for(vocab_size: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(11)
    return [torch.randint(0, vocab_size, (n,), generator=gen).tolist() for n in PROMPT_LENGTHS]


def generate(checkpoint: Path, prompts: list[list[int]], max_new_tokens: int = MAX_NEW_TOKENS) -> list:
    config = EngineConfig(cache=CacheConfig(block_size=16, num_blocks=64),
                          scheduler=SchedulerConfig(max_num_batched_tokens=64, max_num_seqs=8))
    engine = LLMEngine(read_checkpoint_info(checkpoint), config)
    return engine.generate(prompts, [SamplingParams(max_new_tokens=max_new_tokens)] * len(prompts))


@pytest.mark.parametrize("name", VARIANTS)
def test_variant_greedy_equals_hf_tp1(name, variant_model, variant_checkpoint, hf_greedy):
    checkpoint = variant_checkpoint(name, 1)
    prompts = prompts_for(read_checkpoint_info(checkpoint).model.vocab_size)
    outputs = generate(checkpoint, prompts)
    assert [o.token_ids for o in outputs] == hf_greedy(variant_model(name), prompts, MAX_NEW_TOKENS)


@pytest.mark.mpi
@pytest.mark.parametrize("name", ["attention_bias", "mlp_bias", "gelu", "qwen2", "yarn", "mistral_window64"])
def test_variant_cli_greedy_equals_hf_tp2(name, variant_model, variant_checkpoint, hf_greedy, generate_tp2_json):
    checkpoint = variant_checkpoint(name, 2)
    prompts = prompts_for(read_checkpoint_info(checkpoint).model.vocab_size)
    records = generate_tp2_json(checkpoint, prompts, "--max-new-tokens", str(MAX_NEW_TOKENS), "--num-blocks", "64")
    assert [r["token_ids"] for r in records] == hf_greedy(variant_model(name), prompts, MAX_NEW_TOKENS)


@pytest.mark.mpi
@pytest.mark.parametrize("name", ["mistral_window", "mistral_window64"])
def test_variant_window_spread_over_two_instances_equals_hf(name, variant_model, variant_checkpoint, hf_greedy,
                                                            run_mpi, tmp_path):
    """A prompt of 18 blocks on pools of 10: its last blocks, the window among them, live on the creditor,
    whose micro-attentions must honour the window too."""
    prompt = torch.randint(0, 301, (280,), generator=torch.Generator().manual_seed(3)).tolist()
    prompts_file = tmp_path / "prompts.jsonl"
    prompts_file.write_text(json.dumps({"prompt_ids": prompt}) + "\n")
    proc = run_mpi(2, [MEGAKV, "generate", "--model", str(variant_checkpoint(name, 1)), "--instances", "2",
                       "--block-size", "16", "--kv-blocks-per-instance", "10", "--max-num-batched-tokens", "64",
                       "--max-new-tokens", str(MAX_NEW_TOKENS), "--prompts-file", str(prompts_file), "--json",
                       "--dtype", "float32"])
    record = json.loads(proc.stdout.splitlines()[0])
    assert record["block_instances"] == [0, 1]
    assert record["token_ids"] == hf_greedy(variant_model(name), [prompt], MAX_NEW_TOKENS)[0]


def test_generation_config_eos_ids_stop_as_hf(variant_model, convert_hf, hf_greedy, tmp_path):
    """generation_config.json's several EOS ids (LLaMA 3 Instruct's <|eot_id|> lives there) stop generation."""
    source = tmp_path / "hf"
    shutil.copytree(variant_model("attention_bias"), source)
    prompts = prompts_for(301)
    free_runs = hf_greedy(source, prompts, MAX_NEW_TOKENS)
    eos_ids = [free_runs[1][6], free_runs[2][9]]
    generation = json.loads((source / "generation_config.json").read_text())
    (source / "generation_config.json").write_text(json.dumps({**generation, "eos_token_id": eos_ids}))
    checkpoint = convert_hf(source, tmp_path / "ckpt", 1)
    assert read_checkpoint_info(checkpoint).model.eos_token_ids == tuple(eos_ids)
    expected = hf_greedy(source, prompts, MAX_NEW_TOKENS)
    assert expected != free_runs
    outputs = generate(checkpoint, prompts)
    assert [o.token_ids for o in outputs] == expected
    assert [o.finish_reason for o in outputs] == ["stop" if e[-1] in eos_ids else "length" for e in expected]


@pytest.mark.parametrize("name", ["attention_bias", "mlp_bias", "gelu", "qwen2", "yarn", "mistral_window"])
def test_variant_export_hf_round_trip_bit_exact(name, variant_model, variant_checkpoint, tmp_path):
    """megakv (TP 2) -> Hugging Face gives the original tensors, a config transformers reads to the same
    logits, and converts back to the same shards."""
    from transformers import AutoModelForCausalLM

    exported = convert_checkpoint("megakv", variant_checkpoint(name, 2), tmp_path / "hf", None, to="hf")
    original = load_file(variant_model(name) / "model.safetensors")
    got = load_file(exported / "model.safetensors")
    assert got.keys() == original.keys()
    assert all(torch.equal(got[key], original[key]) for key in original)
    prompt = torch.tensor([prompts_for(301)[2]])
    with torch.no_grad():
        expected = AutoModelForCausalLM.from_pretrained(variant_model(name), dtype=torch.float32)(prompt).logits
        logits = AutoModelForCausalLM.from_pretrained(exported, dtype=torch.float32)(prompt).logits
    assert torch.equal(logits, expected)
    back = convert_checkpoint("hf", exported, tmp_path / "back", 2)
    assert back.model == read_checkpoint_info(variant_checkpoint(name, 2)).model
    for rank in range(2):
        expected_shard = load_shard(read_checkpoint_info(variant_checkpoint(name, 2)), rank)
        shard = load_shard(back, rank)
        assert shard.keys() == expected_shard.keys()
        assert all(torch.equal(shard[key], expected_shard[key]) for key in shard)
