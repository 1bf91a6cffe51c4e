"""What every renderer shares: where the documents and the results files are, reading a results
file (:func:`load`, :func:`files`) and the run metadata it records (:func:`recorded_meta`, named
under each table by :func:`source_line`), and the formatting of tables and figures (:func:`table`,
:func:`pct`, :func:`ci95`), so that every table of every document is written alike."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from ragcompress.provenance import META_KEYS

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
# Other documents whose blocks are rendered (and checked) along with README.md's.
DOCS = tuple(
    ROOT / "docs" / name
    for name in (
        "serve.md",
        "distill.md",
        "recompute.md",
        "compression.md",
        "kernels.md",
        "llamaindex.md",
        "guarantees.md",
        "scaling.md",
    )
)
RESULTS = ROOT / "docs" / "results"

MODEL_NAMES = {"smollm2-135m": "SmolLM2-135M", "qwen2.5-coder-0.5b": "Qwen2.5-Coder-0.5B"}
TAG_ORDER = ("smollm2", "qwen")  # file-name tags, in the README's order of models (default model first)


class ReportError(Exception):
    """A block cannot be rendered (unknown name, missing or malformed results file)."""


def load(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise ReportError(f"{path} is missing") from None
    except json.JSONDecodeError as exc:
        raise ReportError(f"{path} is not valid JSON: {exc}") from None


def _tag_rank(path: Path) -> tuple[int, str]:
    ranks = [i for i, tag in enumerate(TAG_ORDER) if f"_{tag}" in path.stem]
    return (ranks[0] if ranks else len(TAG_ORDER), path.name)


def files(results: Path, pattern: str, exclude: str | None = None) -> list[Path]:
    """Files of ``results`` matching ``pattern``, in the README's order of models."""
    found = [p for p in results.glob(pattern) if exclude is None or not p.name.startswith(exclude)]
    if not found:
        raise ReportError(f"no {results / pattern} (excluding {exclude}*)" if exclude else f"no {results / pattern}")
    return sorted(found, key=_tag_rank)


def model_name(model: str) -> str:
    return MODEL_NAMES.get(model, model)


def recorded_meta(data: Any) -> dict[str, Any]:
    """The run metadata a results file records, wherever its shape keeps it: ``meta`` (and the
    needle benchmark's ``args``), the top level, or the first row of a list-shaped file; the
    number of questions also as ``n`` or as every row's ``questions``."""
    first = data[0] if isinstance(data, list) and data and isinstance(data[0], dict) else {}
    top = data if isinstance(data, dict) else first
    found: dict[str, Any] = {}
    for source in (top, top.get("args"), top.get("meta"), first.get("meta")):
        if isinstance(source, dict):
            found.update({k: v for k, v in source.items() if k in META_KEYS and v not in (None, "None")})
    if "questions" not in found and isinstance(top.get("n"), int):
        found["questions"] = top["n"]
    rows = top.get("rows")
    if "questions" not in found and isinstance(rows, list) and rows and all("questions" in r for r in rows):
        found["questions"] = sorted({r["questions"] for r in rows})
    return found


def missing_meta(path: Path) -> list[str]:
    found = recorded_meta(load(path))
    return [key for key in META_KEYS if key not in found]


def _shown(path: Path) -> str:
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def meta_notes(results: Path) -> list[str]:
    """One line per results file that lacks some of :data:`META_KEYS`."""
    notes = []
    for path in sorted(results.glob("*.json")):
        missing = missing_meta(path)
        if missing:
            notes.append(f"note: {_shown(path)} does not record {', '.join(missing)}")
    return notes


def source_line(paths: Iterable[Path]) -> str:
    """``Source:`` line under a table: its files and what run metadata they do not record."""
    paths = list(paths)
    names = ", ".join(f"`docs/results/{p.name}`" for p in paths)
    missing = {key for p in paths for key in missing_meta(p)}
    line = f"Source: {names}."
    if missing:
        line += f" Not recorded in {'this file' if len(paths) == 1 else 'these files'}: " + ", ".join(
            key for key in META_KEYS if key in missing
        )
        line += "."
    return line


def pct(value: float, reference: float) -> str:
    """``value`` as a percentage of ``reference`` ("–" when the reference is 0)."""
    return "–" if not reference else f"{100 * value / reference:.0f} %"


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def ci95(interval: list[float]) -> str:
    """A 95 % interval as the tables print it, ``[low, high]`` to 3 decimals."""
    return f"[{interval[0]:.3f}, {interval[1]:.3f}]"
