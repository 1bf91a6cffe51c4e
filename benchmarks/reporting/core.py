"""README's ``core`` and ``core-all`` blocks: cached answering against full prefill on SQuAD-dev
(``benchmarks/core_eval.py``: ``core_*.json``, and ``core272_*.json`` over all dev questions)."""

from __future__ import annotations

from pathlib import Path

from .shared import ci95, files, load, model_name, pct, source_line, table


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
                f"{full:.3f} {ci95(ci['full_sub_em'])}",
                f"{cached:.3f} {ci95(ci['compressed_sub_em'])}",
                pct(cached, full),
                f"{paired['mean_difference']:+.3f} {ci95(paired['ci95'])}",
                f"{paired['wins']} / {paired['losses']}",
                f"{paired['p_value']:.3g}",
                f"{r['agreement']:.3f} {ci95(ci['agreement'])}",
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
