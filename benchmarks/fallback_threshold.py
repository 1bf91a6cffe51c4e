"""What a fallback margin would cost and buy, read from a ``recompute_quality.py`` checkpoint.

``AnswerOptions.fallback_margin`` answers a question by prefix-cached full prefill when its first
token from the stored caches leads the runner-up by less than the margin. The checkpoint records,
per question, each setting's first-token ``margin``, its agreement with full prefill and the TTFTs
of full prefill, prefix-cached prefill and the setting, so every margin on a grid can be priced
without running anything: a question below the margin agrees (it is answered by full prefill) and
costs the setting's TTFT plus the prefix-cached one. The mean ratio (mean full TTFT over mean
path TTFT) is the one to read: the medians hide the few questions that fall back.

    .venv/bin/python benchmarks/fallback_threshold.py docs/results/faithful_qwen_fallback_dev.jsonl reuse

This is how the margin 0.025 of docs/recompute.md ("Falling back on near ties") was chosen on the
dev articles: the largest on the grid whose mean ratio stays at 6x.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path


def price(records: list[dict], setting: str, margin: float) -> dict[str, float]:
    """Fallback share, agreement and TTFT ratios (mean and median) of ``setting`` with ``margin``."""
    falls = [r[setting]["margin"] < margin for r in records]
    ttft = [r[setting]["ttft"] + (r["prefix_cached_ttft"] if f else 0.0) for r, f in zip(records, falls, strict=True)]
    full = [r["full"]["ttft"] for r in records]
    return {
        "margin": margin,
        "fallback": statistics.fmean(falls),
        "agreement": statistics.fmean(1.0 if f else r[setting]["agree"] for r, f in zip(records, falls, strict=True)),
        "ttft_speedup_mean": statistics.fmean(full) / statistics.fmean(ttft),
        "ttft_speedup_median": statistics.median(full) / statistics.median(ttft),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("setting", help="a setting the checkpoint holds, e.g. reuse")
    parser.add_argument("--step", type=float, default=0.005)
    parser.add_argument("--points", type=int, default=11)
    args = parser.parse_args()
    records = [json.loads(line) for line in args.checkpoint.read_text().splitlines() if line.strip()]
    print(f"{len(records)} questions, setting {args.setting}")
    print("| margin | falls back | agreement | TTFT vs full (mean) | (median) |\n|---|---|---|---|---|")
    for i in range(args.points):
        row = price(records, args.setting, round(i * args.step, 6))
        print(
            f"| < {row['margin']:.3f} | {100 * row['fallback']:.1f} % | {row['agreement']:.3f} | "
            f"{row['ttft_speedup_mean']:.2f}x | {row['ttft_speedup_median']:.2f}x |"
        )


if __name__ == "__main__":
    main()
