"""Logprobs through the real openai client: greedy decoding's logprobs equal log_softmax of Hugging Face's logits
(fp32) at each step, and the top logprobs are Hugging Face's top-k, in order."""
from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

MAX_TOKENS, NUM_TOP = 8, 5


@pytest.fixture(scope="module")
def tokenizer(chat_model) -> PreTrainedTokenizerFast:
    return PreTrainedTokenizerFast.from_pretrained(chat_model[0])


def hf_logprobs(hf_dir, prompt_ids: list[int], output_ids: list[int]) -> torch.Tensor:
    """log_softmax of Hugging Face's fp32 logits [len(output_ids), vocab] at each generated position."""
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(torch.tensor([prompt_ids + output_ids])).logits[0]  # [S, vocab]
    return torch.log_softmax(logits[len(prompt_ids) - 1:-1], dim=-1)


def check_completion_logprobs(logprobs, token_ids: list[int], expected: torch.Tensor, tokenizer,
                              first_scored: int = 0) -> None:
    """A completion's ``logprobs`` over ``token_ids``: each token's text and offset; from ``first_scored`` on
    (before it, None), the token's logprob and the top ones equal ``expected``, HF's log_softmax rows of the
    scored tokens [N, vocab]."""
    assert logprobs.tokens == [tokenizer.decode([token]) for token in token_ids]
    assert logprobs.token_logprobs[:first_scored] == logprobs.top_logprobs[:first_scored] == [None] * first_scored
    torch.testing.assert_close(torch.tensor(logprobs.token_logprobs[first_scored:]),
                               expected.gather(1, torch.tensor(token_ids[first_scored:])[:, None])[:, 0],
                               atol=1e-4, rtol=0)
    for row, top in enumerate(logprobs.top_logprobs[first_scored:]):
        values, ids = expected[row].topk(NUM_TOP)
        # Keyed by text, as vLLM's: tokens with the same text (bytes that are not UTF-8 alone) share a key.
        reference = {tokenizer.decode([token]): value for token, value in zip(ids.tolist(), values.tolist())}
        assert top.keys() == reference.keys()
        torch.testing.assert_close(torch.tensor(list(top.values())), torch.tensor(list(reference.values())),
                                   atol=1e-4, rtol=0)
    lengths = [len(token) for token in logprobs.tokens]
    assert logprobs.text_offset == [sum(lengths[:index]) for index in range(len(lengths))]


def test_completions_logprobs_equal_hugging_face(client, chat_model, tokenizer):
    prompt_ids = [5, 80, 33, 120, 7]
    choice = client.completions.create(model="tiny", prompt=prompt_ids, max_tokens=MAX_TOKENS, temperature=0,
                                       logprobs=NUM_TOP, extra_body={"return_token_ids": True,
                                                                     "ignore_eos": True}).choices[0]
    expected = hf_logprobs(chat_model[0], prompt_ids, choice.token_ids)
    assert choice.token_ids == expected.argmax(-1).tolist()
    logprobs = choice.logprobs
    check_completion_logprobs(logprobs, choice.token_ids, expected, tokenizer)

    chunks = list(client.completions.create(model="tiny", prompt=prompt_ids, max_tokens=MAX_TOKENS, temperature=0,
                                            logprobs=NUM_TOP, stream=True, extra_body={"ignore_eos": True}))
    streamed = [chunk.choices[0].logprobs for chunk in chunks if chunk.choices[0].logprobs is not None]
    assert sum((part.tokens for part in streamed), []) == logprobs.tokens
    assert sum((part.token_logprobs for part in streamed), []) == logprobs.token_logprobs
    assert sum((part.text_offset for part in streamed), []) == logprobs.text_offset


def test_chat_logprobs_equal_hugging_face_top_k_in_order(client, chat_model, tokenizer):
    messages = [{"role": "user", "content": "Hi there"}]
    response = client.chat.completions.create(model="tiny", messages=messages, max_tokens=MAX_TOKENS,
                                              temperature=0, logprobs=True, top_logprobs=NUM_TOP,
                                              extra_body={"return_token_ids": True, "ignore_eos": True})
    choice = response.choices[0]
    expected = hf_logprobs(chat_model[0], choice.prompt_token_ids, choice.token_ids)
    content = choice.logprobs.content
    assert len(content) == len(choice.token_ids)
    # A token's bytes are its own, also when it holds part of a character: together they spell the text (which
    # shows U+FFFD where this random model's bytes are not UTF-8).
    spelled = bytes(sum((entry.bytes for entry in content), [])).decode("utf-8", errors="replace")
    assert spelled == tokenizer.decode(choice.token_ids)
    for step, (token, entry) in enumerate(zip(choice.token_ids, content)):
        text = tokenizer.decode([token])
        assert entry.token == text
        if "\ufffd" not in text:
            assert entry.bytes == list(text.encode("utf-8"))
        assert entry.logprob == pytest.approx(expected[step, token].item(), abs=1e-4)
        values, ids = expected[step].topk(NUM_TOP)
        assert [top.token for top in entry.top_logprobs] == [tokenizer.decode([top]) for top in ids.tolist()]
        assert [top.logprob for top in entry.top_logprobs] == pytest.approx(values.tolist(), abs=1e-4)

    chunks = list(client.chat.completions.create(model="tiny", messages=messages, max_tokens=MAX_TOKENS,
                                                 temperature=0, logprobs=True, top_logprobs=NUM_TOP, stream=True,
                                                 extra_body={"ignore_eos": True}))
    streamed = [entry for chunk in chunks if chunk.choices and chunk.choices[0].logprobs
                for entry in chunk.choices[0].logprobs.content]
    # The same tokens; logprobs equal up to summation order: the resent prompt's prefix is cached, so its last
    # tokens run as a smaller batch, which the linear layers sum in another order than the first request's GEMM.
    assert [entry.token for entry in streamed] == [entry.token for entry in content]
    for got, sent in zip(streamed, content):
        assert [top.token for top in got.top_logprobs] == [top.token for top in sent.top_logprobs]
        assert [got.logprob] + [top.logprob for top in got.top_logprobs] == pytest.approx(
            [sent.logprob] + [top.logprob for top in sent.top_logprobs], abs=1e-5)
    plain = client.chat.completions.create(model="tiny", messages=messages, max_tokens=2, temperature=0,
                                           logprobs=True)
    assert all(entry.top_logprobs == [] for entry in plain.choices[0].logprobs.content)


def test_completions_echo_with_logprobs_scores_the_prompt_as_hugging_face(client, chat_model, tokenizer):
    prompt_ids = [5, 80, 33, 120, 7, 64, 9]
    choice = client.completions.create(model="tiny", prompt=prompt_ids, max_tokens=3, temperature=0, echo=True,
                                       logprobs=NUM_TOP, extra_body={"return_token_ids": True,
                                                                     "ignore_eos": True}).choices[0]
    token_ids = prompt_ids + choice.token_ids
    # Every token after the first is scored: the rows that predict them from the first one on.
    expected = hf_logprobs(chat_model[0], token_ids[:1], token_ids[1:])
    logprobs = choice.logprobs
    # As vLLM: the first prompt token has no context, so no logprobs.
    check_completion_logprobs(logprobs, token_ids, expected, tokenizer, first_scored=1)

    chunks = list(client.completions.create(model="tiny", prompt=prompt_ids, max_tokens=3, temperature=0, echo=True,
                                            logprobs=NUM_TOP, stream=True, extra_body={"ignore_eos": True}))
    assert "".join(chunk.choices[0].text for chunk in chunks) == choice.text
    streamed = [chunk.choices[0].logprobs for chunk in chunks if chunk.choices[0].logprobs is not None]
    assert sum((part.tokens for part in streamed), []) == logprobs.tokens
    assert sum((part.token_logprobs for part in streamed), []) == logprobs.token_logprobs
    assert sum((part.text_offset for part in streamed), []) == logprobs.text_offset
