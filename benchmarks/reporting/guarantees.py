"""docs/guarantees.md's blocks: ``index-memory`` (indexing and validation memory against input
size, ``benchmarks/index_memory.py``, which prints the same tables) and ``kill-landings`` (where
the random-instant SIGKILLs of the store test landed; the test prints the same table)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .shared import load, source_line, table


def index_memory_tables(data: dict[str, Any]) -> str:
    """``benchmarks/index_memory.py``'s two tables (indexing, then validation, against size), as
    it prints them and as docs/guarantees.md shows them."""
    rows = [
        [
            str(r["passages"]),
            f"{r['passages_per_s']:.1f}",
            f"{r['rss_before_mb']:.0f}",
            f"{r['peak_rss_mb']:.0f}",
            f"{r['loop_rss_mb']:.1f}",
            f"{r['indexing_rss_mb']:.1f}",
            f"{r['store_mb']:.1f}",
            f"{r['passages_ratio']:.0f}",
            f"{r['peak_rss_ratio']:.3f}",
            f"{r['throughput_ratio']:.2f}",
        ]
        for r in data["index"]
    ]
    header = [
        "passages",
        "passages/s",
        "RSS before (MB)",
        "peak RSS (MB)",
        "growth: passage loop (MB)",
        "growth: incl. FAISS build (MB)",
        "store (MB)",
        "passages x",
        "peak RSS x",
        "throughput x",
    ]
    text = table(header, rows)
    if data["validate"]:
        rows = [
            [
                f"{r['input_mb']:.0f}",
                str(r["passages"]),
                f"{r['seconds']:.1f}",
                f"{r['peak_rss_mb']:.0f}",
                f"{r['validate_rss_mb']:.1f}",
                f"{r['input_ratio']:.0f}",
                f"{r['peak_rss_ratio']:.3f}",
            ]
            for r in data["validate"]
        ]
        header = ["input (MB)", "passages", "seconds", "peak RSS (MB)", "validate RSS (MB)", "input x", "peak RSS x"]
        text += "\n\n" + table(header, rows)
    return text


def render_index_memory(results: Path) -> str:
    """Indexing and validation memory against input size (``index_memory.json``)."""
    path = results / "index_memory.json"
    data = load(path)
    when = f"Measured {data['meta']['date']}, at {data['meta']['git']}. "
    return index_memory_tables(data) + "\n\n" + when + source_line([path])


KILL_LANDINGS = "kill_landings.json"


def kill_landing_table(rows: list[dict[str, Any]]) -> str:
    """The table of external kills (one row per kill, as the store test records it); the test
    prints it after every run, the ``kill-landings`` block renders a recorded one."""

    def kind(row: dict[str, Any]) -> str:
        if "retry_of" in row:
            return f"{row['kill']} (retry of #{row['retry_of']})"
        return row["kill"] + (f" (missed: that run took {row['run_ms']} ms)" if "run_ms" in row else "")

    def run(row: dict[str, Any]) -> str:
        return "`--overwrite`" if row["run"] == "--overwrite" else row["run"]

    header = ["#", "run", "kill", "at ms (share of run)", "landed in", "detail", "after the kill"]
    header += ["uncommitted bytes", "litter", "resume"]
    lines = [
        [
            str(i),
            run(r),
            kind(r),
            f"{r['killed_at_ms']} ({r['fraction_of_run']:.2f})",
            r["landed"],
            r["detail"] or "-",
            r["after_kill"],
            str(r["uncommitted_bytes"]),
            ", ".join(f"`{name}`" for name in r["litter"]) or "-",
            r.get("resume", "-"),
        ]
        for i, r in enumerate(rows, 1)
    ]
    return table(header, lines)


def render_kill_landings(results: Path) -> str:
    """One recorded run of the random-instant kill test: the run's seed, its uninterrupted runs'
    durations and phase shares, then every kill."""
    path = results / KILL_LANDINGS
    data = load(path)
    shares = ", ".join(
        f"{phase} {100 * share:.0f}%"
        for phase, share in data["phase_shares_of_uninterrupted_run"].items()
        if share >= 0.01
    )
    note = (
        f"Seed {data['seed']}, {data['passages']} passages in batches of {data['batch']}; uninterrupted runs "
        f"{' and '.join(f'{ms:.0f}' for ms in data['calibration_runs_ms'])} ms; time shares of the faster run "
        f"(phases of 1 % or more): {shares}."
    )
    return "\n\n".join([note, kill_landing_table(data["kills"]), source_line([path])])
