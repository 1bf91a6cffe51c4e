"""docs/recompute.md's blocks of ``benchmarks/recompute_quality.py``: ``faithful`` (the
faithful-reuse curve, ``faithful_*.json``), ``faithful-price`` (the recompute fraction swept) and
the first round's ``recompute-first-round:*`` tables (``recompute_<tag>.json``)."""

from __future__ import annotations

from pathlib import Path

from .shared import ci95, files, load, model_name, pct, source_line, table


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
                f"{r['agreement']:.2f} {ci95(r['ci95']['agreement'])}",
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
                        f"{r['agreement']:.2f} {ci95(r['ci95']['agreement'])}",
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
                f"{ci95(p['agreement']['ci95'])} ({p['agreement']['wins']} won, {p['agreement']['losses']} lost, "
                f"p = {p['agreement']['p_value']:.2g}), sub-EM {p['sub_em']['mean_difference']:+.3f} "
                f"(p = {p['sub_em']['p_value']:.2g}), KL {p['kl_mean_difference']:+.4f}"
                for pair, p in (data.get("paired") or {}).items()
                if pair.startswith(key + " ") and " vs " in pair and ":" in pair.split(" vs ")[0]
            ]
            note = ("\n\nPaired by question: " + "; ".join(paired) + ".") if paired else ""
            same = [
                f"`{name.split(' ', 1)[1]}` {r['agreement']:.2f} {ci95(r['ci95'])}"
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
