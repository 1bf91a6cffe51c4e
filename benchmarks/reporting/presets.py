"""README's ``presets`` block: the measurement behind each preset of ``ragcompress/presets.py``
(:data:`PRESET_MEASUREMENTS`), read from results files of four shapes (core, distill, frontier,
recompute), and the pooled figures of a preset measured on disjoint question files."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .frontier import frontier_ttft_speedup
from .shared import ReportError, load, model_name, pct, table

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
