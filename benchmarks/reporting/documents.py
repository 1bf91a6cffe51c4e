"""The documents' side: finding the ``<!-- report:NAME -->`` blocks of a Markdown file, replacing
them by their rendering, and checking a document against the results (every block equal to its
rendering, and no table of figures typed by hand unless it says why)."""

from __future__ import annotations

import difflib
import re
from pathlib import Path

from .registry import render_block
from .shared import README, RESULTS, ReportError

BLOCK_RE = re.compile(r"<!-- report:(?P<name>[\w.:-]+) -->\n(?P<body>.*?)<!-- /report:(?P=name) -->", re.DOTALL)
OPEN_RE = re.compile(r"<!-- report:([\w.:-]+) -->")


def wrap(name: str, body: str) -> str:
    return f"<!-- report:{name} -->\n\n{body}\n\n<!-- /report:{name} -->"


def blocks(text: str) -> list[str]:
    """Names of the report blocks of ``text``, in order; an unclosed or repeated block is an error."""
    opened = OPEN_RE.findall(text)
    closed = [m.group("name") for m in BLOCK_RE.finditer(text)]
    if opened != closed:
        unclosed = [n for n in opened if n not in closed] or opened
        raise ReportError(f"README block report:{unclosed[0]} is not closed by <!-- /report:{unclosed[0]} -->")
    if len(set(opened)) != len(opened):
        raise ReportError(f"README has a report block twice: {sorted(opened)}")
    return opened


def render_readme(text: str, results: Path = RESULTS) -> str:
    """``text`` with every report block replaced by its rendering from ``results``."""
    blocks(text)
    return BLOCK_RE.sub(lambda m: wrap(m.group("name"), render_block(m.group("name"), results)), text)


def unmanaged_tables(text: str) -> list[str]:
    """First lines of Markdown tables in the README's ``## Results`` section outside any report block."""
    start = text.find("\n## Results\n")
    if start < 0:
        return []
    end = text.find("\n## ", start + 1)
    section = BLOCK_RE.sub("", text[start : end if end >= 0 else len(text)])
    found, previous = [], ""
    for line in section.splitlines():
        if line.startswith("|") and not previous.startswith("|"):
            found.append(line)
        previous = line
    return found


# a cell that reads as a measurement: a decimal, or a number with a unit, a ratio or a percentage
# (plain integers are left out: status codes, counts and defaults fill reference tables)
FIGURE_CELL = re.compile(r"^\s*\**[-+]?\d[\d,]*(\.\d+\s*(%|x|×|ms|s|MB|GB)?|\s*(%|x|×|ms|s|MB|GB))\**\s*$")
HAND_TYPED = "<!-- hand-typed:"  # the marker a table of figures without a results file carries, with why


def hand_typed_tables(text: str) -> list[str]:
    """First lines of tables of measured figures outside any report block that are not marked
    ``<!-- hand-typed: WHY -->`` on the line before them (a blank line between is allowed): in
    every rendered document, so a number typed into a docs table is either generated from
    ``docs/results`` or says why it cannot be."""
    lines = BLOCK_RE.sub("", text).splitlines()
    found, i = [], 0
    while i < len(lines):
        if not lines[i].startswith("|"):
            i += 1
            continue
        end = i
        while end < len(lines) and lines[end].startswith("|"):
            end += 1
        cells = [cell for row in lines[i + 2 : end] for cell in row.strip().strip("|").split("|")]
        before = [line for line in lines[max(0, i - 2) : i] if line.strip()]
        marked = bool(before) and before[-1].startswith(HAND_TYPED)
        if any(FIGURE_CELL.match(cell) for cell in cells) and not marked:
            found.append(lines[i])
        i = end
    return found


DRIFT = "differs from its rendering"  # the one problem that rendering again (report.py) mends


def check(readme: Path = README, results: Path = RESULTS) -> str | None:
    """``None`` when every report block of ``readme`` equals its rendering from ``results``, the
    Results section has no table outside a block, and no table of figures elsewhere is typed by
    hand unless marked so (:func:`hand_typed_tables`); else a message naming the first problem
    (it contains :data:`DRIFT` when a block differs from its rendering)."""
    text = readme.read_text()
    try:
        names = blocks(text)
        if not names:
            return f"{readme} has no <!-- report:NAME --> block"
        for match in BLOCK_RE.finditer(text):
            name = match.group("name")
            expected = wrap(name, render_block(name, results))
            if match.group(0) != expected:
                diff = "\n".join(
                    difflib.unified_diff(
                        match.group(0).splitlines(), expected.splitlines(), "README.md", "rendered", lineterm="", n=0
                    )
                )
                return f"README block report:{name} {DRIFT} from {results}:\n{diff}"
    except ReportError as exc:
        return str(exc)
    loose = unmanaged_tables(text)
    if loose:
        return f"a table in {readme}'s Results section is not generated (no report block): {loose[0]}"
    typed = hand_typed_tables(text)
    if typed:
        return (
            f"a table of figures in {readme} is neither generated (no report block) nor marked "
            f"{HAND_TYPED} WHY --> on the line before it: {typed[0]}"
        )
    return None
