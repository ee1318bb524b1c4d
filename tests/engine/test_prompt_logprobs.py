"""Prompt logprobs (vLLM's prompt_logprobs) equal log_softmax of Hugging Face's fp32 logits at every prompt
position, whether the prompt is prefilled in one chunk or several, batched with other requests or preempted and
recomputed (no position is reported twice)."""
from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from megakv.checkpoint.format import read_checkpoint_info
from megakv.config import CacheConfig, EngineConfig, SchedulerConfig
from megakv.engine.llm_engine import LLMEngine
from megakv.engine.sampling import SamplingParams

NUM_TOP = 4


def random_prompt(length: int, seed: int) -> list[int]:
    return torch.randint(0, 301, (length,), generator=torch.Generator().manual_seed(seed)).tolist()


def serve(engine: LLMEngine, prompts: list[list[int]], params: SamplingParams) -> dict[str, list]:
    """Each request's outputs, in order, by request id."""
    outputs: dict[str, list] = {engine.add_request(prompt, params): [] for prompt in prompts}
    while engine.has_unfinished():
        for output in engine.step():
            outputs[output.request_id].append(output)
    return outputs


def hf_prompt_logprobs(hf_dir, prompt: list[int]) -> torch.Tensor:
    """log_softmax [len(prompt) - 1, vocab] of the logits that predict prompt tokens 1 .. end."""
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        return torch.log_softmax(model(torch.tensor([prompt])).logits[0, :-1], dim=-1)


def check_against_hf(hf_dir, prompt: list[int], prompt_logprobs) -> None:
    expected = hf_prompt_logprobs(hf_dir, prompt)
    assert len(prompt_logprobs) == len(prompt) - 1
    torch.testing.assert_close(torch.tensor([entry.logprob for entry in prompt_logprobs]),
                               expected.gather(1, torch.tensor(prompt[1:])[:, None])[:, 0], atol=1e-4, rtol=0)
    values, ids = expected.topk(NUM_TOP)
    assert [[token for token, _ in entry.top] for entry in prompt_logprobs] == ids.tolist()
    torch.testing.assert_close(torch.tensor([[value for _, value in entry.top] for entry in prompt_logprobs]),
                               values, atol=1e-4, rtol=0)


@pytest.mark.parametrize("max_num_batched_tokens", [512, 48])
def test_prompt_logprobs_equal_hugging_face_in_one_chunk_or_several(megakv_checkpoint, hf_llama,
                                                                     max_num_batched_tokens):
    engine = LLMEngine(read_checkpoint_info(megakv_checkpoint("gqa", 1)),
                       EngineConfig(cache=CacheConfig(block_size=16, num_blocks=64),
                                    scheduler=SchedulerConfig(max_num_batched_tokens=max_num_batched_tokens)))
    prompts = [random_prompt(130, seed=1), random_prompt(7, seed=2)]
    outputs = serve(engine, prompts, SamplingParams(max_new_tokens=3, logprobs=1, prompt_logprobs=NUM_TOP))
    for prompt, request_outputs in zip(prompts, outputs.values()):
        first, *rest = request_outputs
        check_against_hf(hf_llama("gqa"), prompt, first.prompt_logprobs)
        assert all(output.prompt_logprobs is None for output in rest)
    (plain,) = serve(engine, prompts[:1], SamplingParams(max_new_tokens=2)).values()
    assert all(output.prompt_logprobs is None for output in plain)


def test_prompt_logprobs_of_a_preempted_request_are_reported_once(megakv_checkpoint, hf_llama):
    # Two requests of 6 blocks fill the 12-block pool; growing to a 7th block preempts the later one, which is
    # recomputed after the first finishes.
    engine = LLMEngine(read_checkpoint_info(megakv_checkpoint("gqa", 1)),
                       EngineConfig(cache=CacheConfig(block_size=16, num_blocks=12)))
    prompts = [random_prompt(90, seed=3), random_prompt(90, seed=4)]
    outputs = serve(engine, prompts, SamplingParams(max_new_tokens=20, ignore_eos=True, prompt_logprobs=NUM_TOP))
    assert engine.core.scheduler.num_preemptions >= 1
    for prompt, request_outputs in zip(prompts, outputs.values()):
        with_prompt_logprobs = [output for output in request_outputs if output.prompt_logprobs is not None]
        assert len(with_prompt_logprobs) == 1
        check_against_hf(hf_llama("gqa"), prompt, with_prompt_logprobs[0].prompt_logprobs)
