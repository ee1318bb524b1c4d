"""Request bodies of the OpenAI-compatible API, as vLLM accepts them, checked strictly with pydantic.

As vLLM reads them, an explicit null is the field left out, and an integral float is an integer. A field
megakv does not know is rejected by name ("extra": "forbid"); a field of vLLM's schema that megakv does
not implement (tools, structured output, beam search) is accepted only at its neutral value and otherwise
refused with the reason, so a client never gets an answer that silently ignored what it asked for.
"""
from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, model_validator

from megakv.engine.sampling import MAX_LOGPROBS

TOOLS = "megakv does not call tools"
STRUCTURED_OUTPUT = "megakv has no structured output (JSON mode, JSON schemas, regexes, grammars)"
BEAM_SEARCH = "megakv does not do beam search"
TEXT_ONLY = "megakv serves text only"
# vLLM's (and OpenAI's) fields that megakv does not implement -> (the values that ask for nothing, why not).
UNSUPPORTED_FIELDS: dict[str, tuple[tuple[Any, ...], str]] = {
    "tools": (([],), TOOLS), "functions": (([],), TOOLS), "tool_choice": (("none",), TOOLS),
    "function_call": (("none",), TOOLS), "parallel_tool_calls": ((True, False), TOOLS),
    "response_format": (({"type": "text"},), STRUCTURED_OUTPUT),
    **{name: ((), STRUCTURED_OUTPUT) for name in ("guided_json", "guided_regex", "guided_choice", "guided_grammar",
                                                  "guided_decoding_backend", "guided_whitespace_pattern",
                                                  "structured_outputs", "structural_tag")},
    "use_beam_search": ((False,), BEAM_SEARCH), "length_penalty": ((1.0,), BEAM_SEARCH),
    "suffix": (("",), "megakv does not fill in the middle"),
    "bad_words": (([],), "megakv does not ban words: use logit_bias on their tokens"),
    "logits_processors": (([],), "megakv runs no custom logits processors"),
    "prompt_logprobs": ((), "for the prompt's logprobs, ask /v1/completions with echo and logprobs"),
    "prompt_embeds": ((), "megakv takes prompts as text or token ids"),
    "mm_processor_kwargs": (({},), TEXT_ONLY), "modalities": ((["text"],), TEXT_ONLY),
    "chat_template": ((), "megakv renders the checkpoint's own chat template (chat_template_kwargs are passed to it)"),
    "documents": (([],), "megakv's chat templates get no documents"),
    "reasoning_effort": ((), "megakv parses no reasoning"),
    "kv_transfer_params": ((), "megakv takes no KV from another server: its cluster shares KV itself"),
    "priority": ((0,), "megakv schedules first come, first served"),
    "spaces_between_special_tokens": ((True,), "megakv decodes with the fast tokenizer, which has no such option"),
    "vllm_xargs": (({},), "megakv takes no extra arguments"),
    "echo": ((False,), "a chat reply does not repeat the last message in megakv"),
    "tool_calls": (([],), TOOLS), "tool_call_id": ((), TOOLS),
}
# Content parts of a message that are not text.
MEDIA_PARTS = ("image_url", "input_image", "image", "input_audio", "audio_url", "video_url", "file")


def _integral(value: Any) -> Any:
    """2.0 -> 2, as vLLM accepts in integer fields; 2.5 stays a float, which the field refuses."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


# An integer field that also takes an integral float.
Integer = Annotated[int, BeforeValidator(_integral)]


def _nullable_fields(schema: dict[str, Any]) -> None:
    """The served schema says what the server accepts: null in any field (see StrictModel)."""
    for name, field_schema in schema.get("properties", {}).items():
        options = field_schema.get("anyOf", [field_schema])
        if {"type": "null"} not in options:
            kept = {key: field_schema.pop(key) for key in ("title", "default", "description") if key in field_schema}
            schema["properties"][name] = {"anyOf": [dict(field_schema), {"type": "null"}], **kept}


class StrictModel(BaseModel):
    """No unknown fields, no type coercion ("5" is not 5); null is the field's default, as vLLM reads it."""

    model_config = ConfigDict(extra="forbid", strict=True, json_schema_extra=_nullable_fields)

    @model_validator(mode="before")
    @classmethod
    def _defaults_and_unsupported_fields(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        data = {key: value for key, value in data.items() if value is not None}
        for name in set(data) & set(UNSUPPORTED_FIELDS) - set(cls.model_fields):
            neutral, reason = UNSUPPORTED_FIELDS[name]
            value = data.pop(name)
            # True == 1 in Python; a flag and a number are not the same value here.
            if not any(value == option and isinstance(value, bool) == isinstance(option, bool) for option in neutral):
                raise ValueError(f"{name} = {value!r} is not supported: {reason}")
        return data


class StreamOptions(StrictModel):
    """What a streamed response adds: a last chunk with the usage counts, and with continuous_usage_stats the
    counts so far in every chunk."""

    include_usage: bool = False
    continuous_usage_stats: bool = False


# The most choices one prompt may ask for (OpenAI's bound on n).
MAX_N = 128
# OpenAI's bound on a logit bias.
MAX_LOGIT_BIAS = 100.0


class SamplingRequest(StrictModel):
    """The fields shared by completions and chat completions."""

    # The served model's name; optional, as in vLLM.
    model: str | None = None
    max_tokens: Integer | None = None
    temperature: float | None = None
    top_p: float | None = None
    # vLLM's extension; -1 (vLLM's "off") and 0 both disable top-k.
    top_k: Integer | None = None
    min_p: float = 0.0
    seed: Integer | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    # vLLM's extension: the stop string (or stop token's text) that ended a choice stays in its text.
    include_stop_str_in_output: bool = False
    ignore_eos: bool | None = None
    # EOS, stop tokens and stop strings cannot end a choice before it has this many tokens.
    min_tokens: Integer = Field(default=0, ge=0)
    stream: bool = False
    stream_options: StreamOptions | None = None
    # vLLM's extension: each choice also carries its token ids, and the prompt's.
    return_token_ids: bool = False
    # vLLM's extension: logprobs name their tokens "token_id:<id>" instead of their text.
    return_tokens_as_token_ids: bool = False
    # megakv's extension: each finished choice also carries kv_placement, where its KV blocks lived.
    return_kv_placement: bool = False
    # vLLM's extension: the text leaves out special tokens (false keeps them).
    skip_special_tokens: bool = True
    # vLLM's extension: only the prompt's last this many tokens are used (-1: as many as a request may hold).
    truncate_prompt_tokens: Integer | None = Field(default=None, ge=-1)
    # vLLM's extension: the response's id, in place of a random one.
    request_id: str | None = None
    # Names the end user; it changes nothing here.
    user: str | None = None
    # Prefix caching: only requests with the same salt share cached KV (vLLM's, per tenant).
    cache_salt: str | None = None
    # Choices per prompt, sampled independently.
    n: Integer = Field(default=1, ge=1, le=MAX_N)
    # vLLM accepts best_of only equal to n (one sample per choice).
    best_of: Integer | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    # Token id (as a string, OpenAI's form) -> value added to its logit, within +-100.
    logit_bias: dict[str, float] | None = None
    # vLLM's extension: the only tokens that may be generated.
    allowed_token_ids: list[int] | None = None

    @model_validator(mode="after")
    def _sampling_fields(self) -> SamplingRequest:
        if self.best_of is not None and self.best_of != self.n:
            raise ValueError(f"best_of = {self.best_of} is not supported: megakv samples one sequence per choice "
                             f"(best_of may only equal n)")
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed when stream is true")
        bad = [key for key in self.logit_bias or {} if not key.strip().lstrip("-").isdigit()]
        if bad:
            raise ValueError(f"logit_bias keys must be token ids, got {bad[0]!r}")
        return self

    @property
    def stop_strings(self) -> list[str]:
        """The stop strings, as a list."""
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    @property
    def logit_bias_pairs(self) -> list[tuple[int, float]]:
        """(token id, bias) pairs, biases clipped to OpenAI's +-100 as vLLM clips them."""
        return [(int(key), min(max(value, -MAX_LOGIT_BIAS), MAX_LOGIT_BIAS)) for key, value in
                (self.logit_bias or {}).items()]


def check_num_logprobs(name: str, value: int | None) -> None:
    """Raise ValueError unless value is None or 0 .. MAX_LOGPROBS."""
    if value is not None and not 0 <= value <= MAX_LOGPROBS:
        raise ValueError(f"{name} must be from 0 to {MAX_LOGPROBS}, got {value}")


class CompletionRequest(SamplingRequest):
    """POST /v1/completions: a prompt as text, token ids, or a list of either (one choice each)."""

    prompt: str | list[int] | list[str] | list[list[int]]
    echo: bool = False
    # Top logprobs per generated token, and with echo per prompt token too (vLLM's and OpenAI's legacy field).
    logprobs: Integer | None = None
    # Whether a text prompt gets the tokenizer's special tokens (BOS).
    add_special_tokens: bool = True

    @model_validator(mode="after")
    def _logprobs(self) -> CompletionRequest:
        check_num_logprobs("logprobs", self.logprobs)
        return self

    @property
    def num_top_logprobs(self) -> int | None:
        """Top logprobs wanted per generated token; None: no logprobs."""
        return self.logprobs

    @property
    def num_top_prompt_logprobs(self) -> int | None:
        """Top logprobs wanted per prompt token: echo returns the prompt, with its logprobs when asked."""
        return self.logprobs if self.echo else None


class TextPart(StrictModel):
    """A text part of a message's content (images and audio are not supported)."""

    type: Literal["text"]
    text: str

    @model_validator(mode="before")
    @classmethod
    def _text_only(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("type") in MEDIA_PARTS:
            raise ValueError(f"content parts of type {data['type']!r} are not supported: {TEXT_ONLY}")
        return data


class ChatMessage(StrictModel):
    """One turn of a conversation."""

    role: str
    # None (an assistant turn that only called tools, in OpenAI's schema) renders as empty text.
    content: str | list[TextPart] | None = None
    name: str | None = None

    @property
    def text(self) -> str:
        """The content as one string (text parts joined, as chat templates expect a string)."""
        if self.content is None:
            return ""
        return self.content if isinstance(self.content, str) else "".join(part.text for part in self.content)


class ChatTemplateOptions(StrictModel):
    """How messages are rendered, as vLLM's and transformers' apply_chat_template take it: ending with the
    assistant's turn opened, or inside the last message to continue it (not both), and further variables for
    the template."""

    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template_kwargs: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _template_options(self) -> ChatTemplateOptions:
        if self.add_generation_prompt and self.continue_final_message:
            raise ValueError("add_generation_prompt and continue_final_message cannot both be true: set "
                             "add_generation_prompt to false to continue the last message")
        if "messages" in self.chat_template_kwargs:
            raise ValueError("chat_template_kwargs cannot set messages: send them as messages")
        return self

    @property
    def template_variables(self) -> dict[str, Any]:
        """The variables the chat template gets besides the messages (chat_template_kwargs win, as in vLLM)."""
        return {"add_generation_prompt": self.add_generation_prompt, **self.chat_template_kwargs}


class ChatCompletionRequest(SamplingRequest, ChatTemplateOptions):
    """POST /v1/chat/completions: a conversation rendered with the checkpoint's chat template."""

    messages: list[ChatMessage] = Field(min_length=1)
    # The newer name of max_tokens; it wins when both are given.
    max_completion_tokens: Integer | None = None
    logprobs: bool = False
    # Top logprobs per generated token; needs logprobs.
    top_logprobs: Integer | None = None
    # Whether the tokenizer's special tokens (BOS) are added to what the template wrote.
    add_special_tokens: bool = False

    @model_validator(mode="after")
    def _max_completion_tokens(self) -> ChatCompletionRequest:
        if self.max_completion_tokens is not None:
            self.max_tokens = self.max_completion_tokens
        return self

    @model_validator(mode="after")
    def _logprobs(self) -> ChatCompletionRequest:
        check_num_logprobs("top_logprobs", self.top_logprobs)
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs set to true")
        return self


    @property
    def num_top_logprobs(self) -> int | None:
        """Top logprobs wanted per generated token; None: no logprobs."""
        return (self.top_logprobs or 0) if self.logprobs else None

    @property
    def num_top_prompt_logprobs(self) -> None:
        """A chat response never returns its prompt."""
        return None


class TokenizeRequest(ChatTemplateOptions):
    """POST /tokenize: a prompt, or messages rendered with the chat template."""

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    # Whether the tokenizer's special tokens (BOS) are added: by default to a prompt, not to messages (whose
    # template writes them), as vLLM's defaults are.
    add_special_tokens: bool | None = None

    @property
    def adds_special_tokens(self) -> bool:
        """Whether the tokenizer adds its special tokens here."""
        return self.prompt is not None if self.add_special_tokens is None else self.add_special_tokens

    @model_validator(mode="after")
    def _one_input(self) -> TokenizeRequest:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of prompt and messages")
        return self


class DetokenizeRequest(StrictModel):
    """POST /detokenize: token ids back to text."""

    model: str | None = None
    tokens: list[int]
