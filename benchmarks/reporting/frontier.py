"""docs/compression.md's blocks of ``benchmarks/lowrank_frontier.py``'s published files:
``lowrank-frontier`` (eviction x rank x bits), ``compression-methods-100*`` (every eviction
method on the frontier's held-out questions) and ``protection-global`` (the protected tokens of
``global:kvzip`` stores); also :func:`frontier_ttft_speedup`, which the preset table reads."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ragcompress.stats import mcnemar_exact

from .shared import ReportError, files, load, model_name, pct, source_line, table
from frontier_rows import protection


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
        protected = _protections(name, rows)
        header = ["kept", "protected first / last", "KL(full ‖ row)", "sub-EM", "agreement", "vs 4/4: won / lost (p)"]
        lines = []
        for row_name, row in sorted(rows.items(), key=lambda item: (-item[1]["ratio"], -sum(protected[item[0]]))):
            base = next((r for n, r in rows.items() if r["ratio"] == row["ratio"] and protected[n] == (4, 4)), None)
            paired = "–"
            if base is not None and base is not row:
                won = sum(a > b for a, b in zip(row["per_question_sub_em"], base["per_question_sub_em"], strict=True))
                lost = sum(a < b for a, b in zip(row["per_question_sub_em"], base["per_question_sub_em"], strict=True))
                paired = f"{won} / {lost} ({mcnemar_exact(won, lost):.2g})"
            first, last = protected[row_name]
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


def _protections(name: str, rows: dict[str, Any]) -> dict[str, tuple[int, int]]:
    """Each row's protected tokens first and last, read by the grammar the frontier wrote the
    names with (``frontier_rows``): a name it cannot have written fails the file ``name``."""
    try:
        return {row_name: protection(row_name) for row_name in rows}
    except ValueError as exc:
        raise ReportError(f"{name}: {exc}") from None


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
