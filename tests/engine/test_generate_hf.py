"""Greedy generation equals Hugging Face ``generate`` token for token, at TP=1 and TP=2."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megakv.checkpoint.format import read_checkpoint_info
from megakv.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
from megakv.engine.llm_engine import LLMEngine
from megakv.engine.sampling import SamplingParams
from megakv.kernels.cpu_build import runnable_isas

# Every test here starts subprocesses, servers or models: the full run's, not the quick one's.
pytestmark = pytest.mark.slow

MEGAKV = str(Path(sys.executable).with_name("megakv"))
MAX_NEW_TOKENS = 32
# Prompt lengths spanning one block, many blocks, and several 64-token prefill chunks.
PROMPT_LENGTHS = [3, 40, 200, 333]


def batch_prompts(vocab_size: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(7)
    return [torch.randint(0, vocab_size, (n,), generator=gen).tolist() for n in PROMPT_LENGTHS]


def engine_for(checkpoint: Path, num_blocks: int = 128, model: ModelConfig | None = None) -> LLMEngine:
    info = read_checkpoint_info(checkpoint)
    if model is not None:
        info = type(info)(model=model, tensor_parallel_size=info.tensor_parallel_size, path=info.path)
    config = EngineConfig(cache=CacheConfig(block_size=16, num_blocks=num_blocks),
                          scheduler=SchedulerConfig(max_num_batched_tokens=64, max_num_seqs=8))
    return LLMEngine(info, config)


# head_dim 64 decodes through the C++ op: once with each build of it this CPU can run.
@pytest.mark.parametrize("kind,isa", [("gqa", None), ("mha", None)] + [("gqa64", isa) for isa in runnable_isas()])
def test_generate_greedy_batch_equals_hf_tp1(kind, isa, hf_llama, megakv_checkpoint, hf_greedy, monkeypatch):
    from megakv.kernels import cpu_attention

    if isa is not None:
        monkeypatch.setenv("MEGAKV_CPU_ISA", isa)
    engine = engine_for(megakv_checkpoint(kind, 1))
    prompts = batch_prompts(engine.model_config.vocab_size)
    decode_op = cpu_attention._decode_extension
    calls = []
    monkeypatch.setattr(cpu_attention, "_decode_extension", lambda *args: calls.append(1) or decode_op(*args))
    outputs = engine.generate(prompts, [SamplingParams(max_new_tokens=MAX_NEW_TOKENS)] * len(prompts))
    # The decode steps of head_dim 64 go through the C++ op wherever it builds.
    assert bool(calls) == (kind == "gqa64" and cpu_attention.load_extension() is not None)
    assert [o.token_ids for o in outputs] == hf_greedy(hf_llama(kind), prompts, MAX_NEW_TOKENS)
    assert all(o.finish_reason == "length" for o in outputs)
    assert engine.rmanager.num_free_blocks == 128


def test_generate_preemption_keeps_tokens(hf_llama, megakv_checkpoint, hf_greedy):
    # 40 blocks cannot hold the four requests at once: the scheduler must preempt and recompute.
    engine = engine_for(megakv_checkpoint("gqa", 1), num_blocks=30)
    prompts = batch_prompts(engine.model_config.vocab_size)
    outputs = engine.generate(prompts, [SamplingParams(max_new_tokens=MAX_NEW_TOKENS)] * len(prompts))
    assert [o.token_ids for o in outputs] == hf_greedy(hf_llama("gqa"), prompts, MAX_NEW_TOKENS)
    assert engine.rmanager.num_free_blocks == 30


def test_generate_stops_at_eos(megakv_checkpoint):
    checkpoint = megakv_checkpoint("gqa", 1)
    prompt = batch_prompts(301)[1]
    free_run = engine_for(checkpoint).generate([prompt], [SamplingParams(max_new_tokens=12)])[0].token_ids
    eos = free_run[5]
    model = ModelConfig.from_dict({**read_checkpoint_info(checkpoint).model.to_dict(), "eos_token_ids": [eos]})
    output = engine_for(checkpoint, model=model).generate([prompt], [SamplingParams(max_new_tokens=12)])[0]
    assert output.finish_reason == "stop"
    assert output.token_ids == free_run[:free_run.index(eos) + 1]
    ignoring = engine_for(checkpoint, model=model).generate(
        [prompt], [SamplingParams(max_new_tokens=12, ignore_eos=True)])[0]
    assert ignoring.token_ids == free_run and ignoring.finish_reason == "length"


def test_generate_seeded_sampling_is_reproducible(megakv_checkpoint):
    engine = engine_for(megakv_checkpoint("gqa", 1))
    prompts = batch_prompts(301)[:2]
    params = [SamplingParams(max_new_tokens=8, temperature=0.8, top_k=50, top_p=0.9, seed=s) for s in (1, 2)]
    first = [o.token_ids for o in engine.generate(prompts, params)]
    second = [o.token_ids for o in engine.generate(prompts[::-1], params[::-1])][::-1]
    assert first == second


@pytest.mark.mpi
@pytest.mark.parametrize("kind", ["gqa", "mha"])
def test_generate_cli_greedy_equals_hf_tp2(kind, hf_llama, megakv_checkpoint, generate_tp2_json, hf_greedy):
    checkpoint = megakv_checkpoint(kind, 2)
    prompts = batch_prompts(read_checkpoint_info(checkpoint).model.vocab_size)
    records = generate_tp2_json(checkpoint, prompts, "--max-new-tokens", str(MAX_NEW_TOKENS), "--num-blocks", "128")
    assert [r["prompt_ids"] for r in records] == prompts
    assert [r["token_ids"] for r in records] == hf_greedy(hf_llama(kind), prompts, MAX_NEW_TOKENS)
    assert {r["finish_reason"] for r in records} == {"length"}


def test_generate_cli_single_process_json(megakv_checkpoint):
    checkpoint = megakv_checkpoint("gqa", 1)
    proc = subprocess.run([MEGAKV, "generate", "--model", str(checkpoint), "--prompt-ids", "1,2,3",
                           "--max-new-tokens", "5", "--temperature", "0", "--json"],
                          capture_output=True, text=True, check=True)
    record = json.loads(proc.stdout)
    assert record["prompt_ids"] == [1, 2, 3] and len(record["token_ids"]) == 5
    assert record["finish_reason"] == "length"
