"""docs/compression.md's blocks of the compression methods' first round and of their costs:
``compression`` (the headline settings on Qwen), the ``sweep:*`` tables (every method x ratio x
quant of ``benchmarks/compression_quality.py``, with ``benchmarks/kl_fidelity.py``'s KL), the
``needle:*`` runs, ``kvzip-cost`` (KVzip's scoring against a plain forward) and ``layer-padding``
(the dense path's per-layer padding against the layout it replaced)."""

from __future__ import annotations

import json
from pathlib import Path

from .shared import ReportError, files, load, model_name, pct, source_line, table

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
