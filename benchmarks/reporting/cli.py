"""README.md's result tables, rendered from ``docs/results/*.json`` (no number is typed by hand).

The command line of ``benchmarks/report.py``: render every document's blocks in place, or with
``--check`` exit 1 naming the first one that differs. The line above is ``--help``'s description."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .documents import DRIFT, blocks, check, render_readme
from .shared import DOCS, README, RESULTS, ReportError, meta_notes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if README.md differs from the rendering")
    parser.add_argument(
        "--readme",
        type=Path,
        default=None,
        help="the one file to render (default: README.md and DOCS)",
    )
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    targets = [args.readme] if args.readme else [README, *DOCS]
    try:
        return _run(args.check, targets, args.results)
    except (ReportError, OSError) as exc:
        print(f"error: {_reason(exc)}", file=sys.stderr)
        return 1


def _reason(exc: ReportError | OSError) -> str:
    """One line for ``exc``: a file that cannot be read or written is named with why, not a traceback."""
    if isinstance(exc, OSError) and exc.filename is not None:
        return f"{exc.filename}: {exc.strerror or exc}"
    return str(exc)


def _run(check_only: bool, targets: list[Path], results: Path) -> int:
    if not results.is_dir():
        raise ReportError(f"--results {results} is not an existing folder")
    for target in targets:
        if not target.is_file():
            raise ReportError(f"{target} is not an existing file")
    for note in meta_notes(results):
        print(note, file=sys.stderr)
    for target in targets:
        if check_only:
            problem = check(target, results)
            if problem is not None:
                hint = "\nrun: python benchmarks/report.py" if DRIFT in problem else ""
                print(f"error: {problem}{hint}", file=sys.stderr)
                return 1
            print(f"{target}: {len(blocks(target.read_text()))} report blocks match {results}")
            continue
        text = target.read_text()
        new = render_readme(text, results)
        if new != text:
            target.write_text(new)
        print(f"{target}: {len(blocks(new))} report blocks rendered ({'changed' if new != text else 'unchanged'})")
    return 0
