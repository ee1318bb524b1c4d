"""The prompts of a serving benchmark: random token ids with chosen length distributions, questions about long
documents (a shared-prefix workload), ShareGPT, or JSONL.

Every dataset is drawn from ``--seed`` alone, so two servers given the same flags get the
same requests. Random prompts are token ids drawn from the tokens of a fixed English text
as the server's /tokenize splits it (so they are ids the server's vocabulary holds and its
tokenizer produces), sent as token-id prompts to /v1/completions, or as their text (the
server's /detokenize) to /v1/chat/completions. ShareGPT files are read and filtered as
``vllm bench serve`` does.
"""
from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from typing import Any

import numpy as np

from megakv.bench.client import ServerAPI

# The text whose tokens random prompts are drawn from: common words, so that every tokenizer has them.
TOKEN_SOURCE_TEXT = (
    "The quick brown fox jumps over the lazy dog. A long context is cut into blocks of tokens, and each block "
    "may live on another machine. Serving many requests at once needs memory for every token that was read or "
    "written. When one instance runs out of room, it can borrow free blocks from the others, and give them back "
    "when the request is done. Numbers like 12, 345 and 6789 appear in text as well as names, places and dates.")
# vLLM's ShareGPT filter: shorter prompts or replies are noise, longer ones outgrow a 2K-context model.
SHAREGPT_MIN_TOKENS = 4
SHAREGPT_MAX_PROMPT_TOKENS = 1024
SHAREGPT_MAX_TOTAL_TOKENS = 2048
# /tokenize calls in flight at once while a ShareGPT file is measured.
TOKENIZE_BATCH = 32
# Keys of a JSONL line that choose the prompt, and the ones that set its output length.
JSONL_PROMPT_KEYS = ("prompt", "prompt_ids", "messages")
JSONL_LENGTH_KEYS = ("max_tokens", "max_new_tokens")
# Keys of megakv's prompts files that a load test does not use: sampling and routing come from the flags.
JSONL_IGNORED_KEYS = ("instance", "temperature", "top_k", "top_p", "seed")


@dataclass(frozen=True)
class BenchRequest:
    """One request of the benchmark."""

    # Text, token ids (completions only) or chat messages (chat only).
    prompt: str | list[int] | list[dict[str, Any]]
    # Prompt tokens when known before sending (None: the server's usage will tell).
    prompt_len: int | None
    # max_tokens asked for.
    output_len: int


@dataclass(frozen=True)
class LengthDistribution:
    """Token lengths: uniform over ``short`` (inclusive), except a ``long_fraction`` share uniform over ``long``."""

    short: tuple[int, int]
    long: tuple[int, int] | None = None
    long_fraction: float = 0.0

    def sample(self, num: int, rng: np.random.Generator) -> list[int]:
        """``num`` lengths; exactly round(long_fraction * num) of them long, at random places."""
        lengths = rng.integers(self.short[0], self.short[1] + 1, size=num)
        if self.long is not None:
            num_long = round(self.long_fraction * num)
            places = rng.choice(num, size=num_long, replace=False)
            lengths[places] = rng.integers(self.long[0], self.long[1] + 1, size=num_long)
        return lengths.tolist()


def _positive_int(text: str, flag: str, spec: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise ValueError(f"{flag} {spec!r}: {text!r} is not a positive whole number of tokens")
    return value


def _token_range(low: str, high: str, flag: str, spec: str) -> tuple[int, int]:
    bounds = (_positive_int(low, flag, spec), _positive_int(high, flag, spec))
    if bounds[0] > bounds[1]:
        raise ValueError(f"{flag} {spec!r}: the range {bounds[0]}..{bounds[1]} is empty")
    return bounds


def parse_length_distribution(spec: str, flag: str) -> LengthDistribution:
    """``fixed:N``, ``uniform:LO:HI`` or ``longtail:LO:HI:LONG_LO:LONG_HI:FRACTION``; ValueError naming ``flag``."""
    kind, *fields = spec.split(":")
    expected = {"fixed": 1, "uniform": 2, "longtail": 5}
    if kind not in expected or len(fields) != expected[kind]:
        raise ValueError(f"{flag} {spec!r}: expected fixed:N, uniform:LO:HI or "
                         f"longtail:LO:HI:LONG_LO:LONG_HI:FRACTION (lengths in tokens)")
    if kind == "fixed":
        length = _positive_int(fields[0], flag, spec)
        return LengthDistribution((length, length))
    if kind == "uniform":
        return LengthDistribution(_token_range(*fields, flag, spec))
    try:
        fraction = float(fields[4])
    except ValueError:
        fraction = -1.0
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"{flag} {spec!r}: the long share {fields[4]!r} must be a fraction from 0 to 1")
    return LengthDistribution(_token_range(fields[0], fields[1], flag, spec),
                              _token_range(fields[2], fields[3], flag, spec), fraction)


def range_ratio_distribution(length: int, range_ratio: float, flag: str) -> LengthDistribution:
    """vLLM's --random-*-len with --random-range-ratio: uniform over length * [1 - ratio, 1 + ratio]."""
    if length < 1:
        raise ValueError(f"{flag} must be at least 1, got {length}")
    if not 0.0 <= range_ratio < 1.0:
        raise ValueError(f"--random-range-ratio must be from 0 to below 1, got {range_ratio}")
    return LengthDistribution((max(1, int(length * (1 - range_ratio))), int(length * (1 + range_ratio))))


async def random_requests(api: ServerAPI, model: str, num: int, input_lengths: LengthDistribution,
                          output_lengths: LengthDistribution, seed: int, chat: bool) -> list[BenchRequest]:
    """Random prompts of the drawn lengths, from the server's tokens of TOKEN_SOURCE_TEXT."""
    what = "--dataset random draws its prompt tokens from the server's tokenizer"
    token_pool = sorted(set(await api.tokenize(TOKEN_SOURCE_TEXT, model, what)))
    rng = np.random.default_rng(seed)
    prompt_lens = input_lengths.sample(num, rng)
    output_lens = output_lengths.sample(num, rng)
    prompts = [rng.choice(token_pool, size=length).tolist() for length in prompt_lens]
    if chat:
        # A chat request carries text: its length after the chat template is what the server's usage reports.
        texts = await asyncio.gather(*(api.detokenize(ids, model, what) for ids in prompts))
        return [BenchRequest(text, None, out) for text, out in zip(texts, output_lens)]
    return [BenchRequest(ids, len(ids), out) for ids, out in zip(prompts, output_lens)]


async def document_requests(api: ServerAPI, model: str, num: int, document_lengths: LengthDistribution,
                            questions_per_document: int, question_len: int, output_lengths: LengthDistribution,
                            seed: int, chat: bool) -> list[BenchRequest]:
    """Questions about long documents (a shared-prefix workload): each prompt is a document's tokens and then a
    question's, drawn as random prompts are. Request i asks about document i mod D (D = num / questions per
    document, rounded up), so every document's first question comes before any follow-up about it."""
    what = "--dataset documents draws its tokens from the server's tokenizer"
    token_pool = sorted(set(await api.tokenize(TOKEN_SOURCE_TEXT, model, what)))
    rng = np.random.default_rng(seed)
    num_documents = -(-num // questions_per_document)
    documents = [rng.choice(token_pool, size=length).tolist() for length in document_lengths.sample(num_documents, rng)]
    output_lens = output_lengths.sample(num, rng)
    prompts = [documents[index % num_documents] + rng.choice(token_pool, size=question_len).tolist()
               for index in range(num)]
    if chat:
        texts = await asyncio.gather(*(api.detokenize(ids, model, what) for ids in prompts))
        return [BenchRequest(text, None, out) for text, out in zip(texts, output_lens)]
    return [BenchRequest(ids, len(ids), out) for ids, out in zip(prompts, output_lens)]


def _sharegpt_pairs(path: str) -> list[tuple[str, str]]:
    try:
        with open(path) as f:
            records = json.load(f)
    except OSError as err:
        raise ValueError(f"cannot read --dataset-path {path}: {err.strerror}") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"--dataset-path {path} is not valid JSON ({err.msg} at line {err.lineno})") from None
    if not isinstance(records, list):
        raise ValueError(f"--dataset-path {path}: a ShareGPT file is a JSON list of {{\"conversations\": [...]}}")
    pairs = []
    for record in records:
        turns = record.get("conversations") if isinstance(record, dict) else None
        if isinstance(turns, list) and len(turns) >= 2 and all(isinstance(turn, dict) for turn in turns[:2]):
            prompt, reply = turns[0].get("value"), turns[1].get("value")
            if isinstance(prompt, str) and isinstance(reply, str):
                pairs.append((prompt, reply))
    return pairs


async def sharegpt_requests(api: ServerAPI, model: str, path: str, num: int, seed: int,
                            fixed_output_len: int | None) -> list[BenchRequest]:
    """The first ``num`` conversations (seeded shuffle) that pass vLLM's length filter: first turn as the
    prompt, the second turn's token count as the output length unless ``fixed_output_len``."""
    pairs = _sharegpt_pairs(path)
    np.random.default_rng(seed).shuffle(pairs)
    what = "--dataset sharegpt measures prompts and replies with the server's tokenizer"
    requests: list[BenchRequest] = []
    for start in range(0, len(pairs), TOKENIZE_BATCH):
        batch = pairs[start:start + TOKENIZE_BATCH]
        texts = [text for pair in batch for text in pair]
        counts = [len(ids) for ids in await asyncio.gather(*(api.tokenize(t, model, what) for t in texts))]
        for (prompt, _), prompt_len, reply_len in zip(batch, counts[::2], counts[1::2]):
            output_len = reply_len if fixed_output_len is None else fixed_output_len
            too_short = prompt_len < SHAREGPT_MIN_TOKENS or (fixed_output_len is None
                                                             and output_len < SHAREGPT_MIN_TOKENS)
            too_long = prompt_len > SHAREGPT_MAX_PROMPT_TOKENS or prompt_len + output_len > SHAREGPT_MAX_TOTAL_TOKENS
            if not too_short and not too_long:
                requests.append(BenchRequest(prompt, prompt_len, output_len))
            if len(requests) == num:
                return requests
    raise ValueError(f"--dataset-path {path}: only {len(requests)} of its {len(pairs)} conversations have a prompt "
                     f"of {SHAREGPT_MIN_TOKENS}-{SHAREGPT_MAX_PROMPT_TOKENS} tokens and at most "
                     f"{SHAREGPT_MAX_TOTAL_TOKENS} with the reply, fewer than --num-prompts {num}")


def _jsonl_request(record: Any, where: str, chat: bool, default_output_len: int) -> BenchRequest:
    if not isinstance(record, dict) or sum(key in record for key in JSONL_PROMPT_KEYS) != 1:
        raise ValueError(f"{where}: each line needs exactly one of {', '.join(JSONL_PROMPT_KEYS)}")
    unknown = sorted(set(record) - {*JSONL_PROMPT_KEYS, *JSONL_LENGTH_KEYS, *JSONL_IGNORED_KEYS})
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {', '.join(unknown)}")
    lengths = [record[key] for key in JSONL_LENGTH_KEYS if key in record]
    output_len = lengths[0] if lengths else default_output_len
    if not isinstance(output_len, int) or isinstance(output_len, bool) or output_len < 1:
        raise ValueError(f"{where}: max_tokens must be a whole number >= 1, got {output_len!r}")
    if "prompt_ids" in record:
        ids = record["prompt_ids"]
        if not isinstance(ids, list) or not ids or not all(type(t) is int for t in ids):
            raise ValueError(f"{where}: prompt_ids must be a non-empty list of integers")
        if chat:
            raise ValueError(f"{where}: prompt_ids cannot go to --endpoint chat, which takes text: "
                             f"use --endpoint completions")
        return BenchRequest(ids, len(ids), output_len)
    if "messages" in record:
        messages = record["messages"]
        if not chat:
            raise ValueError(f"{where}: messages need --endpoint chat")
        if not isinstance(messages, list) or not messages or not all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                for m in messages):
            raise ValueError(f"{where}: messages must be a non-empty list of {{\"role\": ..., \"content\": ...}}")
        return BenchRequest(messages, None, output_len)
    if not isinstance(record["prompt"], str) or not record["prompt"]:
        raise ValueError(f"{where}: prompt must be a non-empty string")
    return BenchRequest(record["prompt"], None, output_len)


def jsonl_requests(path: str, num: int, chat: bool, default_output_len: int) -> list[BenchRequest]:
    """The first ``num`` lines of a JSONL file of prompts (megakv's prompts-file keys, or prompt/max_tokens);
    a file with fewer lines is cycled through again."""
    try:
        with open(path) as f:
            lines = [(number, line) for number, line in enumerate(f, 1) if line.strip()]
    except OSError as err:
        raise ValueError(f"cannot read --dataset-path {path}: {err.strerror}") from None
    if not lines:
        raise ValueError(f"--dataset-path {path} holds no prompt")
    requests = []
    for number, line in lines[:num]:
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}:{number}: not valid JSON ({err.msg})") from None
        requests.append(_jsonl_request(record, f"{path}:{number}", chat, default_output_len))
    return [requests[index % len(requests)] for index in range(num)]
