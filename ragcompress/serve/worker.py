"""The one generation thread: the engine is not thread-safe, so every use of it runs here, one
request at a time, in arrival order. Requests wait in a bounded queue; a full queue is refused at
once (the caller answers 429) instead of growing without bound.

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
    cancelled: threading.Event = field(default_factory=threading.Event)
    submitted_at: float = field(default_factory=time.perf_counter)
    started_at: float | None = None

    def cancel(self) -> None:
        self.cancelled.set()


class Worker:
    """A thread that runs :class:`Job`s on ``engine`` one at a time; at most ``queue_size`` wait."""

    def __init__(self, engine: Any, queue_size: int) -> None:
        self.engine = engine
        self.queue_size = queue_size
        self._jobs: deque[Job] = deque()
        self._cv = threading.Condition()
        self._busy = False
        self._stopping = False
        self._service_s = 1.0  # moving average of one job's time, for Retry-After
        self._thread: threading.Thread | None = None

    @property
    def waiting(self) -> int:
        return len(self._jobs)

    @property
    def busy(self) -> bool:
        return self._busy

    def submit(self, job: Job) -> None:
        with self._cv:
            if self._stopping:
                raise ShuttingDown("the service is shutting down")
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
                job = self._jobs.popleft()
                self._busy = True
            try:
                if not job.cancelled.is_set():
                    job.started_at = time.perf_counter()
                    job.run(self.engine, job)
                    self._service_s = 0.8 * self._service_s + 0.2 * (time.perf_counter() - job.started_at)
            except BaseException as exc:  # one request's failure never ends the thread
                if not isinstance(exc, Exception):
                    log.exception("generation thread: unexpected %s", type(exc).__name__)
                job.emit(("error", exc))
            finally:
                with self._cv:
                    self._busy = False

    def close(self, timeout: float | None = None) -> None:
        """Finish the queued jobs, then stop the thread (new submissions are refused)."""
        with self._cv:
            self._stopping = True
            self._cv.notify_all()
            thread = self._thread
        if thread is not None:
            thread.join(timeout)
