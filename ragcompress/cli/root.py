"""The root typer application and the process entry point: one-line errors and warnings, exit codes."""

from __future__ import annotations

import errno
import os
import signal
import sys
import warnings
from typing import Any, NoReturn

import typer

from ragcompress.cli import answer, serve, store, train
from ragcompress.cli.options import BUSY
from ragcompress.errors import CorruptSegmentError, InputError, RagCompressError, RagCompressWarning, StoreBusyError
from ragcompress.interrupts import INTERRUPTED, interrupt_on_stop_signals
from ragcompress.runtime.memory import keep_freed_memory

app = typer.Typer(
    add_completion=False,
    rich_markup_mode="markdown",  # docstrings' wrapped lines read as one paragraph
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Answer RAG questions from precomputed, compressed passage KV caches.",
)
# the commands, in the order --help lists them: build a store, answer from it, maintain it
app.command()(store.index)
app.command()(train.train)
app.command()(answer.ask)
app.command(name="eval")(answer.evaluate)
app.command()(answer.bench)
app.command()(answer.calibrate)
app.command()(store.remove)
app.command()(store.compact)
app.command()(store.verify)
app.command()(serve.serve)


def _print_version(value: bool) -> None:
    if value:
        from importlib.metadata import PackageNotFoundError, version

        try:
            typer.echo(f"ragcompress {version('ragcompress-kv')}")
        except PackageNotFoundError:  # a checkout pulled past the rename to ragcompress-kv, not reinstalled
            raise InputError(
                "ragcompress-kv is not installed in this environment (an install from before the distribution "
                "was renamed?); reinstall: `pip install -e .` in the checkout, or `pip install ragcompress-kv`"
            ) from None
        raise typer.Exit()


@app.callback()
def _options(
    version: bool = typer.Option(
        False, "--version", is_eager=True, callback=_print_version, help="print the version and exit"
    ),
) -> None:
    """Answer RAG questions from precomputed, compressed passage KV caches."""


def _one_line_warning(message: Any, category: Any, filename: str, lineno: int, line: str | None = None) -> str:
    """ragcompress's own warnings (:class:`RagCompressWarning`) as ``warning: ...`` (what to do is
    in the message; the source line Python would print is not the user's), other libraries' as
    Python formats them, wherever they were raised: Ray's deprecation of an argument ragcompress
    passes pointed into this package and read as ragcompress's advice."""
    if isinstance(category, type) and issubclass(category, RagCompressWarning):
        return f"warning: {message}\n"
    return _PYTHON_FORMATWARNING(message, category, filename, lineno, line)


_PYTHON_FORMATWARNING = warnings.formatwarning


# what to do after an OSError in a command that writes a store: each leaves it intact (docs/guarantees.md)
STORE_WRITERS = {
    "index": "run it again {when}: it resumes where it stopped",
    "remove": "its passages were removed in one commit or not at all; run it again with --missing-ok {when}",
    "compact": "it is as it was; run it again {when}",
}


def _command(args: list[str]) -> str | None:
    """The command named in ``args`` (the root takes no option with a value)."""
    return next((arg for arg in args if not arg.startswith("-")), None)


def os_error_line(exc: OSError, command: str | None) -> str:
    """An ``OSError`` as one line: the file and the system's words for it, and what to do: free
    disk space when it is full; after a command that writes a store, that the store is intact."""
    where = f"{exc.filename}: " if exc.filename else ""
    line = f"{where}{exc.strerror or exc}"
    full = exc.errno in (errno.ENOSPC, errno.EDQUOT)
    if command in STORE_WRITERS:
        when = "after freeing disk space" if full else "once that is fixed"
        return f"{line}; the store is intact ({STORE_WRITERS[command].format(when=when)})"
    return f"{line}; free disk space, then run the command again" if full else line


def _escape_unencodable_output() -> None:
    """Write what the output encoding cannot hold as ``\\uXXXX``: on a Latin-1 terminal
    (``PYTHONIOENCODING=latin-1``, a Latin-1 or cp1252 locale) a Chinese store name or answer
    otherwise ended a finished command in a UnicodeEncodeError traceback. A stream that is not a
    text file (closed, ``None``; replaced by a caller) is left as it is."""
    for stream in (sys.stdout, sys.stderr):
        reconfigure = getattr(stream, "reconfigure", None)
        if reconfigure is not None:
            reconfigure(errors="backslashreplace")


def _reader_gone() -> NoReturn:
    """Exit as a shell reports a process SIGPIPE ended, 141 (128 + 13), saying nothing: the reader
    of stdout has gone (``verify ... | head -0``). click's handling exited 1, which reads as
    verify's "damaged". stdout is pointed at /dev/null so that the interpreter's last flush does
    not fail again (the recipe of the Python docs' note on SIGPIPE, in the signal module)."""
    if sys.stdout is not None:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    sys.exit(128 + signal.SIGPIPE)


def _flush_stdout() -> None:
    """Write out what stdout still buffers (``--json``'s object is written unflushed), so that a
    reader that has gone is found here, not by the interpreter's last flush ("Exception ignored",
    exit 120). A closed stdout (``>&-``) is ``None``: nothing to flush."""
    try:
        if sys.stdout is not None:
            sys.stdout.flush()
    except BrokenPipeError:
        _reader_gone()


def main() -> None:
    """Entry point: one-line errors and warnings, non-zero exit. The command is the whole process,
    so it keeps freed memory for the next request (:mod:`ragcompress.runtime.memory`)."""
    _escape_unencodable_output()
    keep_freed_memory()
    interrupt_on_stop_signals()  # `kill`, `timeout` or a scheduler stop a run as Ctrl-C does
    warnings.formatwarning = _one_line_warning
    try:
        _run()
    finally:
        _flush_stdout()


def _run() -> None:
    """The command, its errors as one line and its exit status."""
    try:
        # typer returns (does not raise) the code of an Exit in this mode, Ctrl-C's 130 included
        code = app(standalone_mode=False)
        if code == INTERRUPTED:  # the resume note only where it holds
            resumes = _command(sys.argv[1:]) in ("index", "train")
            typer.echo(
                f"error: interrupted{' (run it again: it resumes where it stopped)' if resumes else ''}", err=True
            )
        if isinstance(code, int) and code:
            sys.exit(code)
    except StoreBusyError as exc:  # being written: its message says to retry when the writer finishes
        typer.echo(f"error: {exc}", err=True)
        sys.exit(BUSY)
    except RagCompressError as exc:
        hint = " (run `ragcompress verify --store ...`: it lists the damage and how to repair it)"
        typer.echo(f"error: {exc}{hint if isinstance(exc, CorruptSegmentError) else ''}", err=True)
        sys.exit(1)
    except OSError as exc:  # a full disk, an I/O error, a name too long: one line, not a traceback
        typer.echo(f"error: {os_error_line(exc, _command(sys.argv[1:]))}", err=True)
        sys.exit(1)
    except (typer.Exit, SystemExit) as exc:
        if isinstance(exc.__context__, BrokenPipeError):  # click's exit 1 for a write to a reader gone
            _reader_gone()
        code = getattr(exc, "exit_code", getattr(exc, "code", 0))
        sys.exit(code)
    except typer.Abort:
        typer.echo("error: aborted", err=True)
        sys.exit(INTERRUPTED)
    except typer.TyperException as exc:  # usage errors (unknown option, bad value) carry their own message
        message = exc.format_message() if hasattr(exc, "format_message") else str(exc)
        context, names = getattr(exc, "ctx", None), []  # a usage error knows its command: point at its help
        while context is not None and context.parent is not None:  # the root's name is how python was run
            names.append(context.info_name)
            context = context.parent
        typer.echo(f"error: {message} (see {' '.join(['ragcompress', *reversed(names)])} --help)", err=True)
        sys.exit(getattr(exc, "exit_code", 2))
