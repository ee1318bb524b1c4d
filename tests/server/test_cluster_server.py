"""megakv serve on a 2-instance DistKV cluster, under mpirun and under the deepspeed launcher: a prompt longer
than one pool borrows blocks and decodes as Hugging Face does (its logprobs cross instances and its remote
micro-attentions are counted), a temperature or top_p too small for fp32 picks the same tokens, its prompt logprobs
(echo) are Hugging Face's, a client that leaves aborts its
request with every block back home, and SIGTERM on rank 0 ends the whole job with status 0."""
from __future__ import annotations

import signal

import httpx
import pytest
import torch
from openai import OpenAI
from transformers import AutoModelForCausalLM

from megakv.bench.server_metrics import scrape, total

from server_process import wait_for_idle_pools

# Pools of 8 blocks of 16 tokens: 128 tokens per instance, 256 with what the other lends.
NUM_BLOCKS, BLOCK_SIZE = 8, 16


@pytest.mark.mpi
@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["mpirun", "deepspeed"])
def test_cluster_server_borrows_matches_hugging_face_aborts_and_stops(chat_model, start_server, hf_greedy, launcher):
    hf_dir, checkpoint = chat_model
    server = start_server(checkpoint, "--instances", "2", "--num-blocks", str(NUM_BLOCKS), "--block-size",
                          str(BLOCK_SIZE), "--served-model-name", "tiny", ranks=2, launcher=launcher)
    client = OpenAI(base_url=f"{server.url}/v1", api_key="unused", timeout=120, max_retries=0)
    assert client.models.list().data[0].max_model_len == 2 * NUM_BLOCKS * BLOCK_SIZE
    assert "as 'tiny': 2 instances x TP 1\n" in server.output
    assert "KV cache: 8 blocks of 16 tokens per instance (128 tokens); cluster KV capacity 256 tokens; lending cap " \
           "1.0 (each instance lends up to 8 blocks); a request may hold 256 tokens" in server.output

    long_prompt, short_prompt = [(7 * index) % 256 for index in range(200)], [5, 6, 7]
    expected = hf_greedy(hf_dir, [long_prompt, short_prompt], 16)
    response = client.completions.create(model="tiny", prompt=[long_prompt, short_prompt], max_tokens=16,
                                         temperature=0, logprobs=2,
                                         extra_body={"return_token_ids": True, "return_kv_placement": True})
    assert [choice.token_ids for choice in response.choices] == expected
    long_placement, short_placement = (choice.kv_placement for choice in response.choices)
    assert long_placement["num_remote_blocks"] > 0 and long_placement["block_instances"] == [0, 1]
    assert short_placement["num_remote_blocks"] == 0
    assert [len(choice.logprobs.top_logprobs) for choice in response.choices] == list(map(len, expected))
    # Sampling parameters that once made the probabilities NaN and ended every rank: both pick the top token.
    for sampling in ({"temperature": 1e-40}, {"temperature": 1.0, "top_p": 1e-320}):
        response = client.completions.create(model="tiny", prompt=[long_prompt, short_prompt], max_tokens=16,
                                             extra_body={"return_token_ids": True}, **sampling)
        assert [choice.token_ids for choice in response.choices] == expected
    # The prompt's own logprobs (echo), computed in prefill chunks whose attention spans both instances.
    echoed = client.completions.create(model="tiny", prompt=long_prompt, max_tokens=1, temperature=0, echo=True,
                                       logprobs=1).choices[0].logprobs
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        expected = torch.log_softmax(model(torch.tensor([long_prompt])).logits[0, :-1], dim=-1)  # [199, vocab]
    assert echoed.token_logprobs[0] is None
    torch.testing.assert_close(torch.tensor(echoed.token_logprobs[1:len(long_prompt)]),
                               expected.gather(1, torch.tensor(long_prompt[1:])[:, None])[:, 0], atol=1e-4, rtol=0)
    samples = wait_for_idle_pools(server.url)
    assert total(samples, "megakv:borrow_events_total") >= 1
    assert total(samples, "megakv:remote_micro_attentions_total") >= 1
    assert total(samples, "megakv:kv_blocks_total", instance="1") == NUM_BLOCKS

    with httpx.stream("POST", f"{server.url}/v1/completions", timeout=60, json={
            "model": "tiny", "prompt": long_prompt[:150], "max_tokens": 100, "ignore_eos": True, "stream": True}
            ) as stream:
        lines = stream.iter_lines()
        assert sum(next(lines).startswith("data: ") for _ in range(6)) == 3
        running = scrape(server.url)
        assert total(running, "megakv:num_requests_running") == 1
        assert total(running, "megakv:kv_blocks_borrowed") > 0
    wait_for_idle_pools(server.url)

    assert server.stop(signal.SIGTERM) == 0, server.output
