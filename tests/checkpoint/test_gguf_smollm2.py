"""The real model (SmolLM2-135M-Instruct, Q4_1 GGUF) converted by megakv equals transformers' own GGUF load."""
from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from logits_tolerance import assert_logits_close
from megakv.chat import ChatTemplate
from megakv.checkpoint.format import read_checkpoint_info
from megakv.config import CacheConfig, EngineConfig, SchedulerConfig
from megakv.engine.llm_engine import LLMEngine
from megakv.engine.sampling import SamplingParams
from megakv.kernels.cpu_build import runnable_isas
from megakv.tokenizer import TextTokenizer

MEGAKV = str(Path(sys.executable).with_name("megakv"))
LOGITS_WORKER = Path(__file__).with_name("logits_worker.py")
FRANCE = [{"role": "user", "content": "What is the capital of France?"}]
NUM_GREEDY_TOKENS = 12
MIXED_TEXTS = ["Hello, world! def f(x):\n\treturn x ** 2  # square",
               "Grüße aus Köln — naïve café, 世界, こんにちは, emoji 🚀🎉, and   runs of   spaces.\n\n",
               "<|im_start|>user\nspecial tokens in text<|im_end|> 3.14159 1,234,567 $US"]
CONVERSATIONS = [FRANCE,
                 [{"role": "system", "content": "You answer in French."}, {"role": "user", "content": "Hi!"},
                  {"role": "assistant", "content": "Bonjour !"}, {"role": "user", "content": "Ça va ?"}]]

pytestmark = pytest.mark.slow


def long_prompt(smollm2) -> list[int]:
    """The pass-key conversation: many blocks and prefill chunks."""
    return smollm2.chat_ids(smollm2.pass_key_messages())


def test_smollm2_logits_equal_transformers_tp1(smollm2):
    info = read_checkpoint_info(smollm2.checkpoint(1))
    engine = LLMEngine(info, EngineConfig(cache=CacheConfig(block_size=16, num_blocks=80),
                                          scheduler=SchedulerConfig(max_num_batched_tokens=128)))
    for prompt in (smollm2.chat_ids(FRANCE), long_prompt(smollm2)):
        assert_logits_close(engine.prompt_logits(prompt), smollm2.logits(prompt), info.model.num_layers)


@pytest.mark.mpi
def test_smollm2_tp3_logits_and_greedy_equal_transformers(smollm2, run_mpi, tmp_path):
    # The worker pool holds 256 tokens: 200 is still 13 blocks and 4 prefill chunks of 64.
    prompts = [smollm2.chat_ids(FRANCE), long_prompt(smollm2)[:200]]
    jobs = [{"checkpoint": str(smollm2.checkpoint(3)), "prompt": prompt, "num_tokens": NUM_GREEDY_TOKENS}
            for prompt in prompts]
    (tmp_path / "jobs.json").write_text(json.dumps(jobs))
    run_mpi(3, [sys.executable, str(LOGITS_WORKER), str(tmp_path / "jobs.json"), str(tmp_path / "out.pt")])
    num_layers = read_checkpoint_info(smollm2.checkpoint(3)).model.num_layers
    for prompt, result in zip(prompts, torch.load(tmp_path / "out.pt")):
        assert_logits_close(result["logits"], smollm2.logits(prompt), num_layers)
        expected = smollm2.greedy(prompt, NUM_GREEDY_TOKENS)
        assert result["greedy"][:len(expected)] == expected


# Decode reads the KV cache through the C++ op: once with each build of it this CPU can run.
@pytest.mark.parametrize("isa", runnable_isas())
def test_smollm2_chat_answers_paris_with_transformers_tokens(smollm2, isa):
    proc = subprocess.run([MEGAKV, "generate", "--model", str(smollm2.checkpoint(1)), "--chat",
                           FRANCE[0]["content"], "--max-new-tokens", "24", "--json"],
                          capture_output=True, text=True, timeout=300, check=True,
                          env=dict(os.environ, MEGAKV_CPU_ISA=isa))
    record = json.loads(proc.stdout)
    assert record["prompt_ids"] == smollm2.chat_ids(FRANCE)
    assert record["token_ids"] == smollm2.greedy(record["prompt_ids"], 24)
    assert record["finish_reason"] == "stop" and record["token_ids"][-1] == 2
    assert "Paris" in record["text"]


def test_smollm2_tokenizer_round_trips_equal_transformers(smollm2):
    tokenizer = TextTokenizer(str(smollm2.checkpoint(1) / "tokenizer.json"))
    for text in MIXED_TEXTS:
        ids = tokenizer.encode(text)
        assert ids == smollm2.tokenizer.encode(text)
        assert tokenizer.decode(ids) == smollm2.tokenizer.decode(ids, skip_special_tokens=True)
        assert smollm2.tokenizer.decode(ids) == text


def test_smollm2_chat_template_renders_as_transformers(smollm2):
    chat = ChatTemplate.from_checkpoint(smollm2.checkpoint(1))
    assert chat.end_of_turn_token == "<|im_end|>"
    for messages in CONVERSATIONS:
        assert chat.render(messages) == smollm2.tokenizer.apply_chat_template(messages, tokenize=False,
                                                                              add_generation_prompt=True)
    config = read_checkpoint_info(smollm2.checkpoint(1)).model
    assert (config.bos_token_id, config.eos_token_ids, config.tie_word_embeddings) == (1, (2,), True)


def test_smollm2_bf16_greedy_equals_transformers_bf16(smollm2):
    """In bf16 (weights, activations and KV pool; the C++ linear, norm and rotary ops on CPU) the demo prompts get
    transformers' own bf16 greedy tokens, and the logits stay within transformers' own bf16 drift from fp32."""
    info = read_checkpoint_info(smollm2.checkpoint(1))
    engine = LLMEngine(info, EngineConfig(cache=CacheConfig(block_size=16, num_blocks=96),
                                          scheduler=SchedulerConfig(max_num_batched_tokens=256)),
                       dtype=torch.bfloat16)
    hf_bf16 = copy.deepcopy(smollm2.model).to(torch.bfloat16)
    for prompt in (smollm2.chat_ids(FRANCE), long_prompt(smollm2)):
        with torch.no_grad():
            expected = hf_bf16.generate(torch.tensor([prompt]), max_new_tokens=NUM_GREEDY_TOKENS, do_sample=False)
            hf_drift = (hf_bf16(torch.tensor([prompt])).logits[0].float() - smollm2.logits(prompt)).abs()
        output = engine.generate([prompt], [SamplingParams(max_new_tokens=NUM_GREEDY_TOKENS)])[0]
        assert output.token_ids == expected[0, len(prompt):].tolist()
        drift = (engine.prompt_logits(prompt).float() - smollm2.logits(prompt)).abs()
        assert drift.max() < 1.5 * hf_drift.max() and drift.mean() < 1.5 * hf_drift.mean()
