"""Requests as vLLM's clients send them: null as the default, the neutral values of what megakv does not do, and
the fields megakv implements, each with its effect checked (Hugging Face's processors and chat template, the
tokenizer, the response's own counts); /ping and /tokenizer_info."""
from __future__ import annotations

import json
import threading
import time

import httpx
import pytest
import torch
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

from megakv.bench.server_metrics import scrape, total

from server_process import CHAT_TEMPLATE

MAX_TOKENS = 8
PROMPT = [5, 80, 33, 120, 7, 64, 19]
CHAT = [{"role": "user", "content": "Hi there"}]


@pytest.fixture(scope="module")
def reference_tokenizer(chat_model) -> PreTrainedTokenizerFast:
    tokenizer = PreTrainedTokenizerFast.from_pretrained(chat_model[0])
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def post(server, route: str, body: dict) -> dict:
    response = httpx.post(f"{server.url}{route}", json=body, timeout=60)
    assert response.status_code == 200, response.text
    return response.json()


def complete(server, **fields) -> dict:
    body = {"model": "tiny", "prompt": PROMPT, "max_tokens": MAX_TOKENS, "temperature": 0, "ignore_eos": True,
            "return_token_ids": True, **fields}
    return post(server, "/v1/completions", body)


def chat(server, **fields) -> dict:
    body = {"model": "tiny", "messages": CHAT, "max_tokens": MAX_TOKENS, "temperature": 0, "ignore_eos": True,
            "return_token_ids": True, **fields}
    return post(server, "/v1/chat/completions", body)


def events(server, route: str, body: dict) -> list[dict]:
    """The JSON chunks of a streamed response, as sent (before the final [DONE])."""
    with httpx.stream("POST", f"{server.url}{route}", json=body, timeout=60) as response:
        assert response.status_code == 200
        lines = [line[len("data: "):] for line in response.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return [json.loads(line) for line in lines[:-1]]


# Fields a client may send that ask for nothing: the answer is the plain request's.
NEUTRAL_COMPLETION_FIELDS = [
    {"n": None}, {"stream": None}, {"presence_penalty": None}, {"frequency_penalty": None}, {"seed": None},
    {"stop": None}, {"logit_bias": None}, {"model": None}, {"max_tokens": 8.0}, {"n": 1.0}, {"seed": 0.0},
    {"skip_special_tokens": True}, {"include_stop_str_in_output": False}, {"min_p": 0}, {"min_tokens": 0},
    {"presence_penalty": 0}, {"frequency_penalty": 0.0}, {"repetition_penalty": 1}, {"logit_bias": {}},
    {"response_format": {"type": "text"}}, {"use_beam_search": False}, {"length_penalty": 1.0}, {"best_of": 1},
    {"spaces_between_special_tokens": True}, {"priority": 0}, {"cache_salt": "tenant-a"}, {"user": "u1"},
    {"suffix": None}, {"guided_json": None}, {"bad_words": []}, {"echo": False}, {"add_special_tokens": True},
    {"truncate_prompt_tokens": 100}, {"return_tokens_as_token_ids": False},
]
NEUTRAL_CHAT_FIELDS = [
    {"logprobs": None}, {"top_logprobs": None}, {"chat_template_kwargs": {}}, {"tools": []}, {"tool_choice": "none"},
    {"parallel_tool_calls": False}, {"add_generation_prompt": True}, {"continue_final_message": False},
    {"add_special_tokens": False}, {"echo": False}, {"max_completion_tokens": None}, {"documents": []},
    {"messages": [{"role": "user", "content": [{"type": "text", "text": "Hi there"}]}]},
]


def test_neutral_and_null_fields_answer_as_the_plain_request(server):
    plain = complete(server)["choices"][0]["token_ids"]
    for fields in NEUTRAL_COMPLETION_FIELDS:
        assert complete(server, **fields)["choices"][0]["token_ids"] == plain, fields
    plain_chat = chat(server)["choices"][0]["token_ids"]
    for fields in NEUTRAL_CHAT_FIELDS:
        assert chat(server, **fields)["choices"][0]["token_ids"] == plain_chat, fields
    # An assistant turn whose content is null (it only called tools, in OpenAI's schema) is empty text.
    turns = [*CHAT, {"role": "assistant", "content": ""}, *CHAT]
    empty = chat(server, messages=turns)["choices"][0]
    turns[1] = {"role": "assistant", "content": None}
    assert chat(server, messages=turns)["choices"][0]["token_ids"] == empty["token_ids"]


@pytest.mark.slow
def test_penalties_and_bias_equal_hugging_face_generate(server, chat_model):
    model = AutoModelForCausalLM.from_pretrained(chat_model[0], dtype=torch.float32).eval()
    plain = complete(server)["choices"][0]["token_ids"]
    biased = plain[1]
    served = complete(server, repetition_penalty=1.4, logit_bias={str(biased): 3.0})["choices"][0]["token_ids"]
    with torch.no_grad():
        generated = model.generate(torch.tensor([PROMPT]), max_new_tokens=MAX_TOKENS, do_sample=False,
                                   repetition_penalty=1.4, sequence_bias={(biased,): 3.0}, eos_token_id=None,
                                   pad_token_id=0)
    assert served == generated[0, len(PROMPT):].tolist() != plain


def test_logit_bias_and_allowed_token_ids_steer_every_token(server):
    forced = complete(server, logit_bias={"42": 100})["choices"][0]["token_ids"]
    assert forced == [42] * MAX_TOKENS
    allowed = [10, 11, 12]
    sampled = complete(server, allowed_token_ids=allowed, temperature=1.0, seed=3, min_p=0.1)
    assert set(sampled["choices"][0]["token_ids"]) <= set(allowed)


def test_frequency_penalty_spreads_the_tokens_of_a_forced_loop(server):
    # A bias makes token 42 win every step; a frequency penalty large enough takes it down after it repeats.
    tokens = complete(server, logit_bias={"42": 8.0}, frequency_penalty=2.0)["choices"][0]["token_ids"]
    assert tokens[0] == 42 and tokens != [42] * MAX_TOKENS


def test_min_tokens_holds_back_a_stop_token(server):
    plain = complete(server)["choices"][0]["token_ids"]
    stop = plain[0]
    early = complete(server, stop_token_ids=[stop], ignore_eos=False)["choices"][0]
    assert early["token_ids"] == [stop] and early["stop_reason"] == stop
    held = complete(server, stop_token_ids=[stop], ignore_eos=False, min_tokens=3)["choices"][0]
    assert stop not in held["token_ids"][:3] and len(held["token_ids"]) >= 3


def test_include_stop_str_in_output_keeps_the_stop_string(server, reference_tokenizer):
    plain = complete(server, max_tokens=24)["choices"][0]
    text = plain["text"]
    stop = next(text[index:index + 2] for index in range(2, len(text) - 2) if text[index:index + 2].isprintable())
    cut = text.index(stop)
    without = complete(server, max_tokens=24, stop=[stop])["choices"][0]
    kept = complete(server, max_tokens=24, stop=[stop], include_stop_str_in_output=True)["choices"][0]
    assert without["text"] == text[:cut] and kept["text"] == text[:cut + len(stop)]
    assert kept["stop_reason"] == stop == without["stop_reason"]


def test_skip_special_tokens_false_keeps_their_text(server, reference_tokenizer):
    eos = reference_tokenizer.eos_token_id
    body = {"logit_bias": {str(eos): 100}, "max_tokens": 3}
    assert complete(server, **body)["choices"][0]["text"] == ""
    assert complete(server, **body, skip_special_tokens=False)["choices"][0]["text"] == \
        reference_tokenizer.eos_token * 3


def test_stream_usage_is_null_until_the_last_chunk_or_continuous(server):
    body = {"model": "tiny", "prompt": PROMPT, "max_tokens": MAX_TOKENS, "temperature": 0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}
    chunks = events(server, "/v1/completions", body)
    assert all("usage" in chunk and chunk["usage"] is None for chunk in chunks[:-1])
    assert chunks[-1]["usage"]["completion_tokens"] == MAX_TOKENS
    body["stream_options"]["continuous_usage_stats"] = True
    chunks = events(server, "/v1/chat/completions", {**body, "prompt": None, "messages": CHAT})
    counts = [chunk["usage"]["completion_tokens"] for chunk in chunks]
    assert counts == sorted(counts) and counts[0] == 0 and counts[-1] == MAX_TOKENS
    assert all(chunk["usage"]["prompt_tokens"] == chunks[-1]["usage"]["prompt_tokens"] for chunk in chunks)


def test_request_id_names_the_response_even_when_reused(server):
    answers = []
    threads = [threading.Thread(target=lambda: answers.append(complete(server, request_id="job-7"))) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert [answer["id"] for answer in answers] == ["cmpl-job-7", "cmpl-job-7"]
    assert answers[0]["choices"][0]["token_ids"] == answers[1]["choices"][0]["token_ids"]


def test_truncate_prompt_tokens_keeps_the_last_tokens(server):
    truncated = complete(server, truncate_prompt_tokens=4)
    assert truncated["usage"]["prompt_tokens"] == 4
    assert truncated["choices"][0]["prompt_token_ids"] == PROMPT[-4:]
    assert truncated["choices"][0]["token_ids"] == complete(server, prompt=PROMPT[-4:])["choices"][0]["token_ids"]


def test_return_tokens_as_token_ids_names_logprob_tokens_by_id(server):
    answer = complete(server, logprobs=2, return_tokens_as_token_ids=True)["choices"][0]
    assert answer["logprobs"]["tokens"] == [f"token_id:{token}" for token in answer["token_ids"]]
    assert all(key.startswith("token_id:") for top in answer["logprobs"]["top_logprobs"] for key in top)
    content = chat(server, logprobs=True, top_logprobs=1, return_tokens_as_token_ids=True)["choices"][0]
    assert [entry["token"] for entry in content["logprobs"]["content"]] == \
        [f"token_id:{token}" for token in content["token_ids"]]


def test_chat_template_options_render_as_transformers(server, reference_tokenizer):
    conversation = [*CHAT, {"role": "assistant", "content": "Hello, I am"}]
    cases = [({"add_generation_prompt": False, "continue_final_message": True}, conversation),
             ({"add_generation_prompt": False}, CHAT),
             ({"chat_template_kwargs": {"add_generation_prompt": False}}, CHAT),
             ({"add_special_tokens": True}, CHAT)]
    for options, messages in cases:
        expected = reference_tokenizer.apply_chat_template(
            messages, add_generation_prompt=options.get("add_generation_prompt", True) and not options.get(
                "chat_template_kwargs"), continue_final_message=options.get("continue_final_message", False),
            tokenize=False)
        expected_ids = reference_tokenizer.encode(expected, add_special_tokens=options.get("add_special_tokens", False))
        tokenized = post(server, "/tokenize", {"messages": messages, **options})
        assert tokenized["tokens"] == expected_ids, options
        answer = chat(server, messages=messages, **options)["choices"][0]
        assert answer["prompt_token_ids"] == expected_ids, options


def test_ping_and_tokenizer_info(server, reference_tokenizer):
    for method in ("GET", "POST"):
        assert httpx.request(method, f"{server.url}/ping", timeout=30).status_code == 200
    info = httpx.get(f"{server.url}/tokenizer_info", timeout=30).json()
    assert info["eos_token"] == reference_tokenizer.eos_token and info["bos_token"] == reference_tokenizer.bos_token
    assert info["chat_template"] == CHAT_TEMPLATE
    models = httpx.get(f"{server.url}/v1/models", timeout=30).json()
    assert info["model_max_length"] == models["data"][0]["max_model_len"]


def abort_count(server) -> float:
    return total(scrape(server.url), "megakv:request_success_total", finished_reason="abort")


def test_a_client_that_leaves_counts_as_an_aborted_request(server):
    before = abort_count(server)
    # Long enough that the request is still running when the client leaves.
    body = {"model": "tiny", "prompt": PROMPT, "max_tokens": 900, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=60) as response:
        next(response.iter_lines())
    deadline = time.monotonic() + 30
    while abort_count(server) != before + 1:
        assert time.monotonic() < deadline, "the abort was not counted within 30 s"
        time.sleep(0.1)


def test_n_samples_share_their_prompt_prefill_and_usage_counts_cached_tokens(server):
    prompt = [(11 * index) % 250 + 2 for index in range(70)]  # 4 full blocks of 16 tokens, and 6 more
    before = scrape(server.url)
    answer = complete(server, prompt=prompt, n=3)
    after = scrape(server.url)
    assert len({tuple(choice["token_ids"]) for choice in answer["choices"]}) == 1
    # The first sample computed the prompt; the other two reused its 64 tokens of full blocks.
    hits = total(after, "megakv:prefix_cache_hits_total") - total(before, "megakv:prefix_cache_hits_total")
    queries = total(after, "megakv:prefix_cache_queries_total") - total(before, "megakv:prefix_cache_queries_total")
    assert (hits, queries) == (2 * 64, 3 * 70)
    assert answer["usage"]["prompt_tokens_details"] == {"cached_tokens": 0}
    again = complete(server, prompt=prompt)
    assert again["usage"]["prompt_tokens_details"] == {"cached_tokens": 64}
    assert again["choices"][0]["token_ids"] == answer["choices"][0]["token_ids"]
    assert total(after, "megakv:kv_blocks_cached") >= 4


def test_n_echo_samples_share_the_first_samples_prompt_logprobs(server):
    prompt = [(13 * index) % 240 + 5 for index in range(40)]
    single = complete(server, prompt=prompt, echo=True, logprobs=1, max_tokens=2)["choices"][0]["logprobs"]
    before = scrape(server.url)
    many = complete(server, prompt=prompt, echo=True, logprobs=1, max_tokens=2, n=3)["choices"]
    hits = total(scrape(server.url), "megakv:prefix_cache_hits_total") - total(before, "megakv:prefix_cache_hits_total")
    # The other two samples reused the first one's 2 full blocks (it computed every prompt position's logits).
    assert hits == 2 * 32
    for choice in many:
        echoed = choice["logprobs"]
        assert echoed["tokens"][:40] == single["tokens"][:40] and echoed["token_logprobs"][0] is None
        assert echoed["token_logprobs"][1:40] == pytest.approx(single["token_logprobs"][1:40], abs=1e-5)
        top_tokens = [list(top) for top in echoed["top_logprobs"][1:40]]
        assert top_tokens == [list(top) for top in single["top_logprobs"][1:40]]
