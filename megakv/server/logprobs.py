"""The engine's per-token logprobs in the response shapes of vLLM's OpenAI server.

/v1/completions answers ``{tokens, token_logprobs, top_logprobs, text_offset}``,
/v1/chat/completions ``{content: [{token, logprob, bytes, top_logprobs}]}``. A
token's text is its decoding alone (as vLLM reports it), or ``token_id:<id>``
when the checkpoint has no tokenizer or the request asks (return_tokens_as_token_ids).
"""
from __future__ import annotations

from typing import Any

from megakv.engine.sampling import TokenLogprobs
from megakv.tokenizer import TextTokenizer

# What vLLM reports in place of -inf, which JSON cannot carry.
MIN_LOGPROB = -9999.0


def token_text(tokenizer: TextTokenizer | None, token_id: int) -> str:
    """One token's text on its own."""
    return tokenizer.decode([token_id]) if tokenizer is not None else f"token_id:{token_id}"


def _logprob(value: float) -> float:
    return max(value, MIN_LOGPROB)


def completion_logprobs(token_ids: list[int], logprobs: list[TokenLogprobs | None],
                        tokenizer: TextTokenizer | None, text_offset: int = 0) -> dict[str, Any]:
    """A completion choice's logprobs; ``text_offset`` is where the first token's text starts in the choice. A
    token without logprobs (an echoed prompt's first) has None for them."""
    tokens, offsets = [], []
    for token_id in token_ids:
        tokens.append(token_text(tokenizer, token_id))
        offsets.append(text_offset)
        text_offset += len(tokens[-1])
    return {"tokens": tokens,
            "token_logprobs": [None if entry is None else _logprob(entry.logprob) for entry in logprobs],
            "top_logprobs": [None if entry is None else
                             {token_text(tokenizer, top_id): _logprob(value) for top_id, value in entry.top}
                             for entry in logprobs],
            "text_offset": offsets}


def _chat_entry(tokenizer: TextTokenizer | None, token_id: int, logprob: float) -> dict[str, Any]:
    text = token_text(tokenizer, token_id)
    # A token's own bytes: its text alone is U+FFFD when it holds part of a character.
    raw = text.encode("utf-8") if tokenizer is None else tokenizer.token_bytes(token_id)
    return {"token": text, "logprob": _logprob(logprob), "bytes": list(raw)}


def chat_logprobs(token_ids: list[int], logprobs: list[TokenLogprobs],
                  tokenizer: TextTokenizer | None) -> dict[str, Any]:
    """A chat choice's logprobs."""
    return {"content": [{**_chat_entry(tokenizer, token_id, entry.logprob),
                         "top_logprobs": [_chat_entry(tokenizer, top_id, value) for top_id, value in entry.top]}
                        for token_id, entry in zip(token_ids, logprobs)]}
