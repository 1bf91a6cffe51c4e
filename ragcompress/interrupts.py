"""SIGTERM as Ctrl-C: one way for a long run to be stopped, whoever sends the signal.

A job scheduler, ``timeout`` or ``kill`` stops a process with SIGTERM, whose default action ends
it at once with no message and no ``finally``. Raising ``KeyboardInterrupt`` instead lets the run
stop the way Ctrl-C stops it: its cleanup runs, and the CLI prints its one line "error:
interrupted" (with the resume note for ``index`` and ``train``) and exits 130.
"""

from __future__ import annotations

import signal
import threading
from typing import Any


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def interrupt_on_sigterm() -> None:
    """Make SIGTERM raise ``KeyboardInterrupt`` in the main thread (only it can set a handler;
    elsewhere this does nothing)."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _interrupt)
