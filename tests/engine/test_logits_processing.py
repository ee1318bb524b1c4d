"""Penalties, logit bias, min_tokens, min_p and allowed tokens: greedy decoding with them equals Hugging Face
``generate`` with its own processors (repetition_penalty, sequence_bias, min_new_tokens) token for token in fp32,
and the presence and frequency penalties follow OpenAI's formula."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from transformers import AutoModelForCausalLM
from transformers.generation.logits_process import MinPLogitsWarper

from megakv.checkpoint.format import read_checkpoint_info
from megakv.config import CacheConfig, EngineConfig, SchedulerConfig
from megakv.engine.llm_engine import LLMEngine
from megakv.engine.logits_processing import filter_min_p, process_logits
from megakv.engine.sampling import SamplingParams

MAX_NEW_TOKENS = 24


def engine_for(checkpoint) -> LLMEngine:
    return LLMEngine(read_checkpoint_info(checkpoint),
                     EngineConfig(cache=CacheConfig(block_size=16, num_blocks=64),
                                  scheduler=SchedulerConfig(max_num_batched_tokens=64, max_num_seqs=8)))


@pytest.mark.slow
def test_greedy_with_penalty_bias_and_min_tokens_equals_hugging_face(hf_llama, megakv_checkpoint):
    engine = engine_for(megakv_checkpoint("gqa", 1))
    gen = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, 200, (n,), generator=gen).tolist() for n in (3, 40)]
    plain = engine.generate(prompts, [SamplingParams(max_new_tokens=MAX_NEW_TOKENS)] * 2)
    model = AutoModelForCausalLM.from_pretrained(hf_llama("gqa"), dtype=torch.float32).eval()
    for prompt, reference in zip(prompts, plain):
        # The token plain greedy decoding picks first: as a stop token held back by min_tokens, and biased.
        stop, biased = reference.token_ids[0], reference.token_ids[1]
        params = SamplingParams(max_new_tokens=MAX_NEW_TOKENS, repetition_penalty=1.3, logit_bias=((biased, 2.5),),
                                min_tokens=5, stop_token_ids=(stop,))
        [output] = engine.generate([prompt], [params])
        with torch.no_grad():
            generated = model.generate(torch.tensor([prompt]), max_new_tokens=MAX_NEW_TOKENS, do_sample=False,
                                       repetition_penalty=1.3, sequence_bias={(biased,): 2.5}, min_new_tokens=5,
                                       eos_token_id=stop, pad_token_id=stop)
        expected = generated[0, len(prompt):].tolist()
        assert output.token_ids == expected
        assert output.token_ids != reference.token_ids and stop not in output.token_ids[:5]
    assert engine.rmanager.num_free_blocks == 64


def test_presence_and_frequency_penalties_follow_openai_formula():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(50, generator=gen)
    history = SimpleNamespace(prompt_ids=[1, 2, 3], output_ids=[7, 7, 9, 3])
    params = SamplingParams(presence_penalty=0.5, frequency_penalty=-0.25)
    counts = torch.zeros(50)
    for token in history.output_ids:
        counts[token] += 1
    # OpenAI: mu[j] - c[j] * alpha_frequency - float(c[j] > 0) * alpha_presence, over generated tokens only.
    expected = logits - counts * -0.25 - (counts > 0).float() * 0.5
    assert torch.allclose(process_logits(logits, params, history, ()), expected)


def test_repetition_penalty_covers_prompt_and_output_and_both_signs():
    logits = torch.tensor([2.0, -2.0, 1.0, -1.0, 0.5])
    history = SimpleNamespace(prompt_ids=[0], output_ids=[1, 1])
    processed = process_logits(logits, SamplingParams(repetition_penalty=2.0), history, ())
    assert processed.tolist() == [1.0, -4.0, 1.0, -1.0, 0.5]


@pytest.mark.parametrize("min_p", [0.0, 0.05, 0.3, 1.0])
def test_min_p_keeps_what_hugging_face_keeps(min_p):
    logits = torch.randn(200, generator=torch.Generator().manual_seed(4)) * 3
    kept = filter_min_p(logits, min_p).isfinite()
    if min_p == 0:
        assert kept.all()
        return
    reference = MinPLogitsWarper(min_p)(torch.zeros(1, 1, dtype=torch.long), logits[None].clone())[0].isfinite()
    assert kept.tolist() == reference.tolist()


def test_min_tokens_holds_back_eos_unless_ignored_and_stop_tokens_always():
    logits = torch.zeros(10)
    history = SimpleNamespace(prompt_ids=[1], output_ids=[4])
    params = SamplingParams(max_new_tokens=8, min_tokens=2, stop_token_ids=(5,))
    masked = ~process_logits(logits, params, history, eos_token_ids=(9,)).isfinite()
    assert masked.nonzero().flatten().tolist() == [5, 9]
    ignoring = SamplingParams(max_new_tokens=8, min_tokens=2, stop_token_ids=(5,), ignore_eos=True)
    assert (~process_logits(logits, ignoring, history, (9,)).isfinite()).nonzero().flatten().tolist() == [5]
    history.output_ids = [4, 4]
    assert process_logits(logits, params, history, (9,)).isfinite().all()


def test_allowed_tokens_bound_sampling_and_a_fully_masked_request_fails_alone(megakv_checkpoint):
    engine = engine_for(megakv_checkpoint("gqa", 1))
    allowed = (11, 12, 13)
    masked = SamplingParams(max_new_tokens=6, allowed_token_ids=(11,), stop_token_ids=(11,), min_tokens=3)
    sampled = SamplingParams(max_new_tokens=16, temperature=1.0, seed=5, allowed_token_ids=allowed)
    failed, served = engine.generate([[1, 2, 3], [4, 5, 6]], [masked, sampled])
    assert failed.finish_reason == "error" and "every token is masked" in failed.error
    assert served.finish_reason == "length" and set(served.token_ids) <= set(allowed)
    assert engine.rmanager.num_free_blocks == 64


@pytest.mark.parametrize("params, message", [
    (dict(presence_penalty=2.5), "presence_penalty must be in [-2.0, 2.0]"),
    (dict(frequency_penalty=float("nan")), "frequency_penalty must be a finite number"),
    (dict(repetition_penalty=0.0), "repetition_penalty must be > 0"),
    (dict(min_p=-0.1), "min_p must be in [0, 1]"),
    (dict(max_new_tokens=4, min_tokens=5), "min_tokens must be an integer from 0 to max_new_tokens (4)"),
    (dict(logit_bias=((3, float("inf")),)), "logit_bias values must be finite"),
    (dict(allowed_token_ids=()), "allowed_token_ids must name at least one token"),
])
def test_sampling_params_refuse_bad_processing_values(params, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        SamplingParams(**params)


def test_engine_refuses_processing_token_ids_outside_the_vocabulary(megakv_checkpoint):
    engine = engine_for(megakv_checkpoint("gqa", 1))
    with pytest.raises(ValueError, match="sampling parameters name token id 100000, outside the vocabulary"):
        engine.add_request([1, 2], SamplingParams(logit_bias=((100000, 1.0),)))
