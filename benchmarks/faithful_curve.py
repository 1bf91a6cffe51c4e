"""The faithful-reuse curve as a plot (issue 14): every setting of every
``docs/results/faithful_*.json`` (``benchmarks/recompute_quality.py``), agreement with full prefill
and sub-EM (% of full prefill's) against TTFT speed-up over full prefill, both measured in the
same run on the same retrieved passages. The generated table beside it in docs/recompute.md is
``benchmarks/report.py``'s ``report:faithful`` block over the same files.

    python benchmarks/faithful_curve.py            # writes docs/img/faithful-curve.png

Speed-ups are each run's own (its host load is in the table's caption), so compare points within
one series; the dashed lines are issue 14's target (agreement 0.80, 97 % of full, 5x).
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent.parent / "docs" / "results"
TARGET_AGREEMENT, TARGET_SUB_EM_PCT, TARGET_SPEEDUP = 0.80, 97.0, 5.0
# SmolLM2-135M's full prefill answers SQuAD poorly (sub-EM 0.07-0.15), so a percentage of it is
# noise (docs/recompute.md); its agreement still carries the signal and stays in the left panel.
MIN_FULL_SUB_EM = 0.2
MARKERS = {"ad": "s", "n2": "^"}  # variant store of a setting ("ad:reuse"): adaptor, neighbour-conditioned
SHORT_MODEL = {"qwen2.5-coder-0.5b": "Qwen2.5-0.5B", "smollm2-135m": "SmolLM2-135M"}


@dataclass(frozen=True)
class Point:
    setting: str
    speedup: float  # TTFT of full prefill / TTFT of the setting, medians of one run
    agreement: float
    agreement_ci: tuple[float, float]
    sub_em_pct: float | None  # None where full prefill's sub-EM is 0


@dataclass(frozen=True)
class Series:
    label: str
    model: str
    full_sub_em: float
    points: list[Point]


def curve(data: dict[str, Any], source: str) -> list[Series]:
    """One series per top-k table of a recompute_quality result: its settings other than full
    prefill (the common reference at 1x, agreement 1) and the TTFT-only prefix-cached row."""
    out = []
    for key, rows in data["tables"].items():
        full_em = rows["full"]["sub_em"]
        points = [
            Point(
                name,
                r["ttft_speedup"],
                r["agreement"],
                tuple(r["ci95"]["agreement"]),
                100 * r["sub_em"] / full_em if full_em else None,
            )
            for name, r in rows.items()
            if name != "full" and "sub_em" in r
        ]
        sample = f"{rows['full']['n']} q" + (f", {len(data['articles'])} articles" if data.get("articles") else "")
        model = SHORT_MODEL.get(data["model"], data["model"])
        out.append(Series(f"{key.replace('top', 'top-')}, {sample} ({source})", model, full_em, points))
    return out


def plot(series: list[Series], path: Path) -> None:
    """One agreement panel per model (95 % intervals) and one sub-EM panel (% of full prefill's),
    x = TTFT speed-up (log); one colour per series within a model, one marker per store variant,
    each point named by its setting."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(s.model for s in series))
    fig, axes = plt.subplots(1, len(models) + 1, figsize=(6.5 * (len(models) + 1), 5.6))
    agree_axes, em_ax = dict(zip(models, axes[:-1], strict=True)), axes[-1]
    for s in series:
        agree_ax = agree_axes[s.model]
        colour = f"C{[t for t in series if t.model == s.model].index(s)}"  # a model's series are C0, C1, ...
        for p in s.points:
            style = dict(color=colour, marker=MARKERS.get(p.setting.split(":")[0], "o"), linestyle="none")
            agree_ax.errorbar(
                p.speedup, p.agreement, capsize=2, linewidth=0.8,
                yerr=[[p.agreement - p.agreement_ci[0]], [p.agreement_ci[1] - p.agreement]], **style,
            )  # fmt: skip
            agree_ax.annotate(
                p.setting, (p.speedup, p.agreement), fontsize=6, xytext=(3, 3), textcoords="offset points"
            )
            if p.sub_em_pct is not None and s.full_sub_em >= MIN_FULL_SUB_EM:
                em_ax.plot(p.speedup, p.sub_em_pct, **style)
                em_ax.annotate(
                    p.setting, (p.speedup, p.sub_em_pct), fontsize=6, xytext=(3, 3), textcoords="offset points"
                )
        agree_ax.plot([], [], color=colour, marker="o", linestyle="none", label=s.label)
    panels = [
        (ax, TARGET_AGREEMENT, f"{model}: agreement with full prefill's answer") for model, ax in agree_axes.items()
    ]
    panels.append((em_ax, TARGET_SUB_EM_PCT, f"sub-EM, % of full prefill's (runs where full's >= {MIN_FULL_SUB_EM})"))
    for ax, target, label in panels:
        ax.axhline(target, color="grey", linestyle="--", linewidth=1)
        ax.axvline(TARGET_SPEEDUP, color="grey", linestyle="--", linewidth=1)
        ax.set_xscale("log")
        ax.set_xlabel("TTFT speed-up over full prefill (medians, same run)")
        ax.set_title(label, fontsize=9)
    for ax in agree_axes.values():
        ax.set_ylim(0, 1.02)
        ax.legend(fontsize=6, loc="lower left", title="o plain store, s adaptor, ^ neighbour-encoded", title_fontsize=6)
    fig.suptitle(
        "Faithful reuse: stored-cache answers against full prefill (dashed: issue 14's target, up and right of both; "
        "bars: 95 % intervals)",
        fontsize=10,
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--out", type=Path, default=RESULTS.parent / "img" / "faithful-curve.png")
    args = parser.parse_args(argv)
    paths = sorted(args.results.glob("faithful_*.json"))
    if not paths:
        parser.error(f"no faithful_*.json in {args.results} (run benchmarks/recompute_quality.py first)")
    series = [s for path in paths for s in curve(json.loads(path.read_text()), path.stem.removeprefix("faithful_"))]
    plot(series, args.out)
    print(f"{args.out}: {len(series)} series, {sum(len(s.points) for s in series)} points")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
