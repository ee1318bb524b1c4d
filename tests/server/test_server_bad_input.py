"""Bad requests get HTTP 400 with an OpenAI-style body naming the problem; the server keeps serving, leaking no
block."""
from __future__ import annotations

import subprocess

import httpx
import pytest

from megakv.bench.server_metrics import total

from server_process import MEGAKV, spawn_server, wait_for_idle_pools

NUM_BLOCKS, BLOCK_SIZE = 16, 16
MAX_MODEL_LEN = NUM_BLOCKS * BLOCK_SIZE
CHAT = [{"role": "user", "content": "Hi"}]


@pytest.fixture(scope="module")
def server(chat_model):
    server = spawn_server(chat_model[1], "--num-blocks", str(NUM_BLOCKS), "--block-size", str(BLOCK_SIZE),
                          "--served-model-name", "tiny")
    yield server
    server.kill()


BAD_COMPLETIONS = [
    ({"model": "tiny", "prompt": "x", "max_tokens": "5"}, "max_tokens", "invalid value for 'max_tokens'"),
    ({"model": "tiny", "prompt": "x", "temperature": "hot"}, "temperature", "invalid value for 'temperature'"),
    ({"model": "tiny", "prompt": 5}, "prompt", "invalid value for 'prompt'"),
    ({"model": "tiny", "prompt": [1, "a"]}, "prompt", "invalid value for 'prompt"),
    ({"model": "tiny"}, "prompt", "missing required field 'prompt'"),
    ({"model": "gpt-4", "prompt": "x"}, "model", "model 'gpt-4' does not exist: this server serves 'tiny'"),
    ({"model": "tiny", "prompt": "x", "max_tokens": -1}, "max_tokens", "max_tokens must be at least 1, got -1"),
    ({"model": "tiny", "prompt": "x", "max_tokens": 0}, "max_tokens", "max_tokens must be at least 1, got 0"),
    ({"model": "tiny", "prompt": "x", "max_tokens": 10_000}, "max_tokens",
     f"exceeds the {MAX_MODEL_LEN} tokens a request may hold (the KV memory it may use"),
    ({"model": "tiny", "prompt": [1, 2, 259]}, "prompt", "token id 259 is outside the vocabulary [0, 259)"),
    ({"model": "tiny", "prompt": [[1, 2], [-1]]}, "prompt", "token id -1 is outside the vocabulary"),
    ({"model": "tiny", "prompt": list(range(200)) * 2}, "prompt",
     f"the prompt has 400 tokens, and a request may hold at most {MAX_MODEL_LEN}"),
    ({"model": "tiny", "prompt": ""}, "prompt", "prompt is empty"),
    ({"model": "tiny", "prompt": []}, "prompt", "prompt is empty"),
    ({"model": "tiny", "prompt": "x", "stop_token_ids": [999]}, None, "stop_token_ids: token id 999 is outside"),
    ({"model": "tiny", "prompt": "x", "top_p": 0}, None, "top_p must be in (0, 1], got 0"),
    ({"model": "tiny", "prompt": "x", "temperature": -1}, None, "temperature must be >= 0, got -1"),
    ({"model": "tiny", "prompt": "x", "frobnicate": 1}, "frobnicate", "unsupported field 'frobnicate'"),
    ({"model": "tiny", "prompt": "x", "n": 0}, "n",
     "invalid value for 'n': input should be greater than or equal to 1"),
    ({"model": "tiny", "prompt": "x", "n": 129}, "n",
     "invalid value for 'n': input should be less than or equal to 128"),
    ({"model": "tiny", "prompt": "x", "n": 2, "seed": 2**63 - 1}, "seed",
     "seed must be an integer from 0 to 2**63 - 1"),
    ({"model": "tiny", "prompt": "x", "best_of": 2}, None, "best_of = 2 is not supported: megakv samples one"),
    ({"model": "tiny", "prompt": "x", "logprobs": 21}, None, "logprobs must be from 0 to 20, got 21"),
    ({"model": "tiny", "prompt": "x", "presence_penalty": 3}, None, "presence_penalty must be in [-2.0, 2.0], got 3"),
    ({"model": "tiny", "prompt": "x", "repetition_penalty": 0}, None, "repetition_penalty must be > 0, got 0"),
    ({"model": "tiny", "prompt": "x", "min_p": 1.5}, None, "min_p must be in [0, 1], got 1.5"),
    ({"model": "tiny", "prompt": "x", "min_tokens": 9, "max_tokens": 4}, "min_tokens",
     "min_tokens (9) is more than max_tokens (4)"),
    ({"model": "tiny", "prompt": "x", "logit_bias": {"a": 1}}, None, "logit_bias keys must be token ids, got 'a'"),
    ({"model": "tiny", "prompt": "x", "logit_bias": {"999": 1}}, "logit_bias", "token id 999 is outside"),
    ({"model": "tiny", "prompt": "x", "allowed_token_ids": [1, 999]}, "allowed_token_ids", "token id 999 is outside"),
    ({"model": "tiny", "prompt": "x", "allowed_token_ids": []}, None, "allowed_token_ids must name at least one"),
    ({"model": "tiny", "prompt": "x", "truncate_prompt_tokens": 0}, "truncate_prompt_tokens",
     "truncate_prompt_tokens must be -1 or at least 1, got 0"),
    ({"model": "tiny", "prompt": "x", "response_format": {"type": "json_object"}}, None,
     "response_format = {'type': 'json_object'} is not supported: megakv has no structured output"),
    ({"model": "tiny", "prompt": "x", "guided_json": {"type": "object"}}, None, "megakv has no structured output"),
    ({"model": "tiny", "prompt": "x", "use_beam_search": True}, None, "megakv does not do beam search"),
    ({"model": "tiny", "prompt": "x", "length_penalty": 2.0}, None, "megakv does not do beam search"),
    ({"model": "tiny", "prompt": "x", "suffix": "end"}, None, "megakv does not fill in the middle"),
    ({"model": "tiny", "prompt": "x", "prompt_logprobs": 1}, None, "ask /v1/completions with echo and logprobs"),
    ({"model": "tiny", "prompt": "x", "skip_special_tokens": 1}, "skip_special_tokens",
     "invalid value for 'skip_special_tokens'"),
    ({"model": "tiny", "prompt": "x", "stream_options": {"include_usage": True}}, None,
     "stream_options is only allowed when stream is true"),
    ({"model": "tiny", "prompt": "x", "stream": True, "stream_options": {"include_usage": True, "other": 1}},
     "stream_options.other", "unsupported field 'stream_options.other'"),
]

BAD_CHATS = [
    ({"model": "tiny", "messages": []}, "messages", "invalid value for 'messages'"),
    ({"model": "tiny", "messages": [{"content": "Hi"}]}, "messages.0.role", "missing required field"),
    ({"model": "tiny", "messages": CHAT, "logprobs": True, "top_logprobs": -1}, None,
     "top_logprobs must be from 0 to 20, got -1"),
    ({"model": "tiny", "messages": CHAT, "top_logprobs": 3}, None, "top_logprobs needs logprobs set to true"),
    ({"model": "tiny", "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}]},
     None, "content parts of type 'image_url' are not supported: megakv serves text only"),
    ({"model": "tiny", "messages": CHAT, "tools": [{"type": "function", "function": {"name": "f"}}]}, None,
     "is not supported: megakv does not call tools"),
    ({"model": "tiny", "messages": CHAT, "tool_choice": "auto"}, None, "megakv does not call tools"),
    ({"model": "tiny", "messages": CHAT, "echo": True}, None, "a chat reply does not repeat the last message"),
    ({"model": "tiny", "messages": CHAT, "chat_template": "{{ messages }}"}, None,
     "megakv renders the checkpoint's own chat template"),
    ({"model": "tiny", "messages": CHAT, "continue_final_message": True}, None,
     "add_generation_prompt and continue_final_message cannot both be true"),
    ({"model": "tiny", "messages": CHAT, "chat_template_kwargs": {"messages": []}}, None,
     "chat_template_kwargs cannot set messages"),
    ({"model": "tiny", "messages": CHAT, "max_completion_tokens": MAX_MODEL_LEN}, "max_tokens", "exceeds the"),
]


def assert_rejected(response: httpx.Response, param: str | None, message: str) -> None:
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert message in error["message"], error
    assert error["type"] == "BadRequestError" and error["code"] == 400
    if param is not None:
        assert error["param"] == param


@pytest.mark.parametrize("body, param, message", BAD_COMPLETIONS)
def test_completions_bad_request_is_a_400_naming_it(server, body, param, message):
    assert_rejected(httpx.post(f"{server.url}/v1/completions", json=body, timeout=30), param, message)


@pytest.mark.parametrize("body, param, message", BAD_CHATS)
def test_chat_bad_request_is_a_400_naming_it(server, body, param, message):
    assert_rejected(httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=30), param, message)


@pytest.mark.parametrize("content, message", [
    (b'{"model": "tiny", "prompt": ', "the request body is not valid JSON"),
    (b'[1, 2]', "the request body must be a JSON object"),
    (b'{"model": "tiny", "prompt": "x", "temperature": NaN}', "NaN is not a number JSON allows"),
    (b'\xff\xfe', "the request body is not valid JSON"),
])
def test_completions_malformed_body_is_a_400(server, content, message):
    response = httpx.post(f"{server.url}/v1/completions", content=content, timeout=30,
                          headers={"content-type": "application/json"})
    assert_rejected(response, None, message)


def test_tokenize_and_detokenize_bad_input_is_a_400(server):
    assert_rejected(httpx.post(f"{server.url}/tokenize", json={"prompt": "x", "messages": CHAT}), None,
                    "give exactly one of prompt and messages")
    assert_rejected(httpx.post(f"{server.url}/detokenize", json={"tokens": [5000]}), None,
                    "tokens: token id 5000 is outside the vocabulary")
    assert_rejected(httpx.post(f"{server.url}/detokenize", json={"model": "other", "tokens": [1]}), "model",
                    "model 'other' does not exist")


def test_unknown_route_is_an_openai_style_404(server):
    response = httpx.get(f"{server.url}/v1/nothing")
    assert response.status_code == 404 and response.json()["error"]["code"] == 404


def test_server_keeps_serving_after_bad_requests_with_every_block_free(server):
    for body, _, _ in BAD_COMPLETIONS:
        httpx.post(f"{server.url}/v1/completions", json=body, timeout=30)
    response = httpx.post(f"{server.url}/v1/completions", json={"model": "tiny", "prompt": "ok", "max_tokens": 3},
                          timeout=30)
    assert response.status_code == 200 and response.json()["usage"]["completion_tokens"] <= 3
    samples = wait_for_idle_pools(server.url)
    assert total(samples, "megakv:kv_blocks_free") == NUM_BLOCKS


@pytest.mark.slow
def test_server_and_generate_refuse_the_same_requests_at_the_kv_limit(server, chat_model):
    prompt = [5, 6, 7]
    room = MAX_MODEL_LEN - len(prompt)
    refusals = {}
    for max_new_tokens in (room, room + 1):
        generated = subprocess.run([MEGAKV, "generate", "--model", str(chat_model[1]), "--num-blocks",
                                    str(NUM_BLOCKS), "--block-size", str(BLOCK_SIZE), "--prompt-ids", "5,6,7",
                                    "--max-new-tokens", str(max_new_tokens)], capture_output=True, text=True,
                                   timeout=120)
        served = httpx.post(f"{server.url}/v1/completions", timeout=60,
                            json={"model": "tiny", "prompt": prompt, "max_tokens": max_new_tokens})
        refusals[max_new_tokens] = (generated.returncode, generated.stderr, served.status_code, served.json())
    generated_status, _, served_status, _ = refusals[room]
    assert (generated_status, served_status) == (0, 200)
    generated_status, stderr, served_status, body = refusals[room + 1]
    message = (f"prompt (3 tokens) + max_new_tokens ({room + 1}) = {MAX_MODEL_LEN + 1} exceeds the {MAX_MODEL_LEN} "
               f"tokens a request may hold (the KV memory it may use: {NUM_BLOCKS} blocks of {BLOCK_SIZE} tokens, "
               f"its instance's pool)")
    assert generated_status != 0 and f"megakv: error: {message}" in stderr.splitlines()
    assert served_status == 400 and body["error"]["message"] == message.replace("max_new_tokens", "max_tokens")
