"""/metrics counts preemptions: concurrent requests that outgrow a small pool preempt one another."""
from __future__ import annotations

from openai import OpenAI

from megakv.bench.server_metrics import total

from server_process import spawn_server, wait_for_idle_pools

# A pool of 4 blocks of 16 tokens: one request of 20 + 40 tokens fills it alone.
NUM_BLOCKS, PROMPT_LEN, MAX_TOKENS = 4, 20, 40


def test_metrics_count_preemptions_of_a_small_pool(chat_model):
    server = spawn_server(chat_model[1], "--num-blocks", str(NUM_BLOCKS), "--served-model-name", "tiny")
    try:
        client = OpenAI(base_url=f"{server.url}/v1", api_key="unused", timeout=120, max_retries=0)
        prompts = [[(11 * index + shift) % 256 for index in range(PROMPT_LEN)] for shift in range(3)]
        alone = [client.completions.create(model="tiny", prompt=prompt, max_tokens=MAX_TOKENS, temperature=0,
                                           extra_body={"return_token_ids": True, "ignore_eos": True}
                                           ).choices[0].token_ids for prompt in prompts]
        assert total(wait_for_idle_pools(server.url), "megakv:num_preemptions_total") == 0
        together = client.completions.create(model="tiny", prompt=prompts, max_tokens=MAX_TOKENS, temperature=0,
                                             extra_body={"return_token_ids": True, "ignore_eos": True})
        # Recomputation after a preemption changes no token.
        assert [choice.token_ids for choice in together.choices] == alone
        samples = wait_for_idle_pools(server.url)
        assert total(samples, "megakv:num_preemptions_total", instance="0") >= 1
        assert total(samples, "megakv:remote_micro_attentions_total", instance="0") == 0
    finally:
        server.kill()
