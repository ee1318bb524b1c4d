"""The sampler's logprobs: log_softmax of the raw fp32 logits, whatever the temperature, top-k and top-p."""
from __future__ import annotations

import pytest
import torch

from megakv.engine.sampling import Sampler, SamplingParams


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
