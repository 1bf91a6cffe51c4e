"""The one generation thread: every request runs here, in arrival order, so that requests can
be batched (below) and are answered in order; the engine itself may answer from several threads
(:class:`~ragcompress.runtime.engine.Engine`). Requests wait in a bounded queue; a full queue is
refused at once (the caller answers 429) instead of growing without bound.

Batching (``max_batch`` > 1): jobs that may share forward passes (``Job.batch`` set) and are
waiting when the thread takes one are run together by ``run_batch``, up to ``max_batch`` of them
(``runtime.batch``: on this CPU a decoding step over 8 rows costs about one over 1 row). A batch is
formed when the thread becomes free and runs to its end; a request arriving meanwhile waits for the
next batch. While requests come concurrently (the last batch held more than one), the thread
waits up to ``batch_window_s`` for a batch to fill, since clients answered by the last batch
resubmit a moment after it ends. ``max_batch`` 1 runs every job alone (the unbatched path).

A :class:`Job` reports back through ``emit`` (called on this thread; the app hands it a function
that puts events on the request's asyncio queue) and is told to stop through ``cancelled`` (set
when the client goes away; checked before the job starts and between tokens).
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger("ragcompress.serve")

Event = tuple[str, Any]


class QueueFull(Exception):
    """The queue holds as many waiting requests as it may; ``retry_after_s`` is a fair guess."""

    def __init__(self, retry_after_s: int) -> None:
        super().__init__(f"queue full; retry after {retry_after_s} s")
        self.retry_after_s = retry_after_s


class ShuttingDown(Exception):
    """The service is stopping and takes no new work."""


@dataclass
class Job:
    """One request's work: ``run(engine, job)`` on the generation thread."""

    run: Callable[[Any, Job], None]
    emit: Callable[[Event], None]
    batch: Any = None  # what ``run_batch`` needs when this job may share a batch; None: it runs alone
    cancelled: threading.Event = field(default_factory=threading.Event)
    submitted_at: float = field(default_factory=time.perf_counter)
    started_at: float | None = None

    def cancel(self) -> None:
        self.cancelled.set()


class Worker:
    """A thread that runs :class:`Job`s on ``engine`` (alone, or up to ``max_batch`` batchable
    ones together through ``run_batch``); at most ``queue_size`` wait."""

    def __init__(
        self,
        engine: Any,
        queue_size: int,
        *,
        max_batch: int = 1,
        run_batch: Callable[[Any, list[Job]], None] | None = None,
        batch_window_s: float = 0.0,
    ) -> None:
        if max_batch > 1 and run_batch is None:
            raise ValueError("batching needs run_batch")
        self.engine = engine
        self.queue_size = queue_size
        self.max_batch = max_batch
        self.run_batch = run_batch
        self.batch_window_s = batch_window_s
        self._last_group = 1
        self.batches: dict[int, int] = {}  # batch size -> batches run (metrics, the load benchmark)
        self._jobs: deque[Job] = deque()
        self._cv = threading.Condition()
        self._busy = False
        self._running = 0  # jobs of the group being run
        self._group: list[Job] = []  # the group being run (:meth:`abandon` tells them too)
        self._stopping = False
        self._service_s = 1.0  # moving average of one job's time, for Retry-After
        self._thread: threading.Thread | None = None

    @property
    def waiting(self) -> int:
        """Jobs waiting whose clients have not given up."""
        return sum(1 for job in self._jobs if not job.cancelled.is_set())

    @property
    def busy(self) -> bool:
        return self._busy

    @property
    def running(self) -> int:
        """Requests being answered now (the current batch's size, or 1)."""
        return self._running

    def submit(self, job: Job) -> None:
        with self._cv:
            if self._stopping:
                raise ShuttingDown("the service is shutting down")
            # a client that gave up while waiting frees its place now, not when the thread reaches it
            self._jobs = deque(waiting for waiting in self._jobs if not waiting.cancelled.is_set())
            if len(self._jobs) >= self.queue_size:
                wait = self._service_s * (len(self._jobs) + int(self._busy))
                raise QueueFull(max(1, min(60, math.ceil(wait))))
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="ragcompress-generation", daemon=True)
                self._thread.start()
            self._jobs.append(job)
            self._cv.notify()

    def _loop(self) -> None:
        while True:
            with self._cv:
                while not self._jobs and not self._stopping:
                    self._cv.wait()
                if not self._jobs:
                    return
                group = self._take()
                self._busy = True
                self._running = len(group)
                self._group = group
            try:
                group = [job for job in group if not job.cancelled.is_set()]
                started = time.perf_counter()
                for job in group:
                    job.started_at = started
                if len(group) == 1:
                    group[0].run(self.engine, group[0])
                elif group:
                    assert self.run_batch is not None
                    self.run_batch(self.engine, group)
                if group:
                    per_job = (time.perf_counter() - started) / len(group)
                    self._service_s = 0.8 * self._service_s + 0.2 * per_job
                    self.batches[len(group)] = self.batches.get(len(group), 0) + 1
                    self._last_group = len(group)
            except BaseException as exc:  # one request's failure never ends the thread
                if not isinstance(exc, Exception):
                    log.exception("generation thread: unexpected %s", type(exc).__name__)
                for job in group:
                    job.emit(("error", exc))
            finally:
                with self._cv:
                    self._busy = False
                    self._running = 0
                    self._group = []

    def _take(self) -> list[Job]:
        """The next job, and (batching) the batchable jobs waiting with it, in arrival order.
        A job that cannot be batched, waiting between them, is passed over by this one batch only:
        it is at the front when the next one is taken. Called with the lock held."""
        first = self._jobs.popleft()
        group = [first]
        if self.max_batch < 2 or first.batch is None:
            return group
        deadline = time.perf_counter() + (self.batch_window_s if self._last_group > 1 else 0.0)
        while True:
            for job in [job for job in self._jobs if job.batch is not None][: self.max_batch - len(group)]:
                self._jobs.remove(job)
                group.append(job)
            left = deadline - time.perf_counter()
            if len(group) >= self.max_batch or left <= 0 or self._stopping:
                return group
            self._cv.wait(left)

    def abandon(self, error: Exception) -> None:
        """Stop without finishing: the queued jobs and the group being run are cancelled and told
        ``error`` at once (their requests answer it, instead of being cut off when the process
        exits under them), new submissions are refused, and the thread stops at its next check
        between tokens. For a forced exit; :meth:`close` is the graceful stop."""
        with self._cv:
            self._stopping = True
            jobs = list(self._jobs) + self._group
            self._jobs.clear()
            self._cv.notify_all()
        for job in jobs:
            job.cancel()
            job.emit(("error", error))

    def close(self, timeout: float | None = None) -> None:
        """Finish the queued jobs, then stop the thread (new submissions are refused)."""
        with self._cv:
            self._stopping = True
            self._cv.notify_all()
            thread = self._thread
        if thread is not None:
            thread.join(timeout)
