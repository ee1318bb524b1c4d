"""Request bodies of the OpenAI-compatible API, as vLLM accepts them, checked strictly with pydantic.

A field megakv does not know is rejected by name ("extra": "forbid"), and a known field that
megakv does not implement is accepted only at its neutral value (no ``best_of``, no penalties), so a
client never gets an answer that silently ignored what it asked for.
"""
from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, model_validator

from megakv.engine.sampling import MAX_LOGPROBS


def _integral(value: Any) -> Any:
    """2.0 -> 2, as vLLM accepts in integer fields; 2.5 stays a float, which the field refuses."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


# An integer field that also takes an integral float.
Integer = Annotated[int, BeforeValidator(_integral)]


class StrictModel(BaseModel):
    """No unknown fields, no type coercion ("5" is not 5)."""

    model_config = ConfigDict(extra="forbid", strict=True)


class StreamOptions(StrictModel):
    """What a streamed response adds: a last chunk with the usage counts."""

    include_usage: bool = False


# Known fields megakv does not implement -> the only value it accepts for them.
NEUTRAL_VALUES = {"best_of": None, "presence_penalty": 0.0, "frequency_penalty": 0.0,
                  "repetition_penalty": 1.0, "logit_bias": None, "suffix": None, "min_tokens": 0}
# The most choices one prompt may ask for (OpenAI's bound on n).
MAX_N = 128


class SamplingRequest(StrictModel):
    """The fields shared by completions and chat completions."""

    model: str
    max_tokens: Integer | None = None
    temperature: float | None = None
    top_p: float | None = None
    # vLLM's extension; -1 (vLLM's "off") and 0 both disable top-k.
    top_k: Integer | None = None
    seed: Integer | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    # vLLM's extension: each choice also carries its token ids, and the prompt's.
    return_token_ids: bool = False
    # megakv's extension: each finished choice also carries kv_placement, where its KV blocks lived.
    return_kv_placement: bool = False
    # Names the end user; it changes nothing here.
    user: str | None = None
    # Choices per prompt, sampled independently.
    n: Integer = Field(default=1, ge=1, le=MAX_N)
    best_of: Integer | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: dict[str, float] | None = None
    min_tokens: Integer = 0

    @model_validator(mode="after")
    def _only_neutral_values(self) -> SamplingRequest:
        for name, neutral in NEUTRAL_VALUES.items():
            value = getattr(self, name, neutral)
            # An empty logit_bias biases nothing.
            if value != neutral and value != {}:
                raise ValueError(f"{name} = {value!r} is not supported by megakv: leave it out")
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed when stream is true")
        return self

    @property
    def stop_strings(self) -> list[str]:
        """The stop strings, as a list."""
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])


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
    suffix: str | None = None

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


class ChatMessage(StrictModel):
    """One turn of a conversation."""

    role: str
    content: str | list[TextPart]
    name: str | None = None

    @property
    def text(self) -> str:
        """The content as one string (text parts joined, as chat templates expect a string)."""
        return self.content if isinstance(self.content, str) else "".join(part.text for part in self.content)


class ChatCompletionRequest(SamplingRequest):
    """POST /v1/chat/completions: a conversation rendered with the checkpoint's chat template."""

    messages: list[ChatMessage] = Field(min_length=1)
    # The newer name of max_tokens; it wins when both are given.
    max_completion_tokens: Integer | None = None
    logprobs: bool = False
    # Top logprobs per generated token; needs logprobs.
    top_logprobs: Integer | None = None

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


class TokenizeRequest(StrictModel):
    """POST /tokenize: a prompt, or messages rendered with the chat template."""

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True

    @model_validator(mode="after")
    def _one_input(self) -> TokenizeRequest:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of prompt and messages")
        return self


class DetokenizeRequest(StrictModel):
    """POST /detokenize: token ids back to text."""

    model: str | None = None
    tokens: list[int]
