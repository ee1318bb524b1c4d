"""/v1/completions and /v1/chat/completions: prompts to token ids, sampling parameters, and vLLM's response shapes.

Everything a request can get wrong is checked before any of its prompts reaches
the engine (an APIError, answered with HTTP 400), so a rejected request never
holds a block. A request with several prompts runs them concurrently, one choice
each; streamed responses are Server-Sent Events, one JSON chunk per step.
"""
from __future__ import annotations

import asyncio
import dataclasses
import json
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any

from megakv.chat import ChatTemplate, special_tokens
from megakv.config import RequestLimits
from megakv.engine.async_engine import AsyncEngine, RequestRejectedError
from megakv.engine.limits import ContextLimit
from megakv.engine.sampling import SamplingParams, TokenLogprobs
from megakv.server.logprobs import chat_logprobs, completion_logprobs
from megakv.server.metrics import ServerMetrics
from megakv.server.protocol import (ChatCompletionRequest, ChatMessage, ChatTemplateOptions, CompletionRequest,
                                   TokenizeRequest)
from megakv.server.streams import ServerShuttingDownError, TextDelta, TextOptions, generate_text, merge
from megakv.tokenizer import TextTokenizer, TooManyTokensError

# vLLM's (and OpenAI's legacy) max_tokens of a completion that sets none; a chat reply may fill the room left.
COMPLETION_MAX_TOKENS = 16
# The error type of each status, as OpenAI's and vLLM's error bodies name them.
ERROR_TYPES = {400: "BadRequestError", 404: "NotFoundError", 405: "MethodNotAllowedError",
               413: "RequestTooLargeError", 500: "InternalServerError", 503: "ServiceUnavailableError"}


def error_body(message: str, status_code: int, param: str | None = None) -> dict[str, Any]:
    """An OpenAI-style error object."""
    kind = ERROR_TYPES.get(status_code, "BadRequestError" if status_code < 500 else "InternalServerError")
    return {"error": {"message": message, "type": kind, "param": param, "code": status_code}}


class APIError(ValueError):
    """A request the server cannot serve, answered with an OpenAI-style error body."""

    def __init__(self, message: str, status_code: int = 400, param: str | None = None) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.param = param


@dataclass(frozen=True)
class ServingContext:
    """What the handlers need of the model and the engine."""

    engine: AsyncEngine
    model_name: str
    vocab_size: int
    tokenizer: TextTokenizer | None
    chat: ChatTemplate | None
    metrics: ServerMetrics
    limits: RequestLimits
    # Sampling values of a request that does not set them (the server's options).
    defaults: dict[str, Any] = field(default_factory=dict)
    # The chat template's end-of-turn token, which ends a chat reply as EOS does.
    chat_stop_token_ids: tuple[int, ...] = ()
    # The checkpoint's tokenizer_config.json, which /tokenizer_info answers with.
    tokenizer_config: dict[str, Any] = field(default_factory=dict)
    # Whether the engine reuses cached prefixes (the n samples of a prompt then share its prefill).
    prefix_caching: bool = False
    # Set when the server starts to stop: every open response ends at once (see streams.merge).
    shutting_down: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def context_limit(self) -> ContextLimit:
        """The most tokens (prompt + generated) one request may hold, and what sets that bound: the engine's now,
        which a cluster lowers when instances fail."""
        return self.engine.context_limit

    @property
    def max_model_len(self) -> int:
        return self.context_limit.max_model_len

    def check_model(self, model: str | None) -> None:
        """Raise APIError unless ``model`` is None or the served model's name."""
        if model is not None and model != self.model_name:
            raise APIError(f"model {model!r} does not exist: this server serves {self.model_name!r}", param="model")

    def check_token_ids(self, token_ids: list[int], what: str) -> None:
        """Raise APIError naming the first id outside the vocabulary, and the field ``what`` that holds it."""
        bad = [token for token in token_ids if not 0 <= token < self.vocab_size]
        if bad:
            raise APIError(f"{what}: token id {bad[0]} is outside the vocabulary [0, {self.vocab_size})", param=what)

    def prompt_too_long(self, num_prompt_tokens: int | str) -> APIError:
        """The error for a prompt that leaves no room for a generated token (its count, or "at least" one)."""
        return APIError(f"the prompt has {num_prompt_tokens} tokens, and a request may hold at most "
                        f"{self.max_model_len} ({self.context_limit.reason}): shorten the prompt", param="prompt")

    def truncation(self, request: CompletionRequest | ChatCompletionRequest) -> int | None:
        """How many of a prompt's last tokens the request keeps (truncate_prompt_tokens; -1: a request's most)."""
        value = request.truncate_prompt_tokens
        if value == 0:
            raise APIError("truncate_prompt_tokens must be -1 or at least 1, got 0", param="truncate_prompt_tokens")
        return self.max_model_len if value == -1 else value

    def prompt_token_bound(self, request: CompletionRequest | ChatCompletionRequest) -> int:
        """The most tokens a prompt may tokenize to: what a request may hold, or with truncation what the server
        tokenizes for one request (the prompt is cut afterwards)."""
        return self.max_model_len if request.truncate_prompt_tokens is None else self.limits.max_tokens

    def require_tokenizer(self, what: str) -> TextTokenizer:
        """The tokenizer, or an APIError saying that ``what`` needs one."""
        if self.tokenizer is None:
            raise APIError(f"{what} needs a tokenizer, and the checkpoint has no tokenizer.json: send token ids")
        return self.tokenizer


@dataclass(frozen=True)
class Prompt:
    """One prompt of a request: its token ids, and its text when it came as text."""

    token_ids: list[int]
    text: str | None

    def truncated(self, num_tokens: int | None) -> Prompt:
        """The prompt's last ``num_tokens`` tokens (vLLM's truncate_prompt_tokens); itself for None."""
        if num_tokens is None or len(self.token_ids) <= num_tokens:
            return self
        return Prompt(self.token_ids[len(self.token_ids) - num_tokens:], None)


def completion_prompts(request: CompletionRequest, context: ServingContext) -> list[Prompt]:
    """The prompts of a completion request: text, token ids, or a list of either."""
    prompt = request.prompt
    if not prompt:
        raise APIError("prompt is empty: a request needs at least one prompt token", param="prompt")
    items = [prompt] if isinstance(prompt, str) or isinstance(prompt[0], int) else prompt
    max_prompts = context.limits.max_prompts
    if len(items) > max_prompts:
        raise APIError(f"the request has {len(items)} prompts, more than the {max_prompts} the server takes in one "
                       f"request (megakv serve --max-prompts-per-request)", param="prompt")
    prompts = []
    for item in items:
        if isinstance(item, str):
            tokenizer = context.require_tokenizer("a text prompt")
            try:
                token_ids = tokenizer.encode(item, request.add_special_tokens, context.prompt_token_bound(request))
            except TooManyTokensError as err:
                raise context.prompt_too_long(err.count) from None
            prompts.append(Prompt(token_ids, item))
        else:
            prompts.append(Prompt(list(item), None))
    return [prompt.truncated(context.truncation(request)) for prompt in prompts]


def chat_prompt(messages: list[ChatMessage], context: ServingContext, options: ChatTemplateOptions,
                add_special_tokens: bool, max_tokens: int | None = None) -> Prompt:
    """The conversation rendered with the checkpoint's chat template as transformers renders it, with ``options``,
    and tokenized (the template writes the special tokens; ``add_special_tokens`` adds the tokenizer's too); a
    prompt of more than ``max_tokens`` (default: what a request may hold) is an APIError."""
    tokenizer = context.require_tokenizer("a chat")
    if context.chat is None:
        raise APIError("the checkpoint has no chat template (chat_template.jinja): use /v1/completions")
    try:
        text = context.chat.render([{"role": message.role, "content": message.text} for message in messages],
                                   options.continue_final_message, options.template_variables)
    except ValueError as err:
        raise APIError(str(err), param="messages") from None
    try:
        return Prompt(tokenizer.encode(text, add_special_tokens,
                                       max_tokens=context.max_model_len if max_tokens is None else max_tokens), text)
    except TooManyTokensError as err:
        if max_tokens is None:
            raise context.prompt_too_long(err.count) from None
        raise APIError(f"the conversation has {err.count} tokens, more than the {max_tokens} the server "
                       f"tokenizes in one request (megakv serve --max-request-tokens)", param="messages") from None


def tokenize_body(body: TokenizeRequest, context: ServingContext) -> list[int]:
    """The token ids /tokenize answers: of a prompt, or of messages rendered with the chat template."""
    max_tokens = context.limits.max_tokens
    if body.messages is not None:
        return chat_prompt(body.messages, context, body, body.adds_special_tokens, max_tokens).token_ids
    try:
        return context.require_tokenizer("/tokenize").encode(body.prompt, body.adds_special_tokens, max_tokens)
    except TooManyTokensError as err:
        raise APIError(f"the prompt has {err.count} tokens, more than the {max_tokens} the server tokenizes "
                       f"in one request (megakv serve --max-request-tokens)", param="prompt") from None


def tokenizer_info(context: ServingContext) -> dict[str, Any]:
    """What vLLM's /tokenizer_info answers: the tokenizer's configuration, its special tokens as strings, the
    chat template in use and the longest request (lm-evaluation-harness's remote tokenizer reads it)."""
    context.require_tokenizer("/tokenizer_info")
    config = context.tokenizer_config
    return {"tokenizer_class": config.get("tokenizer_class", "PreTrainedTokenizerFast"), **config,
            **special_tokens(config), "chat_template": None if context.chat is None else context.chat.source,
            "model_max_length": context.max_model_len}


def sampling_params(request: CompletionRequest | ChatCompletionRequest, prompt: Prompt, context: ServingContext,
                    extra_stop_ids: tuple[int, ...] = ()) -> SamplingParams:
    """The engine's parameters for one prompt; APIError when they can never be served."""
    if not prompt.token_ids:
        raise APIError("prompt is empty: a request needs at least one prompt token", param="prompt")
    context.check_token_ids(prompt.token_ids, "prompt")
    num_prompt_tokens = len(prompt.token_ids)
    room = context.max_model_len - num_prompt_tokens
    if room <= 0:
        raise context.prompt_too_long(num_prompt_tokens)
    max_tokens = request.max_tokens
    if max_tokens is None:
        default = COMPLETION_MAX_TOKENS if isinstance(request, CompletionRequest) else room
        max_tokens = min(context.defaults.get("max_new_tokens", default), room)
    elif max_tokens < 1:
        raise APIError(f"max_tokens must be at least 1, got {max_tokens}", param="max_tokens")
    else:
        try:
            context.context_limit.check(num_prompt_tokens, max_tokens, "max_tokens")
        except ValueError as err:
            raise APIError(str(err), param="max_tokens") from None
    stop_token_ids = list(request.stop_token_ids or [])
    context.check_token_ids(stop_token_ids, "stop_token_ids")
    logit_bias = request.logit_bias_pairs
    context.check_token_ids([token for token, _ in logit_bias], "logit_bias")
    if request.allowed_token_ids is not None:
        context.check_token_ids(request.allowed_token_ids, "allowed_token_ids")
    if request.min_tokens > max_tokens:
        raise APIError(f"min_tokens ({request.min_tokens}) is more than max_tokens ({max_tokens})", param="min_tokens")
    values = {name: getattr(request, name) for name in ("temperature", "top_p", "top_k", "seed", "ignore_eos")}
    values = {name: context.defaults.get(name) if value is None else value for name, value in values.items()}
    # vLLM disables top-k with -1, megakv with 0.
    top_k = 0 if values["top_k"] in (None, -1) else values["top_k"]
    try:
        return SamplingParams(max_new_tokens=max_tokens, temperature=values["temperature"] or 0.0,
                              top_k=top_k, top_p=1.0 if values["top_p"] is None else values["top_p"],
                              seed=values["seed"], ignore_eos=bool(values["ignore_eos"]),
                              stop_token_ids=(*stop_token_ids, *extra_stop_ids),
                              logprobs=request.num_top_logprobs,
                              prompt_logprobs=request.num_top_prompt_logprobs,
                              min_p=request.min_p, min_tokens=request.min_tokens,
                              presence_penalty=request.presence_penalty, frequency_penalty=request.frequency_penalty,
                              repetition_penalty=request.repetition_penalty, logit_bias=tuple(logit_bias),
                              allowed_token_ids=None if request.allowed_token_ids is None else
                              tuple(request.allowed_token_ids), cache_salt=request.cache_salt)
    except ValueError as err:
        raise APIError(str(err)) from None


def usage(num_prompt_tokens: int, num_completion_tokens: int, num_cached_tokens: int = 0) -> dict[str, Any]:
    """OpenAI's usage counts, with the prompt tokens the prefix cache gave."""
    return {"prompt_tokens": num_prompt_tokens, "completion_tokens": num_completion_tokens,
            "total_tokens": num_prompt_tokens + num_completion_tokens,
            "prompt_tokens_details": {"cached_tokens": num_cached_tokens}}


def kv_placement(delta: TextDelta) -> dict[str, Any] | None:
    """Where a finished request's KV blocks lived, named as ``megakv generate --json`` names them."""
    if delta.placement is None:
        return None
    return {"instance": delta.instance, "num_local_blocks": delta.placement.num_local_blocks,
            "num_remote_blocks": delta.placement.num_remote_blocks, "block_instances": delta.placement.instances}


def sse(payload: dict | str) -> str:
    """One Server-Sent Event."""
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n"


def sample_params(params: SamplingParams, sample_index: int) -> SamplingParams:
    """The parameters of a prompt's sample ``sample_index`` of ``n``: a seeded request's samples differ, each
    seeded with seed + sample_index, as vLLM seeds its parallel samples."""
    if params.seed is None or sample_index == 0:
        return params
    try:
        return dataclasses.replace(params, seed=params.seed + sample_index)
    except ValueError as err:
        raise APIError(f"{err} (seed + the sample's index, for n > 1)", param="seed") from None


class Completion:
    """One completion or chat request: its choices' prompts and parameters, validated; run streamed or whole.

    Each prompt has ``n`` choices, one engine request each, indexed as vLLM does: choice i * n + j is sample j of
    prompt i.
    """

    def __init__(self, request: CompletionRequest | ChatCompletionRequest, context: ServingContext) -> None:
        context.check_model(request.model)
        self.request, self.context = request, context
        self.chat = isinstance(request, ChatCompletionRequest)
        if self.chat:
            bound = None if request.truncate_prompt_tokens is None else context.prompt_token_bound(request)
            prompt = chat_prompt(request.messages, context, request, request.add_special_tokens, bound)
            prompts = [prompt.truncated(context.truncation(request))]
            stop_ids = context.chat_stop_token_ids
        else:
            prompts = completion_prompts(request, context)
            stop_ids = ()
        num_choices = len(prompts) * request.n
        if num_choices > context.limits.max_choices:
            raise APIError(f"{len(prompts)} prompt(s) x n = {request.n} ask for {num_choices} choices, more than the "
                           f"{context.limits.max_choices} the server takes in one request "
                           f"(megakv serve --max-choices-per-request)", param="n")
        params = [sampling_params(request, prompt, context, stop_ids) for prompt in prompts]
        num_tokens = request.n * sum(len(prompt.token_ids) + prompt_params.max_new_tokens
                                     for prompt, prompt_params in zip(prompts, params))
        if num_tokens > context.limits.max_tokens:
            raise APIError(f"the request's choices hold {num_tokens} tokens (prompt and max_tokens of each), more "
                           f"than the {context.limits.max_tokens} the server takes in one request "
                           f"(megakv serve --max-request-tokens)", param="max_tokens")
        # One entry per choice.
        self.prompts = [prompt for prompt in prompts for _ in range(request.n)]
        # With prefix caching, a prompt's other samples reuse its first sample's prefill (see _streams); they
        # reuse its prompt logprobs too, which a prefill from the cache does not compute.
        self.shares_prefill = context.prefix_caching and request.n > 1
        self.params = [sample_params(prompt_params, index) for prompt_params in params for index in range(request.n)]
        if self.shares_prefill:
            self.params = [dataclasses.replace(params, prompt_logprobs=None) if index % request.n else params
                           for index, params in enumerate(self.params)]
        # Prompt index -> the prompt logprobs its first sample computed.
        self._prompt_logprobs: dict[int, list[TokenLogprobs]] = {}
        kind = "chatcmpl" if self.chat else "cmpl"
        # The engine's request ids stay unique when clients reuse a request_id.
        self._engine_id = f"{kind}-{uuid.uuid4().hex}"
        self.id = self._engine_id if request.request_id is None else f"{kind}-{request.request_id}"
        self.created = int(time.time())
        self.echo = not self.chat and request.echo
        # Token ids go back when asked for, and always without a tokenizer (there is no text).
        self.with_token_ids = request.return_token_ids or context.tokenizer is None
        self.text_options = TextOptions(request.stop_strings, request.include_stop_str_in_output,
                                        request.skip_special_tokens)
        # Logprobs name tokens by their text, or by "token_id:<id>" as a tokenizer-less server does.
        self.logprob_tokenizer = None if request.return_tokens_as_token_ids else context.tokenizer
        # Per choice: the prompt tokens its request found in the prefix cache.
        self.num_cached_tokens = [0] * len(self.prompts)
        options = request.stream_options
        self.usage_in_chunks = options is not None and options.include_usage
        self.continuous_usage = self.usage_in_chunks and options.continuous_usage_stats

    def _streams(self) -> AsyncIterator[tuple[int, TextDelta]]:
        """Every choice's deltas. With prefix caching, a prompt's other samples wait until its first one has
        computed the prompt, and then reuse its KV: the prompt is prefilled once, not n times."""
        context, n = self.context, self.request.n
        computed = [asyncio.Event() for _ in self.prompts[::n]] if self.shares_prefill else None
        streams = []
        for index, (prompt, params) in enumerate(zip(self.prompts, self.params)):
            first = index % n == 0
            after = None if computed is None or first else computed[index // n]
            started = computed[index // n] if computed is not None and first else None
            streams.append(generate_text(context.engine, prompt.token_ids, params, f"{self._engine_id}-{index}",
                                         context.tokenizer, self.text_options, context.metrics.track(),
                                         self.request.return_kv_placement, after, started))
        return merge(streams, context.shutting_down)

    def _prompt_text(self, prompt: Prompt) -> str:
        if prompt.text is not None or self.context.tokenizer is None:
            return prompt.text or ""
        return self.context.tokenizer.decode(prompt.token_ids)

    def _header(self, chunk: bool) -> dict[str, Any]:
        kind = ("chat.completion" if self.chat else "text_completion") + (".chunk" if chunk and self.chat else "")
        return {"id": self.id, "object": kind, "created": self.created, "model": self.context.model_name}

    def _logprobs(self, token_ids: list[int], logprobs: list[TokenLogprobs] | None, text_offset: int,
                  prompt: tuple[list[int], list[TokenLogprobs]] | None = None) -> dict[str, Any] | None:
        """A choice's (or chunk's) logprobs; an echoed ``prompt`` (its token ids and the logprobs of all but
        the first) comes first, as vLLM returns it: the first prompt token has none."""
        if logprobs is None:
            return None
        if self.chat:
            return chat_logprobs(token_ids, logprobs, self.logprob_tokenizer)
        if prompt is not None:
            prompt_ids, prompt_logprobs = prompt
            token_ids, logprobs = prompt_ids + token_ids, [None, *prompt_logprobs, *logprobs]
        return completion_logprobs(token_ids, logprobs, self.logprob_tokenizer, text_offset)

    def _echoed_prompt(self, index: int, delta: TextDelta) -> tuple[list[int], list[TokenLogprobs]] | None:
        """The prompt of choice ``index`` and its logprobs, carried by the choice's first delta when it asked (by
        its prompt's first sample's, for the others that share its prefill)."""
        n, logprobs = self.request.n, delta.prompt_logprobs
        if logprobs is not None:
            self._prompt_logprobs[index // n] = logprobs
        elif self.shares_prefill and self.request.num_top_prompt_logprobs is not None:
            logprobs = self._prompt_logprobs.get(index // n)
        if logprobs is None:
            return None
        return self.prompts[index].token_ids, logprobs

    def _choice(self, index: int, text: str, token_ids: list[int], delta: TextDelta | None, chunk: bool,
                logprobs: dict[str, Any] | None = None) -> dict[str, Any]:
        choice: dict[str, Any] = {"index": index}
        if self.chat:
            message = {"role": "assistant", "content": text} if not chunk else {"content": text} if text else {}
            choice["delta" if chunk else "message"] = message
        else:
            choice["text"] = text
        choice.update(logprobs=logprobs, finish_reason=delta.finish_reason if delta else None,
                      stop_reason=delta.stop_reason if delta else None)
        if self.with_token_ids:
            choice["token_ids"] = token_ids
            if not chunk:
                choice["prompt_token_ids"] = self.prompts[index].token_ids
        if self.request.return_kv_placement and delta is not None and delta.finish_reason is not None:
            choice["kv_placement"] = kv_placement(delta)
        return choice

    async def run(self) -> dict[str, Any]:
        """The whole response, once every prompt has finished."""
        texts = [self._prompt_text(prompt) if self.echo else "" for prompt in self.prompts]
        token_ids: list[list[int]] = [[] for _ in self.prompts]
        logprobs: list[list[TokenLogprobs] | None] = [None] * len(self.prompts)
        echoed: list[tuple[list[int], list[TokenLogprobs]] | None] = [None] * len(self.prompts)
        finals: list[TextDelta | None] = [None] * len(self.prompts)
        async with aclosing(self._streams()) as streams:
            async for index, delta in streams:
                self.num_cached_tokens[index] = delta.num_cached_tokens
                texts[index] += delta.text
                token_ids[index] += delta.token_ids
                if delta.logprobs is not None:
                    logprobs[index] = (logprobs[index] or []) + delta.logprobs
                echoed[index] = echoed[index] or self._echoed_prompt(index, delta)
                if delta.finish_reason is not None:
                    finals[index] = delta
        choices = [self._choice(index, texts[index], token_ids[index], finals[index], chunk=False,
                                logprobs=self._logprobs(token_ids[index], logprobs[index], 0, echoed[index]))
                   for index in range(len(self.prompts))]
        return {**self._header(chunk=False), "choices": choices, "usage": self._usage(token_ids)}

    async def stream(self) -> AsyncIterator[str]:
        """The response as Server-Sent Events, ending with "[DONE]"; a failure mid-stream is an error event."""
        token_ids: list[list[int]] = [[] for _ in self.prompts]
        # Where each completion choice's next token text starts, for its logprobs' text_offset.
        text_offsets = [0] * len(self.prompts)
        # As vLLM: an echoed prompt comes with its choice's first tokens, and so can carry its logprobs.
        to_echo = [self.echo] * len(self.prompts)
        if self.chat:
            for index in range(len(self.prompts)):
                opening = {"index": index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                           "finish_reason": None}
                yield sse({**self._header(chunk=True), "choices": [opening], **self._chunk_usage(index, [])})
        try:
            async with aclosing(self._streams()) as streams:
                async for index, delta in streams:
                    self.num_cached_tokens[index] = delta.num_cached_tokens
                    text, prompt = delta.text, None
                    if to_echo[index]:
                        to_echo[index] = False
                        text, prompt = self._prompt_text(self.prompts[index]) + text, self._echoed_prompt(index, delta)
                    logprobs = self._logprobs(delta.token_ids, delta.logprobs, text_offsets[index], prompt)
                    if logprobs is not None and not self.chat:
                        text_offsets[index] += sum(map(len, logprobs["tokens"]))
                    token_ids[index] += delta.token_ids
                    if text or delta.finish_reason is not None or self.with_token_ids or logprobs:
                        choice = self._choice(index, text, delta.token_ids, delta, chunk=True, logprobs=logprobs)
                        yield sse({**self._header(chunk=True), "choices": [choice],
                                   **self._chunk_usage(index, token_ids[index])})
        except (RuntimeError, ValueError) as err:
            status = 503 if isinstance(err, ServerShuttingDownError) else 400 if isinstance(err, RequestRejectedError) \
                else 500
            yield sse(error_body(str(err), status))
        else:
            if self.usage_in_chunks:
                yield sse({**self._header(chunk=True), "choices": [], "usage": self._usage(token_ids)})
        yield sse("[DONE]")

    def _chunk_usage(self, index: int, token_ids: list[int]) -> dict[str, Any]:
        """A chunk's usage field, as vLLM sends it with include_usage: null, or with continuous_usage_stats the
        counts of the chunk's choice so far; no field otherwise."""
        if not self.usage_in_chunks:
            return {}
        if not self.continuous_usage:
            return {"usage": None}
        return {"usage": usage(len(self.prompts[index].token_ids), len(token_ids), self.num_cached_tokens[index])}

    def _usage(self, token_ids: list[list[int]]) -> dict[str, Any]:
        # As vLLM counts: each prompt once, whatever its number of choices (its first choice computed it).
        n = self.request.n
        return usage(sum(len(prompt.token_ids) for prompt in self.prompts[::n]), sum(map(len, token_ids)),
                     sum(self.num_cached_tokens[::n]))
