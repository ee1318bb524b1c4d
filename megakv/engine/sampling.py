"""Sampling parameters and the sampler: greedy, temperature, min-p, top-k, top-p, penalties and logit bias
(megakv.engine.logits_processing), seeded, with optional logprobs."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from megakv.engine.logits_processing import TokenHistory, filter_min_p, process_logits

# The most top logprobs a request may ask for per token (OpenAI's and vLLM's default bound).
MAX_LOGPROBS = 20
# Temperatures below this sample greedily, as vLLM's do: dividing logits by a smaller one overflows fp32.
GREEDY_TEMPERATURE = 1e-5
# The token a failed sampling step gives its request (broadcast to every TP rank, so all of them end it).
SAMPLING_FAILED = -1
# OpenAI's bounds on the presence and frequency penalties.
MAX_PENALTY = 2.0


@dataclass(frozen=True)
class SamplingParams:
    """How one request picks its tokens and when it stops, and whose cached KV it may reuse."""

    max_new_tokens: int = 16
    # Below GREEDY_TEMPERATURE (0 included) means greedy decoding.
    temperature: float = 0.0
    # 0 disables top-k filtering.
    top_k: int = 0
    top_p: float = 1.0
    # Seed of the request's own generator: the same seed gives the same tokens whatever the batch.
    seed: int | None = None
    ignore_eos: bool = False
    # Tokens that end the request as the model's EOS does (a chat template's end-of-turn token).
    stop_token_ids: tuple[int, ...] = ()
    # Top logprobs wanted per sampled token (0 = the sampled token's alone); None = no logprobs.
    logprobs: int | None = None
    # The same for each prompt token after the first (vLLM's prompt_logprobs): computed during prefill.
    prompt_logprobs: int | None = None
    # Tokens less likely than min_p times the most likely one are not sampled (0 disables it).
    min_p: float = 0.0
    # EOS and the stop tokens cannot be picked before this many tokens are generated.
    min_tokens: int = 0
    # Subtracted from a token's logit once if it was generated before (presence), per time it was (frequency).
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    # Above 1, tokens of the prompt or the output become less likely; below 1, more.
    repetition_penalty: float = 1.0
    # (token id, value added to its logit) pairs.
    logit_bias: tuple[tuple[int, float], ...] = ()
    # The only tokens that may be picked; None: any.
    allowed_token_ids: tuple[int, ...] | None = None
    # Prefix caching: only requests with the same salt share cached KV (vLLM's cache_salt, per tenant).
    cache_salt: str | None = None

    def __post_init__(self) -> None:
        for key in ("temperature", "top_p", "min_p", "presence_penalty", "frequency_penalty", "repetition_penalty"):
            value = getattr(self, key)
            # NaN passes every comparison below and then poisons the sampler's probabilities.
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"{key} must be a finite number, got {value!r}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)
                                      or not 0 <= self.seed < 2**63):
            raise ValueError(f"seed must be an integer from 0 to 2**63 - 1 (a torch generator's seed), "
                             f"got {self.seed!r}")
        if not isinstance(self.max_new_tokens, int) or isinstance(self.max_new_tokens, bool) \
                or self.max_new_tokens <= 0:
            raise ValueError(f"max_new_tokens must be a positive integer, got {self.max_new_tokens!r}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not isinstance(self.top_k, int) or isinstance(self.top_k, bool) or self.top_k < 0:
            raise ValueError(f"top_k must be an integer >= 0, got {self.top_k!r}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not 0 <= self.min_p <= 1:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
        for key in ("presence_penalty", "frequency_penalty"):
            if not -MAX_PENALTY <= getattr(self, key) <= MAX_PENALTY:
                raise ValueError(f"{key} must be in [-{MAX_PENALTY}, {MAX_PENALTY}], got {getattr(self, key)}")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        if not isinstance(self.min_tokens, int) or isinstance(self.min_tokens, bool) \
                or not 0 <= self.min_tokens <= self.max_new_tokens:
            raise ValueError(f"min_tokens must be an integer from 0 to max_new_tokens ({self.max_new_tokens}), "
                             f"got {self.min_tokens!r}")
        if any(not math.isfinite(value) for _, value in self.logit_bias):
            raise ValueError("logit_bias values must be finite numbers")
        if self.allowed_token_ids is not None and not self.allowed_token_ids:
            raise ValueError("allowed_token_ids must name at least one token")
        for key in ("logprobs", "prompt_logprobs"):
            value = getattr(self, key)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool)
                                      or not 0 <= value <= MAX_LOGPROBS):
                raise ValueError(f"{key} must be an integer from 0 to {MAX_LOGPROBS}, got {value!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_TEMPERATURE

    @property
    def processes_logits(self) -> bool:
        """Whether the model's logits change before a token is picked (see megakv.engine.logits_processing)."""
        return bool(self.allowed_token_ids is not None or self.logit_bias or self.min_tokens
                    or self.repetition_penalty != 1.0 or self.presence_penalty or self.frequency_penalty)

    def token_ids(self) -> tuple[int, ...]:
        """Every token id the parameters name (to check them against the vocabulary)."""
        return (*self.stop_token_ids, *(token for token, _ in self.logit_bias), *(self.allowed_token_ids or ()))


def filter_logits(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Set to -inf the logits [vocab] outside the top-k and the top-p nucleus; the most likely token always stays
    (a top_p that rounds to 0 in the logits' dtype keeps it alone)."""
    if 0 < top_k < logits.numel():
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        # Drop a token when the tokens ranked above it already reach top_p; the first always stays.
        drop_sorted = (cumulative - sorted_logits.softmax(-1)) >= top_p
        drop_sorted[0] = False
        logits = logits.masked_fill(drop_sorted.scatter(0, order, drop_sorted), float("-inf"))
    return logits


@dataclass(frozen=True)
class TokenLogprobs:
    """Log-probabilities of one sampled token under the model's raw distribution (before temperature,
    top-k and top-p, as vLLM reports them by default)."""

    logprob: float
    # The most likely tokens as (token id, logprob), most likely first.
    top: list[tuple[int, float]]


@dataclass(frozen=True)
class SampledTokens:
    """One step's sampled token per request, in batch order, with logprobs for requests that asked."""

    # SAMPLING_FAILED for a request whose sampling raised: it alone ends, with finish_reason "error".
    token_ids: list[int]
    logprobs: list[TokenLogprobs | None]
    # request id -> logprobs of the prompt tokens this step's chunk of it predicted, in order (prompt_logprobs).
    prompt_logprobs: dict[str, list[TokenLogprobs]] = field(default_factory=dict)
    # request id -> why its sampling failed, on the rank that sampled.
    errors: dict[str, str] = field(default_factory=dict)


def token_logprobs(logits: torch.Tensor, token_ids: list[int], num_top: int) -> list[TokenLogprobs]:
    """For each logits row [N, vocab] (fp32 log_softmax): the logprob of its token in ``token_ids`` [N] and its
    ``num_top`` most likely tokens."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)  # [N, vocab]
    chosen = logprobs.gather(1, torch.tensor(token_ids, device=logits.device)[:, None])[:, 0].tolist()
    if not num_top:
        return [TokenLogprobs(value, []) for value in chosen]
    top = torch.topk(logprobs, num_top)
    return [TokenLogprobs(value, list(zip(ids, values)))
            for value, ids, values in zip(chosen, top.indices.tolist(), top.values.tolist())]


class Sampler:
    """Picks the next token of each request from its logits row."""

    def __init__(self, eos_token_ids: tuple[int, ...] = ()) -> None:
        # What min_tokens holds back, with each request's stop tokens.
        self.eos_token_ids = tuple(eos_token_ids)
        self._generators: dict[str, torch.Generator] = {}

    def sample(self, logits: torch.Tensor, request_ids: list[str], params: list[SamplingParams],
               histories: list[TokenHistory] | None = None) -> SampledTokens:
        """logits [num_requests, vocab] -> one token id per request, and logprobs (of the raw logits) where asked.
        ``histories`` (one per request: its prompt and output so far) are needed by parameters that process logits.

        A row whose sampling raises (logits the model made non-finite, every token masked) fails its own request,
        not the step.
        """
        tokens = logits.argmax(dim=-1).tolist()
        errors = {}
        for row, (request_id, request_params) in enumerate(zip(request_ids, params)):
            if request_params.greedy and not request_params.processes_logits:
                continue
            try:
                tokens[row] = self._sample_row(logits[row], request_id, request_params,
                                               None if histories is None else histories[row])
            except RuntimeError as err:
                tokens[row] = SAMPLING_FAILED
                errors[request_id] = f"sampling failed: {err}"
        logprobs = [None if request_params.logprobs is None or tokens[row] == SAMPLING_FAILED else
                    token_logprobs(logits[row:row + 1], tokens[row:row + 1], request_params.logprobs)[0]
                    for row, request_params in enumerate(params)]
        return SampledTokens(tokens, logprobs, errors=errors)

    def _sample_row(self, logits: torch.Tensor, request_id: str, params: SamplingParams,
                    history: TokenHistory | None) -> int:
        logits = logits.float()  # fp32 whatever the model's dtype
        if params.processes_logits:
            assert history is not None, "parameters that process logits need the request's tokens"
            logits = process_logits(logits, params, history, self.eos_token_ids)
            if not torch.isfinite(logits).any():
                raise RuntimeError("every token is masked (allowed_token_ids, logit_bias and min_tokens together)")
        if params.greedy:
            return int(logits.argmax())
        # A temperature of at least GREEDY_TEMPERATURE keeps finite logits finite.
        filtered = filter_min_p(logits / params.temperature, params.min_p)
        filtered = filter_logits(filtered, params.top_k, params.top_p)  # [vocab]
        return int(torch.multinomial(filtered.softmax(-1), 1, generator=self._generator(request_id, params)))

    def _generator(self, request_id: str, params: SamplingParams) -> torch.Generator:
        if request_id not in self._generators:
            generator = torch.Generator()
            if params.seed is None:
                generator.seed()
            else:
                generator.manual_seed(params.seed)
            self._generators[request_id] = generator
        return self._generators[request_id]

    def release(self, request_id: str) -> None:
        """Forget a finished request's generator."""
        self._generators.pop(request_id, None)
