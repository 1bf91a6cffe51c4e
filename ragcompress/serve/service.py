"""The service behind the HTTP app: one engine, its generation thread, the settings and metrics.

Requests are queued as jobs for the thread (:mod:`ragcompress.serve.worker`), which answers
them alone or several in one batch; a :class:`Pending` turns the thread's events back into
awaitables on the event loop, cancelling the job when its client goes away.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any, NamedTuple

from starlette.requests import Request

from ragcompress.runtime.attention import sliding_window
from ragcompress.runtime.batch import BatchStream, batchable, fits_one_batch
from ragcompress.runtime.engine import Engine
from ragcompress.runtime.generate import Prepared, TextDeltas, TokenStream
from ragcompress.runtime.options import AnswerOptions
from ragcompress.runtime.prepare import DenseStrategy, choose_strategy
from ragcompress.serve.metrics import Metrics
from ragcompress.serve.protocol import (
    ApiError,
    ChatQuery,
    RetrieveQuery,
    api_error,
)
from ragcompress.serve.settings import ServeSettings
from ragcompress.serve.worker import Event, Job, QueueFull, ShuttingDown, Worker

# How often a request waiting for its next event (queued, or not streaming) checks whether its
# client has gone away: at 1 s the generation thread could start a departed client's request and
# decode for up to a second (an audit saw ~900 tokens of a tiny model); a check is a non-blocking
# read of the connection's receive channel, so ten a second per waiting request cost nothing.
DISCONNECT_POLL_S = 0.1


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


class _Member(NamedTuple):
    """A request :meth:`Service.answer_batch` prepared: decoded in the batch or alone."""

    job: Job
    query: ChatQuery
    entries: list[Any]
    options: AnswerOptions
    prompt_tokens: int  # as the request's stream counted them (the question tokenized once)
    prepared: Any  # a Prepared; None once the batch holds the cache (freed)
    prepare_s: float


class Service:
    """The engine, its generation thread, the settings and the metrics of one app."""

    def __init__(self, engine: Engine, settings: ServeSettings, *, owns_engine: bool) -> None:
        # defaults no request could be answered with (the packed backend under a preset's
        # recompute, or on a store of full rows) are refused here, not answered 400 on every request
        choose_strategy(engine.context, engine.calibrated(engine.options))
        engine.warm_up_retrieval()  # an embedder that cannot load fails the start, not every request
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

    def abandon(self, why: str = "a second Ctrl-C") -> None:
        """A forced exit (a second Ctrl-C, or a graceful shutdown past its time): every request
        queued or being answered gets a 503 saying the server was stopped, now, rather than a 500
        when the process ends under it."""
        self.worker.abandon(
            ApiError(
                503,
                f"the server was stopped ({why}) before this request was answered; retry it",
                type="server_error",
                code="shutting_down",
            )
        )

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
        dense cache (no recompute, no packed segments, no fallback check: those read the question
        alone)."""
        if self.settings.max_batch < 2:
            return False
        options = self._options(query, self.engine)
        plain = not options.recompute.active and not options.fallback_margin
        return plain and isinstance(choose_strategy(self.engine.context, options), DenseStrategy)

    def _options(self, query: ChatQuery, engine: Engine) -> AnswerOptions:
        return engine.options.overridden(
            max_new_tokens=query.max_new_tokens, recompute=query.recompute, fallback_margin=query.fallback_margin
        )

    def answer(self, query: ChatQuery, engine: Engine, job: Job) -> None:
        """Retrieve (or look up) the passages and decode the answer from their caches, alone."""
        entries = self._entries(query, engine)
        options = self._options(query, engine)
        started = time.perf_counter()
        stream = engine.stream_cached(query.question, entries, options)  # the one tokenization of the question
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
        stream.stop = job.cancelled  # a client gone away ends it before the next decoding step

        def tokens() -> Any:
            for token in stream:
                token_ids.append(token)
                if len(token_ids) == 1:
                    job.emit(("started", None))
                yield token

        if query.stream:
            for piece in engine.text_pieces(tokens()):
                job.emit(("delta", piece))
        else:
            for _ in tokens():
                pass
        ttft = None if stream.ttft_s is None else ttft_offset_s + stream.ttft_s
        backend = stream.backend or options.backend
        total_s = time.perf_counter() - started
        self._finish(query, engine, job, entries, options, stream.prompt_tokens, token_ids, ttft, total_s, backend)

    def answer_batch(self, engine: Engine, jobs: list[Job]) -> None:
        """Answer several queued requests together: each is retrieved and its caches prepared,
        then their questions are prefilled and their answers decoded in one batch
        (:class:`~ragcompress.runtime.batch.BatchStream`); the answers are the unbatched ones.
        A request that fails while it is prepared fails alone; one whose prepared cache cannot
        be batched (per-head eviction masks, a sliding window it, or the batch with it, outgrows)
        is decoded alone, and fails alone."""
        started = time.perf_counter()
        window = sliding_window(engine.lm.config)
        members: list[_Member] = []
        alone: list[_Member] = []
        for job in jobs:
            query: ChatQuery = job.batch
            try:
                entries = self._entries(query, engine)
                options = self._options(query, engine)
                prepare_started = time.perf_counter()
                cached = engine.stream_cached(query.question, entries, options)  # the question tokenized once
                prepared = cached.prepare()
            except Exception as exc:
                job.emit(("error", exc))
                continue
            member = _Member(
                job, query, entries, options, cached.prompt_tokens, prepared, time.perf_counter() - prepare_started
            )
            together = [m.prepared for m in members] + [prepared]
            steps = [m.options.max_new_tokens for m in members] + [options.max_new_tokens]
            if batchable(prepared, window, options.max_new_tokens) and fits_one_batch(together, steps, window):
                members.append(member)
            else:
                alone.append(member)
        for m in alone:
            stream = TokenStream(
                engine.lm.model, partial(_ready, m.prepared), m.options.max_new_tokens, engine.stop_ids, m.prompt_tokens
            )
            try:
                self._decode(m.query, engine, m.job, m.entries, m.options, stream, started, m.prepare_s)
            except Exception as exc:  # fails this request alone, not the batch waiting behind it
                m.job.emit(("error", exc))
        if not members:
            return
        batch = BatchStream(
            engine.lm.model,
            [m.prepared for m in members],
            [m.options.max_new_tokens for m in members],
            engine.stop_ids,
            started,
        )
        members = [m._replace(prepared=None) for m in members]  # the batch holds the caches from here on
        tokens: list[list[int]] = [[] for _ in members]
        deltas = [TextDeltas(engine.lm.tokenizer) if m.query.stream else None for m in members]
        for i, token in batch:
            job, query, entries, options, prompt_tokens = members[i][:5]
            piece: str | None
            if token is None:
                piece = deltas[i].finish() if deltas[i] is not None else None  # type: ignore[union-attr]
                if piece is not None:
                    job.emit(("delta", piece))
                total_s = time.perf_counter() - started
                ttft = batch.ttft_s[i]
                self._finish(
                    query, engine, job, entries, options, prompt_tokens, tokens[i], ttft, total_s, "dense", len(members)
                )
                continue
            tokens[i].append(token)
            if len(tokens[i]) == 1:
                job.emit(("started", None))
            delta = deltas[i]
            if delta is not None:
                piece = delta.push(token)
                if piece is not None:
                    job.emit(("delta", piece))
            if job.cancelled.is_set():  # reported as a lone request that was cancelled is: its tokens counted
                batch.drop(i)
                total_s = time.perf_counter() - started
                ttft = batch.ttft_s[i]
                self._finish(
                    query, engine, job, entries, options, prompt_tokens, tokens[i], ttft, total_s, "dense", len(members)
                )

    def _finish(
        self,
        query: ChatQuery,
        engine: Engine,
        job: Job,
        entries: list[Any],
        options: AnswerOptions,
        prompt_tokens: int,
        token_ids: list[int],
        ttft_s: float | None,
        total_s: float,
        backend: str,
        batch: int = 1,
    ) -> None:
        """The request's :class:`Result`, counted in the metrics and handed back (``prompt_tokens``:
        as the request's stream counted them, so the question is not tokenized again)."""
        bytes_read = engine.store.stored_bytes(entries)
        result = Result(
            text=engine.decode(token_ids),
            token_ids=token_ids,
            passage_ids=[e.id for e in entries],
            ttft_s=ttft_s,
            total_s=total_s,
            queue_s=(job.started_at or job.submitted_at) - job.submitted_at,
            backend=backend,
            bytes_read=bytes_read,
            prompt_tokens=prompt_tokens,
            finish_reason="length" if len(token_ids) >= options.max_new_tokens else "stop",
            settings={
                "top_k": query.top_k,
                "recompute": options.recompute.ratio_for(len(entries)),
                "fallback_margin": options.fallback_margin,
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
        hits = engine.search(query.query, query.top_k)
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
            except TimeoutError:
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
