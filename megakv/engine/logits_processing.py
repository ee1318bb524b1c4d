"""What a request's sampling parameters do to its logits before a token is picked, in vLLM's order and with
OpenAI's and vLLM's definitions: the allowed tokens, the logit bias and min_tokens first, then the repetition,
frequency and presence penalties. Greedy decoding picks the most likely token of the result; sampling divides
it by the temperature and filters it by min_p, top-k and top-p (megakv.engine.sampling).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

import torch

if TYPE_CHECKING:
    from megakv.engine.sampling import SamplingParams


class TokenHistory(Protocol):
    """The tokens a request has seen: its prompt, and what it generated so far."""

    prompt_ids: list[int]
    output_ids: list[int]


def process_logits(logits: torch.Tensor, params: SamplingParams, history: TokenHistory,
                   eos_token_ids: tuple[int, ...]) -> torch.Tensor:
    """The logits [vocab] (fp32) of one request after its allowed tokens, logit bias, min_tokens and penalties."""
    logits = logits.float()
    if params.allowed_token_ids is not None:
        allowed = torch.full_like(logits, float("-inf"))
        index = torch.tensor(params.allowed_token_ids)
        logits = allowed.index_copy(0, index, logits[index])
    if params.logit_bias:
        ids, biases = zip(*params.logit_bias)
        logits = logits.index_add(0, torch.tensor(ids), torch.tensor(biases, dtype=logits.dtype))
    if len(history.output_ids) < params.min_tokens:
        # vLLM's rule: ignore_eos lets EOS through; a stop token stays masked either way.
        stop_ids = params.stop_token_ids if params.ignore_eos else (*params.stop_token_ids, *eos_token_ids)
        if stop_ids:
            logits = logits.index_fill(0, torch.tensor(stop_ids), float("-inf"))
    if params.repetition_penalty != 1.0:
        seen = torch.zeros_like(logits, dtype=torch.bool)
        seen[torch.tensor(history.prompt_ids + history.output_ids, dtype=torch.long)] = True
        # Shrinks a seen token's logit toward -inf whatever its sign (CTRL's rule, as vLLM applies it).
        penalized = torch.where(logits > 0, logits / params.repetition_penalty, logits * params.repetition_penalty)
        logits = torch.where(seen, penalized, logits)
    if (params.frequency_penalty or params.presence_penalty) and history.output_ids:
        counts = torch.bincount(torch.tensor(history.output_ids), minlength=logits.numel()).to(logits.dtype)
        logits = logits - params.frequency_penalty * counts - params.presence_penalty * (counts > 0).to(logits.dtype)
    return logits


def filter_min_p(logits: torch.Tensor, min_p: float) -> torch.Tensor:
    """Set to -inf the logits [vocab] of tokens less likely than ``min_p`` times the most likely one."""
    if min_p <= 0:
        return logits
    probs = logits.softmax(-1)
    return logits.masked_fill(probs < min_p * probs.max(), float("-inf"))
