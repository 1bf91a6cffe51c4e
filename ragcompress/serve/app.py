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
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ragcompress.errors import StoreError
from ragcompress.runtime.attention import sliding_window
from ragcompress.runtime.batch import BatchStream, batchable
from ragcompress.runtime.engine import Engine
from ragcompress.runtime.generate import Prepared, TextDeltas, TokenStream, text_deltas
from ragcompress.runtime.options import AnswerOptions
from ragcompress.runtime.prepare import DenseStrategy, choose_strategy
from ragcompress.serve.metrics import Metrics
from ragcompress.serve.protocol import (
    ApiError,
    ChatQuery,
    RetrieveQuery,
    api_error,
    chunk_body,
    completion_body,
    parse_chat,
    parse_json,
    parse_retrieve,
    sse,
)
from ragcompress.serve.settings import ServeSettings
from ragcompress.serve.worker import Event, Job, QueueFull, ShuttingDown, Worker

log = logging.getLogger("ragcompress.serve")

# How often a waiting non-streaming request checks whether its client has gone away.
DISCONNECT_POLL_S = 1.0


@dataclass(frozen=True)
class Result:
    """One finished answer, as the generation thread hands it back."""

    text: str
    token_ids: list[int]
    passage_ids: list[str]
    ttft_s: float | None
    total_s: float
    queue_s: float
    backend: str
    bytes_read: int
    prompt_tokens: int
    finish_reason: str
    settings: dict[str, Any]
    batch: int = 1

    def info(self) -> dict[str, Any]:
        """The response's ``ragcompress`` object."""
        return {
            "passage_ids": self.passage_ids,
            "ttft_s": self.ttft_s,
            "total_s": self.total_s,
            "queue_s": self.queue_s,
            "backend": self.backend,
            "bytes_read": self.bytes_read,
            "batch": self.batch,
            "settings": self.settings,
        }

    def usage(self) -> dict[str, int]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": len(self.token_ids),
            "total_tokens": self.prompt_tokens + len(self.token_ids),
        }


class Service:
    """The engine, its generation thread, the settings and the metrics of one app."""

    def __init__(self, engine: Engine, settings: ServeSettings, *, owns_engine: bool) -> None:
        self.engine = engine
        self.settings = settings
        self.owns_engine = owns_engine
        self.worker = Worker(
            engine,
            settings.queue_size,
            max_batch=settings.max_batch,
            run_batch=self.answer_batch,
            batch_window_s=settings.batch_window_s,
        )
        self.passages = len(engine.store)
        self.metrics = Metrics(
            waiting=lambda: self.worker.waiting, busy=lambda: float(self.worker.busy), passages=lambda: self.passages
        )
        self.created = int(time.time())

    def close(self) -> None:
        """Finish queued work, stop the thread, close the engine if this service opened it."""
        self.worker.close()
        if self.owns_engine:
            self.engine.close()

    async def submit(self, request: Request, run: Callable[[Any, Job], None], batch: Any = None) -> Pending:
        """Queue ``run`` for the generation thread; 429 when the queue is full. The job is
        cancelled if ``request``'s client goes away while it waits. ``batch``: the query, when
        the job may share a batch (:meth:`answer_batch`)."""
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[Event] = asyncio.Queue()

        def emit(event: Event) -> None:
            try:
                loop.call_soon_threadsafe(events.put_nowait, event)
            except RuntimeError:  # the loop has closed: nobody waits for this event
                pass

        job = Job(run, emit, batch)
        try:
            self.worker.submit(job)
        except QueueFull as full:
            raise ApiError(
                429,
                f"the service is busy: {self.worker.queue_size} requests are already waiting; "
                f"retry after {full.retry_after_s} s",
                type="rate_limit_error",
                code="queue_full",
                headers={"Retry-After": str(full.retry_after_s)},
            ) from None
        except ShuttingDown:
            raise ApiError(503, "the service is shutting down", type="server_error", code="shutting_down") from None
        return Pending(job, events, request)

    # -- work done on the generation thread --------------------------------------------------------

    def may_batch(self, query: ChatQuery) -> bool:
        """Whether ``query`` may share a batch: batching is on and its options give a plain
        dense cache (no recompute, no packed segments)."""
        if self.settings.max_batch < 2:
            return False
        options = self._options(query, self.engine)
        return not options.recompute.active and isinstance(choose_strategy(self.engine.context, options), DenseStrategy)

    def _options(self, query: ChatQuery, engine: Engine) -> AnswerOptions:
        options = engine.options.replace(max_new_tokens=query.max_new_tokens)
        if query.recompute is not None:
            # the request sets the fraction; the preset's selection, sinks and check layer stay
            options = options.replace(recompute=replace(options.recompute, ratio=query.recompute))
        return options

    def answer(self, query: ChatQuery, engine: Engine, job: Job) -> None:
        """Retrieve (or look up) the passages and decode the answer from their caches, alone."""
        entries = self._entries(query, engine)
        options = self._options(query, engine)
        started = time.perf_counter()
        stream = engine.stream_cached(query.question, entries, options)
        self._decode(query, engine, job, entries, options, stream, started, 0.0)

    def _decode(
        self,
        query: ChatQuery,
        engine: Engine,
        job: Job,
        entries: list[Any],
        options: AnswerOptions,
        stream: TokenStream,
        started: float,
        ttft_offset_s: float,
    ) -> None:
        """Run ``stream`` for one request and report it (``ttft_offset_s``: time spent on it
        before the stream's own clock started)."""
        token_ids: list[int] = []

        def tokens() -> Any:
            for token in stream:
                token_ids.append(token)
                if len(token_ids) == 1:
                    job.emit(("started", None))
                yield token
                if job.cancelled.is_set():
                    return

        if query.stream:
            for piece in text_deltas(engine.lm.tokenizer, tokens()):
                job.emit(("delta", piece))
        else:
            for _ in tokens():
                pass
        ttft = None if stream.ttft_s is None else ttft_offset_s + stream.ttft_s
        backend = stream.backend or options.backend
        self._finish(query, engine, job, entries, options, token_ids, ttft, time.perf_counter() - started, backend)

    def answer_batch(self, engine: Engine, jobs: list[Job]) -> None:
        """Answer several queued requests together: each is retrieved and its caches prepared,
        then their questions are prefilled and their answers decoded in one batch
        (:class:`~ragcompress.runtime.batch.BatchStream`); the answers are the unbatched ones.
        A request that fails while it is prepared fails alone; one whose prepared cache cannot
        be batched (per-head eviction masks, a sliding window it outgrows) is decoded alone, and
        fails alone."""
        started = time.perf_counter()
        members: list[tuple[Job, ChatQuery, list[Any], AnswerOptions, Any]] = []
        alone: list[tuple[Job, ChatQuery, list[Any], AnswerOptions, Any, float]] = []
        for job in jobs:
            query: ChatQuery = job.batch
            try:
                entries = self._entries(query, engine)
                options = self._options(query, engine)
                prepare_started = time.perf_counter()
                prepared = engine.prepare(query.question, entries, options)
            except Exception as exc:
                job.emit(("error", exc))
                continue
            if batchable(prepared, sliding_window(engine.lm.config), options.max_new_tokens):
                members.append((job, query, entries, options, prepared))
            else:
                alone.append((job, query, entries, options, prepared, time.perf_counter() - prepare_started))
        for job, query, entries, options, prepared, prepare_s in alone:
            stream = TokenStream(engine.lm.model, partial(_ready, prepared), options.max_new_tokens, engine.stop_ids)
            try:
                self._decode(query, engine, job, entries, options, stream, started, prepare_s)
            except Exception as exc:  # fails this request alone, not the batch waiting behind it
                job.emit(("error", exc))
        if not members:
            return
        batch = BatchStream(
            engine.lm.model,
            [m[4] for m in members],
            [m[3].max_new_tokens for m in members],
            engine.stop_ids,
            started,
        )
        members = [m[:4] + (None,) for m in members]  # the batch holds the caches from here on
        tokens: list[list[int]] = [[] for _ in members]
        deltas = [TextDeltas(engine.lm.tokenizer) if m[1].stream else None for m in members]
        for i, token in batch:
            job, query, entries, options, _ = members[i]
            piece: str | None
            if token is None:
                piece = deltas[i].finish() if deltas[i] is not None else None  # type: ignore[union-attr]
                if piece is not None:
                    job.emit(("delta", piece))
                total_s = time.perf_counter() - started
                ttft = batch.ttft_s[i]
                self._finish(query, engine, job, entries, options, tokens[i], ttft, total_s, "dense", len(members))
                continue
            tokens[i].append(token)
            if len(tokens[i]) == 1:
                job.emit(("started", None))
            delta = deltas[i]
            if delta is not None:
                piece = delta.push(token)
                if piece is not None:
                    job.emit(("delta", piece))
            if job.cancelled.is_set():
                batch.drop(i)

    def _finish(
        self,
        query: ChatQuery,
        engine: Engine,
        job: Job,
        entries: list[Any],
        options: AnswerOptions,
        token_ids: list[int],
        ttft_s: float | None,
        total_s: float,
        backend: str,
        batch: int = 1,
    ) -> None:
        """The request's :class:`Result`, counted in the metrics and handed back."""
        bytes_read = engine.store.stored_bytes(entries)
        prompt = (
            engine.prefix.num_tokens + sum(e.num_tokens for e in entries) + len(engine.tokens.suffix(query.question))
        )
        result = Result(
            text=engine.decode(token_ids),
            token_ids=token_ids,
            passage_ids=[e.id for e in entries],
            ttft_s=ttft_s,
            total_s=total_s,
            queue_s=(job.started_at or job.submitted_at) - job.submitted_at,
            backend=backend,
            bytes_read=bytes_read,
            prompt_tokens=prompt,
            finish_reason="length" if len(token_ids) >= options.max_new_tokens else "stop",
            settings={
                "top_k": query.top_k,
                "recompute": options.recompute.ratio,
                "max_new_tokens": options.max_new_tokens,
                "backend": options.backend,
                "preset": self.settings.preset,
            },
            batch=batch,
        )
        metrics = self.metrics
        if result.ttft_s is not None:
            metrics.ttft.observe(result.ttft_s)
        metrics.latency.observe(total_s)
        metrics.queue_wait.observe(result.queue_s)
        metrics.bytes_read.inc(bytes_read)
        metrics.tokens.inc(len(token_ids))
        metrics.batch_size.observe(batch)
        job.emit(("done", result))

    def _entries(self, query: ChatQuery, engine: Engine) -> list[Any]:
        if query.passage_ids is None:
            assert query.top_k is not None
            entries = engine.retrieve(query.question, query.top_k)  # recounts committed rows
        else:
            entries = []
            for i, pid in enumerate(query.passage_ids):
                entry = engine.store.catalogue.get(pid)  # sees rows committed since the start
                if entry is None:
                    raise ApiError(
                        404,
                        f"passage {pid!r} is not in the store",
                        code="passage_not_found",
                        param=f"ragcompress.passage_ids.{i}",
                    )
                entries.append(entry)
        self.passages = len(engine.store)
        return entries

    def retrieve(self, query: RetrieveQuery, engine: Engine, job: Job) -> None:
        self.passages = len(engine.store)
        if self.passages == 0:
            raise StoreError("the store holds no passages; index some first")
        vector = engine.embedder.embed([query.query])[0]
        hits = engine.store.search(vector, query.top_k)
        job.emit(
            (
                "done",
                [
                    {"id": e.id, "title": e.title, "score": float(score), "num_tokens": e.num_tokens, "text": e.text}
                    for e, score in hits
                ],
            )
        )


def _ready(prepared: Prepared) -> Prepared:
    """An already prepared request, as the ``prepare`` of a :class:`TokenStream`."""
    return prepared


class ClientGone(Exception):
    """The client closed the connection while its request waited."""


class Pending:
    """A queued job's events, read on the event loop."""

    def __init__(self, job: Job, events: asyncio.Queue[Event], request: Request | None) -> None:
        self.job = job
        self.events = events
        self.request = request

    async def next(self) -> Event:
        """The next event; with a request to watch, cancels the job if its client goes away."""
        if self.request is None:
            return await self.events.get()
        while True:
            try:
                return await asyncio.wait_for(self.events.get(), DISCONNECT_POLL_S)
            except asyncio.TimeoutError:
                if await self.request.is_disconnected():
                    self.job.cancel()
                    raise ClientGone() from None

    async def until(self, *kinds: str) -> Event:
        """Skip events until one of ``kinds`` (or an error, raised as an :class:`ApiError`)."""
        while True:
            kind, value = await self.next()
            if kind == "error":
                raise api_error(value)
            if kind in kinds:
                return kind, value


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


async def read_json(request: Request, limit: int) -> dict[str, Any]:
    """The body as a JSON object; 413 past ``limit`` bytes (before reading it when the length is given)."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise ApiError(400, "invalid Content-Length header", code="invalid_request")
        if int(declared) > limit:
            raise ApiError(413, f"request body of {declared} bytes exceeds the limit of {limit}", code="too_large")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(413, f"request body exceeds the limit of {limit} bytes", code="too_large")
        chunks.append(chunk)
    return parse_json(b"".join(chunks))


def error_response(service: Service, path: str, error: ApiError) -> JSONBody:
    service.metrics.errors.labels(service.metrics.endpoint(path), error.code or str(error.status)).inc()
    if error.status >= 500:
        log.warning("%s: %s %s", path, error.status, error.message)
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
        await read_json(request, service.settings.max_body_bytes),
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
            error = api_error(value)
            error_response(service, path, error)
            yield sse(error.body())
            return
        kind, value = await pending.next()


@handled
async def retrieve(request: Request) -> Response:
    service = _service(request)
    query = parse_retrieve(await read_json(request, service.settings.max_body_bytes), service.settings)
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
    orchestrator's health check then restarts the service, which opens the new store."""
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
        body.update(status="unavailable", error=str(exc))
        return JSONBody(body, status_code=503)
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
    """Outermost layer: the API key (every endpoint but /health) and request counting."""

    def __init__(self, app: ASGIApp, service: Service) -> None:
        self.app = app
        self.service = service
        key = service.settings.api_key
        self.expected = None if key is None else f"Bearer {key}".encode()

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

    def _authorized(self, scope: Scope) -> bool:
        assert self.expected is not None
        given = [value for name, value in scope["headers"] if name == b"authorization"]
        return len(given) == 1 and hmac.compare_digest(given[0], self.expected)


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
    app.add_middleware(Gate, service=service)
    return app
