"""The ASGI app: OpenAI-compatible chat completions answered from the stored caches.

Endpoints: ``POST /v1/chat/completions`` (``stream: true`` for server-sent events),
``POST /v1/retrieve``, ``GET /v1/models``, ``GET /health``, ``GET /metrics``. The engine and the
store are opened once; every use of the engine runs on the one generation thread
(:mod:`ragcompress.serve.worker`). Handlers parse and bound the request on the event loop, queue
the work, and turn the thread's events into a response.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ragcompress.errors import StoreError, StoreMismatchError
from ragcompress.runtime.engine import Engine
from ragcompress.serve.protocol import (
    ApiError,
    ChatQuery,
    api_error,
    chunk_body,
    completion_body,
    parse_chat,
    parse_json,
    parse_retrieve,
    sse,
)
from ragcompress.serve.service import ClientGone, Pending, Result, Service
from ragcompress.serve.settings import ServeSettings, host_name
from ragcompress.serve.worker import Event, Job

log = logging.getLogger("ragcompress.serve")


class JSONBody(JSONResponse):
    """Starlette's compact JSON with every non-ASCII character escaped. A lone surrogate (how
    Python gives a non-UTF-8 byte of an argument or a path, ``"\\udcff"``) has no UTF-8
    encoding, but it has an escape; parsed, the JSON is the same."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, ensure_ascii=True, allow_nan=False, separators=(",", ":")).encode("ascii")


class EventStream(StreamingResponse):
    """Server-sent events whose job is cancelled if the response ends early (client gone)."""

    def __init__(self, content: AsyncIterator[bytes], job: Job) -> None:
        super().__init__(
            content, media_type="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        )
        self.job = job

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.job.cancel()


# -- request handling ------------------------------------------------------------------------------


def _service(request: Request) -> Service:
    service: Service = request.app.state.service
    return service


async def read_json(request: Request, limit: int, timeout: float) -> dict[str, Any]:
    """The body as a JSON object; 413 past ``limit`` bytes (before reading it when the length is
    given); 408 if it has not all arrived within ``timeout`` seconds.

    Only a body sent as ``application/json``: a web page may send any site a POST whose body is
    ``text/plain`` (or has no type) without asking it first (no CORS preflight), so a service on
    localhost that parsed such a body would answer questions for every page its user opens."""
    media_type = request.headers.get("content-type", "").partition(";")[0].strip().lower()
    if media_type != "application/json":
        raise ApiError(
            415, "send the request body as JSON, with `Content-Type: application/json`", code="unsupported_media_type"
        )
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise ApiError(400, "invalid Content-Length header", code="invalid_request")
        if int(declared) > limit:
            raise ApiError(413, f"request body of {declared} bytes exceeds the limit of {limit}", code="too_large")
    try:
        body = await asyncio.wait_for(_body(request, limit), timeout)
    except TimeoutError:
        raise ApiError(
            408,
            f"the request body did not arrive within {timeout:g} s",
            code="request_timeout",
            headers={"Connection": "close"},  # the rest of the body is never read
        ) from None
    return parse_json(body)


async def _body(request: Request, limit: int) -> bytes:
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(413, f"request body exceeds the limit of {limit} bytes", code="too_large")
        chunks.append(chunk)
    return b"".join(chunks)


def client_error(service: Service, path: str, error: ApiError) -> ApiError:
    """``error`` counted, logged in full (5xx), and as its client gets it: the store's directory
    reads ``<store>``. A store's error names its path (``store /srv/... is gone``), which tells
    the operator where to look and a client only where the server keeps its files."""
    service.metrics.errors.labels(service.metrics.endpoint(path), error.code or str(error.status)).inc()
    if error.status >= 500:
        log.warning("%s: %s %s", path, error.status, error.message)
    message = error.message
    for shown in _store_paths(service):
        message = message.replace(shown, "<store>")
    if message == error.message:
        return error
    return ApiError(error.status, message, type=error.type, code=error.code, param=error.param, headers=error.headers)


def _store_paths(service: Service) -> list[str]:
    """How errors may spell the served store's directory, longest first: its absolute path, and
    the path it was opened by when that is relative but not a bare name (``store`` alone is a
    word of every such message, and names no place)."""
    given = str(service.engine.store.path)
    spellings = {os.path.abspath(given)}
    if os.sep in given.strip(os.sep):
        spellings.add(given)
    return sorted(spellings, key=len, reverse=True)


def error_response(service: Service, path: str, error: ApiError) -> JSONBody:
    error = client_error(service, path, error)
    return JSONBody(error.body(), status_code=error.status, headers=error.headers)


def handled(
    endpoint: Callable[[Request], Awaitable[Response]],
) -> Callable[[Request], Awaitable[Response]]:
    """Run ``endpoint``; any failure becomes an OpenAI-style error response (never a crash)."""

    async def run(request: Request) -> Response:
        service = _service(request)
        try:
            return await endpoint(request)
        except ClientGone:
            return Response(status_code=499)
        except Exception as exc:
            if not isinstance(exc, ApiError):
                log.exception("%s failed", request.url.path)
            return error_response(service, request.url.path, api_error(exc))

    return run


@handled
async def chat_completions(request: Request) -> Response:
    service = _service(request)
    query = parse_chat(
        await read_json(request, service.settings.max_body_bytes, service.settings.body_timeout_s),
        service.settings,
        service.engine.options.max_new_tokens,
    )
    pending = await service.submit(request, partial(service.answer, query), query if service.may_batch(query) else None)
    # Wait for the first token (or the end, or an error) before answering: a request that fails
    # while its caches are loaded gets a real status code, even when it asked for a stream.
    first = await pending.until("started", "delta", "done")
    if not query.stream:
        kind, result = first if first[0] == "done" else await pending.until("done")
        return JSONBody(
            completion_body(
                query, service.settings.model_id, result.text, result.finish_reason, result.usage(), result.info()
            )
        )
    pending.request = None  # from here the response notices a departed client itself (EventStream)
    return EventStream(_chunks(service, request.url.path, query, pending, first), pending.job)


async def _chunks(
    service: Service, path: str, query: ChatQuery, pending: Pending, first: Event
) -> AsyncIterator[bytes]:
    model = service.settings.model_id
    yield sse(chunk_body(query, model, {"role": "assistant", "content": ""}))
    kind, value = first
    while True:
        if kind == "delta":
            yield sse(chunk_body(query, model, {"content": value}))
        elif kind == "done":
            result: Result = value
            yield sse(chunk_body(query, model, {}, result.finish_reason, ragcompress=result.info()))
            if query.include_usage:
                yield sse(chunk_body(query, model, None, usage=result.usage()))
            yield sse("[DONE]")
            return
        elif kind == "error":  # after the stream began: an error event, then the end
            yield sse(client_error(service, path, api_error(value)).body())
            return
        kind, value = await pending.next()


@handled
async def retrieve(request: Request) -> Response:
    service = _service(request)
    settings = service.settings
    query = parse_retrieve(await read_json(request, settings.max_body_bytes, settings.body_timeout_s), settings)
    pending = await service.submit(request, partial(service.retrieve, query))
    _, hits = await pending.until("done")
    return JSONBody({"object": "list", "data": hits})


def _model(service: Service) -> dict[str, Any]:
    return {"id": service.settings.model_id, "object": "model", "created": service.created, "owned_by": "ragcompress"}


@handled
async def models(request: Request) -> Response:
    return JSONBody({"object": "list", "data": [_model(_service(request))]})


@handled
async def one_model(request: Request) -> Response:
    service = _service(request)
    if request.path_params["model"] != service.settings.model_id:
        raise ApiError(404, f"model {request.path_params['model']!r} is not served here", code="model_not_found")
    return JSONBody(_model(service))


async def health(request: Request) -> Response:
    """200 while the service can answer; 503 once its store was removed or replaced by another
    build (``index --overwrite`` with other settings), which no request can recover from: an
    orchestrator's health check then restarts the service, which opens the new store.

    /health is never behind the key, so its 503 gives a code and a fixed reason, no path; the
    store's own message goes to the log (once while it stays the same: health is polled)."""
    service = _service(request)
    worker = service.worker
    body: dict[str, Any] = {
        "status": "ok",
        "queue": {
            "waiting": worker.waiting,
            "busy": worker.busy,
            "running": worker.running,
            "capacity": worker.queue_size,
        },
    }
    try:
        service.engine.store.check_replacement()
    except StoreError as exc:
        if request.app.state.health_error != str(exc):
            request.app.state.health_error = str(exc)
            log.warning("/health: 503 %s", exc)
        reason = (
            "the store was replaced by another build, which this service cannot answer from; restart it"
            if isinstance(exc, StoreMismatchError)
            else "the store cannot be read (removed?); restore it and restart the service"
        )
        body.update(status="unavailable", code="store_unavailable", error=reason)
        return JSONBody(body, status_code=503)
    request.app.state.health_error = None
    return JSONBody(body)


async def metrics(request: Request) -> Response:
    service = _service(request)
    return Response(service.metrics.render(), media_type=service.metrics.content_type)


async def http_error(request: Request, exc: Exception) -> Response:
    """404 and 405 from routing, in OpenAI's error shape."""
    assert isinstance(exc, HTTPException)
    code = "method_not_allowed" if exc.status_code == 405 else "not_found"
    message = f"{request.method} {request.url.path}: {exc.detail}"
    error = ApiError(exc.status_code, message, code=code, headers=dict(exc.headers or {}))  # 405 keeps its Allow
    return error_response(_service(request), request.url.path, error)


class Gate:
    """Outermost layer: the Host header (``ServeSettings.allowed_hosts``), the API key (every
    endpoint but /health) and request counting."""

    def __init__(self, app: ASGIApp, service: Service) -> None:
        self.app = app
        self.service = service
        key = service.settings.api_key
        self.expected = None if key is None else key.encode()  # the credentials after "Bearer "
        hosts = service.settings.allowed_hosts
        self.hosts = None if hosts is None else frozenset(host_name(host) for host in hosts)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        status = 500

        async def counted(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            if self.hosts is not None and not self._host_allowed(scope):
                error = ApiError(
                    400,
                    "the Host header names a host this service does not answer for (a guard against DNS "
                    "rebinding); connect to it as localhost or 127.0.0.1, or start it with --allowed-host NAME",
                    code="invalid_host",
                )
                await error_response(self.service, path, error)(scope, receive, counted)
                return
            if self.expected is not None and path != "/health" and not self._authorized(scope):
                error = ApiError(
                    401,
                    "missing or wrong API key: send `Authorization: Bearer KEY`",
                    code="invalid_api_key",
                    headers={"WWW-Authenticate": "Bearer"},
                )
                await error_response(self.service, path, error)(scope, receive, counted)
                return
            await self.app(scope, receive, counted)
        finally:
            self.service.metrics.requests.labels(self.service.metrics.endpoint(path), str(status)).inc()

    def _host_allowed(self, scope: Scope) -> bool:
        """A request without a Host header (HTTP/1.0) is let through: browsers always send one."""
        assert self.hosts is not None
        given = [value for name, value in scope["headers"] if name == b"host"]
        if not given:
            return True
        if len(given) != 1:
            return False
        host = given[0].decode("latin-1")
        name = host.partition("]")[0] + "]" if host.startswith("[") else host.partition(":")[0]
        return host_name(name) in self.hosts

    def _authorized(self, scope: Scope) -> bool:
        assert self.expected is not None
        given = [value for name, value in scope["headers"] if name == b"authorization"]
        if len(given) != 1:
            return False
        scheme, _, credentials = given[0].partition(b" ")  # the scheme is case-insensitive (RFC 9110 11.1)
        return scheme.lower() == b"bearer" and hmac.compare_digest(credentials.strip(b" "), self.expected)


def create_app(
    engine_or_store: Engine | str | Path, settings: ServeSettings | None = None, *, options: Any = None
) -> Starlette:
    """The service as an ASGI app (run it with uvicorn, or test it in-process).

    ``engine_or_store``: an open :class:`Engine` (the app never closes it) or a store path (the
    app opens it with ``options``, default the ``settings.preset``'s, and closes it on shutdown).
    The app's ``state.service`` holds the engine, the generation thread and the metrics.
    """
    settings = settings or ServeSettings()
    if isinstance(engine_or_store, Engine):
        service = Service(engine_or_store, settings, owns_engine=False)
    else:
        from ragcompress.presets import answer_options

        engine = Engine.open(engine_or_store, options=options or answer_options(settings.preset))
        service = Service(engine, settings, owns_engine=True)

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        yield
        await asyncio.to_thread(service.close)

    app = Starlette(
        routes=[
            Route("/v1/chat/completions", chat_completions, methods=["POST"]),
            Route("/v1/retrieve", retrieve, methods=["POST"]),
            Route("/v1/models", models, methods=["GET"]),
            Route("/v1/models/{model:path}", one_model, methods=["GET"]),
            Route("/health", health, methods=["GET"]),
            Route("/metrics", metrics, methods=["GET"]),
        ],
        exception_handlers={HTTPException: http_error},
        lifespan=lifespan,
    )
    app.state.service = service
    app.state.health_error = None  # the last store error /health logged
    app.add_middleware(Gate, service=service)
    return app
