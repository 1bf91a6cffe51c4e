"""The TTFT blocks. README's come from ``ragcompress bench --json`` runs: ``ttft`` and ``packed``
from its first shape (``bench_*_int8.json``), ``ttft-curve``, ``indexing-curve`` and
``packed-curve`` from the current one (``bench_curve_*.json``), and ``keep-freed-memory`` (the
allocator setting off and on); docs/recompute.md's ``dtype-ttft`` compares weight dtypes side by
side (``benchmarks/dtype_ttft.py``)."""

from __future__ import annotations

import functools
import operator
from collections.abc import Callable
from pathlib import Path

from .shared import ReportError, files, load, model_name, source_line, table


def _old_bench_model(path: Path, results: Path) -> str:
    """The first bench shape records no model: ``bench_<tag>_<quant>.json`` was run on the stores
    of ``core_<tag>.json``, whose rows name it."""
    tag = path.stem.removeprefix("bench_").rsplit("_", 1)[0]
    core = results / f"core_{tag}.json"
    models = {r["model"] for r in load(core)} if core.is_file() else set()
    return model_name(models.pop()) if len(models) == 1 else tag


def render_ttft(results: Path) -> str:
    """TTFT of the first ``bench --json`` shape (``bench_*_int8.json``)."""
    paths = files(results, "bench_*.json", exclude="bench_curve_")
    header = ["model", "top-k", "context tokens", "TTFT full prefill", "TTFT from stored caches", "speedup"]
    rows = []
    for path in paths:
        model = _old_bench_model(path, results)
        for r in load(path)["rows"]:
            rows.append(
                [
                    model,
                    str(r["top_k"]),
                    f"{r['context_tokens']:.0f}",
                    f"{r['ttft_full_ms']:.0f} ms",
                    f"{r['ttft_cached_ms']:.0f} ms",
                    f"**{r['speedup']:.1f}x**",
                ]
            )
    return "\n\n".join(
        [
            table(header, rows),
            source_line(paths) + " The model is the one of `core_<same tag>.json` (these files do not name it).",
        ]
    )


def _curve_caption(path: Path, data: dict) -> str:
    meta = data.get("meta") or {}
    parts = [f"{k} {meta[k]}" for k in ("limit", "repeats", "threads", "git") if k in meta]
    if "load_avg" in meta:
        parts.append("load average " + " / ".join(str(x) for x in meta["load_avg"]))
    return f"**{model_name(data['model'])}**" + (f" ({', '.join(parts)})" if parts else "")


def render_ttft_curve(results: Path) -> str:
    """One table per model from the ``ragcompress bench --json`` shape (``bench_curve_*.json``),
    rendered by the table ``ragcompress bench`` itself prints."""
    from ragcompress.bench import BenchRow
    from ragcompress.bench import table as bench_table

    paths = files(results, "bench_curve_*.json")
    parts = []
    for path in paths:
        data = load(path)
        parts += [_curve_caption(path, data), bench_table([BenchRow(**row) for row in data["rows"]])]
    parts.append(source_line(paths))
    return "\n\n".join(parts)


def render_indexing_curve(results: Path) -> str:
    """Indexing throughput against a plain forward, from ``bench_curve_*.json``'s ``indexing``."""
    paths = [p for p in files(results, "bench_curve_*.json") if "indexing" in load(p)]
    if not paths:
        raise ReportError(f"no {results}/bench_curve_*.json records indexing")
    header = ["model", "passages", "repeats", "indexer (passages/s)", "plain forward (passages/s)", "indexer / forward"]
    rows = []
    for path in paths:
        data = load(path)
        i = data["indexing"]
        rows.append(
            [
                model_name(data["model"]),
                str(i["passages"]),
                str(i["repeats"]),
                f"{i['indexer_passages_per_s']:.1f}",
                f"{i['forward_passages_per_s']:.1f}",
                f"{i['ratio']:.2f}x",
            ]
        )
    return "\n\n".join([table(header, rows), source_line(paths)])


def _render_packed(results: Path, paths: list[Path], model: Callable[[Path, dict], str]) -> str:
    header = [
        "model",
        "questions",
        "repeats",
        "packed backend",
        "TTFT dequantize-then-SDPA",
        "TTFT packed",
        "packed / dequantize-then-SDPA (median per question)",
        "same first token as dequantize-then-SDPA",
    ]
    rows = []
    for path in paths:
        data = load(path)
        p = data["packed_attention"]
        rows.append(
            [
                model(path, data),
                str(p["questions"]),
                str(p["repeats"]),
                f"`{p['packed_backend']}`" if "packed_backend" in p else "not recorded",
                f"{p['assembled_ttft_s'] * 1000:.0f} ms",
                f"{p['packed_ttft_s'] * 1000:.0f} ms",
                f"{p['ratio']:.2f}",
                f"{p['same_first_token']:.0%}",
            ]
        )
    return "\n\n".join([table(header, rows), source_line(paths)])


def render_packed(results: Path) -> str:
    """Packed attention path vs dequantize-then-SDPA from the first bench shape."""
    paths = [p for p in files(results, "bench_*.json", exclude="bench_curve_") if "packed_attention" in load(p)]
    if not paths:
        raise ReportError(f"no {results}/bench_*.json records packed_attention")
    return _render_packed(results, paths, lambda path, data: _old_bench_model(path, results))


def render_packed_curve(results: Path) -> str:
    """Packed attention path vs dequantize-then-SDPA from ``bench_curve_*.json``."""
    paths = [p for p in files(results, "bench_curve_*.json") if "packed_attention" in load(p)]
    if not paths:
        raise ReportError(f"no {results}/bench_curve_*.json records packed_attention")
    return _render_packed(results, paths, lambda path, data: model_name(data["model"]))


def render_dtype_ttft(results: Path) -> str:
    """Full prefill and a preset's cached path in each weight dtype, side by side in one process
    (``dtype_ttft_*.json``, ``benchmarks/dtype_ttft.py``)."""
    paths = files(results, "dtype_ttft_*.json")
    rows = []
    for path in paths:
        data = load(path)
        first = data["first_dtype"]
        for dtype, r in data["rows"].items():
            agree = r["first_token_as_first_dtype_full"]
            rows.append(
                [
                    model_name(data["meta"]["model"]),
                    f"`{data['preset']}`, top-{data['top_k']}",
                    dtype,
                    f"{1000 * r['full_ttft_s_median']:.0f} ms ({r['full_speedup_vs_first_dtype']:.2f}x)",
                    f"{1000 * r['cached_ttft_s_median']:.0f} ms ({r['cached_speedup_vs_first_dtype']:.2f}x)",
                    f"{r['cached_vs_own_full']:.2f}x / {r['cached_vs_first_dtype_full']:.2f}x",
                    f"{agree['full']:.2f} / {agree['cached']:.2f}",
                    f"{data['n']}, {data['meta']['threads']} threads, {', '.join(data['meta']['cpu_flags_bf16']) or 'no bf16 flags'}",
                ]
            )
    header = [
        "model",
        "cached path",
        "weights",
        f"full prefill, median TTFT (speed-up vs {first})",
        f"cached path, median TTFT (speed-up vs {first})",
        f"cached path vs full prefill: same dtype / {first}",
        f"first token as {first} full prefill's: full / cached",
        "questions, threads, CPU",
    ]
    return table(header, rows) + "\n\n" + source_line(paths)


KEEP_FREED_MEMORY = "keep_freed_memory_qwen.json"


def render_keep_freed_memory(results: Path) -> str:
    """``ragcompress bench`` with the command's kept freed memory turned off
    (``RAGCOMPRESS_KEEP_FREED_MEMORY=0``) and on, rounds alternating on one store: per top-k the
    mean over rounds of each path's median TTFT, of the cache work (cached - floor, median over
    questions) and of the cached path's ratio to full prefill."""
    path = results / KEEP_FREED_MEMORY
    data = load(path)
    runs = data["runs"]

    def mean(setting: str, top_k: int, *keys: str) -> float:
        """The mean over ``setting``'s rows of ``top_k`` of the value at ``keys`` (``ttft_s``, ``full``)."""
        rows = [row for run in runs[setting] for row in run["rows"] if row["top_k"] == top_k]
        return sum(functools.reduce(operator.getitem, keys, row) for row in rows) / len(rows)

    rows = []
    for top_k in sorted({row["top_k"] for run in runs["off"] for row in run["rows"]}):
        cells = [str(top_k)]
        for name in ("full", "cached", "floor"):
            off = mean("off", top_k, "ttft_s", name)
            on = mean("on", top_k, "ttft_s", name)
            cells.append(f"{1000 * off:.0f} / {1000 * on:.0f} ({on / off:.2f})")
        off_work = mean("off", top_k, "cache_work_s")
        on_work = mean("on", top_k, "cache_work_s")
        cells.append(f"{1000 * off_work:.0f} / {1000 * on_work:.0f}")
        off_ratio = mean("off", top_k, "speedup", "vs_full")
        on_ratio = mean("on", top_k, "speedup", "vs_full")
        cells.append(f"{off_ratio:.1f}x / {on_ratio:.1f}x")
        rows.append(cells)
    header = [
        "top-k",
        "full, ms: off / on (on/off)",
        "cached, ms: off / on (on/off)",
        "floor, ms: off / on (on/off)",
        "cache work, ms: off / on",
        "cached vs full: off / on",
    ]
    first = runs["off"][0]["meta"]
    revisions = [
        off if off == on else f"off {off}, on {on}"
        for off, on in zip(
            (run["meta"].get("git", "not recorded") for run in runs["off"]),
            (run["meta"].get("git", "not recorded") for run in runs["on"]),
            strict=True,
        )
    ]
    note = (
        f"{model_name(data['model'])}, {data['store']}; {len(runs['off'])} rounds of each setting, "
        f"{first['limit']} questions x {first['repeats']} repeats per run, {first['threads']} threads; "
        "each cell the mean over rounds of the run's median. Code of each round: "
        + ", ".join(f"{i + 1}: {git}" for i, git in enumerate(revisions))
        + "."
    )
    return "\n\n".join([table(header, rows), note, source_line([path])])
