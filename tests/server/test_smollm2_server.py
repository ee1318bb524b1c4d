"""The real demo model behind megakv serve answers a chat through the openai client."""
from __future__ import annotations

import pytest
from openai import OpenAI

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.mark.slow
def test_smollm2_server_chat_answers_paris_as_transformers(smollm2, start_server):
    server = start_server(smollm2.checkpoint(1), "--num-blocks", "64", "--served-model-name", "smollm2")
    client = OpenAI(base_url=f"{server.url}/v1", api_key="unused", timeout=300, max_retries=0)
    response = client.chat.completions.create(model="smollm2", messages=QUESTION, max_tokens=24, temperature=0,
                                              extra_body={"return_token_ids": True})
    (choice,) = response.choices
    prompt_ids = smollm2.chat_ids(QUESTION)
    assert choice.prompt_token_ids == prompt_ids
    assert choice.token_ids == smollm2.greedy(prompt_ids, 24)
    assert "Paris" in choice.message.content and choice.finish_reason == "stop"
    streamed = client.chat.completions.create(model="smollm2", messages=QUESTION, max_tokens=24, temperature=0,
                                              stream=True)
    assert "".join(chunk.choices[0].delta.content or "" for chunk in streamed) == choice.message.content
