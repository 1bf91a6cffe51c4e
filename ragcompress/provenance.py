"""What a results file records of the run that measured it: its ``"meta"`` object.

``ragcompress bench --json`` and the benchmark scripts build it here (:func:`run_meta`), their
rows kept across invocations record :func:`row_run`, and ``benchmarks/report.py`` names the
results files that lack some of :data:`META_KEYS`. This module imports neither torch nor the
model code at import time, so the report reads the keys without loading them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

# What every results file records of its run: code revision, torch threads, timed repeats, the
# cap on questions asked (``--limit``), the questions (a count, or a questions file) and the model.
# A key that does not apply to a run (a benchmark that asks no questions) is recorded as None,
# which the report counts as not recorded: absent and inapplicable read alike there.
META_KEYS = ("git", "threads", "repeats", "limit", "questions", "model")
# What each row of a results file kept across invocations records of the run that measured it:
# a resumed run's rows can span several revisions, and the file's ``meta.git`` is only the last
# writer's.
ROW_KEYS = ("git", "threads")


def git_revision() -> str:
    """Short revision of the checkout this code runs from, ``-dirty`` when tracked files differ
    from it, ``unknown`` otherwise (an installed wheel, no git). The repository must be the
    package's own: a wheel installed into a site-packages inside another git repository (a user's
    project) once reported that project's commit as the code's."""
    import subprocess

    root = Path(__file__).resolve().parents[1]  # the folder holding the ragcompress package
    if not ((root / "pyproject.toml").is_file() and (root / "ragcompress" / "__init__.py").is_file()):
        return "unknown"  # not a source checkout: site-packages holds no pyproject.toml

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", "-C", str(root), *args], capture_output=True, text=True, check=True
        ).stdout.strip()

    try:
        if Path(git("rev-parse", "--show-toplevel")).resolve() != root:
            return "unknown"  # the checkout is some enclosing repository, not ragcompress's
        revision = git("rev-parse", "--short", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return revision + ("-dirty" if dirty else "")


def row_run(git: str | None = None, threads: int | None = None) -> dict[str, Any]:
    """:data:`ROW_KEYS` of this run: ``git`` (:func:`git_revision` unless given: a run of hours
    gives the revision it started from) and ``threads`` (torch's setting unless given)."""
    if threads is None:
        import torch

        threads = torch.get_num_threads()
    return {"git": git or git_revision(), "threads": threads}


def run_meta(
    *,
    git: str | None = None,
    threads: int | None = None,
    repeats: int | None = None,
    limit: int | None = None,
    questions: int | str | Path | None = None,
    model: str | Path | None = None,
) -> dict[str, Any]:
    """Every one of :data:`META_KEYS` (None where the run has no such value; ``git`` and
    ``threads`` as :func:`row_run` fills them; a path, such as a questions file, as its text), and
    ``keep_freed_memory``: whether the allocator setting applied in this process (the CLI applies
    it, the benchmark scripts, which import the library only, do not; TTFT moves with it)."""
    from ragcompress.runtime.memory import freed_memory_kept

    given = {"repeats": repeats, "limit": limit, "questions": questions, "model": model}
    meta = {**row_run(git, threads), **given, "keep_freed_memory": freed_memory_kept()}
    return {key: str(value) if isinstance(value, Path) else value for key, value in meta.items()}
