"""megakv's LLaMA over the paged KV cache gives the logits of Hugging Face LlamaForCausalLM."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from megakv.checkpoint.format import read_checkpoint_info
from megakv.config import CacheConfig, EngineConfig, SchedulerConfig
from megakv.engine.llm_engine import LLMEngine
from megakv.kernels.cpu_build import runnable_isas

WORKER = Path(__file__).with_name("prompt_logits_worker.py")
# Shorter than one block, and spanning many blocks and several prefill chunks.
PROMPT_LENGTHS = [5, 300]


def prompts_for(vocab_size: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(1)
    return [torch.randint(0, vocab_size, (n,), generator=gen).tolist() for n in PROMPT_LENGTHS]


def hf_logits(hf_dir: Path, prompt: list[int], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(hf_dir, dtype=dtype).eval()
    with torch.no_grad():
        return model(torch.tensor([prompt])).logits[0].float()


def small_engine_config() -> EngineConfig:
    return EngineConfig(cache=CacheConfig(block_size=16, num_blocks=64),
                        scheduler=SchedulerConfig(max_num_batched_tokens=64))


@pytest.mark.parametrize("kind", ["gqa", "mha"])
def test_llama_logits_equal_hf_tp1(kind, hf_llama, megakv_checkpoint):
    info = read_checkpoint_info(megakv_checkpoint(kind, 1))
    engine = LLMEngine(info, small_engine_config())
    for prompt in prompts_for(info.model.vocab_size):
        torch.testing.assert_close(engine.prompt_logits(prompt), hf_logits(hf_llama(kind), prompt),
                                   atol=1e-4, rtol=0)
    assert engine.rmanager.num_free_blocks == 64


@pytest.mark.mpi
@pytest.mark.parametrize("kind", ["gqa", "mha"])
def test_llama_logits_equal_hf_tp2(kind, hf_llama, megakv_checkpoint, run_mpi, tmp_path):
    checkpoint = megakv_checkpoint(kind, 2)
    prompts = prompts_for(read_checkpoint_info(checkpoint).model.vocab_size)
    prompts_file = tmp_path / "prompts.json"
    prompts_file.write_text(json.dumps(prompts))
    out_file = tmp_path / "logits.pt"
    run_mpi(2, [sys.executable, str(WORKER), str(checkpoint), str(prompts_file), str(out_file)])
    logits = torch.load(out_file)
    for prompt, got in zip(prompts, logits):
        torch.testing.assert_close(got, hf_logits(hf_llama(kind), prompt), atol=1e-4, rtol=0)


@pytest.mark.parametrize("isa", runnable_isas())
def test_llama_bf16_cpu_decode_op_logits_close_to_hf(hf_llama, megakv_checkpoint, monkeypatch, isa):
    """A bf16 pool read in place by each build of the CPU decode op stays within bf16 noise of HF's fp32 logits."""
    from megakv.kernels import cpu_attention

    monkeypatch.setenv("MEGAKV_CPU_ISA", isa)
    if cpu_attention.load_extension() is None:
        pytest.skip("the C++ CPU op did not build here")
    info = read_checkpoint_info(megakv_checkpoint("gqa64", 1))
    # Chunks of at most 8 tokens: every attention call of the prompt takes the decode op.
    config = EngineConfig(cache=CacheConfig(block_size=16, num_blocks=64),
                          scheduler=SchedulerConfig(max_num_batched_tokens=cpu_attention.MAX_DECODE_QUERIES))
    prompt = prompts_for(info.model.vocab_size)[1]
    calls = []
    decode_op = cpu_attention._decode_extension
    monkeypatch.setattr(cpu_attention, "_decode_extension", lambda *args: calls.append(1) or decode_op(*args))
    got = LLMEngine(info, config, dtype=torch.bfloat16).prompt_logits(prompt).float()
    assert len(calls) == info.model.num_layers * -(-len(prompt) // cpu_attention.MAX_DECODE_QUERIES)
    expected = hf_logits(hf_llama("gqa64"), prompt)
    # bf16 weights and activations drift from fp32 whatever the attention does: the bound is HF's own bf16 drift.
    hf_drift = (hf_logits(hf_llama("gqa64"), prompt, torch.bfloat16) - expected).abs()
    drift = (got - expected).abs()
    assert drift.max() < 1.5 * hf_drift.max() and drift.mean() < 1.5 * hf_drift.mean()
