"""The load generator's datasets: length distributions, random token prompts, ShareGPT and JSONL files."""
from __future__ import annotations

import asyncio
import json

import numpy as np
import pytest

from megakv.bench.datasets import (TOKEN_SOURCE_TEXT, LengthDistribution, document_requests, jsonl_requests,
                                   parse_length_distribution, random_requests, range_ratio_distribution,
                                   sharegpt_requests)


class ByteTokenizerAPI:
    """A stand-in for a server's /tokenize and /detokenize: one token per UTF-8 byte."""

    async def tokenize(self, text: str, model: str, what: str) -> list[int]:
        return list(text.encode())

    async def detokenize(self, token_ids: list[int], model: str, what: str) -> str:
        return bytes(token_ids).decode(errors="replace")


def test_parse_length_distribution_fixed_uniform_and_longtail():
    assert parse_length_distribution("fixed:7", "--x") == LengthDistribution((7, 7))
    assert parse_length_distribution("uniform:3:9", "--x") == LengthDistribution((3, 9))
    assert parse_length_distribution("longtail:16:64:1000:2000:0.1", "--x") == LengthDistribution(
        (16, 64), (1000, 2000), 0.1)


@pytest.mark.parametrize("spec", ["", "fixed", "fixed:0", "fixed:x", "uniform:9:3", "uniform:1", "gauss:1:2",
                                  "longtail:16:64:1000:2000:1.5", "longtail:16:64:1000:2000"])
def test_parse_length_distribution_bad_spec_names_the_flag_and_the_spec(spec):
    with pytest.raises(ValueError, match=f"--input-len-dist '{spec}'"):
        parse_length_distribution(spec, "--input-len-dist")


def test_length_distribution_longtail_has_its_exact_share_of_long_requests():
    rng = np.random.default_rng(0)
    lengths = LengthDistribution((16, 64), (1000, 2000), 0.1).sample(200, rng)
    assert sum(length >= 1000 for length in lengths) == 20
    assert all(16 <= length <= 64 or 1000 <= length <= 2000 for length in lengths)
    uniform = LengthDistribution((5, 8)).sample(2000, rng)
    assert set(uniform) == {5, 6, 7, 8}


def test_range_ratio_distribution_follows_vllm():
    assert range_ratio_distribution(100, 0.0, "--random-input-len") == LengthDistribution((100, 100))
    assert range_ratio_distribution(100, 0.5, "--random-input-len") == LengthDistribution((50, 150))
    with pytest.raises(ValueError, match="--random-range-ratio"):
        range_ratio_distribution(100, 1.0, "--random-input-len")
    with pytest.raises(ValueError, match="--random-output-len"):
        range_ratio_distribution(0, 0.0, "--random-output-len")


def test_random_requests_are_seeded_token_ids_of_the_drawn_lengths():
    lengths = LengthDistribution((4, 12), (40, 50), 0.25)

    def make(seed: int):
        return asyncio.run(random_requests(ByteTokenizerAPI(), "m", 8, lengths, LengthDistribution((3, 3)), seed,
                                           chat=False))

    requests = make(1)
    assert requests == make(1) and requests != make(2)
    assert sum(request.prompt_len >= 40 for request in requests) == 2
    # Every token is one the server's tokenizer produced for the source text.
    source_tokens = set(TOKEN_SOURCE_TEXT.encode())
    for request in requests:
        assert len(request.prompt) == request.prompt_len and request.output_len == 3
        assert set(request.prompt) <= source_tokens and all(type(token) is int for token in request.prompt)
    [chat] = asyncio.run(random_requests(ByteTokenizerAPI(), "m", 1, LengthDistribution((6, 6)),
                                         LengthDistribution((2, 2)), 0, chat=True))
    assert isinstance(chat.prompt, str) and len(chat.prompt) == 6 and chat.prompt_len is None


def test_document_requests_ask_about_every_document_before_any_follow_up():
    requests = asyncio.run(document_requests(ByteTokenizerAPI(), "m", 7, LengthDistribution((20, 30)), 3, 5,
                                             LengthDistribution((4, 4)), seed=0, chat=False))
    # 7 questions, 3 per document: 3 documents, asked in rounds; the last round is cut short.
    documents = [request.prompt[:-5] for request in requests[:3]]
    assert len({tuple(document) for document in documents}) == 3
    assert all(20 <= len(document) <= 30 for document in documents)
    for index, request in enumerate(requests):
        assert request.prompt[:-5] == documents[index % 3] and request.prompt_len == len(request.prompt)
        assert request.output_len == 4
    assert len({tuple(request.prompt[-5:]) for request in requests}) == 7


def test_sharegpt_requests_take_first_turns_and_filter_as_vllm(tmp_path):
    conversations = [
        {"conversations": [{"from": "human", "value": "hello there, model"}, {"from": "gpt", "value": "hi, human!"}]},
        {"conversations": [{"from": "human", "value": "ab"}, {"from": "gpt", "value": "too short a prompt"}]},
        {"conversations": [{"from": "human", "value": "x" * 1100}, {"from": "gpt", "value": "too long a prompt"}]},
        {"conversations": [{"from": "human", "value": "only one turn"}]},
        {"conversations": [{"from": "human", "value": "what is two and two"}, {"from": "gpt", "value": "four"}]},
    ]
    path = tmp_path / "sharegpt.json"
    path.write_text(json.dumps(conversations))
    requests = asyncio.run(sharegpt_requests(ByteTokenizerAPI(), "m", str(path), 2, 0, None))
    assert sorted((request.prompt, request.prompt_len, request.output_len) for request in requests) == [
        ("hello there, model", 18, 10), ("what is two and two", 19, 4)]
    fixed = asyncio.run(sharegpt_requests(ByteTokenizerAPI(), "m", str(path), 2, 0, 5))
    assert {request.output_len for request in fixed} == {5}
    with pytest.raises(ValueError, match="fewer than --num-prompts 3"):
        asyncio.run(sharegpt_requests(ByteTokenizerAPI(), "m", str(path), 3, 0, None))
    path.write_text("{}")
    with pytest.raises(ValueError, match="--dataset-path .*JSON list"):
        asyncio.run(sharegpt_requests(ByteTokenizerAPI(), "m", str(path), 1, 0, None))


def test_jsonl_requests_read_megakv_prompt_files_and_cycle(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text('{"prompt": "Hello", "max_tokens": 4}\n\n{"prompt_ids": [1, 2, 3], "instance": 1}\n')
    requests = jsonl_requests(str(path), 3, chat=False, default_output_len=9)
    assert [(r.prompt, r.prompt_len, r.output_len) for r in requests] == [
        ("Hello", None, 4), ([1, 2, 3], 3, 9), ("Hello", None, 4)]


@pytest.mark.parametrize("line, chat, message", [
    ('{"prompt": "a", "prompt_ids": [1]}', False, "exactly one of"),
    ('{"prompt": "a", "colour": 1}', False, "unknown key.*colour"),
    ('{"prompt_ids": [1]}', True, "--endpoint completions"),
    ('{"messages": [{"role": "user", "content": "hi"}]}', False, "need --endpoint chat"),
    ('{"prompt": "a", "max_tokens": 0}', False, "max_tokens must be"),
    ('{"prompt": ', False, "not valid JSON"),
])
def test_jsonl_requests_bad_line_names_file_and_line(tmp_path, line, chat, message):
    path = tmp_path / "prompts.jsonl"
    path.write_text('{"prompt": "fine"}\n' + line + "\n")
    with pytest.raises(ValueError, match=f"{path}:2: .*{message}"):
        jsonl_requests(str(path), 2, chat=chat, default_output_len=8)
