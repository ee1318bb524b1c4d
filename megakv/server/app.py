"""The FastAPI application of ``megakv serve``: vLLM's OpenAI-compatible routes over an AsyncEngine.

Bodies are parsed here rather than by FastAPI so that every mistake (malformed
JSON, a wrong type, an unknown field) is one HTTP 400 with an OpenAI-style error
body naming it. A client that goes away aborts its request: a stream is cancelled
by Starlette, and a whole response is raced against the client's disconnect.
"""
from __future__ import annotations

import asyncio
import json
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException

from megakv.engine.async_engine import EngineStoppedError
from megakv.server.protocol import ChatCompletionRequest, CompletionRequest, DetokenizeRequest, TokenizeRequest
from megakv.server.serving import APIError, Completion, ServingContext, chat_prompt

# HTTP status nginx uses for a client that closed the connection before the answer.
CLIENT_CLOSED_REQUEST = 499
# Where pydantic names the member of a union it tried (list members are spelled like "list[int]").
UNION_MEMBER_TAGS = {"str", "int", "float", "bool"}


def error_body(message: str, status_code: int, param: str | None = None) -> dict[str, Any]:
    """An OpenAI-style error object."""
    kind = "BadRequestError" if status_code == 400 else "NotFoundError" if status_code == 404 else "ServerError"
    return {"error": {"message": message, "type": kind, "param": param, "code": status_code}}


def _reject_constant(name: str) -> float:
    raise APIError(f"the request body is not valid JSON: {name} is not a number JSON allows")


def describe_validation_error(err: ValidationError) -> tuple[str, str | None]:
    """One message naming the first problem pydantic found, and the field it is in."""
    first = err.errors()[0]
    # A union's errors carry the member tried in their location ("prompt", "list[int]", 0): keep the field only.
    location = [str(part) for index, part in enumerate(first["loc"])
                if index == 0 or isinstance(part, int) or not ("[" in part or part in UNION_MEMBER_TAGS)]
    name = ".".join(location) or None
    if first["type"] == "extra_forbidden":
        return f"unsupported field {name!r}: megakv does not implement it", name
    if first["type"] == "missing":
        return f"missing required field {name!r}", name
    if first["type"] == "value_error":
        return str(first["ctx"]["error"]), name
    if name is None:
        return first["msg"], None
    return f"invalid value for {name!r}: {first['msg'].lower()} (got {first['input']!r})", name


async def parse_body(request: Request, model_class: type[BaseModel]) -> Any:
    """The request's JSON body as ``model_class``; APIError naming what is wrong."""
    body = await request.body()
    try:
        data = json.loads(body, parse_constant=_reject_constant)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise APIError(f"the request body is not valid JSON: {err}") from None
    if not isinstance(data, dict):
        raise APIError("the request body must be a JSON object")
    try:
        return model_class.model_validate(data)
    except ValidationError as err:
        message, param = describe_validation_error(err)
        raise APIError(message, param=param) from None


async def _wait_for_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def cancel_on_disconnect(request: Request, work: Any) -> Any:
    """Await ``work``; if the client goes away first, cancel it (aborting its requests) and return None."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_wait_for_disconnect(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
    return None if task.cancelled() else task.result()


def megakv_version() -> str:
    """The installed megakv's version."""
    try:
        return version("megakv")
    except PackageNotFoundError:
        return "unknown"


def build_app(context: ServingContext) -> FastAPI:
    """The application serving ``context``'s model."""
    app = FastAPI(title="megakv", version=megakv_version())

    @app.exception_handler(APIError)
    async def api_error(_: Request, err: APIError) -> JSONResponse:
        return JSONResponse(error_body(str(err), err.status_code, err.param), status_code=err.status_code)

    @app.exception_handler(EngineStoppedError)
    async def engine_stopped(_: Request, err: EngineStoppedError) -> JSONResponse:
        return JSONResponse(error_body(str(err), 500), status_code=500)

    @app.exception_handler(HTTPException)
    async def http_error(_: Request, err: HTTPException) -> JSONResponse:
        return JSONResponse(error_body(str(err.detail), err.status_code), status_code=err.status_code)

    async def respond(request: Request, completion: Completion) -> Response:
        if completion.request.stream:
            return StreamingResponse(completion.stream(), media_type="text/event-stream")
        body = await cancel_on_disconnect(request, completion.run())
        if body is None:
            return Response(status_code=CLIENT_CLOSED_REQUEST)
        return JSONResponse(body)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await respond(request, Completion(await parse_body(request, CompletionRequest), context))

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await respond(request, Completion(await parse_body(request, ChatCompletionRequest), context))

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        card = {"id": context.model_name, "object": "model", "created": 0, "owned_by": "megakv",
                "root": context.model_name, "parent": None, "max_model_len": context.max_model_len}
        return {"object": "list", "data": [card]}

    @app.get("/health")
    async def health() -> Response:
        if not context.engine.is_running:
            return JSONResponse(error_body("the engine loop stopped", 503), status_code=503)
        return Response(status_code=200)

    @app.get("/version")
    async def server_version() -> dict[str, str]:
        return {"version": megakv_version()}

    @app.post("/tokenize")
    async def tokenize(request: Request) -> dict[str, Any]:
        body = await parse_body(request, TokenizeRequest)
        context.check_model(body.model)
        if body.messages is not None:
            tokens = chat_prompt(body.messages, context).token_ids
        else:
            tokens = context.require_tokenizer("/tokenize").encode(body.prompt, body.add_special_tokens)
        return {"count": len(tokens), "max_model_len": context.max_model_len, "tokens": tokens}

    @app.post("/detokenize")
    async def detokenize(request: Request) -> dict[str, str]:
        body = await parse_body(request, DetokenizeRequest)
        context.check_model(body.model)
        context.check_token_ids(body.tokens, "tokens")
        return {"prompt": context.require_tokenizer("/detokenize").decode(body.tokens)}

    @app.get("/metrics")
    async def metrics() -> Response:
        context.metrics.engine_stats.snapshot = await context.engine.stats()
        return Response(generate_latest(context.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app
