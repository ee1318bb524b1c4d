"""The served OpenAPI schema: every route's request body, response bodies and error statuses.

The handlers parse bodies themselves (megakv.server.app says why), so FastAPI cannot see them: the request models
of megakv.server.protocol are declared here instead, with the response models below, which describe the JSON the
handlers build. Schema-driven clients and fuzzers (schemathesis) then see the API as it is.
"""
from __future__ import annotations

from typing import Any, Literal

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel, ConfigDict

from megakv.server.protocol import ChatCompletionRequest, CompletionRequest, DetokenizeRequest, TokenizeRequest

REQUEST_MODELS: tuple[type[BaseModel], ...] = (CompletionRequest, ChatCompletionRequest, TokenizeRequest,
                                               DetokenizeRequest)


class OpenModel(BaseModel):
    """A response object: the fields listed are always there; extensions asked for (token ids, kv_placement)
    may add others."""

    model_config = ConfigDict(extra="allow")


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: int


class ErrorResponse(BaseModel):
    """Every error status: OpenAI's error shape."""

    error: ErrorDetail


class PromptTokensDetails(BaseModel):
    # Prompt tokens whose KV the prefix cache gave.
    cached_tokens: int


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails


class CompletionChoice(OpenModel):
    index: int
    text: str
    logprobs: dict[str, Any] | None
    finish_reason: str | None
    stop_reason: str | int | None


class CompletionResponse(OpenModel):
    """POST /v1/completions without streaming."""

    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage


class AssistantMessage(OpenModel):
    role: Literal["assistant"]
    content: str


class ChatChoice(OpenModel):
    index: int
    message: AssistantMessage
    logprobs: dict[str, Any] | None
    finish_reason: str | None
    stop_reason: str | int | None


class ChatCompletionResponse(OpenModel):
    """POST /v1/chat/completions without streaming."""

    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class ModelCard(OpenModel):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    root: str
    parent: str | None
    max_model_len: int


class ModelList(BaseModel):
    """GET /v1/models."""

    object: Literal["list"]
    data: list[ModelCard]


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]


class DetokenizeResponse(BaseModel):
    prompt: str


class VersionResponse(BaseModel):
    version: str


def errors(*status_codes: int) -> dict[int | str, dict[str, Any]]:
    """The error responses a route may give."""
    return {status_code: {"model": ErrorResponse} for status_code in status_codes}


def generation_route(body: type[BaseModel], response: type[BaseModel]) -> dict[str, Any]:
    """The route arguments of a completion route: its body, its JSON or event-stream answer, its errors."""
    # Each Server-Sent Event, as OpenAPI 3.2 describes an event stream's items.
    event = {"type": "object", "required": ["data"], "properties": {
        "data": {"type": "string", "description": "one JSON chunk (or an error object); the last event is [DONE]"},
        "event": {"type": "string"}}}
    streamed = {"text/event-stream": {"schema": event}}
    return {"response_model": None, "openapi_extra": request_body(body),
            "responses": {200: {"model": response, "content": streamed}, **errors(400, 413, 500, 503)}}


def request_body(model: type[BaseModel]) -> dict[str, Any]:
    """An operation's JSON request body, as a reference to ``model``'s schema (see install_openapi)."""
    schema = {"$ref": f"#/components/schemas/{model.__name__}"}
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}


def install_openapi(app: FastAPI, model_name: str) -> None:
    """Serve ``app``'s schema with the request models' schemas among its components; their ``model`` field takes
    the one name this server answers to."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            served = {"type": "string", "enum": [model_name]}
            for model in REQUEST_MODELS:
                model_schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
                components.update(model_schema.pop("$defs", {}))
                required = "model" in model_schema.get("required", ())
                model_schema["properties"]["model"] = served if required else {"anyOf": [served, {"type": "null"}]}
                components[model.__name__] = model_schema
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi
