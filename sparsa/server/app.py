"""The FastAPI application: routes, auth, body-size limit, errors, metrics, chat page."""

from __future__ import annotations

import asyncio
import gc
import hmac
import json
import logging
import time
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, Response
from fastapi.staticfiles import StaticFiles
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from sparsa.engine.llm_engine import LLMEngine
from sparsa.server.async_engine import AsyncEngine, EngineFailed
from sparsa.server.errors import APIError
from sparsa.server.metrics import ServerMetrics
from sparsa.server.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeRequest,
)
from sparsa.server.serving import ClientGone, OpenAIServing
from sparsa.server.settings import ServerSettings
from sparsa.server.tokenize import detokenize, tokenize
from sparsa.server.tool_parser import get_tool_parser

log = logging.getLogger(__name__)
STATIC = Path(__file__).parent / "static"
_ENDPOINTS = {"/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/metrics",
              "/"}


_GENERATE = ("/v1/completions", "/v1/chat/completions")


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


_ERRORS: dict[int | str, dict[str, Any]] = {
    s: {"model": ErrorResponse} for s in (400, 401, 404, 408, 413, 429, 500, 503, 504)
}


# 200 is JSON, or with "stream": true server-sent events
_GENERATE_RESPONSES: dict[int | str, dict[str, Any]] = {
    **_ERRORS, 200: {"description": "The completion (JSON), or its chunks as server-sent "
                                    "events when stream is true",
                     "content": {"application/json": {"schema": {"type": "object"}},
                                 "text/event-stream": {"schema": {"type": "string"}}}}}


_TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict", "none"}


def _field_part(part: Any) -> bool:
    """Whether a part of a pydantic error location names a field or an index (and not
    the union member tried, such as "list[str]" or "function-after[...]")."""
    if isinstance(part, int):
        return True
    return (part != "body" and part.isidentifier() and part not in _TYPE_TAGS)


def _error(status: int, message: str, **kw: Any) -> APIError:
    return APIError(status, message, **kw)


async def _send_error(send: Send, err: APIError) -> None:
    body = json.dumps(err.body()).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    for k, v in (err.headers or {}).items():
        headers.append((k.lower().encode(), v.encode()))
    await send({"type": "http.response.start", "status": err.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class GuardMiddleware:
    """Plain ASGI, outermost: counts requests by status, checks the Host header and the API
    key, turns generation requests away at once when the server is overloaded (before
    their body is read or parsed), and reads the body up to the size limit (413 beyond)
    and the time limit (408 beyond) before anything parses it."""

    def __init__(self, app: ASGIApp, settings: ServerSettings, metrics: ServerMetrics,
                 engine: AsyncEngine):
        self.app = app
        self.settings = settings
        self.metrics = metrics
        self.engine = engine

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        if path == "/health" and scope.get("method") in ("GET", "HEAD"):
            # answered here, ahead of the framework's layers: a liveness probe must stay
            # fast while the event loop is crowded (same answer as the documented route)
            await self._health(scope, send)
            return
        endpoint = path if path in _ENDPOINTS else "other"
        status = {"code": 500}
        arrival = time.perf_counter()

        async def counting_send(msg: Message) -> None:
            if msg["type"] == "http.response.start":
                status["code"] = msg["status"]
                started["yes"] = True
                self.metrics.response_start.labels(endpoint, f"{msg['status'] // 100}xx"
                                                   ).observe(time.perf_counter() - arrival)
            await send(msg)

        started = {"yes": False}

        try:
            err, receive = await self._check(scope, receive, path)
            if err is not None:
                await _send_error(counting_send, err)
                return
            if path in _GENERATE and scope.get("method") == "POST":
                self.engine.arrive(scope.setdefault("state", {}))
            await self.app(scope, receive, counting_send)
        except Exception:
            # Starlette re-raises after its 500 answer, and uvicorn then drops the
            # keep-alive connection, failing the client's next request too: stop it here.
            log.exception("unhandled error in %s", path)
            if not started["yes"]:
                await _send_error(counting_send, APIError(500, "internal error"))
        finally:
            self.engine.parsed(scope.setdefault("state", {}))
            self.metrics.requests.labels(endpoint, str(status["code"])).inc()

    async def _health(self, scope: Scope, send: Send) -> None:
        headers = {k.decode("latin-1").lower(): v.decode("latin-1")
                   for k, v in scope.get("headers", [])}
        if not self.settings.host_allowed(headers.get("host", "")):
            err = _error(400, "Host header not allowed (--allowed-hosts)",
                         code="host_not_allowed")
        elif not self.engine.is_alive:
            err = APIError(503, "engine thread is not running")
        else:
            err = None
        if err is not None:
            await _send_error(send, err)
        else:
            await send({"type": "http.response.start", "status": 200, "headers": [
                (b"content-type", b"application/json"), (b"content-length", b"16")]})
            await send({"type": "http.response.body", "body": b'{"status": "ok"}'})
        code = 200 if err is None else err.status
        self.metrics.requests.labels("/health", str(code)).inc()

    async def _check(self, scope: Scope, receive: Receive, path: str):
        headers = {k.decode("latin-1").lower(): v.decode("latin-1")
                   for k, v in scope.get("headers", [])}
        if not self.settings.host_allowed(headers.get("host", "")):
            return _error(400, "Host header not allowed (--allowed-hosts)",
                          code="host_not_allowed"), receive
        key = self.settings.api_key
        if key and path.startswith("/v1"):
            auth = headers.get("authorization", "")
            given = auth[7:].strip() if auth[:7].lower() == "bearer " else ""
            if not hmac.compare_digest(given.encode(), key.encode()):
                return _error(401, "Incorrect or missing API key: send 'Authorization: "
                                   "Bearer <key>'", code="invalid_api_key"), receive
        if scope.get("method") not in ("POST", "PUT", "PATCH"):
            return None, receive
        if path in _GENERATE:
            busy = self.engine.overloaded()
            if busy is not None:
                return busy, receive
        limit = self.settings.max_body_bytes
        too_big = _error(413, f"request body larger than {limit} bytes",
                         code="request_too_large")
        try:
            if int(headers.get("content-length", "0")) > limit:
                return too_big, receive
        except ValueError:
            return _error(400, "bad Content-Length header"), receive
        chunks, size = [], 0
        timeout = self.settings.body_timeout
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            try:
                msg = await asyncio.wait_for(
                    receive(), None if deadline is None else max(0.0, deadline - time.monotonic()))
            except asyncio.TimeoutError:
                return _error(408, f"request body not received within {timeout:g} s "
                                   "(--body-timeout)", code="body_timeout",
                              headers={"Connection": "close"}), receive
            if msg["type"] == "http.disconnect":
                return None, _replay([], msg, receive)
            body = msg.get("body", b"")
            size += len(body)
            if size > limit:
                return too_big, receive
            chunks.append(body)
            if not msg.get("more_body", False):
                break
        return None, _replay(chunks, None, receive)


def _replay(chunks: list[bytes], first: Message | None, receive: Receive) -> Receive:
    """A receive() that hands out the body read already, then the real channel (so the
    app still sees the client's disconnect)."""
    pending: list[Message] = [first] if first is not None else [
        {"type": "http.request", "body": b"".join(chunks), "more_body": False}]

    async def replay() -> Message:
        if pending:
            return pending.pop()
        return await receive()

    return replay


def build_app(engine: LLMEngine, settings: ServerSettings) -> FastAPI:
    async_engine = AsyncEngine(engine, settings.admission)

    def stats() -> dict:
        s = engine.stats()
        s["tokens_in_flight"] = async_engine.tokens_in_flight
        return s

    metrics = ServerMetrics(stats)
    names = [settings.model_name, *settings.extra_model_names]
    serving = OpenAIServing(async_engine, names, metrics,
                            get_tool_parser(settings.tool_call_parser))

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        # Everything alive at start-up (model, tokenizer, libraries) lives as long as the
        # server: keep it out of the collector's full passes, which otherwise stop the
        # event loop for ~100 ms at a time under bursts of requests.
        gc.collect()
        gc.freeze()
        # This thread validates requests: it must not flush denormals (5e-324 > 0 would be
        # False), and a thread inherits the flag from the one that started it (a process
        # that generated on its main thread before serving).
        torch.set_flush_denormal(False)
        async_engine.start(asyncio.get_running_loop())
        try:
            yield
        finally:
            async_engine.shutdown()
            engine.shutdown()  # after the loop thread: writes --trace-experts

    app = FastAPI(title="Sparsa OpenAI-compatible server", version="0.1.0", lifespan=lifespan)
    app.state.engine = engine
    app.state.async_engine = async_engine
    app.state.metrics = metrics
    app.state.settings = settings

    @app.exception_handler(APIError)
    async def api_error(_: Request, e: APIError) -> JSONResponse:
        return e.response()

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, e: RequestValidationError) -> JSONResponse:
        errs = e.errors()
        # a value that matches no member of a union gets one error per member; ours (a
        # ValueError from a validator) says what is wrong, "should be a string" does not
        first = min(errs, key=lambda x: x.get("type") != "value_error") if errs else {}
        loc = [str(x) for x in first.get("loc", ()) if _field_part(x)]
        msg = f"{'.'.join(loc) or 'body'}: {first.get('msg', 'invalid request')}"
        if len(errs) > 1:
            msg += f" (and {len(errs) - 1} more errors)"
        return APIError(400, msg, param=loc[0] if loc else None).response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, e: StarletteHTTPException) -> JSONResponse:
        return APIError(e.status_code, str(e.detail), headers=getattr(e, "headers", None)
                        ).response()

    @app.exception_handler(EngineFailed)
    async def failed(_: Request, e: EngineFailed) -> JSONResponse:
        return APIError(500, f"generation failed: {e}", code="engine_error").response()

    @app.exception_handler(ClientGone)
    async def gone(_: Request, e: ClientGone) -> Response:
        return Response(status_code=499)  # nobody reads it: nginx's "client closed request"

    @app.exception_handler(Exception)
    async def internal(_: Request, e: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return APIError(500, f"internal error: {type(e).__name__}").response()

    @app.get("/health")
    async def health() -> Response:
        if not async_engine.is_alive:
            return APIError(503, "engine thread is not running").response()
        return JSONResponse({"status": "ok"})

    @app.get("/metrics", response_class=PlainTextResponse, responses={200: {
        "content": {CONTENT_TYPE_LATEST.split(";")[0]: {"schema": {"type": "string"}}},
        "description": "Prometheus text exposition format"}})
    async def metrics_endpoint() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models", responses=_ERRORS)
    async def models() -> JSONResponse:
        now = int(time.time())
        return JSONResponse({"object": "list", "data": [
            {"id": n, "object": "model", "created": now, "owned_by": "sparsa",
             "root": settings.model_name, "max_model_len": engine.max_model_len}
            for n in names]})

    @app.post("/v1/completions", responses=_GENERATE_RESPONSES)
    async def completions(body: CompletionRequest, request: Request) -> Any:
        return await serving.completions(body, request)

    @app.post("/v1/chat/completions", responses=_GENERATE_RESPONSES)
    async def chat(body: ChatCompletionRequest, request: Request) -> Any:
        return await serving.chat(body, request)

    @app.post("/tokenize", responses=_ERRORS)
    async def tokenize_endpoint(body: TokenizeRequest) -> JSONResponse:
        return JSONResponse(await tokenize(serving, body))

    @app.post("/detokenize", responses=_ERRORS)
    async def detokenize_endpoint(body: DetokenizeRequest) -> JSONResponse:
        return JSONResponse(await detokenize(serving, body))

    @app.get("/", include_in_schema=False)
    async def index() -> FileResponse:
        return FileResponse(STATIC / "index.html")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    # middleware wraps the whole app, including its error handling, as the outermost layer
    app.add_middleware(GuardMiddleware, settings=settings, metrics=metrics,
                       engine=async_engine)
    return app
