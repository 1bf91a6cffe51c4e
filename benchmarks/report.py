"""README.md's result tables, rendered from ``docs/results/*.json`` (no number is typed by hand).

Each generated table sits in README.md between ``<!-- report:NAME -->`` and
``<!-- /report:NAME -->``; :data:`BLOCKS` maps NAME to its renderer:

* ``core``: cached answering vs full prefill on SQuAD-dev (``core_*.json``, ``benchmarks/core_eval.py``);
* ``ttft``: TTFT table of the first ``bench --json`` shape (``bench_*_int8.json``: ``rows`` of
  ``ttft_full_ms`` / ``ttft_cached_ms``, no model, no run metadata);
* ``ttft-curve``: one table per model from the current ``ragcompress bench --json`` shape
  (``bench_curve_*.json``: ``model``, ``rows`` with the four paths of ``ragcompress.bench.PATHS``,
  ``meta``), the columns of ``ragcompress.bench.table()`` plus the model and the share of first
  tokens equal to full prefill's; ``indexing-curve`` and ``packed-curve`` render the same files'
  ``indexing`` and ``packed_attention`` objects;
* ``packed``: the packed attention path vs dequantize-then-SDPA from the ``bench_*_int8.json`` files;
* ``compression``: the headline compression settings on Qwen (``compression_qwen.json``, 16
  questions, and ``compression_qwen32.json``, 32), each sub-EM against full prefill and against
  uncompressed reuse;
* ``sweep:*`` / ``needle:*`` (docs/compression.md §1-6): the first round's sweeps of every
  method x ratio x quant (``compression_<model>.json`` with ``compression_kl_<model>.json``,
  :data:`SWEEP_TABLES`) and the needle-in-a-haystack runs (``needle_*.json``);
* ``lowrank-frontier`` / ``kvzip-cost`` / ``layer-padding`` (docs/compression.md §8):
  eviction x rank x bits (``lowrank_*.json``, ``benchmarks/lowrank_frontier.py --publish``),
  KVzip's scoring cost against a plain forward (``kvzip_cost_*.json``) and the dense path's
  per-layer padding against the layout it replaced (``layer_padding_*.json``);
* ``kernel-gpu`` / ``kernel-cpu-ttft`` (docs/kernels.md): the fused kernel per call on a GPU
  (``gpu_check_*.json``, ``benchmarks/gpu_check.sh``) and the packed CPU path's TTFT against the
  dense path (``kernel_cpu_ttft_*.json``, ``benchmarks/kernel_bench.py --ttft --json``);
* ``keep-freed-memory``: ``bench`` with the command's allocator setting off and on
  (``keep_freed_memory_qwen.json``, :mod:`ragcompress.runtime.memory`);
* ``serve-memory`` (docs/serve.md): a long-running ``ragcompress serve`` with the allocator
  setting off and on, resident memory and server TTFT over many requests
  (``serve_memory_*.json``, ``benchmarks/serve_memory.py``);
* ``kill-landings`` (docs/guarantees.md): where the external SIGKILLs of
  ``test_external_sigkill_at_random_instants_then_resume`` landed, one run
  (``kill_landings.json``, written by the test under ``$RAGCOMPRESS_KILL_TABLE``);
* ``text-compression`` (docs/llamaindex.md): every text compressor of one
  ``benchmarks/text_compression.py --out`` run (``text_compression_smollm2.json``);
* ``store-scale``: stores at 1k..100k passages and Ray indexing against one process
  (``store_scale.json``, ``ray_throughput.json``, ``benchmarks/store_scale.py``);
  ``scale-estimate``: 10M passages on N nodes, simulated (``scale_estimate.json``).

Every quality figure of a cached or compressed row comes with its reference and its percentage of
full prefill. Files in ``docs/results/`` that do not record the run metadata of
``ragcompress.provenance.run_meta`` (git, threads, repeats, limit, questions, model) are named on stderr.

    .venv/bin/python benchmarks/report.py           # rewrite the blocks of README.md in place
    .venv/bin/python benchmarks/report.py --check   # exit 1 naming the first block that differs

A block whose files are missing fails; to switch the TTFT table to the new shape, replace the
``ttft`` markers by ``ttft-curve`` ones (and ``packed`` by ``packed-curve``) and run the script.
This module imports the standard library, ``ragcompress.stats`` and ``ragcompress.provenance``
only (no torch: it runs in a fraction of a second; ``tests/test_report.py`` runs it in-process).
"""

from __future__ import annotations

import argparse
import difflib
import json
import re
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from ragcompress.provenance import META_KEYS
from ragcompress.stats import mcnemar_exact

ROOT = Path(__file__).resolve().parents[1]
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

BLOCK_RE = re.compile(r"<!-- report:(?P<name>[\w.:-]+) -->\n(?P<body>.*?)<!-- /report:(?P=name) -->", re.DOTALL)
OPEN_RE = re.compile(r"<!-- report:([\w.:-]+) -->")


class ReportError(Exception):
    """A block cannot be rendered (unknown name, missing or malformed results file)."""


# -- reading ------------------------------------------------------------------------------------


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


# -- formatting ---------------------------------------------------------------------------------


def pct(value: float, reference: float) -> str:
    """``value`` as a percentage of ``reference`` ("–" when the reference is 0)."""
    return "–" if not reference else f"{100 * value / reference:.0f} %"


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


# -- blocks -------------------------------------------------------------------------------------


def render_core(results: Path) -> str:
    """Cached answering vs full prefill (``benchmarks/core_eval.py``): one row per model, quant, top-k."""
    paths = files(results, "core_*.json")
    records = [(p, r) for p in paths for r in load(p)]
    fp16 = {r["model"]: r["kv_bytes_per_token"]["fp16"] for _, r in records}
    header = [
        "model",
        "quant",
        "top-k",
        "sub-EM full",
        "sub-EM cached",
        "sub-EM cached, % of full",
        "F1 full",
        "F1 cached",
        "F1 cached, % of full",
        "agreement",
        f"stored bytes/token (fp16: {' / '.join(f'{v:,.0f}' for v in fp16.values())})",
    ]
    rows = []
    for _, r in records:
        full, cached, kv = r["full"], r["compressed"], r["kv_bytes_per_token"]
        rows.append(
            [
                model_name(r["model"]),
                r["quant"],
                str(r["top_k"]),
                f"{full['sub_em']:.3f}",
                f"{cached['sub_em']:.3f}",
                pct(cached["sub_em"], full["sub_em"]),
                f"{full['f1']:.3f}",
                f"{cached['f1']:.3f}",
                pct(cached["f1"], full["f1"]),
                f"{r['agreement']:.3f}",
                f"{kv['stored']:,.0f} ({kv['stored'] / kv['fp16']:.3f}x fp16)",
            ]
        )
    sizes = sorted({r["n"] for _, r in records})
    return "\n\n".join(
        [
            table(header, rows),
            f"Questions per row: {', '.join(map(str, sizes))}. Reference of every `full` column and of "
            "`agreement`: full prefill of the same token ids in the same process. " + source_line(paths),
        ]
    )


def _ci(interval: list[float]) -> str:
    return f"[{interval[0]:.3f}, {interval[1]:.3f}]"


def render_core_all(results: Path) -> str:
    """All dev questions (``core_eval.py --limit 272``): sub-EM and agreement with 95 % bootstrap
    intervals, and the paired comparison of cached against full-prefill sub-EM."""
    paths = files(results, "core272_*.json")
    records = [(p, r) for p in paths for r in load(p)]
    header = [
        "model",
        "quant",
        "top-k",
        "questions",
        "sub-EM full [95 % CI]",
        "sub-EM cached [95 % CI]",
        "cached, % of full",
        "cached − full (paired) [95 % CI]",
        "questions right only cached / only full",
        "McNemar p",
        "agreement [95 % CI]",
        "TTFT speedup",
    ]
    rows = []
    for _, r in records:
        ci, paired = r["ci95"], r["compressed_vs_full_sub_em"]
        full, cached = r["full"]["sub_em"], r["compressed"]["sub_em"]
        rows.append(
            [
                model_name(r["model"]),
                r["quant"],
                str(r["top_k"]),
                str(r["n"]),
                f"{full:.3f} {_ci(ci['full_sub_em'])}",
                f"{cached:.3f} {_ci(ci['compressed_sub_em'])}",
                pct(cached, full),
                f"{paired['mean_difference']:+.3f} {_ci(paired['ci95'])}",
                f"{paired['wins']} / {paired['losses']}",
                f"{paired['p_value']:.3g}",
                f"{r['agreement']:.3f} {_ci(ci['agreement'])}",
                f"{r['ttft_speedup']:.1f}x",
            ]
        )
    return "\n\n".join(
        [
            table(header, rows),
            "Reference of every `full` figure and of `agreement`: full prefill of the same token ids, "
            "same retrieved passages, same process. Intervals: seeded percentile bootstrap over questions; "
            "the paired column and McNemar's exact test compare the two answers to each question "
            "(`ragcompress.stats`). TTFT speedup: median full TTFT / median cached TTFT over all questions "
            "(answers decoded in full, quality runs sharing the CPU: see the TTFT curve for timings). "
            + source_line(paths),
        ]
    )


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


COMPRESSION_FILES = ("compression_qwen.json", "compression_qwen32.json")


def _method(row: dict) -> str:
    return "`none` (uncompressed reuse)" if row["method"] == "none" else f"`{row['method']}`"


def render_compression(results: Path) -> str:
    """The settings measured on both Qwen samples (every row of the larger one), sub-EM against
    full prefill and against uncompressed reuse (``none`` at ratio 1.0, same quantization)."""
    paths = [results / name for name in COMPRESSION_FILES]
    runs = [load(p) for p in paths]
    models = {run["model"] for run in runs}
    if len(models) != 1:
        raise ReportError(f"{', '.join(COMPRESSION_FILES)} name different models: {sorted(models)}")
    largest = max(runs, key=lambda run: run["n"])
    header = ["method", "ratio", "quant", f"compression vs fp16 ({largest['n']} q)"]
    for run in runs:
        header += [f"sub-EM, {run['n']} q", "% of full prefill", "% of uncompressed"]
    rows = [["full prefill (reference)", "–", "–", "–"]]
    for run in runs:
        rows[0] += [f"{run['full']['sub_em']:.3f}", "100 %", "–"]
    for key, row in largest["rows"].items():
        line = [_method(row), str(row["ratio"]), row["quant"], f"{row['compression']:.1f}x"]
        for run in runs:
            if key not in run["rows"]:
                raise ReportError(f"row {key} of the {largest['n']}-question file is missing from another file")
            here = run["rows"][key]
            base = [r for r in run["rows"].values() if r["method"] == "none" and r["quant"] == here["quant"]]
            line += [
                f"{here['sub_em']:.3f}",
                pct(here["sub_em"], run["full"]["sub_em"]),
                pct(here["sub_em"], base[0]["sub_em"]) if base else "–",
            ]
        rows.append(line)
    note = (
        f"{model_name(models.pop())}, top-{largest['top_k']}; sub-EM with SQuAD normalisation; references: full "
        "prefill of the same token ids, and uncompressed reuse (`none`, ratio 1.0, same quantization) of the "
        "same questions. "
    )
    return "\n\n".join([table(header, rows), note + source_line(paths)])


# The first round's sweeps (docs/compression.md §1-6): 16 questions, every method x ratio x quant
# of ``benchmarks/compression_quality.py`` (``compression_<model>.json``) with the KL of each row
# (``benchmarks/kl_fidelity.py``, ``compression_kl_<model>.json``, keyed alike). Each table is a
# selection of those rows, named here in the order the document shows them.
_SWEEP_METHODS = ("global-kvzip", "adaptive-kvzip", "kvzip", "expected-attention", "snapkv", "knorm", "streaming")
_PROTECTED = (
    "global-kvzip",
    "global-kvzip-keep-first-1-keep-last-0",
    "global-kvzip-keep-first-0-keep-last-0",
    "global-kvzip-keep-last-0",
    "global-expected-attention",
    "global-snapkv",
)
_KVPRESS = (
    "global-kvzip",
    "kvzip",
    "expected-attention",
    "snapkv",
    "knorm",
    "global-kvpress-kvzip",
    "kvpress-kvzip",
    "global-kvpress-kvzip-plus",
    "kvpress-kvzip-plus",
    "kvpress-expected-attention",
    "kvpress-snapkv",
    "kvpress-knorm",
)
_RATIOS = (0.5, 0.25, 0.125)


def _sweep(first: tuple[str, ...], methods: tuple[str, ...], quants: tuple[str, ...]) -> list[str]:
    return [*first, *(f"{m}_{r}_{q}" for r in _RATIOS for m in methods for q in quants)]


# block name -> (results file, KL file or None, row keys (missing ones skipped), indexing column)
SWEEP_TABLES: dict[str, tuple[str, str | None, list[str], bool]] = {
    "sweep:qwen-int4": (
        "compression_qwen.json",
        "compression_kl_qwen.json",
        _sweep(("none_1.0_int4",), _SWEEP_METHODS, ("int4",)),
        True,
    ),
    "sweep:qwen-fp16": ("compression_qwen.json", None, _sweep(("none_1.0_fp16",), _SWEEP_METHODS, ("fp16",)), False),
    "sweep:qwen-protected": (
        "compression_qwen.json",
        "compression_kl_qwen.json",
        _sweep(("none_1.0_int4",), _PROTECTED, ("int4",)),
        False,
    ),
    "sweep:qwen-kvpress": (
        "compression_qwen.json",
        "compression_kl_qwen.json",
        _sweep(("none_1.0_int4",), _KVPRESS, ("int4",)),
        False,
    ),
    "sweep:qwen32": (
        "compression_qwen32.json",
        None,
        [
            "none_1.0_int4",
            *(f"{m}_{r}_int4" for r in (0.5, 0.25) for m in _PROTECTED[:2] + ("expected-attention",)),
        ],
        False,
    ),
    "sweep:smollm2": (
        "compression_smollm2.json",
        "compression_kl_smollm2.json",
        _sweep(("none_1.0_fp16", "none_1.0_int4"), _SWEEP_METHODS, ("fp16", "int4")),
        True,
    ),
}


def render_sweep(name: str, results: Path) -> str:
    """One of :data:`SWEEP_TABLES`: sub-EM, F1, agreement, bytes per token and compression of
    each row, indexing time against ``none`` where asked, and the KL of each row against the
    KL file's reference row (which reads "(reference)")."""
    file, kl_file, keys, indexing = SWEEP_TABLES[name]
    run = load(results / file)
    kl = load(results / kl_file) if kl_file else None
    header = ["method", "ratio", "quant", "sub-EM", "F1", "agreement", "bytes/token", "compression"]
    # timed once per method, at ratio 0.25 (compression_quality.indexing_times): the same on each ratio's row
    header += ["indexing / none (the method at ratio 0.25)"] * indexing + ["KL suffix+answer", "KL answer"] * (
        kl is not None
    )
    references = {entry["reference"] for entry in kl.values()} if kl else set()
    rows = []
    for key in keys:
        if key not in run["rows"]:
            continue  # a ratio a selection does not cover (e.g. keep_last=0 at 0.5)
        row = run["rows"][key]
        method = f"**{row['method']}**" if row["method"].startswith("global:kvzip") else row["method"]
        line = [method, str(row["ratio"]), row["quant"], f"{row['sub_em']:.3f}", f"{row['f1']:.3f}"]
        line += [f"{row['agreement']:.3f}", f"{row['bytes_per_token']:.0f}", f"{row['compression']:.1f}x"]
        if indexing:
            times = run["indexing_s"]
            line.append(f"{times[row['method'].split('[')[0]] / times['none']:.2f}")
        if kl is not None:
            if key in references:
                line += ["(reference)", ""]
            elif key not in kl:
                raise ReportError(f"row {key} of {file} has no KL in {kl_file}")
            else:
                line += [f"{kl[key]['kl_suffix_answer']:.3f}", f"{kl[key]['kl_answer']:.3f}"]
        rows.append(line)
    return "\n\n".join([table(header, rows), source_line([results / f for f in (file, kl_file) if f])])


def render_needle(file: str, results: Path) -> str:
    """``benchmarks/needle.py``'s table: the share of needles found per insertion depth."""
    path = results / file
    data = load(path)
    args = data["args"]
    depths = [float(d) for d in json.loads(args["depths"])]
    caption = (
        f"{model_name(data['model'])}: {args['essays']} essays × {len(depths)} depths, {args['chunks']} passage(s) "
        f"of {args['chunk_tokens']} tokens, {args['quant']}"
    )
    header = ["setting", *(f"depth {d:.0%}" for d in depths), "mean"]
    rows = []
    for setting, row in data["rows"].items():
        bold = setting.startswith("global:kvzip")
        found = [f"{row['by_depth'][str(d)]:.2f}" for d in depths]
        mean = f"{row['mean']:.2f}"
        rows.append([f"**{setting}**" if bold else setting, *found, f"**{mean}**" if bold else mean])
    return "\n\n".join([caption, table(header, rows), source_line([path])])


def _mb(n: float) -> str:
    return f"{n / 1e6:.1f}"


def _range(row: dict, part: str) -> str:
    low, high = row[f"{part}_vs_smallest_range"]
    return f"{low:.2f}–{high:.2f}"


def render_store_scale(results: Path) -> str:
    """Stores at 1k..100k passages (``store_scale.json``) and Ray against one process
    (``ray_throughput.json``), both from ``benchmarks/store_scale.py``."""
    scale_path, tp_path = results / "store_scale.json", results / "ray_throughput.json"
    scale = load(scale_path)
    rows = []
    for r in scale["rows"]:
        index = r["index"]
        kind = index["type"] if index["type"] == "flat" else f"ivf ({index['nlist']:,} cells, nprobe {index['nprobe']})"
        recall = r.get("query_recall_at_10")
        built = index.get("recall_at_10")
        rows.append(
            [
                f"{r['passages']:,}",
                kind,
                "exact" if recall is None else f"{recall:.3f} / {built:.3f}",
                f"{r['search_ms']:.3f}",
                f"{r['load_ms']:.3f}",
                f"{r['total_ms']:.3f} (p90 {r['total_p90_ms']:.3f})",
                f"{r['total_vs_smallest']:.2f}x ({_range(r, 'total')})",
                f"{r['interleaved_ms']:.3f} ({r['interleaved_vs_smallest']:.2f}x)",
                f"{r['with_real_segments_vs_smallest']:.2f}x" if "with_real_segments_vs_smallest" in r else "–",
                f"{r['reload_ms']:.3f}",
                f"{r['open_s']:.2f}",
                f"{r['rss_added_mb']:.0f}",
                _mb(r["disk_bytes"]["total"]),
            ]
        )
    meta = scale["meta"]
    out = [
        table(
            [
                "passages",
                "FAISS index",
                "recall@10 (queries / at build)",
                "search (ms)",
                f"load top-{scale['top_k']} (ms)",
                "search + load (ms)",
                "vs smallest (range over processes)",
                "interleaved query by query (ms, vs smallest)",
                "with real segments, estimated (vs smallest)",
                "same segment again (ms)",
                "open (s)",
                "RSS added (MB)",
                "disk (MB)",
            ],
            rows,
        ),
        "",
        f"Medians over {meta['questions']} queries x {meta['repeats']} rounds after one untimed pass of the same "
        f"queries (page cache warm), in each of {scale['processes']} fresh processes; times and ratios are the "
        f"medians over the processes. Served: {scale['block']} queries to one store, then the next, order rotating; "
        f"target: search + load at the largest store within {scale['target_total_vs_smallest']}x of the smallest. "
        + (
            f"Real segments: each size's search plus the median load of {scale['top_k']} random segments of "
            f"`{scale['real_segment_store']}` ({scale['real_segment_load_ms']:.1f} ms, timed in the same run). "
            if scale.get("real_segment_load_ms")
            else ""
        )
        + f"Load average {meta['load_before'][0]:.1f} before, {meta['load_after'][0]:.1f} after (2 cores, shared). "
        + source_line([scale_path]),
    ]
    if tp_path.is_file():
        tp = load(tp_path)
        med = tp["median"]
        same = all(tp["same_bytes"].values())

        def rate(key: str) -> str:
            """A marginal rate <= 0 means fixed costs varied more than the work: not a rate."""
            if key not in med:
                return "–"
            return f"{med[key]:.2f}" if med[key] > 0 else "not measurable (< 0)"

        out += [
            "",
            table(
                [
                    "indexing (SmolLM2-135M, SQuAD-dev)",
                    "one process, 2 threads",
                    "Ray, 2 actors x 1 thread",
                    "Ray / one process",
                    "control: one process, 1 thread",
                ],
                [
                    [
                        f"marginal passages/s ({tp['sizes'][0]} -> {tp['sizes'][-1]} passages)",
                        rate("single_marginal_pps"),
                        rate("ray_marginal_pps"),
                        f"{med['marginal_ratio']:.2f}x" if med["marginal_ratio"] > 0 else "–",
                        rate("single_1t_marginal_pps"),
                    ],
                    [
                        f"end to end passages/s ({tp['sizes'][-1]} passages, model loads included)",
                        f"{med['single_end_to_end_pps']:.2f}",
                        f"{med['ray_end_to_end_pps']:.2f}",
                        f"{med['end_to_end_ratio']:.2f}x",
                        f"{med['single_1t_end_to_end_pps']:.2f}" if "single_1t_end_to_end_pps" in med else "–",
                    ],
                ],
            ),
            "",
            f"Medians of {len(tp['rounds'])} rounds, order rotating; target Ray / one process >= {tp['target_ratio']}. "
            f"Same catalogue rows and segment bytes: {'yes' if same else 'NO'} (`store_digest`). "
            f"Load average {tp['meta']['load_before'][0]:.1f} before, {tp['meta']['load_after'][0]:.1f} after. "
            + source_line([tp_path]),
        ]
    return "\n".join(out)


def _s(value: float | None) -> str:
    return "–" if value is None else (f"{value * 1000:.0f} ms" if value < 1 else f"{value:.2f} s")


def render_serve_load(results: Path) -> str:
    """``ragcompress serve`` under load (``serve_load.json``, ``benchmarks/load.py --serve-store``):
    throughput with 1 and 8 clients, batching on and off, then the long run with its faults."""
    path = results / "serve_load.json"
    data = load(path)
    meta, comparison = data["meta"], data["batching_comparison"]
    out = []
    if comparison:
        rows = []
        medians = comparison["median"]
        for row in medians.values():
            single = medians[f"batch{row['batch']}_clients1"]["throughput_rps"]
            rows.append(
                [
                    "off (`--batch 1`)" if row["batch"] == 1 else f"on (`--batch {row['batch']}`)",
                    str(row["clients"]),
                    f"{row['throughput_rps']:.2f}",
                    f"{row['tokens_per_s']:.1f}",
                    _s(row["latency_p50_s"]),
                    f"{row['throughput_rps'] / single:.2f}x",
                ]
            )
        out += [
            table(["batching", "clients", "answers/s", "tokens/s", "p50 latency", "vs 1 client"], rows),
            "",
            f"Medians of {len(comparison['rounds'])} rounds of {comparison['seconds_per_phase']:.0f} s per cell, "
            "the two services measured in alternation. Batched vs unbatched at "
            f"{max(r['clients'] for r in medians.values())} clients: {comparison['batched_vs_unbatched']:.2f}x.",
            "",
        ]
    single, run = data["single_client"], data["load"]
    queue = run["queue_s"]
    # runs before 2026-12-06 kept the server's TTFT over every answer only
    streamed = "ttft_server_streamed_s" in run
    server = "ttft_server_streamed_s" if streamed else "ttft_server_s"
    out += [
        table(
            [
                "phase",
                "answers",
                "failed",
                "lost",
                "429",
                "answers/s",
                "TTFT p50 / p99 (client, streamed answers)",
                "TTFT p50 / p99 (server, the same answers)" if streamed else "TTFT p50 / p99 (server, every answer)",
                "queue p50 / p99",
                "latency p50 / p99",
            ],
            [
                [
                    f"{n} client{'s' if n > 1 else ''}, {phase['seconds']:.0f} s",
                    str(phase["ok"]),
                    str(phase["failed"]),
                    str(phase["lost"]),
                    str(phase["rejected"]),
                    f"{phase['throughput_rps']:.2f}",
                    f"{_s(phase['ttft_client_s']['p50'])} / {_s(phase['ttft_client_s']['p99'])} "
                    f"(n = {phase['ttft_client_s']['n']})",
                    f"{_s(phase[server]['p50'])} / {_s(phase[server]['p99'])} (n = {phase[server]['n']})",
                    f"{_s(phase['queue_s']['p50'])} / {_s(phase['queue_s']['p99'])}",
                    f"{_s(phase['latency_s']['p50'])} / {_s(phase['latency_s']['p99'])}",
                ]
                for n, phase in ((1, single), (meta["clients"], run))
            ],
        ),
        "",
        f"Throughput with {meta['clients']} clients: {data['throughput_vs_single']:.2f}x one client's "
        f"(TTFT client side: first content chunk of a streamed answer, queue wait included; server side: "
        f"`ragcompress.ttft_s`; queue p50/p99 {_s(queue['p50'])} / {_s(queue['p99'])}).",
    ]
    faults = []
    fuzz, indexed, sigterm = data.get("fuzz"), data.get("index"), data.get("sigterm")
    if fuzz:
        statuses = ", ".join(f"{code}: {n}" for code, n in sorted(fuzz["statuses"].items()))
        faults.append(
            f"fuzzed bodies: {fuzz['requests']} sent ({statuses}), {fuzz['5xx']} answered 5xx, {fuzz['lost']} dropped"
        )
    if indexed:
        faults.append(
            f"`ragcompress index` during the load: exit {indexed['exit']} after {indexed['seconds']:.0f} s, "
            f"{indexed['answerable']}/{indexed['passages']} new passages answer by id, "
            f"{indexed['retrieved_top3_by_own_text']}/{indexed['passages']} retrieved in the top 3 by their own text"
        )
    if sigterm:
        faults.append(
            f"SIGTERM with {sigterm['requests']} requests in flight "
            f"({sigterm['queue_at_signal'].get('waiting', '?')} still queued): {sigterm['ok']} finished, exit status "
            f"{sigterm['exit_code']} after {sigterm['seconds_to_exit']:.1f} s"
        )
    failed = [name for name, passed in data["checks"].items() if not passed]
    faults.append("checks: " + ("all passed" if not failed else "FAILED: " + ", ".join(failed)))
    out += ["", *[f"* {line}" for line in faults], ""]
    before, after = meta["load_before"][0], meta["load_after"][0]
    out.append(
        f"{model_name(meta['model'])} over `{meta['store']}`, `--max-tokens {meta['max_tokens']}`, "
        f"{meta['cpus']} CPUs shared with other jobs: load average {before:.1f} before the run, {after:.1f} after "
        f"(measured {meta['date']}). " + source_line([path])
    )
    return "\n".join(out)


def render_scale_estimate(results: Path) -> str:
    """10M passages on N nodes, simulated from measured rates (``scale_estimate.json``,
    ``benchmarks/store_scale.py estimate``)."""
    path = results / "scale_estimate.json"
    est = load(path)
    rows = [
        [
            str(r["nodes"]),
            str(r["workers"]),
            f"{r['encode_and_commit_h']:.1f}",
            f"{r['index_build_h']:.1f}",
            f"{r['total_h']:.1f}",
            "driver" if r["driver_bound"] else "actors",
        ]
        for r in est["rows"]
    ]
    return "\n".join(
        [
            table(
                [
                    "nodes (16 cores)",
                    "actors",
                    "encode + commit (h)",
                    "index build (h)",
                    "total (h)",
                    "bound by",
                ],
                rows,
            ),
            "",
            f"{est['passages']:,} passages; measured inputs: {est['actor_pps']:.2f} passages/s per actor "
            f"(SmolLM2-135M, int8, 1 thread: the one-process control's marginal rate in `ray_throughput.json`), "
            f"{est['driver_commit_rows_per_s']:,.0f} catalogue rows/s at the driver, "
            f"index build {est['index_build_s_measured']:.1f} s at {est['index_build_measured_at']:,} vectors "
            f"(IVF, {est['index_type_at_estimate']['nlist']:,} cells at {est['passages']:,}; scaled by N x cells). "
            f"Store: {est['segment_bytes_per_passage'] / 1e3:.0f} KB of segment and "
            f"{est['catalogue_bytes_per_passage'] / 1e3:.1f} KB of catalogue per passage (the SmolLM2 int8 SQuAD store), "
            f"{est['store_tb']:.1f} TB in all; IVF-Flat index ~{est['index_gb']:.0f} GB. " + source_line([path]),
        ]
    )


def _ranks(row: dict) -> str:
    """Mean rank of keys / values over layers ("–": rows stored whole)."""
    parts = []
    for kind in ("ranks_k", "ranks_v"):
        ranks = row.get(kind)
        parts.append(f"{sum(ranks) / len(ranks):.0f}" if ranks else "–")
    sample = f" (basis: {row['calibration_passages']} passages)" if row.get("calibration_passages") else ""
    return " / ".join(parts) + sample


def frontier_ttft_speedup(data: dict[str, Any], row: str) -> float | None:
    """Full prefill's TTFT over ``row``'s in a frontier file's side-by-side run (None where that run
    did not time the row, or predates timing full prefill alongside)."""
    median = (data.get("ttft") or {}).get("ttft_s_median", {})
    return median["full prefill"] / median[row] if row in median and "full prefill" in median else None


def render_lowrank_frontier(results: Path) -> str:
    """Eviction x rank x bits (``lowrank_*.json``, ``benchmarks/lowrank_frontier.py --publish``):
    bytes per token against KL to full prefill and sub-EM, each against the uncompressed fp16
    store and full prefill, with paired tests, on questions of articles the bases never saw."""
    return "\n\n".join(frontier_file(path) for path in files(results, "lowrank_*.json"))


def render_compression_methods(model: str, results: Path) -> str:
    """Every eviction method at 0.5 and 0.25 kept + int4, on the 100 held-out questions of the
    frontier (``compression_methods_{model}_100q.json``, ``lowrank_frontier.py`` rows without
    rank): docs/compression.md §1's (Qwen) and §6's (SmolLM2) comparisons, re-measured on a
    sample 6x the size they were chosen on."""
    return frontier_file(results / f"compression_methods_{model}_100q.json")


PROTECTION_RUNS = (
    ("protection_qwen_dev.json", "Qwen2.5-Coder-0.5B, 100 dev questions (Yuan dynasty, Genghis Khan): the gate"),
    ("protection_smollm2_dev.json", "SmolLM2-135M, 100 dev questions: the gate"),
    ("protection_qwen_eval.json", "Qwen2.5-Coder-0.5B, the 100 held-out questions: reported"),
)


def render_protection(results: Path) -> str:
    """The protected tokens of ``global:kvzip`` stores (``lowrank_frontier.py`` rows ``~keepF-L``,
    int4, no rank or adaptor) under the rule of docs/rules.md: per run, KL to full prefill, sub-EM
    and agreement, and the paired sub-EM against the 4/4 row of the same ratio (questions won and
    lost, exact McNemar p). A run not measured yet is said so."""
    parts = []
    for name, caption in PROTECTION_RUNS:
        if not (results / name).is_file():
            parts.append(f"**{caption}**: not measured (`{name}` absent).")
            continue
        data = load(results / name)
        rows = data["rows"]
        header = ["kept", "protected first / last", "KL(full ‖ row)", "sub-EM", "agreement", "vs 4/4: won / lost (p)"]
        lines = []
        for row_name, row in sorted(rows.items(), key=lambda item: (-item[1]["ratio"], -sum(_protection(item[0])))):
            base = next((r for n, r in rows.items() if r["ratio"] == row["ratio"] and _protection(n) == (4, 4)), None)
            paired = "–"
            if base is not None and base is not row:
                won = sum(a > b for a, b in zip(row["per_question_sub_em"], base["per_question_sub_em"], strict=True))
                lost = sum(a < b for a, b in zip(row["per_question_sub_em"], base["per_question_sub_em"], strict=True))
                paired = f"{won} / {lost} ({mcnemar_exact(won, lost):.2g})"
            first, last = _protection(row_name)
            lines.append(
                [
                    f"{row['ratio']:g}",
                    f"{first} / {last}",
                    f"{row['kl_full_answer']:.3f} ({row['kl_questions']} q)",
                    f"{row['sub_em']:.2f}",
                    f"{row['agreement']:.2f}",
                    paired,
                ]
            )
        full = data["full"]["sub_em"]
        parts.append(
            f"**{caption}**, top-3, int4, full prefill sub-EM {full:.2f} (computed in the run).\n\n"
            + table(header, lines)
            + f"\n\nSource: `docs/results/{name}`."
        )
    return "\n\n".join(parts)


def _protection(row_name: str) -> tuple[int, int]:
    """A frontier row's protected tokens (``~keepF-L``; 1 and 0 without it)."""
    match = re.search(r"~keep(\d+)-(\d+)$", row_name)
    return (int(match[1]), int(match[2])) if match else (1, 0)


def frontier_file(path: Path) -> str:
    """One ``lowrank_frontier.py --publish`` file: its caption, table, adaptor notes, TTFT line
    and source."""
    parts = []
    data = load(path)
    rows = data["rows"]
    reference = rows[data["reference_row"]]
    full = data["full"]
    header = [
        "store (eviction@kept / bits / rank)",
        "rank K / V",
        "bytes/token",
        "vs fp16",
        "KL(full ‖ row)",
        "sub-EM [95 % CI]",
        "% of uncompressed",
        "paired vs uncompressed (p)",
        "% of full prefill",
        "agreement",
        "TTFT median",
    ]
    lines = []
    for name, row in sorted(rows.items(), key=lambda item: -item[1]["bytes_per_token"]):
        paired = row["vs_uncompressed"]
        lines.append(
            [
                f"`{name}`",
                _ranks(row),
                f"{row['bytes_per_token']:.0f}",
                f"{row['compression']:.1f}x",
                "–" if row["kl_full_answer"] is None else f"{row['kl_full_answer']:.3f} ({row['kl_questions']} q)",
                f"{row['sub_em']:.3f} [{row['sub_em_ci95'][0]:.2f}, {row['sub_em_ci95'][1]:.2f}]",
                pct(row["sub_em"], reference["sub_em"]),
                "–" if name == data["reference_row"] else f"{paired['mean_difference']:+.3f} ({paired['p_value']:.2g})",
                pct(row["sub_em"], full["sub_em"]),
                f"{row['agreement']:.2f}",
                f"{1000 * row['ttft_s_median']:.0f} ms",
            ]
        )
    calibration = data["calibration"]
    load_avg = data["meta"].get("load", [0.0])[0]
    caption = (
        f"**{model_name(data['model'])}**, {data['n']} SQuAD-dev questions ({data['key']['split']} split: articles "
        f"other than {', '.join(calibration['articles'])}, whose first passages the bases were fitted on: how many, "
        f"in the rank column), top-{data['key']['top_k']}. Full prefill: sub-EM {full['sub_em']:.3f} "
        + (
            f"({full['reused_core272']} of {data['n']} answers reused from `runs/core272-ck`). "
            if full.get("reused_core272")
            else "(computed in the run). "
        )
        + "KL: teacher-forced, "
        "nats per answer token, full prefill's distribution as reference, over the evenly spaced questions the "
        "KL column counts. "
        f"Bytes: blobs as stored plus the basis file once, over the store's tokens. TTFT: dense backend on a CPU, "
        f"medians per row measured one row after another on a shared 2-core machine (load average "
        f"{load_avg:.0f} when written): a contention figure, not a speed ranking. "
        f'Reference for "% of uncompressed" and the paired test (bootstrap mean difference of sub-EM, exact '
        f"McNemar p): `{data['reference_row']}`"
        + (
            ", the int8 store's cached answers recorded by `core_eval.py` in `runs/core272-ck` (no fp16 store "
            "was run for this model; int8 matched uncompressed sub-EM in the core table), its TTFT from that run."
            if data["reference_row"].startswith("core272:")
            else " (uncompressed fp16 store)."
        )
    )
    parts += [caption, table(header, lines)]
    adapted = {name: row["adaptor"] for name, row in rows.items() if row.get("adaptor")}
    for name, adaptor in adapted.items():
        lowrank = adaptor.get("lowrank")
        rank = f" rank-{lowrank['rank']} {'keys and values' if lowrank['values'] else 'keys'}" if lowrank else ""
        parts.append(
            f"`{name}`: passages encoded through the KV-Distill adaptor `{adaptor['hash'][:16]}` "
            f"({adaptor['steps']} steps, trained for {adaptor['method']} {adaptor['ratio']:g} {adaptor['quant']}{rank} "
            f"on {', '.join(adaptor['train_articles'])} only: none of these questions' articles), as "
            "`index --adaptor` builds a store; the answering model is the base model."
        )
    ttft = data.get("ttft")
    if ttft:
        median = ttft["ttft_s_median"]
        medians = ", ".join(
            f"`{name}` {1000 * median[name]:.0f} ms"
            + (f" ({speedup:.1f}x faster than full prefill)" if (speedup := frontier_ttft_speedup(data, name)) else "")
            for name in ttft["rows"]
        )
        if "baselines" in ttft:
            medians += "; " + ", ".join(f"{b} {1000 * median[b]:.0f} ms" for b in ttft["baselines"])
        # files before "repeats" was recorded timed 2 runs a question, no warm-up: their median is the
        # mean of both; before "warmup" was, the order rotated from run to run the same in every question
        runs = f"median of {ttft['repeats']} runs" if "repeats" in ttft else "mean of 2 runs"
        order = "the order of stores and baselines rotating between each question's runs, the same for every question"
        if ttft.get("warmup"):
            runs += f" after {ttft['warmup']} untimed warm-up run"
            order = "the order of stores and baselines rotating from run to run and from question to question"
        parts.append(
            f"TTFT side by side (one process, {order}, each question's {runs}, one new token, dense backend, "
            f"first {ttft['questions']} questions, load average {ttft['load'][0]:.0f}): {medians}."
        )
    parts.append(source_line([path]))
    return "\n\n".join(parts)


def render_faithful_price(results: Path) -> str:
    """The recompute fraction swept on the ``faithful`` store (``faithful_qwen_price.json``, the
    100 held-out questions, and ``faithful_qwen_price_133q.json``, all 133): what issue 14's
    agreement target costs in TTFT."""
    paths = [results / "faithful_qwen_price.json", results / "faithful_qwen_price_133q.json"]
    hundred, pooled = (load(path)["tables"]["top3"] for path in paths)
    rows = []
    for name, r in pooled.items():
        if name == "full" or "sub_em" not in r:
            continue
        few = hundred[name]
        rows.append(
            [
                name,
                f"{few['agreement']:.2f}",
                pct(few["sub_em"], hundred["full"]["sub_em"]),
                f"{r['agreement']:.2f} {_ci(r['ci95']['agreement'])}",
                pct(r["sub_em"], pooled["full"]["sub_em"]),
                f"{r['kl']:.3f}",
                f"{r['ttft_speedup']:.1f}x",
            ]
        )
    header = [
        "setting",
        "agreement, the 100",
        "sub-EM % of full, the 100",
        "agreement, all 133 (95 % CI)",
        "sub-EM % of full, all 133",
        "KL, all 133",
        "TTFT vs full prefill, all 133",
    ]
    return table(header, rows) + "\n\n" + source_line(paths)


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


FIRST_ROUND_RECOMPUTE = ("qwen", "smollm2", "qwen_top5", "smollm2_top5", "qwen_unfused")


def render_first_round_recompute(tag: str, results: Path) -> str:
    """One of the first round's selective-recompute tables (``recompute_<tag>.json``, written by
    ``recompute_quality.py`` of that round: one top-k, every setting beside full prefill)."""
    path = results / f"recompute_{tag}.json"
    (settings,) = load(path)["tables"].values()
    full = settings["full"]["sub_em"]
    rows = [
        [
            name,
            f"{r['sub_em']:.3f}",
            pct(r["sub_em"], full),
            f"{r['f1']:.3f}",
            f"{r['agreement']:.3f}",
            f"{r['kl']:.4f}",
            f"{r['ttft_s_median']:.3f}",
            f"{r['ttft_speedup']:.2f}x",
        ]
        for name, r in settings.items()
    ]
    header = ["setting", "sub-EM", "% of full", "F1", "agreement", "KL to full", "TTFT (s)", "TTFT speed-up"]
    return table(header, rows) + "\n\n" + source_line([path])


def render_training_article_retrieval(results: Path) -> str:
    """How often held-out questions retrieve passages of an adaptor's training articles
    (``training_article_retrieval.json``, ``benchmarks/training_article_retrieval.py``)."""
    path = results / "training_article_retrieval.json"
    data = load(path)
    rows = [
        [
            "; ".join(a.replace("_", " ") for a in r["train_articles"]),
            str(len(r["adaptors"])),
            str(r["top_k"]),
            f"{r['questions_reaching_training_articles']} / {r['questions']}",
            f"{r['slots_from_training_articles']} / {r['slots']}",
        ]
        for r in data["rows"]
    ]
    header = [
        "adaptors trained on",
        "packaged adaptors",
        "top-k",
        "held-out questions retrieving a training-article passage",
        "retrieved slots from training articles",
    ]
    return table(header, rows) + "\n\n" + source_line([path])


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


def render_layer_padding(results: Path) -> str:
    """Per-layer padding against the replaced longest-layer layout (``layer_padding_*.json``,
    ``benchmarks/layer_padding.py``): rows the dense path reads and holds, and TTFT, side by side."""
    paths = files(results, "layer_padding_*.json")
    rows = []
    for path in paths:
        data = load(path)
        ttft = data["ttft_median_s"]
        rows.append(
            [
                model_name(data["meta"]["model"]),
                data["method"],
                str(data["meta"]["questions"]),
                f"{data['rows_per_layer_layout'] / 1000:.0f} k / {data['rows_longest_layer_layout'] / 1000:.0f} k",
                f"{data['rows_ratio']:.2f}x",
                f"{data['rows_kept_mean_per_head'] / 1000:.0f} k",
                f"{1000 * ttft['per_layer']:.0f} ms / {1000 * ttft['longest_layer']:.0f} ms ({data['ttft_ratio']:.2f}x)",
                f"{data['same_first_token']} / {data['meta']['questions']}",
                str(data["meta"]["threads"]),
            ]
        )
    header = [
        "model",
        "store",
        "questions",
        "passage rows read (sum over layers): per-layer / longest-layer layout",
        "ratio",
        "rows a head keeps (mean)",
        "median TTFT per-layer / longest-layer",
        "same first token",
        "threads",
    ]
    return "\n\n".join([table(header, rows), source_line(paths)])


def _split_speed(row: dict) -> str:
    """Prefill with one split per passage against the default plan's one split ("–" for decode,
    which the default plan splits already; runs before the column existed did not time it)."""
    if row["phase"] == "decode":
        return "–"
    return f"{row['fused_split-K_vs_fused']:.2f}x" if "fused_split-K_vs_fused" in row else "not timed"


def render_kernel_gpu(results: Path) -> str:
    """The fused kernel's GPU timing (``benchmarks/gpu_check.sh``'s ``kernel_bench.json``, kept in
    ``gpu_check_<gpu>.json``): ms per attention call and its speed against the two baselines."""
    paths = files(results, "gpu_check_*.json")  # raises when there is none
    rows = []
    for path in paths:
        bench = load(path)["kernel_bench"]
        for row in bench["rows"]:
            rows.append(
                [
                    bench["device"]["name"],
                    f"{row['context']} ({row['passages']} x {bench['args']['passage_len']})",
                    row["scheme"],
                    f"{row['phase']} ({row['q_len']})",
                    f"{row['fused_ms']:.3f}",
                    f"{row['deq+sdpa_ms']:.3f}",
                    f"{row['fp16 sdpa_ms']:.3f}",
                    f"{row['fused_vs_deq+sdpa']:.2f}x",
                    f"{row['fused_vs_fp16_sdpa']:.2f}x",
                    _split_speed(row),
                ]
            )
    header = [
        "GPU",
        "context tokens (passages x tokens)",
        "segments",
        "phase (query tokens)",
        "fused ms",
        "dequantize + SDPA ms",
        "fp16 SDPA ms",
        "fused speed vs dequantize + SDPA",
        "fused speed vs fp16 SDPA",
        "prefill split-K speed vs one split",
    ]
    return "\n\n".join([table(header, rows), source_line(paths)])


def render_kernel_cpu_ttft(results: Path) -> str:
    """TTFT of the packed CPU path (the kernel's PyTorch reference) against the dense path
    (``benchmarks/kernel_bench.py --ttft --json``, ``kernel_cpu_ttft_*.json``): medians per
    question over alternating repeats, then the median across questions."""
    paths = files(results, "kernel_cpu_ttft_*.json")  # raises when there is none
    rows = []
    for path in paths:
        data = load(path)
        store, load_avg = data["store"], data["load_average_1min"]
        compression = store["compression"]
        rows.append(
            [
                model_name(store["model"]),
                f"`{compression['method']}` / {compression['quant']}, {store['passages']} passages",
                str(data["top_k"]),
                f"{data['questions']} x {data['repeats']}",
                f"`{data['packed_backend']}`",
                f"{1000 * data['assembled_ttft_s']:.0f}",
                f"{1000 * data['packed_ttft_s']:.0f}",
                f"{data['ratio']:.2f}",
                f"{100 * data['same_first_token']:.0f} %",
                f"{load_avg['before']:.1f} / {load_avg['after']:.1f}",
            ]
        )
    header = [
        "model",
        "store",
        "top-k",
        "questions x repeats",
        "packed backend",
        "dense TTFT ms",
        "packed TTFT ms",
        "median ratio packed / dense",
        "same first token",
        "load average before / after",
    ]
    return "\n\n".join([table(header, rows), source_line(paths)])


TEXT_COMPRESSION = "text_compression_smollm2.json"
# the last run with llmlingua installed (this machine has it no more): its llmlingua rows are shown
# beside the current run's, in a table of their own with that run's baseline
TEXT_COMPRESSION_LLMLINGUA = "text_compression_smollm2_2026-12-04.json"


def text_compression_label(method: str) -> str:
    """The table's name for a ``benchmarks/text_compression.py`` method key (``NAME@RATE``)."""
    name, _, rate = method.partition("@")
    labels = {
        "uncompressed": "uncompressed (baseline)",
        "extractive": f"`TextCompressionPostprocessor` extractive, rate {rate}",
        "sentence-optimizer": f"core `SentenceEmbeddingOptimizer`, percentile {rate}",
        "selfinfo": f"`TextCompressionPostprocessor` selfinfo (words), rate {rate}",
        "selfinfo-token": f'`TextCompressionPostprocessor` selfinfo (tokens, `unit="token"`), rate {rate}',
        "llmlingua": f"`llmlingua.PromptCompressor` (SmolLM2 scorer), rate {rate}",
    }
    return labels.get(name, f"`{method}`")


def render_text_compression(results: Path) -> str:
    """Text compression for LLMs without a KV-cache interface (docs/llamaindex.md): every method
    of one ``benchmarks/text_compression.py --out`` run on the same questions, answered by the
    same reader with a full prefill; rows in the order the run measured them."""
    path = results / TEXT_COMPRESSION
    data = load(path)
    parts = [_text_compression_table(data, data["methods"]), _text_compression_run(data), source_line([path])]
    if data["llmlingua"] != "run" and (results / TEXT_COMPRESSION_LLMLINGUA).is_file():
        earlier_path = results / TEXT_COMPRESSION_LLMLINGUA
        earlier = load(earlier_path)
        rows = {m: item for m, item in earlier["methods"].items() if m == "uncompressed" or m.startswith("llmlingua@")}
        parts += [
            "llmlingua was not installed for that run; its rows from the last run that had it, beside that "
            "run's own baseline (the other methods' rows of that run came before fixes to them):",
            _text_compression_table(earlier, rows),
            _text_compression_run(earlier),
            source_line([earlier_path]),
        ]
    return "\n\n".join(parts)


def _text_compression_table(data: dict, methods: dict) -> str:
    """One table of ``benchmarks/text_compression.py`` rows, in the order the run measured them."""
    rows = [
        [
            text_compression_label(method),
            f"{item['sub_em']:.3f}",
            f"{item['agreement']:.3f}",
            f"{item['tokens_per_question']:.0f}",
            f"{item['token_ratio']:.3f}",
            f"{item['compress_s_median']:.2f}",
        ]
        for method, item in methods.items()
    ]
    header = [
        "method",
        "sub-EM",
        "agreement with uncompressed",
        "passage tokens / question",
        "tokens vs uncompressed",
        "compression latency, median s / question",
    ]
    return table(header, rows)


def _text_compression_run(data: dict) -> str:
    """What one ``benchmarks/text_compression.py`` run measured on, and how loaded the CPU was."""
    meta = data["meta"]
    llmlingua = "run" if data["llmlingua"] == "run" else "not installed"
    return (
        f"{data['n']} questions, top-{data['top_k']}, reader {model_name(data['reader'])}, "
        f"{meta['threads']} torch thread(s), load average {meta['load_at_start'][0]:.1f} at the start "
        f"and {meta['load_at_end'][0]:.1f} at the end, {meta['date'][:10]} (code {meta['git']}); llmlingua: {llmlingua}."
    )


KEEP_FREED_MEMORY = "keep_freed_memory_qwen.json"


def render_keep_freed_memory(results: Path) -> str:
    """``ragcompress bench`` with the command's kept freed memory turned off
    (``RAGCOMPRESS_KEEP_FREED_MEMORY=0``) and on, rounds alternating on one store: per top-k the
    mean over rounds of each path's median TTFT, of the cache work (cached - floor, median over
    questions) and of the cached path's ratio to full prefill."""
    path = results / KEEP_FREED_MEMORY
    data = load(path)
    runs = data["runs"]

    def mean(setting: str, top_k: int, value: Callable[[dict[str, Any]], float]) -> float:
        rows = [row for run in runs[setting] for row in run["rows"] if row["top_k"] == top_k]
        return sum(value(row) for row in rows) / len(rows)

    rows = []
    for top_k in sorted({row["top_k"] for run in runs["off"] for row in run["rows"]}):
        cells = [str(top_k)]
        for name in ("full", "cached", "floor"):
            off = mean("off", top_k, lambda row, name=name: row["ttft_s"][name])
            on = mean("on", top_k, lambda row, name=name: row["ttft_s"][name])
            cells.append(f"{1000 * off:.0f} / {1000 * on:.0f} ({on / off:.2f})")
        off_work = mean("off", top_k, lambda row: row["cache_work_s"])
        on_work = mean("on", top_k, lambda row: row["cache_work_s"])
        cells.append(f"{1000 * off_work:.0f} / {1000 * on_work:.0f}")
        off_ratio = mean("off", top_k, lambda row: row["speedup"]["vs_full"])
        on_ratio = mean("on", top_k, lambda row: row["speedup"]["vs_full"])
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


def render_serve_memory(results: Path) -> str:
    """``benchmarks/serve_memory.py``: per model, the service's resident memory with the allocator
    setting off and on (medians over rounds), then its server TTFT, on against off paired by
    request."""
    paths = files(results, "serve_memory_*.json")
    runs = [load(path) for path in paths]
    bands = [key for key in runs[0]["ttft_on_over_off"] if key.startswith("top")]  # e.g. top1-4, in order
    memory, latency = [], []
    for data in runs:
        off, on = data["settings"]["off"], data["settings"]["on"]
        name = model_name(data["meta"]["model"])
        memory.append(
            [name]
            + [
                f"{off[key]:.0f} / {on[key]:.0f}"
                for key in ("rss_started_mib", "rss_after_warmup_mib", "rss_end_mib", "peak_rss_mib")
            ]
            + [
                f"{off[key]:+.1f} / {on[key]:+.1f}"
                for key in ("growth_second_half_mib_per_100", "anon_growth_second_half_mib_per_100")
            ]
        )
        ratios = data["ttft_on_over_off"]
        latency.append(
            [
                name,
                f"{data['requests']} x {data['rounds']}",
                f"{1000 * off['ttft_median_s']:.0f} / {1000 * on['ttft_median_s']:.0f}",
                f"{ratios['all']:.2f}",
            ]
            + [f"{ratios[band]:.2f}" for band in bands]
        )
    memory_header = ["model", "RSS started, MiB: off / on", "after warm-up", "at the end", "peak (VmHWM)"]
    memory_header += ["growth over the second half, MiB per 100 requests", "of it anonymous (heap)"]
    latency_header = ["model", "requests x rounds", "server TTFT median, ms: off / on", "on / off, paired median"]
    latency_header += ["top-" + band[3:].replace("-", "..") for band in bands]  # top1-4 -> top-1..4
    first = runs[0]
    stores = "; ".join(
        f"{model_name(data['meta']['model'])}: `{data['store']}` ({data['store_quant']}), load average "
        + " and ".join(f"{data[key]:.1f} at the {key[8:]}" for key in ("load_at_start", "load_at_end") if key in data)
        for data in runs
    )
    note = (
        f"One request at a time, `max_tokens` 1, top-k drawn from 1 to {first['max_top_k']} (seed {first['seed']}); "
        f"the first {first['warmup']} requests are left out of the TTFT figures. Stores: {stores}."
    )
    return "\n\n".join([table(memory_header, memory), table(latency_header, latency), note, source_line(paths)])


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


def render_kvzip_cost(results: Path) -> str:
    """KVzip's scoring cost against a plain indexing forward (``kvzip_cost_*.json``)."""
    paths = files(results, "kvzip_cost_*.json")
    rows = []
    for path in paths:
        data = load(path)
        if "ratio_of_medians" not in data:
            raise ReportError(f"{path.name} holds a ratio of medians pooled over passages; run kvzip_cost.py again")
        rows.append(
            [
                model_name(data["model"]),
                str(data["passages"]),
                f"{data['mean_passage_tokens']:.0f}",
                f"{1000 * data['plain_s_median']:.0f} ms",
                f"{1000 * data['kvzip_s_median']:.0f} ms",
                f"{data['ratio']:.2f}x",
                f"{data['tokens_read_ratio']:.2f}x",
                f"{data['meta']['load'][0]:.0f}",
            ]
        )
    header = [
        "model",
        "passages",
        "tokens/passage",
        "forward",
        "forward + KVzip score",
        "ratio (median over passages and rounds, each pair timed back to back)",
        "tokens read ratio",
        "load avg",
    ]
    return "\n\n".join([table(header, rows), source_line(paths)])


def trained_for(adaptor: dict) -> str:
    """' trained for global:kvzip 0.25 int4' when the adaptor's student was compressed, else ''."""
    words = []
    if adaptor.get("method", "none") != "none":
        words += [adaptor["method"], f"{adaptor['ratio']:g}"]
    if adaptor.get("quant", "none") != "none":
        words.append(adaptor["quant"])
    return " trained for " + " ".join(words) if words else ""


def _kl_vs_baseline(row: dict[str, Any]) -> str:
    """An adaptor row's mean KL as a share of its no-adaptor baseline's (``distill_eval.baseline_of``)."""
    vs = row.get("kl_vs_baseline")
    if not vs:
        return "–"
    low, high = vs["ci95"]
    text = f"{100 * vs['ratio']:.0f} % of {vs['baseline']} [{100 * low:.0f}, {100 * high:.0f}]"
    if "median_per_question_ratio" in vs:
        text += f"; per-question median {100 * vs['median_per_question_ratio']:.0f} %"
    return text


def _wins(paired: dict[str, Any] | None) -> str:
    """'+14 / -3 (p 0.013)': questions an adaptor row gets right that its baseline misses, and back."""
    if not paired or "wins" not in paired:
        return "–"
    return f"+{paired['wins']} / -{paired['losses']} (p {paired['p_value']:.2g})"


def _distill_sample(meta: dict[str, Any]) -> str:
    """'24 questions of held-out articles A, B' or, for a run over every question of them
    (``distill_eval --held-out all``, which records training's ``validation_sample``), 'all 81 ...'."""
    every = "all " if meta.get("validation_sample") else ""
    return f"{every}{meta['questions']} questions of {meta['sample']}"


def render_distill(results: Path) -> str:
    """Learned passage caches (#15, ``distill_*.json``, ``benchmarks/distill_eval.py``): each
    setting against full prefill on held-out articles, the training summary and indexing cost."""
    paths = files(results, "distill_*.json")
    parts = []
    for path in paths:
        data = load(path)
        full = data["full_prefill"]["sub_em"]
        rows = [
            [
                name,
                f"{row['ratio']:g}",
                row["quant"],
                f"{row['kl_answer']:.4f}" + (f" {_ci(row['kl_ci95'])}" if "kl_ci95" in row else ""),
                _kl_vs_baseline(row),
                f"{row['agreement']:.2f}" + (f" {_ci(row['agreement_ci95'])}" if "agreement_ci95" in row else ""),
                f"{row['sub_em']:.2f} ({pct(row['sub_em'], full)})",
                _wins(row.get("sub_em_vs_baseline")),
            ]
            for name, row in data["rows"].items()
        ]
        rows.append(["full prefill (reference)", "1", "-", "0", "–", "1.00", f"{full:.2f} (100 %)", "–"])
        meta, metrics = data["meta"], data["adaptor"]["metrics"]
        header = [
            "setting",
            "ratio",
            "quant",
            "KL to full (answer) [95 % CI]",
            "KL vs same bytes, no adaptor [95 % CI]",
            "agreement [95 % CI]",
            "sub-EM (% of full)",
            "sub-EM right / wrong where no adaptor is not (McNemar p)",
        ]
        kinds = f"'adaptor': kind {meta.get('adaptor_kind') or 'cache'}{trained_for(data['adaptor'])}"
        compared = meta.get("compared_adaptor")
        if compared:
            steps = f"{compared['metrics']['steps']} steps"
            if compared.get("init_adaptor_hash"):  # train --init-adaptor: a continuation of another adaptor
                steps += f" continuing {compared['init_adaptor_hash'][:12]}"
            kinds += f"; 'compared adaptor': kind {compared['kind']}{trained_for(compared)} ({compared['hash'][:12]}, {steps})"
        parts.append(
            f"{model_name(meta['model'])}, {_distill_sample(meta)} "
            f"(load average {meta['load'][0]:.0f} on 2 cores; {kinds}):\n\n" + table(header, rows)
        )
        outside = {name: row["outside_validation"] for name, row in data["rows"].items() if "outside_validation" in row}
        if outside:
            n = next(iter(outside.values()))["questions"]
            sub = [
                [
                    name,
                    f"{o['kl_answer']:.4f} {_ci(o['kl_ci95'])}",
                    _kl_vs_baseline(o),
                    f"{o['agreement']:.2f}",
                    f"{o['sub_em']:.2f}",
                ]
                for name, o in outside.items()
            ]
            parts.append(
                f"The {n} of these questions outside the training run's validation sample (its stopping step was "
                "read off that sample's curve):\n\n"
                + table(
                    ["setting", "KL to full (answer) [95 % CI]", "KL vs same bytes, no adaptor", "agreement", "sub-EM"],
                    sub,
                )
            )
        train = (
            f"Training: {metrics['steps']} steps in {metrics['train_minutes']:.0f} min on "
            f"{metrics['train_examples']} questions; held-out top-k KL (answer) "
            f"{metrics['held_out_start']['kl_answer']:.4f} -> {metrics['held_out_end']['kl_answer']:.4f}, "
            f"(continuation) {metrics['held_out_start']['kl_cont']:.4f} -> {metrics['held_out_end']['kl_cont']:.4f}"
        )
        if metrics.get("scorer_r2") is not None:
            train += f"; scorer fit R^2 {metrics['scorer_r2']:.2f} (log KVzip score, training passages)"
        parts.append(train + ".")
        if data.get("index_cost"):
            cost = [
                [name, f"{1000 * c['seconds']:.0f} ms", f"{c['x_plain']:.2f}x"]
                for name, c in data["index_cost"].items()
            ]
            parts.append(table(["indexing (same passages, medians)", "time", "vs plain forward"], cost))
    return "\n\n".join(parts + [source_line(paths)])


def render_faithful(results: Path) -> str:
    """The faithful-reuse curve (``faithful_*.json``, ``benchmarks/recompute_quality.py``): per
    model and top-k, every setting against full prefill on the same retrieved passages."""
    paths = files(results, "faithful_*.json")  # raises when there is none
    parts = []
    for path in paths:
        data = load(path)
        variants = ", ".join(data.get("variants") or []) or "none"
        for key, rows in data["tables"].items():
            full = rows["full"]
            body = []
            for name, r in rows.items():
                if "sub_em" not in r:
                    body.append(
                        [
                            f"{name} (TTFT only)",
                            "",
                            "",
                            "",
                            "",
                            f"{r['ttft_s_median']:.2f}",
                            f"{r['ttft_speedup']:.2f}x",
                            "",
                            "",
                        ]
                    )
                    continue
                split = r.get("disagreements")
                shown, speed, peer = name, f"{r['ttft_speedup']:.2f}x", f"{r['ttft_speedup_vs_prefix_cached']:.2f}x"
                if r.get("fallback_rate"):  # the few that fell back to full prefill: the median hides them
                    shown = f"{name} ({100 * r['fallback_rate']:.0f} % fell back)"
                    speed = f"{r['ttft_speedup_mean']:.2f}x mean ({r['ttft_speedup']:.2f}x median)"
                    peer = f"{r['ttft_speedup_mean_vs_prefix_cached']:.2f}x mean"
                body.append(
                    [
                        shown,
                        f"{r['sub_em']:.3f}",
                        pct(r["sub_em"], full["sub_em"]),
                        f"{r['agreement']:.2f} {_ci(r['ci95']['agreement'])}",
                        f"{r['kl']:.4f}",
                        f"{r['ttft_s_median']:.2f}",
                        speed,
                        peer,
                        "–"
                        if not split
                        else f"{split['full_wrong_too']} / {split['only_full_right']} / {split['only_setting_right']} / "
                        f"{split['both_right']}",
                    ]
                )
            meta = data.get("meta", {})
            load_note = ""
            if meta.get("loadavg_start") is not None:
                load_note = f", load average {meta['loadavg_start'][0]:.0f} at start"
            caption = (
                f"**{model_name(data['model'])}, {key.replace('top', 'top-')}, {full['n']} questions"
                + (f" of {', '.join(a.replace('_', ' ') for a in data['articles'])}" if data.get("articles") else "")
                + f"** (variant stores: {variants}; torch threads {meta.get('threads') or 'not recorded'}{load_note}"
                + (
                    f"; weights in {data['dtype']}, full prefill too"
                    if data.get("dtype", "float32") != "float32"
                    else ""
                )
                + ")"
            )
            for name, a in (data.get("adaptors") or {}).items():
                caption += (
                    f"\n\n`{name}` store: passages encoded through the KV-Distill adaptor `{a['hash'][:16]}` "
                    f"(ratio {a['ratio']}, {'unquantized' if a['quant'] == 'none' else a['quant']}, "
                    f"{a['steps']} steps, trained on {', '.join(t.replace('_', ' ') for t in a['train_articles'])} "
                    "only: none of these questions' articles)."
                )
            header = [
                "setting",
                "sub-EM",
                "% of full",
                "agreement (95 % CI)",
                "KL to full",
                "TTFT (s)",
                "vs full",
                "vs prefix-cached",
                "disagreeing: full wrong too / only full right / only it right / both right",
            ]
            paired = [
                f"`{pair.split(' ', 1)[1]}`: agreement {p['agreement']['mean_difference']:+.2f} "
                f"{_ci(p['agreement']['ci95'])} ({p['agreement']['wins']} won, {p['agreement']['losses']} lost, "
                f"p = {p['agreement']['p_value']:.2g}), sub-EM {p['sub_em']['mean_difference']:+.3f} "
                f"(p = {p['sub_em']['p_value']:.2g}), KL {p['kl_mean_difference']:+.4f}"
                for pair, p in (data.get("paired") or {}).items()
                if pair.startswith(key + " ") and " vs " in pair and ":" in pair.split(" vs ")[0]
            ]
            note = ("\n\nPaired by question: " + "; ".join(paired) + ".") if paired else ""
            same = [
                f"`{name.split(' ', 1)[1]}` {r['agreement']:.2f} {_ci(r['ci95'])}"
                for name, r in (data.get("reference_full") or {}).items()
                if name.startswith(key + " ")
            ]
            if same:
                reference = next(iter(data["reference_full"].values()))
                note += (
                    f"\n\nSame answer as float32 full prefill (`{reference['reference'].split(' ')[0]}`, the same "
                    f"{reference['n']} questions and passages): " + "; ".join(same) + "."
                )
            parts.append(caption + "\n\n" + table(header, body) + note)
    return "\n\n".join(parts + [source_line(paths)])


# The measurement behind each preset of ``ragcompress/presets.py`` (whose ``evidence`` names the same
# files): (preset, results file, row, row it is compared with). Rows are addressed in each file's own
# shape: ``core_*``: "QUANT/top-K"; ``distill_*`` and ``lowrank_*``: the row's name; ``faithful_*``:
# "TABLE/SETTING"; None: compared with full prefill only (the row's own columns).
# tests/test_presets.py checks this covers every preset.
PRESET_MEASUREMENTS: tuple[tuple[str, str, str, str | None], ...] = (
    ("fast", "core272_qwen.json", "int8/top-3", None),
    ("fast", "core272_smollm2.json", "int8/top-3", None),
    (
        "small",
        "distill_qwen2.5-coder-0.5b-kvzip-0.25-int4-81q.json",
        "adaptor + global:kvzip 0.25 int4",
        "global:kvzip 0.25 int4",
    ),
    (
        "small",
        "distill_smollm2-135m-kvzip-0.25-int4-81q.json",
        "adaptor + global:kvzip 0.25 int4",
        "global:kvzip 0.25 int4",
    ),
    ("smallest", "lowrank_qwen.json", "global:kvzip@0.21/int4v2/r32k+adaptor", "none@1/fp16/-"),
    ("smallest", "confirm_smallest_qwen_33q.json", "global:kvzip@0.21/int4v2/r32k+adaptor", "none@1/fp16/-"),
    ("smallest", "lowrank_smollm2.json", "global:kvzip@0.21/int4v2/r32k+adaptor", "none@1/fp16/-"),
    # the two Qwen runs above again, with the quantizer of 2026-12-04 (``remeasure_*``)
    ("smallest", "remeasure_smallest_qwen_100q.json", "global:kvzip@0.21/int4v2/r32k+adaptor", "none@1/fp16/-"),
    ("smallest", "remeasure_smallest_qwen_33q.json", "global:kvzip@0.21/int4v2/r32k+adaptor", "none@1/fp16/-"),
    # ``faithful`` and ``distilled`` with the base copy (``--base-copy``), against the same adapted
    # store without it in the same run (``ad:``): the 100 questions that decided it, the other 33, all 133
    ("faithful", "faithful_qwen_base_copy.json", "top3/r0.05+mixed", "top3/ad:r0.05+mixed"),
    ("faithful", "faithful_qwen_base_copy_33q.json", "top3/r0.05+mixed", "top3/ad:r0.05+mixed"),
    ("faithful", "faithful_qwen_base_copy_133q.json", "top3/r0.05+mixed", "top3/ad:r0.05+mixed"),
    ("faithful", "faithful_smollm2_base_copy.json", "top3/r0.05+mixed", "top3/ad:r0.05+mixed"),
    # ``faithful`` as the library runs it since the first passage read from its base copy is not
    # checked (``skip:``, a patch of the code before that change) against that code, in one run
    ("faithful", "first_passage_skip_qwen.json", "top3/skip:r0.05+mixed", "top3/r0.05+mixed"),
    ("faithful", "first_passage_skip_qwen_33q.json", "top3/skip:r0.05+mixed", "top3/r0.05+mixed"),
    ("faithful", "first_passage_skip_qwen_133q.json", "top3/skip:r0.05+mixed", "top3/r0.05+mixed"),
    # ``faithful`` at top-5: 10 % recompute (``ratio_by_passages``) against the 5 % it had there; the 33
    # questions decided it, then the 100 and all 133 (the same run)
    ("faithful", "faithful_qwen_top5_fraction_33q.json", "top5/r0.1+mixed", "top5/r0.05+mixed"),
    ("faithful", "faithful_qwen_top5_fraction.json", "top5/r0.1+mixed", "top5/r0.05+mixed"),
    ("faithful", "faithful_qwen_top5_fraction_133q.json", "top5/r0.1+mixed", "top5/r0.05+mixed"),
    ("faithful", "faithful_smollm2_top5_fraction.json", "top5/r0.1+mixed", "top5/r0.05+mixed"),
    # ``faithful`` at top-4, where its schedule gives 7.5 % (between its points), against 5 %: measured
    # after it was set (nothing was chosen by it): the 100, the other 33, all 133 (one run)
    ("faithful", "faithful_qwen_top4.json", "top4/r0.075+mixed", "top4/r0.05+mixed"),
    ("faithful", "faithful_qwen_top4_33q.json", "top4/r0.075+mixed", "top4/r0.05+mixed"),
    ("faithful", "faithful_qwen_top4_133q.json", "top4/r0.075+mixed", "top4/r0.05+mixed"),
    ("distilled", "faithful_qwen_base_copy.json", "top3/reuse", "top3/ad:reuse"),
    ("distilled", "faithful_qwen_base_copy_33q.json", "top3/reuse", "top3/ad:reuse"),
    ("distilled", "faithful_qwen_base_copy_133q.json", "top3/reuse", "top3/ad:reuse"),
    ("distilled", "faithful_smollm2_base_copy.json", "top3/reuse", "top3/ad:reuse"),
)


# Results files in the frontier's shape: ``lowrank_*`` (its grids), ``confirm_*`` (a preset's row on
# other questions), ``remeasure_*`` (a preset's rows re-run by later code on the same questions).
FRONTIER_FILES = ("lowrank", "confirm", "remeasure")
# Results files of ``recompute_quality.py`` (``tables`` by top-k and setting).
RECOMPUTE_QUALITY_FILES = ("faithful", "first_passage")


def preset_row(data: Any, name: str, row: str) -> dict[str, Any]:
    """One row of a results file as the preset table shows it: questions, sub-EM, full prefill's
    sub-EM on the same questions, agreement and KL with full prefill, TTFT and bytes against full
    prefill and fp16 (None where the file does not measure it)."""
    try:
        if name.startswith("core"):
            quant, top_k = row.split("/top-")
            (r,) = [r for r in data if r["quant"] == quant and r["top_k"] == int(top_k)]
            return {
                "n": r["n"], "sub_em": r["compressed"]["sub_em"], "full": r["full"]["sub_em"],
                "agreement": r["agreement"], "kl": None, "ttft": r["ttft_speedup"], "bytes": r["compression"],
            }  # fmt: skip
        if name.startswith("distill"):
            r = data["rows"][row]
            return {
                "n": data["meta"]["questions"], "sub_em": r["sub_em"], "full": data["full_prefill"]["sub_em"],
                "agreement": r["agreement"], "kl": r["kl_answer"], "ttft": None, "bytes": None,
            }  # fmt: skip
        if name.startswith(FRONTIER_FILES):  # ``confirm_*``: a frontier run on other questions
            r = data["rows"][row]
            return {
                "n": data["n"], "sub_em": r["sub_em"], "full": data["full"]["sub_em"], "agreement": r["agreement"],
                "kl": r["kl_full_answer"], "ttft": frontier_ttft_speedup(data, row), "bytes": r["compression"],
            }  # fmt: skip
        if name.startswith(RECOMPUTE_QUALITY_FILES):
            key, setting = row.split("/", 1)
            r, full = data["tables"][key][setting], data["tables"][key]["full"]
            return {
                "n": r["n"], "sub_em": r["sub_em"], "full": full["sub_em"], "agreement": r["agreement"],
                "kl": r["kl"], "ttft": r["ttft_speedup"], "bytes": None,
            }  # fmt: skip
    except (KeyError, ValueError) as exc:
        raise ReportError(f"{name} has no row {row!r} ({exc!r})") from None
    raise ReportError(f"no reader for the preset evidence file {name}")


def _model_of(data: Any) -> str:
    if isinstance(data, list):
        return data[0]["model"]
    return data.get("model") or data["meta"]["model"]


def compared_with(data: Any, name: str, baseline: str | None) -> str:
    """The preset table's last cell: the row a preset is compared with in the same file."""
    if baseline is None:
        return "–"
    b = preset_row(data, name, baseline)
    return (
        f"`{baseline}`: sub-EM {b['sub_em']:.2f}, agreement {b['agreement']:.2f}"
        + (f", KL {b['kl']:.3f}" if b["kl"] is not None else "")
        + (f", TTFT {b['ttft']:.1f}x" if b["ttft"] is not None else "")
    )


# Ablations of a preset measured on the same disjoint question files as the preset's own rows:
# (preset, what was changed, files, row, baseline). Their pooled sub-EM is printed under the
# preset's, so the README's prose cites no hand-typed count.
POOLED_ABLATIONS: tuple[tuple[str, str, tuple[str, ...], str, str], ...] = (
    (
        "smallest",
        "its adaptor continued on essay examples",
        ("ablation_lowrank_qwen_smallest_essays.json", "ablation_lowrank_qwen_smallest_essays_33q.json"),
        "global:kvzip@0.21/int4v2/r32k+adaptor-essays",
        "none@1/fp16/-",
    ),
    (
        "smallest",
        "evicted rows' values merged into kept ones",
        ("ablation_lowrank_qwen_merge.json", "ablation_lowrank_qwen_merge_33q.json"),
        "global:kvzip@0.21/int4v2/r32k+adaptor~merge",
        "none@1/fp16/-",
    ),
    (
        "smallest",
        "its rows evicted by the base model's KVzip scores, as its adaptor's training chose them",
        ("ablation_lowrank_qwen_basescore.json", "ablation_lowrank_qwen_basescore_33q.json"),
        "global:kvzip@0.21/int4v2/r32k+adaptor~basescore",
        "none@1/fp16/-",
    ),
    (
        "smallest",
        "KVzip scores weighted by each value's norm relative to its head",
        ("ablation_lowrank_qwen_vnorm.json", "ablation_lowrank_qwen_vnorm_33q.json"),
        "global:kvzip@0.21/int4v2/r32k+adaptor~vnorm",
        "none@1/fp16/-",
    ),
)


def pooled_sub_em(files: list[tuple[str, Any]], row: str, baseline: str) -> str:
    """``row``'s and ``baseline``'s sub-EM summed over files of disjoint questions (each file
    carries both rows' per-question outcomes): "over the N questions of ...: sub-EM a/N against b/N"."""
    seen: set[str] = set()
    right = reference = 0.0
    for name, data in files:
        questions = set(data["key"]["questions"])
        if questions & seen:
            raise ReportError(f"{name} shares questions with another file of its pool: they cannot be pooled")
        seen |= questions
        try:
            right += sum(data["rows"][row]["per_question_sub_em"])
            reference += sum(data["rows"][baseline]["per_question_sub_em"])
        except KeyError as exc:
            raise ReportError(f"{name} has no per-question outcomes for {exc}") from None
    n = len(seen)
    return (
        f"pooled over the {n} questions of "
        + " and ".join(f"`{name}`" for name, _ in files)
        + f": sub-EM {right:.0f}/{n} ({right / n:.2f}) against {reference:.0f}/{n} ({reference / n:.2f}) "
        f"for `{baseline}`, {pct(right, reference)} of it."
    )


def pooled_presets(results: Path) -> list[str]:
    """One sentence per preset and model measured in more than one frontier file (``lowrank_*``,
    ``confirm_*``: disjoint questions, each with per-question outcomes for the row and the row it
    is compared with): both rows' sub-EM pooled over all those questions; then one per ablation of
    :data:`POOLED_ABLATIONS`. ``smallest`` is chosen on one file and confirmed on another, and
    issue 16 reads the pooled figure."""
    groups: dict[tuple[str, str, str, str | None, bool], list[tuple[str, Any]]] = {}
    for preset, name, row, baseline in PRESET_MEASUREMENTS:
        if name.startswith(FRONTIER_FILES):
            data = load(results / name)
            again = name.startswith("remeasure")
            groups.setdefault((preset, _model_of(data), row, baseline, again), []).append((name, data))
    lines = [
        f"`{preset}` on {model_name(model)}{' re-measured' if again else ''}, " + pooled_sub_em(files, row, baseline)
        for (preset, model, row, baseline, again), files in groups.items()
        if len(files) >= 2 and baseline is not None
    ]
    for preset, change, names, row, baseline in POOLED_ABLATIONS:
        files = [(name, load(results / name)) for name in names]
        model = model_name(_model_of(files[0][1]))
        lines.append(
            f"`{preset}` on {model} with {change} (`{row}`, not adopted), " + pooled_sub_em(files, row, baseline)
        )
    return lines


def render_presets(results: Path) -> str:
    """The measurement behind each preset (:data:`PRESET_MEASUREMENTS`), read from its results file."""

    def opt(value: float | None, fmt: str, unit: str = "") -> str:
        return "–" if value is None else format(value, fmt) + unit

    rows = []
    for preset, name, row, baseline in PRESET_MEASUREMENTS:
        data = load(results / name)
        r = preset_row(data, name, row)
        rows.append(
            [
                f"`{preset}`",
                model_name(_model_of(data)),
                f"`{name}`: `{row}`",
                str(r["n"]),
                f"{r['sub_em']:.2f} ({pct(r['sub_em'], r['full'])})",
                f"{r['agreement']:.2f}",
                opt(r["kl"], ".3f"),
                opt(r["ttft"], ".1f", "x"),
                opt(r["bytes"], ".1f", "x"),
                compared_with(data, name, baseline),
            ]
        )
    header = [
        "preset",
        "model",
        "measured row (`docs/results/`)",
        "questions",
        "sub-EM (% of full prefill)",
        "agreement with full prefill",
        "KL to full",
        "TTFT vs full prefill",
        "bytes vs fp16",
        "compared with (same file)",
    ]
    return (
        table(header, rows)
        + '\n\nFull prefill is rerun on the same questions and retrieved passages in each file. "–": not '
        "measured in that file (the `distill` runs time no full prefill, the frontier only in its TTFT "
        "side-by-side run; bytes are measured by `core_eval.py` and the frontier). TTFT ratios depend on "
        "threads and load (docs/recompute.md): the `faithful_*_base_copy*.json` rows were timed by two "
        "one-thread processes (the Qwen run beside the SmolLM2 one for part of it), and one process with two "
        f"threads measures `faithful` (before its base copy: the same work but for reading the larger blobs) "
        f"at {two_thread_faithful_ttft(results)} (`{TWO_THREAD_TTFT}`). {pooled_ttft_note(results)}"
        + "".join("\n\n" + line for line in pooled_presets(results))
    )


TWO_THREAD_TTFT = "ttft_threads_faithful_qwen.json"
POOLED_TTFT_EXAMPLE = (
    "faithful_qwen_base_copy.json",
    "faithful_qwen_base_copy_33q.json",
    "faithful_qwen_base_copy_133q.json",
)


def pooled_ttft_note(results: Path) -> str:
    """Why a ``_133q`` row's TTFT ratio can sit below both of its halves', with the example's
    figures read from its files."""
    hundred, thirty_three, pooled = (load(results / name)["tables"]["top3"] for name in POOLED_TTFT_EXAMPLE)
    ratios = ", ".join(
        f"`{setting}` {pooled[setting]['ttft_speedup']:.1f}x from {hundred[setting]['ttft_speedup']:.1f}x and "
        f"{thirty_three[setting]['ttft_speedup']:.1f}x"
        for setting in ("r0.05+mixed", "reuse")
    )
    return (
        "A `_133q` file pools the run over the 100 questions and the run over the other 33, and its TTFT "
        "is the ratio of the pooled medians; the two runs went at different speeds (full prefill's median "
        f"{hundred['full']['ttft_s_median']:.1f} s and {thirty_three['full']['ttft_s_median']:.1f} s in "
        f"`{POOLED_TTFT_EXAMPLE[0]}` and its `_33q`), so that ratio can fall below both runs' own ({ratios}): "
        "each run's row is the side-by-side measurement. Reports written since 2026-12-06 also record the "
        "median of the per-question ratios (`ttft_speedup_paired`), which pooling leaves paired."
    )


def two_thread_faithful_ttft(results: Path) -> str:
    """The range of the ``faithful`` setting's TTFT ratio over the runs of :data:`TWO_THREAD_TTFT`
    (one process, two threads, each code version and round)."""
    runs = load(results / TWO_THREAD_TTFT)["runs"]
    ratios = [run["r0.05+mixed"]["ttft_speedup"] for run in runs.values()]
    return f"{min(ratios):.1f}–{max(ratios):.1f}x"


BLOCKS: dict[str, Callable[[Path], str]] = {
    "presets": render_presets,
    "faithful": render_faithful,
    "lowrank-frontier": render_lowrank_frontier,
    "compression-methods-100": lambda results: render_compression_methods("qwen", results),
    "compression-methods-100-smollm2": lambda results: render_compression_methods("smollm2", results),
    "protection-global": render_protection,
    "kvzip-cost": render_kvzip_cost,
    "text-compression": render_text_compression,
    "keep-freed-memory": render_keep_freed_memory,
    "kill-landings": render_kill_landings,
    "serve-memory": render_serve_memory,
    "kernel-gpu": render_kernel_gpu,
    "kernel-cpu-ttft": render_kernel_cpu_ttft,
    "layer-padding": render_layer_padding,
    "dtype-ttft": render_dtype_ttft,
    "training-article-retrieval": render_training_article_retrieval,
    "faithful-price": render_faithful_price,
    "core-all": render_core_all,
    "core": render_core,
    "ttft": render_ttft,
    "ttft-curve": render_ttft_curve,
    "indexing-curve": render_indexing_curve,
    "packed": render_packed,
    "packed-curve": render_packed_curve,
    "compression": render_compression,
    "store-scale": render_store_scale,
    "scale-estimate": render_scale_estimate,
    "serve-load": render_serve_load,
    "distill": render_distill,
    **{name: (lambda results, name=name: render_sweep(name, results)) for name in SWEEP_TABLES},
    **{
        f"recompute-first-round:{tag}": (lambda results, tag=tag: render_first_round_recompute(tag, results))
        for tag in FIRST_ROUND_RECOMPUTE
    },
    "index-memory": render_index_memory,
    "needle:qwen": lambda results: render_needle("needle_qwen.json", results),
    "needle:smollm2": lambda results: render_needle("needle_smollm2_1x128.json", results),
}


# -- README -------------------------------------------------------------------------------------


def render_block(name: str, results: Path = RESULTS) -> str:
    if name not in BLOCKS:
        raise ReportError(f"README block report:{name} has no renderer (known: {', '.join(BLOCKS)})")
    return BLOCKS[name](results)


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


if __name__ == "__main__":
    sys.exit(main())
