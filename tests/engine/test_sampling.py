"""The sampler: logprobs are log_softmax of the raw fp32 logits, whatever the temperature, top-k and top-p; no
valid parameters make it fail, and a row that does fail ends its own request alone."""
from __future__ import annotations

import pytest
import torch

from megakv.checkpoint.format import read_checkpoint_info
from megakv.config import CacheConfig, EngineConfig, SchedulerConfig
from megakv.engine.llm_engine import LLMEngine
from megakv.engine.sampling import SAMPLING_FAILED, Sampler, SamplingParams, filter_logits


def test_sampler_logprobs_are_raw_log_softmax_for_requests_that_ask():
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    params = [SamplingParams(logprobs=4), SamplingParams(temperature=0.5, top_k=3, top_p=0.8, seed=1, logprobs=0),
              SamplingParams()]
    sampled = Sampler().sample(logits, ["a", "b", "c"], params)
    reference = logits.float() - logits.float().exp().sum(-1, keepdim=True).log()  # [3, vocab]
    assert sampled.logprobs[2] is None
    for row in (0, 1):
        entry = sampled.logprobs[row]
        assert entry.logprob == pytest.approx(reference[row, sampled.token_ids[row]].item(), abs=1e-5)
    values, ids = reference[0].topk(4)
    assert [token for token, _ in sampled.logprobs[0].top] == ids.tolist()
    assert [value for _, value in sampled.logprobs[0].top] == pytest.approx(values.tolist(), abs=1e-5)
    assert sampled.logprobs[1].top == []


@pytest.mark.parametrize("logprobs", [-1, 21, True, 2.0])
def test_sampling_params_logprobs_out_of_range_is_a_value_error(logprobs):
    with pytest.raises(ValueError, match="logprobs must be an integer from 0 to 20"):
        SamplingParams(logprobs=logprobs)


@pytest.mark.parametrize("params", [SamplingParams(temperature=1e-40), SamplingParams(temperature=9.9e-6),
                                    SamplingParams(temperature=1.0, top_p=1e-320),
                                    SamplingParams(temperature=1e-5, top_p=1e-320, top_k=1)])
def test_sampler_tiny_temperature_and_top_p_pick_the_most_likely_token(params):
    # A temperature below 1e-5 is greedy (vLLM's rule); a top_p that rounds to 0 in fp32 keeps the top token.
    logits = torch.randn(2, 300, generator=torch.Generator().manual_seed(1)) * 30  # [2, vocab]
    sampled = Sampler().sample(logits, ["a", "b"], [params, params])
    assert sampled.token_ids == logits.argmax(-1).tolist() and not sampled.errors


def test_filter_logits_keeps_the_most_likely_token_for_any_top_p():
    logits = torch.tensor([0.5, 3.0, -1.0, 2.9])
    for top_p in (1e-320, 1e-30, 0.01):
        kept = filter_logits(logits, 0, top_p).isfinite()
        assert kept.tolist() == [False, True, False, False]


def test_sampler_failure_ends_only_its_request():
    logits = torch.randn(3, 40, generator=torch.Generator().manual_seed(2))
    logits[1] = float("nan")  # a model fault on one row: multinomial refuses its probabilities
    params = [SamplingParams(temperature=0.7, seed=0, logprobs=2)] * 3
    sampled = Sampler().sample(logits, ["a", "b", "c"], params)
    assert sampled.token_ids[1] == SAMPLING_FAILED and sampled.logprobs[1] is None
    assert list(sampled.errors) == ["b"] and "sampling failed" in sampled.errors["b"]
    assert all(0 <= token < 40 for token in sampled.token_ids[::2])


def test_engine_fails_only_the_request_whose_sampling_raised(megakv_checkpoint, monkeypatch):
    engine = LLMEngine(read_checkpoint_info(megakv_checkpoint("gqa", 1)),
                       EngineConfig(cache=CacheConfig(block_size=16, num_blocks=32),
                                    scheduler=SchedulerConfig(max_num_batched_tokens=64)))
    sample_row = Sampler._sample_row

    def faulty(self, logits, request_id, params, history):
        if params.seed == 13:  # as multinomial fails on probabilities a faulty model made NaN
            raise RuntimeError("probability tensor contains either inf, nan or element < 0")
        return sample_row(self, logits, request_id, params, history)

    monkeypatch.setattr(Sampler, "_sample_row", faulty)
    failed, served = engine.generate([[1, 2, 3], [4, 5, 6]],
                                     [SamplingParams(max_new_tokens=4, temperature=1.0, seed=13),
                                      SamplingParams(max_new_tokens=4, temperature=1.0, seed=1)])
    assert failed.finish_reason == "error" and "sampling failed: probability tensor" in failed.error
    assert failed.token_ids == []
    assert served.finish_reason == "length" and len(served.token_ids) == 4
    assert engine.rmanager.num_free_blocks == 32 and not engine.has_unfinished()
