"""32 requests in flight from several client threads, streamed and not: each equals Hugging Face's greedy decode,
and afterwards every block is free."""
from __future__ import annotations

import random
from concurrent.futures import ThreadPoolExecutor

import pytest
from openai import OpenAI

from megakv.bench.server_metrics import total

from server_process import spawn_server, wait_for_idle_pools

NUM_REQUESTS = 32
NUM_CLIENT_THREADS = 8
MAX_TOKENS = 10
# Too small for all 32 at once: some wait, some are preempted and recomputed.
NUM_BLOCKS = 48


@pytest.fixture(scope="module")
def server(chat_model):
    server = spawn_server(chat_model[1], "--num-blocks", str(NUM_BLOCKS), "--served-model-name", "tiny",
                          "--max-num-seqs", "16")
    yield server
    server.kill()


def completion_token_ids(client: OpenAI, prompt_ids: list[int], stream: bool) -> list[int]:
    """The generated ids of one greedy completion, from a whole response or a stream."""
    request = dict(model="tiny", prompt=prompt_ids, max_tokens=MAX_TOKENS, temperature=0,
                   extra_body={"return_token_ids": True})
    if not stream:
        (choice,) = client.completions.create(**request).choices
        return choice.token_ids
    token_ids: list[int] = []
    for chunk in client.completions.create(**request, stream=True):
        for choice in chunk.choices:
            token_ids += choice.token_ids or []
    return token_ids


@pytest.mark.slow
def test_server_32_concurrent_requests_equal_hugging_face_and_free_every_block(server, chat_model, hf_greedy):
    rng = random.Random(5)
    prompts = [[rng.randrange(3, 250) for _ in range(rng.randint(4, 120))] for _ in range(NUM_REQUESTS)]
    expected = hf_greedy(chat_model[0], prompts, MAX_TOKENS)
    client = OpenAI(base_url=f"{server.url}/v1", api_key="unused", timeout=300, max_retries=0)
    with ThreadPoolExecutor(NUM_CLIENT_THREADS) as pool:
        results = list(pool.map(lambda index: completion_token_ids(client, prompts[index], stream=index % 2 == 1),
                                range(NUM_REQUESTS)))
    assert results == expected
    samples = wait_for_idle_pools(server.url, timeout=60)
    assert total(samples, "megakv:kv_blocks_free") == NUM_BLOCKS
    assert total(samples, "megakv:request_success_total") >= NUM_REQUESTS
