"""Running the app on uvicorn with a graceful stop.

SIGTERM (or Ctrl-C) makes uvicorn stop accepting connections, let in-flight requests finish
(streams included), run the app's shutdown (queued work finished, engine closed) and return.
That wait is bounded (``ServeSettings.shutdown_timeout_s``): the requests still unanswered then
get the ``shutting_down`` error, as on a forced exit, and the stop goes on. A client that stops
sending its body cannot hold it either: the app answers it 408 after ``body_timeout_s``.
uvicorn then restores the handlers it found and raises the signal again; the handler installed
here only asks the server to exit, so the process ends with status 0 instead of dying by the
signal. A second Ctrl-C while that stop waits forces the exit: the app's requests in flight are
answered at once with the service's ``shutting_down`` error (``Service.abandon``), not cut off
(uvicorn answered a request cancelled under it with a 500), and the process exits 130.
"""

from __future__ import annotations

import asyncio
import math
import os
import signal
import socket
import sys
import threading
import time
from typing import Any

ANSWER_ON_FORCED_EXIT_S = 2.0  # a forced exit waits at most this long for the 503s to be sent


def bind(host: str, port: int) -> socket.socket:
    """A socket bound to ``host``:``port`` (0: a free port) for :func:`run`'s ``sock``: bound
    before the model loads, so a port in use is one error line at once, not uvicorn's log and
    exit status 3 after the load."""
    from ragcompress.errors import RagCompressError

    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
    except OSError as exc:
        raise RagCompressError(f"cannot serve on {host}:{port} ({exc}); check --host") from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does: restarts reuse the port
        sock.bind(address)
    except OSError as exc:
        sock.close()
        raise RagCompressError(
            f"cannot listen on {host}:{port} ({exc.strerror or exc}); choose another --port (0 picks a free one), "
            "or stop what holds it"
        ) from None
    return sock


def run(
    app: Any, host: str = "127.0.0.1", port: int = 8000, *, log_level: str = "info", sock: socket.socket | None = None
) -> None:
    """Serve ``app`` until SIGTERM/SIGINT; returns after a graceful shutdown.

    ``port`` 0 picks a free port. Once it accepts connections, one line goes to stderr whatever
    the log level: ``ragcompress serve: listening on http://HOST:PORT``. ``sock`` serves on an
    already bound socket instead of ``host``/``port``. On a forced exit, or once the graceful
    stop has waited ``shutdown_timeout_s`` (the app's settings), the requests in flight of an app
    made by :func:`~ragcompress.serve.app.create_app` (its ``state.service``) are answered 503,
    for up to :data:`ANSWER_ON_FORCED_EXIT_S`.
    """
    import uvicorn

    from ragcompress.serve.settings import ServeSettings

    service = getattr(getattr(app, "state", None), "service", None)
    abandon = getattr(service, "abandon", None)
    bound = getattr(getattr(service, "settings", None), "shutdown_timeout_s", ServeSettings.shutdown_timeout_s)

    class Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: Any) -> None:
            forced = self.force_exit
            super().handle_exit(sig, frame)
            if self.force_exit and not forced and abandon is not None:
                # on the loop, not in the signal handler: it takes the worker's lock
                asyncio.get_event_loop().call_soon_threadsafe(abandon)

        async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
            late = None
            if abandon is not None:  # past the bound, answer what is left instead of cutting it off
                why = f"its graceful shutdown waited {bound:g} s for the requests in flight"
                late = asyncio.get_running_loop().call_later(bound, abandon, why)
            try:
                await super().shutdown(sockets)
            finally:
                if late is not None:
                    late.cancel()
            if self.force_exit:  # let the requests told to stop send that answer before the loop ends
                deadline = time.monotonic() + ANSWER_ON_FORCED_EXIT_S
                while self.server_state.tasks and time.monotonic() < deadline:
                    await asyncio.sleep(0.02)

        async def startup(self, sockets: list[socket.socket] | None = None) -> None:
            await super().startup(sockets)
            if self.started:
                for listener in self.servers:
                    for bound in listener.sockets:
                        address, bound_port = bound.getsockname()[:2]
                        shown = f"[{address}]" if ":" in address else address
                        print(
                            f"ragcompress serve: listening on http://{shown}:{bound_port}", file=sys.stderr, flush=True
                        )

    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level=log_level,
        lifespan="on",
        server_header=False,
        # uvicorn cancels the tasks left after this; the app's have been answered by then
        timeout_graceful_shutdown=math.ceil(bound + (ANSWER_ON_FORCED_EXIT_S if abandon is not None else 0.0)),
    )
    server = Server(config)

    def stop(signum: int, frame: Any) -> None:
        server.should_exit = True

    if threading.current_thread() is threading.main_thread():  # uvicorn handles no signals elsewhere
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, stop)
    server.run(sockets=None if sock is None else [sock])
    if server.force_exit:  # a second signal: leave now, before torch's threads are torn down under a
        # generation still running (the interpreter's exit aborted the process, status -6)
        print("ragcompress serve: forced exit (second signal)", file=sys.stderr, flush=True)
        os._exit(130)
