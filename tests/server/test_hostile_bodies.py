"""Hostile bodies (found by fuzzing and by hand): each gets its status and an OpenAI-style error body, never a
plain-text 500 or a dead engine; afterwards the server answers as before, with every block free."""
from __future__ import annotations

import json
import subprocess
import sys
import time

import httpx
import pytest

from megakv.bench.server_metrics import total

from server_process import spawn_server, wait_for_idle_pools

NUM_BLOCKS = 64
MAX_BYTES, MAX_PROMPTS, MAX_CHOICES, MAX_TOKENS = 1_000_000, 8, 16, 4096
NORMAL = {"model": "tiny", "prompt": "Hello there", "max_tokens": 6, "temperature": 0}
CHAT = [{"role": "user", "content": "Hi"}]


@pytest.fixture(scope="module")
def server(chat_model):
    server = spawn_server(chat_model[1], "--num-blocks", str(NUM_BLOCKS), "--served-model-name", "tiny",
                          "--max-request-bytes", str(MAX_BYTES), "--max-prompts-per-request", str(MAX_PROMPTS),
                          "--max-choices-per-request", str(MAX_CHOICES), "--max-request-tokens", str(MAX_TOKENS))
    yield server
    server.kill()


def raw(text: str) -> bytes:
    return text.encode("utf-8")


# (route, body bytes, status, a fragment of the error message or None for a served request)
HOSTILE = [
    ("/v1/completions", raw('{"model":"tiny","prompt":"Hi","max_tokens":5,"temperature":1e-40}'), 200, None),
    ("/v1/completions", raw('{"model":"tiny","prompt":"Hi","max_tokens":5,"temperature":1,"top_p":1e-320}'),
     200, None),
    ("/v1/completions", raw('{"model":"tiny","prompt":"Hi","max_tokens":2,"n":2.0,"seed":0.0,"temperature":1}'),
     200, None),
    ("/v1/completions", raw('{"model":"tiny","prompt":"Hi","n":2.5}'), 400, "invalid value for 'n'"),
    ("/v1/completions", raw('{"model":"tiny","prompt":"\\ud800"}'), 400, "lone UTF-16 surrogate"),
    ("/v1/completions", b'{"model":"tiny","prompt":"\xed\xa0\x80"}', 400, "not UTF-8"),
    ("/v1/chat/completions", raw('{"model":"tiny","messages":[{"role":"user","content":"a\\udfff"}]}'), 400,
     "'messages.0.content': it holds a lone UTF-16 surrogate"),
    ("/v1/chat/completions", raw('{"model":"tiny","messages":[{"role":"\\ud800","content":"a"}]}'), 400,
     "'messages.0.role'"),
    ("/v1/completions", raw('{"model":"tiny","prompt":"x","\\ud800":1}'), 400, "lone UTF-16 surrogate"),
    ("/tokenize", raw('{"prompt":"\\ud800"}'), 400, "lone UTF-16 surrogate"),
    ("/v1/completions", raw('{"model":"tiny","prompt":' + "[" * 5000 + "]" * 5000 + "}"), 400, "nested too deeply"),
    ("/v1/completions", raw('{"model":"tiny","prompt":"x","max_tokens":' + "9" * 5000 + "}"), 400,
     "not valid JSON"),
    ("/v1/completions", raw(json.dumps({"model": "tiny", "prompt": "x" * MAX_BYTES})), 413, "--max-request-bytes"),
    ("/v1/completions", raw(json.dumps({"model": "tiny", "prompt": ["x"] * (MAX_PROMPTS + 1)})), 400,
     "--max-prompts-per-request"),
    ("/v1/completions", raw(json.dumps({"model": "tiny", "prompt": ["x"] * 4, "n": 5})), 400,
     "--max-choices-per-request"),
    ("/v1/completions", raw(json.dumps({"model": "tiny", "prompt": [1] * 100, "max_tokens": 200, "n": 16})), 400,
     "--max-request-tokens"),
    ("/tokenize", raw(json.dumps({"prompt": "ab " * MAX_TOKENS})), 400, "--max-request-tokens"),
    ("/v1/completions", raw(json.dumps({"model": "tiny", "prompt": "ab " * 2000})), 400,
     "and a request may hold at most 1024"),
]


def post(server, route: str, content: bytes) -> httpx.Response:
    return httpx.post(f"{server.url}{route}", content=content, headers={"content-type": "application/json"},
                      timeout=60)


@pytest.mark.parametrize("route, content, status, message", HOSTILE,
                         ids=[f"{index}-{case[0]}" for index, case in enumerate(HOSTILE)])
def test_hostile_body_gets_its_status_and_a_json_error(server, route, content, status, message):
    response = post(server, route, content)
    assert response.status_code == status, response.text[:2000]
    if message is None:
        assert all(choice["finish_reason"] in ("stop", "length") for choice in response.json()["choices"])
        return
    error = response.json()["error"]
    assert message in error["message"] and error["code"] == status, error


def test_method_not_allowed_names_the_allowed_methods(server):
    response = httpx.get(f"{server.url}/v1/completions", timeout=30)
    assert response.status_code == 405 and response.headers["allow"] == "POST"
    assert response.json()["error"]["type"] == "MethodNotAllowedError"


def test_server_answers_as_before_after_hostile_bodies_with_every_block_free(server):
    before = post(server, "/v1/completions", raw(json.dumps(NORMAL))).json()["choices"][0]["text"]
    for route, content, _, _ in HOSTILE:
        post(server, route, content)
    assert post(server, "/v1/completions", raw(json.dumps(NORMAL))).json()["choices"][0]["text"] == before
    assert total(wait_for_idle_pools(server.url), "megakv:kv_blocks_free") == NUM_BLOCKS


# The client posts from a process of its own: in this one it would share the GIL with the /health loop.
POST_10_MB = """
import json, sys, httpx
body = json.dumps({"model": "tiny", "prompt": "The grass is green. " * 500_000})  # 10 MB
response = httpx.post(sys.argv[1] + "/v1/completions", content=body, timeout=300,
                      headers={"content-type": "application/json"})
print(json.dumps({"status": response.status_code, "body": response.json()}))
"""


@pytest.mark.slow
def test_health_answers_quickly_while_a_10_mb_prompt_is_tokenized(chat_model):
    server = spawn_server(chat_model[1], "--num-blocks", str(NUM_BLOCKS), "--served-model-name", "tiny")
    try:
        sender = subprocess.Popen([sys.executable, "-c", POST_10_MB, server.url], stdout=subprocess.PIPE, text=True)
        latencies = []
        deadline = time.monotonic() + 240
        # One client for every probe: a new one per call would time its own setup (an SSL context) too.
        with httpx.Client(timeout=10) as client:
            while sender.poll() is None and time.monotonic() < deadline:
                started = time.perf_counter()
                assert client.get(f"{server.url}/health").status_code == 200
                latencies.append(time.perf_counter() - started)
                time.sleep(0.05)
        answer = json.loads(sender.communicate(timeout=60)[0])
        assert answer["status"] == 400 and "a request may hold at most" in answer["body"]["error"]["message"]
        assert len(latencies) >= 5 and max(latencies) < 0.1, sorted(latencies)[-10:]
    finally:
        server.kill()
