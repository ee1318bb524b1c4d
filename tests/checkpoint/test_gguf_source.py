"""GGUF files written by the gguf package from random Hugging Face LLaMAs convert to megakv models that equal HF."""
from __future__ import annotations

import json
import struct
import subprocess
import sys
from pathlib import Path

import gguf
import pytest
import torch
from gguf import GGMLQuantizationType as QType
from transformers import LlamaConfig, LlamaForCausalLM

from gguf_files import write_llama_gguf
from megakv.checkpoint.convert import convert_checkpoint
from megakv.checkpoint.format import read_checkpoint_info
from megakv.checkpoint.gguf_source import GGUFReader
from megakv.config import CacheConfig, EngineConfig, SchedulerConfig
from megakv.engine.llm_engine import LLMEngine

# Every test here starts subprocesses, servers or models: the full run's, not the quick one's.
pytestmark = pytest.mark.slow

CONVERT_TOOL = Path(__file__).resolve().parents[2] / "tools" / "convert_checkpoint.py"
PROMPT_WORKER = Path(__file__).resolve().parents[1] / "models" / "prompt_logits_worker.py"
# GQA (4 query heads over 2 KV heads), untied, a vocabulary no TP degree divides; rows of 64 and 96 for Q8_0.
CONFIG = dict(vocab_size=301, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=1024, rms_norm_eps=1e-5, rope_theta=10000.0,
              tie_word_embeddings=False)
# Shorter than a block, and longer than several blocks and prefill chunks.
PROMPT_LENGTHS = (5, 200)


def mixed_types(name: str) -> QType:
    """Attention in F16, MLP, embedding and output layer in Q8_0 (norms stay F32)."""
    return QType.F16 if "self_attn" in name else QType.Q8_0


def hf_model(state: dict[str, torch.Tensor], **overrides) -> LlamaForCausalLM:
    config = dict(CONFIG, **overrides)
    rope_theta = config.pop("rope_theta")
    model = LlamaForCausalLM(LlamaConfig(rope_parameters={"rope_type": "default", "rope_theta": rope_theta},
                                         bos_token_id=None, eos_token_id=None, pad_token_id=None, **config))
    model.load_state_dict(state)
    return model.eval()


def random_state(seed: int = 0) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    config = dict(CONFIG)
    config.pop("rope_theta")
    model = LlamaForCausalLM(LlamaConfig(initializer_range=0.15, **config))
    # Norm weights away from 1 so that a norm landing in the wrong place shows.
    return {name: tensor + 0.1 * torch.randn_like(tensor) if name.endswith("norm.weight") else tensor
            for name, tensor in model.state_dict().items()}


def prompts() -> list[list[int]]:
    gen = torch.Generator().manual_seed(3)
    return [torch.randint(0, CONFIG["vocab_size"], (n,), generator=gen).tolist() for n in PROMPT_LENGTHS]


def hf_logits(model: LlamaForCausalLM, prompt: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([prompt])).logits[0]


@pytest.fixture(scope="module")
def gguf_models(tmp_path_factory) -> dict[str, tuple[Path, dict[str, torch.Tensor]]]:
    """kind -> (GGUF file, the weights it stores in HF layout): "f32", and "mixed" (F32, F16 and Q8_0)."""
    root = tmp_path_factory.mktemp("gguf")
    state = random_state()
    files = {}
    for kind, type_of in (("f32", lambda name: QType.F32), ("mixed", mixed_types)):
        path = root / f"{kind}.gguf"
        files[kind] = (path, write_llama_gguf(path, state, CONFIG, type_of))
    return files


def engine_for(checkpoint: Path) -> LLMEngine:
    config = EngineConfig(cache=CacheConfig(block_size=16, num_blocks=32),
                          scheduler=SchedulerConfig(max_num_batched_tokens=64))
    return LLMEngine(read_checkpoint_info(checkpoint), config)


@pytest.mark.parametrize("kind", ["f32", "mixed"])
def test_gguf_convert_logits_equal_hf_on_stored_weights(gguf_models, kind, tmp_path):
    path, stored = gguf_models[kind]
    info = convert_checkpoint("gguf", path, tmp_path / "ckpt", 1)
    assert info.model.num_kv_heads == 2 and not info.model.tie_word_embeddings
    engine = engine_for(tmp_path / "ckpt")
    reference = hf_model(stored)
    for prompt in prompts():
        torch.testing.assert_close(engine.prompt_logits(prompt), hf_logits(reference, prompt), atol=1e-4, rtol=0)


def test_gguf_f32_stores_the_hf_weights_exactly(gguf_models):
    path, stored = gguf_models["f32"]
    assert all(torch.equal(stored[name], tensor) for name, tensor in random_state().items())
    reader = GGUFReader(path)
    layer = reader.layer(1)
    assert torch.equal(layer["q_proj"], stored["model.layers.1.self_attn.q_proj.weight"])
    assert torch.equal(layer["k_proj"], stored["model.layers.1.self_attn.k_proj.weight"])
    assert torch.equal(reader.lm_head(), stored["lm_head.weight"])
    reader.close()


@pytest.mark.mpi
def test_gguf_convert_tp2_logits_equal_hf(gguf_models, run_mpi, tmp_path):
    path, stored = gguf_models["mixed"]
    convert_checkpoint("gguf", path, tmp_path / "ckpt", 2)
    (tmp_path / "prompts.json").write_text(json.dumps(prompts()))
    run_mpi(2, [sys.executable, str(PROMPT_WORKER), str(tmp_path / "ckpt"), str(tmp_path / "prompts.json"),
                str(tmp_path / "logits.pt")])
    reference = hf_model(stored)
    for prompt, got in zip(prompts(), torch.load(tmp_path / "logits.pt")):
        torch.testing.assert_close(got, hf_logits(reference, prompt), atol=1e-4, rtol=0)


# Block-quantized types need rows of 256 for the K-quants: a one-layer model with hidden and ffn 256.
WIDE = dict(CONFIG, vocab_size=64, hidden_size=256, intermediate_size=256, num_hidden_layers=1)


@pytest.mark.parametrize("qtype", [QType.F32, QType.F16, QType.BF16, QType.Q8_0, QType.Q4_0, QType.Q4_1,
                                   QType.Q5_0, QType.Q5_1, QType.Q4_K, QType.Q5_K, QType.Q6_K])
def test_gguf_reader_dequantizes_each_type_in_hf_layout(qtype, tmp_path):
    torch.manual_seed(1)
    shapes = {"q_proj": (256, 256), "k_proj": (128, 256), "v_proj": (128, 256), "o_proj": (256, 256),
              "gate_proj": (256, 256), "up_proj": (256, 256), "down_proj": (256, 256)}
    state = {"model.embed_tokens.weight": torch.randn(64, 256), "lm_head.weight": torch.randn(64, 256),
             "model.norm.weight": torch.randn(256), "model.layers.0.input_layernorm.weight": torch.randn(256),
             "model.layers.0.post_attention_layernorm.weight": torch.randn(256)}
    state.update({f"model.layers.0.{'self_attn' if key[0] in 'qkvo' else 'mlp'}.{key}.weight": torch.randn(shape)
                  for key, shape in shapes.items()})
    stored = write_llama_gguf(tmp_path / "m.gguf", state, WIDE, lambda name: qtype)
    reader = GGUFReader(tmp_path / "m.gguf")
    layer = reader.layer(0)
    for key in shapes:
        name = f"model.layers.0.{'self_attn' if key[0] in 'qkvo' else 'mlp'}.{key}.weight"
        assert torch.equal(layer[key], stored[name]), key
    assert torch.equal(reader.embedding(), stored["model.embed_tokens.weight"])
    assert reader.config.dtype == {QType.F16: "float16", QType.BF16: "bfloat16"}.get(qtype, "float32")
    reader.close()


def test_gguf_reader_reads_tying_rope_scaling_and_special_tokens(tmp_path):
    state = {name: tensor for name, tensor in random_state().items() if name != "lm_head.weight"}
    write_llama_gguf(tmp_path / "m.gguf", state, CONFIG, lambda name: QType.F32,
                     metadata={"rope_scaling_type": gguf.RopeScalingType.LINEAR,
                               "rope_scaling_factor": 4.0, "bos_token_id": 1, "eos_token_id": 2,
                               "eot_token_id": 7})
    config = GGUFReader(tmp_path / "m.gguf").config
    assert config.tie_word_embeddings
    assert config.rope_scaling == {"rope_type": "linear", "factor": 4.0}
    assert (config.bos_token_id, config.eos_token_ids) == (1, (2, 7))
    assert (config.hidden_size, config.intermediate_size, config.num_layers) == (64, 96, 2)
    assert (config.num_attention_heads, config.num_kv_heads, config.head_dim) == (4, 2, 16)
    assert (config.vocab_size, config.max_position_embeddings, config.rope_theta) == (301, 1024, 10000.0)


def run_cli(*args: str | Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(CONVERT_TOOL), *map(str, args)], capture_output=True, text=True,
                          timeout=120)


def assert_one_error(proc: subprocess.CompletedProcess, *fragments: str) -> None:
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("convert_checkpoint: error: "), proc.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def unknown_type_file(source: Path, target: Path) -> Path:
    """A copy of ``source`` whose first tensor's type id is 99, which no ggml type has."""
    data = bytearray(source.read_bytes())
    name = b"token_embd.weight"
    # Tensor info: name length (u64), name, n_dims (u32), dims (u64 each), type (u32), offset (u64).
    start = data.index(struct.pack("<Q", len(name)) + name) + 8 + len(name)
    (n_dims,) = struct.unpack_from("<I", data, start)
    struct.pack_into("<I", data, start + 4 + 8 * n_dims, 99)
    target.write_bytes(bytes(data))
    return target


def test_cli_gguf_bad_inputs_one_error_nothing_written(gguf_models, tmp_path):
    path, _ = gguf_models["f32"]
    other = tmp_path / "gpt2.gguf"
    write_llama_gguf(other, random_state(), CONFIG, lambda name: QType.F32, architecture="gpt2")
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(path.read_bytes()[:path.stat().st_size * 2 // 3])
    integer = tmp_path / "integer.gguf"
    write_llama_gguf(integer, random_state(), CONFIG,
                     lambda name: QType.I32 if name == "model.layers.1.mlp.up_proj.weight" else QType.F32)
    cases = [
        (other, ("holds a 'gpt2' model", "LLaMA-architecture")),
        (integer, ("tensor 'blk.1.ffn_up.weight' has type I32, which the gguf package cannot dequantize",)),
        (truncated, ("truncated or corrupt",)),
        (unknown_type_file(path, tmp_path / "unknown.gguf"), ("unknown type 99",)),
        (tmp_path / "missing.gguf", ("does not exist",)),
        (tmp_path, ("is a folder",)),
    ]
    for bad_input, fragments in cases:
        assert_one_error(run_cli("--source", "gguf", "--input", bad_input, "--output", tmp_path / "out", "--tp", "1"),
                         str(bad_input), *fragments)
        assert sorted(tmp_path.glob("out*")) == []
