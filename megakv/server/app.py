"""The FastAPI application of ``megakv serve``: vLLM's OpenAI-compatible routes over an AsyncEngine.

Bodies are parsed here rather than by FastAPI so that every mistake (malformed
JSON, text that is not Unicode, a wrong type, an unknown field) is one HTTP 400
with an OpenAI-style error body naming it, and a body over the size limit a 413
before it is read whole. Parsing, tokenization and detokenization run in worker
threads: a large body never stalls the event loop, /health included. A client
that goes away aborts its request: a stream is cancelled by Starlette, and a
whole response is raced against the client's disconnect.
"""
from __future__ import annotations

import asyncio
import json
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException

from megakv.engine.async_engine import EngineStoppedError, RequestRejectedError
from megakv.server.openapi import (ChatCompletionResponse, CompletionResponse, DetokenizeResponse, ModelList,
                                   TokenizeResponse, VersionResponse, errors, generation_route, install_openapi,
                                   request_body)
from megakv.server.protocol import ChatCompletionRequest, CompletionRequest, DetokenizeRequest, TokenizeRequest
from megakv.server.serving import APIError, Completion, ServingContext, error_body, tokenize_body, tokenizer_info
from megakv.server.streams import RequestFailedError, ServerShuttingDownError

# HTTP status nginx uses for a client that closed the connection before the answer.
CLIENT_CLOSED_REQUEST = 499
# Where pydantic names the member of a union it tried (list members are spelled like "list[int]").
UNION_MEMBER_TAGS = {"str", "int", "float", "bool"}


def _reject_constant(name: str) -> float:
    raise APIError(f"the request body is not valid JSON: {name} is not a number JSON allows")


def describe_validation_error(err: ValidationError) -> tuple[str, str | None]:
    """One message naming the first problem pydantic found, and the field it is in."""
    # In a union, the member that raised a message of megakv's own is the one the client meant.
    first = next((error for error in err.errors() if error["type"] == "value_error"), err.errors()[0])
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


def unencodable_text(data: Any) -> str | None:
    """The path of the first string (value or key) in ``data`` that is not Unicode text, or None: a lone
    surrogate, which a JSON escape like \\ud800 or CESU-8 bytes give, cannot reach a tokenizer."""
    pending: list[tuple[str, Any]] = [("", data)]
    while pending:
        path, value = pending.pop()
        if isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                # The path itself may hold the surrogate: it is escaped to be sent back.
                return (path or "the body").encode("utf-8", "backslashreplace").decode("utf-8")
        elif isinstance(value, dict):
            for key, item in value.items():
                child = f"{path}.{key}" if path else key
                pending.extend([(child, key), (child, item)])
        elif isinstance(value, list):
            pending.extend((f"{path}.{index}" if path else str(index), item) for index, item in enumerate(value))
    return None


def decode_json(body: bytes, model_class: type[BaseModel]) -> Any:
    """``body`` as ``model_class``; APIError naming what is wrong."""
    try:
        data = json.loads(body.decode("utf-8"), parse_constant=_reject_constant)
    except APIError:
        raise
    except UnicodeDecodeError as err:
        raise APIError(f"the request body is not valid JSON: it is not UTF-8 ({err})") from None
    except RecursionError:
        raise APIError("the request body is nested too deeply to parse") from None
    except ValueError as err:  # a syntax error, or an integer literal longer than Python converts
        raise APIError(f"the request body is not valid JSON: {err}") from None
    if not isinstance(data, dict):
        raise APIError("the request body must be a JSON object")
    where = unencodable_text(data)
    if where is not None:
        raise APIError(f"invalid value for {where!r}: it holds a lone UTF-16 surrogate, which is not text",
                       param=where)
    try:
        return model_class.model_validate(data)
    except ValidationError as err:
        message, param = describe_validation_error(err)
        raise APIError(message, param=param) from None


async def read_body(request: Request, max_bytes: int) -> bytes:
    """The request's body; a 413 APIError as soon as it is known to exceed ``max_bytes``."""
    too_large = APIError(f"the request body exceeds the server's limit of {max_bytes:,} bytes "
                         f"(megakv serve --max-request-bytes)", status_code=413)
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > max_bytes:
        raise too_large
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_bytes:
            raise too_large
        chunks.append(chunk)
    return b"".join(chunks)


async def parse_body(request: Request, model_class: type[BaseModel], max_bytes: int) -> Any:
    """The request's JSON body as ``model_class``, parsed in a worker thread; APIError naming what is wrong."""
    body = await read_body(request, max_bytes)
    return await asyncio.to_thread(decode_json, body, model_class)


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

    @app.exception_handler(RequestRejectedError)
    async def request_rejected(_: Request, err: RequestRejectedError) -> JSONResponse:
        return JSONResponse(error_body(str(err), 400), status_code=400)

    @app.exception_handler(RequestFailedError)
    async def request_failed(_: Request, err: RequestFailedError) -> JSONResponse:
        return JSONResponse(error_body(str(err), 500), status_code=500)

    @app.exception_handler(ServerShuttingDownError)
    async def shutting_down(_: Request, err: ServerShuttingDownError) -> JSONResponse:
        return JSONResponse(error_body(str(err), 503), status_code=503)

    @app.exception_handler(HTTPException)
    async def http_error(_: Request, err: HTTPException) -> JSONResponse:
        # A 405 keeps the Allow header Starlette sets.
        return JSONResponse(error_body(str(err.detail), err.status_code), status_code=err.status_code,
                            headers=err.headers)

    async def respond(request: Request, completion: Completion) -> Response:
        if completion.request.stream:
            return StreamingResponse(completion.stream(), media_type="text/event-stream")
        body = await cancel_on_disconnect(request, completion.run())
        if body is None:
            return Response(status_code=CLIENT_CLOSED_REQUEST)
        return JSONResponse(body)

    max_bytes = context.limits.max_bytes

    async def completion(request: Request, model_class: type[BaseModel]) -> Response:
        body = await parse_body(request, model_class, max_bytes)
        # Tokenizing a long prompt takes seconds; the worker thread leaves the event loop free meanwhile.
        return await respond(request, await asyncio.to_thread(Completion, body, context))

    @app.post("/v1/completions", **generation_route(CompletionRequest, CompletionResponse))
    async def completions(request: Request) -> Response:
        return await completion(request, CompletionRequest)

    @app.post("/v1/chat/completions", **generation_route(ChatCompletionRequest, ChatCompletionResponse))
    async def chat_completions(request: Request) -> Response:
        return await completion(request, ChatCompletionRequest)

    @app.get("/v1/models", response_model=ModelList)
    async def models() -> dict[str, Any]:
        card = {"id": context.model_name, "object": "model", "created": 0, "owned_by": "megakv",
                "root": context.model_name, "parent": None, "max_model_len": context.max_model_len}
        return {"object": "list", "data": [card]}

    @app.get("/health", response_class=Response,
             responses={200: {"description": "The engine loop runs: no body, or, when instances of the cluster have "
                                             "failed and the others serve, {\"status\": \"degraded\", "
                                             "\"failed_instances\": [...]}"}, **errors(503)})
    async def health() -> Response:
        if not context.engine.is_running:
            return JSONResponse(error_body("the engine loop stopped", 503), status_code=503)
        failed = context.engine.failed_instances
        if failed:
            return JSONResponse({"status": "degraded", "failed_instances": failed,
                                 "message": f"instance(s) {failed} failed; the other instances serve"})
        return Response(status_code=200)

    @app.api_route("/ping", methods=["GET", "POST"], response_class=Response,
                   responses={200: {"description": "The engine loop runs (no body), as /health"}, **errors(503)})
    async def ping() -> Response:
        return await health()

    @app.get("/tokenizer_info", responses=errors(400))
    async def get_tokenizer_info() -> dict[str, Any]:
        return tokenizer_info(context)

    @app.get("/version", response_model=VersionResponse)
    async def server_version() -> dict[str, str]:
        return {"version": megakv_version()}

    @app.post("/tokenize", response_model=TokenizeResponse, openapi_extra=request_body(TokenizeRequest),
              responses=errors(400, 413))
    async def tokenize(request: Request) -> dict[str, Any]:
        body = await parse_body(request, TokenizeRequest, max_bytes)
        context.check_model(body.model)
        tokens = await asyncio.to_thread(tokenize_body, body, context)
        return {"count": len(tokens), "max_model_len": context.max_model_len, "tokens": tokens}

    @app.post("/detokenize", response_model=DetokenizeResponse, openapi_extra=request_body(DetokenizeRequest),
              responses=errors(400, 413))
    async def detokenize(request: Request) -> dict[str, str]:
        body = await parse_body(request, DetokenizeRequest, max_bytes)
        context.check_model(body.model)
        context.check_token_ids(body.tokens, "tokens")
        tokenizer = context.require_tokenizer("/detokenize")
        return {"prompt": await asyncio.to_thread(tokenizer.decode, body.tokens)}

    @app.get("/metrics", response_class=PlainTextResponse,
             responses={200: {"description": "Prometheus' text format"}})
    async def metrics() -> Response:
        context.metrics.engine_stats.snapshot = await context.engine.stats()
        return Response(generate_latest(context.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    install_openapi(app, context.model_name)
    return app
