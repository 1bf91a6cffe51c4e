"""SIGTERM as Ctrl-C: one way for a long run to be stopped, whoever sends the signal.

A job scheduler, ``timeout`` or ``kill`` stops a process with SIGTERM, whose default action ends
it at once with no message and no ``finally``. Raising ``KeyboardInterrupt`` instead lets the run
stop the way Ctrl-C stops it: its cleanup runs, and the CLI prints its one line "error:
interrupted" (with the resume note for ``index`` and ``train``) and exits 130.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import signal
import sys
import threading
from typing import Any, NoReturn

INTERRUPTED = 130  # 128 + SIGINT: the status a shell reports for Ctrl-C


_stop_requested = False


def _interrupt(signum: int, frame: Any) -> None:
    global _stop_requested
    _stop_requested = True
    raise KeyboardInterrupt


def raise_if_stopped() -> None:
    """Raise again the KeyboardInterrupt of a SIGTERM or Ctrl-C that Python swallowed. The handler's
    exception surfaces wherever the main thread happens to be, and one that lands in a ``__del__``
    or a weakref callback is printed as "Exception ignored" and lost: the run went on to its end
    (an ``index --ray local`` run exited 0 after its whole input). Long loops call this once per
    unit of work, where stopping is as safe as it is for Ctrl-C; it does nothing until a signal
    came (and nothing in a process whose signals this module does not handle)."""
    if _stop_requested:
        raise KeyboardInterrupt


def interrupt_on_stop_signals() -> None:
    """Make SIGTERM raise ``KeyboardInterrupt`` in the main thread, and let Ctrl-C's be raised
    again where it was swallowed (:func:`raise_if_stopped`): Python's own SIGINT handler raises it
    without a record, so it is replaced by one that records it first, where it is still Python's
    (a handler someone else installed is left alone). Only the main thread can set a handler;
    elsewhere this does nothing."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _interrupt)
        if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
            signal.signal(signal.SIGINT, _interrupt)


def exit_interrupted() -> NoReturn:
    """End an interrupted ``python -m`` run with status 130, as the console script does.

    CPython marks a KeyboardInterrupt "unhandled" whenever it leaves a string run by ``exec`` or
    ``eval`` (a dataclass or namedtuple being defined while a module imports), even if the run then
    catches it, and a ``python -m`` process so marked ends itself by SIGINT at exit whatever
    ``sys.exit`` said: status -2 to a parent, with the interrupted line already printed. (A script,
    such as the installed ``ragcompress``, exits with its ``sys.exit`` code.) So this runs what a
    normal exit would (the non-daemon threads' end, the ``atexit`` handlers, flushed output) and
    exits with 130 itself."""
    threading._shutdown()  # type: ignore[attr-defined]  # what the interpreter's exit waits for first
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(AttributeError, OSError, ValueError):  # no stream, a closed pipe
            stream.flush()
    os._exit(INTERRUPTED)
