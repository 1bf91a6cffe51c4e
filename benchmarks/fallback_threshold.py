"""What a fallback margin would cost and buy, read from a ``recompute_quality.py`` checkpoint.

``AnswerOptions.fallback_margin`` answers a question by prefix-cached full prefill when its first
token from the stored caches leads the runner-up by less than the margin. The checkpoint records,
per question, each setting's first-token ``margin``, its agreement with full prefill and the TTFTs
of full prefill, prefix-cached prefill and the setting, so every margin on a grid can be priced
without running anything: a question below the margin agrees (it is answered by full prefill) and
costs the setting's TTFT plus the prefix-cached one. The mean ratio (mean full TTFT over mean
path TTFT) is the one to read: the medians hide the few questions that fall back.

    .venv/bin/python benchmarks/fallback_threshold.py docs/results/faithful_qwen_fallback_dev.jsonl reuse

``--measured reuse+f0.999`` prices the fallback as it runs rather than as a prefix-cached
prefill that always agrees: a setting whose margin no first token reaches falls back on every
question, so its records hold each question's cost and answer by the fallback (which reuses the
first passage where the store's passages are exact: ``runtime.prepare.fallback_prefill``).

This is how the margin 0.025 of docs/recompute.md ("Falling back on near ties") was chosen on the
dev articles: the largest on the grid whose mean ratio stays at 6x.

``--tokens K`` prices a check that looks further: the smallest margin over the first ``K`` tokens
of the path's own answer (decoded from the caches before anything is emitted, ``--decode-step``
seconds each), read from the per-position ``margins`` and ``greedy`` tokens a checkpoint records
along full prefill's answer. Where the path's answer leaves full prefill's, the margin of that
position is its own and the later ones are not known, so the minimum stops there (the real check
would fall back at least as often on those questions, which disagree anyway).
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

from recompute_quality import checkpointed, one_run


def smallest_margin(record: dict, setting: str, tokens: int) -> float:
    """The smallest margin over the first ``tokens`` positions of ``setting``'s own answer, up to
    and including the position where it leaves full prefill's."""
    if tokens == 1:
        return record[setting]["margin"]
    reference, greedy = record["full"]["tokens"], record[setting]["greedy"]
    leaves = next((i for i, token in enumerate(reference) if greedy[i] != token), len(reference))
    return min(record[setting]["margins"][: min(tokens, leaves + 1)])


def price(
    records: list[dict],
    setting: str,
    margin: float,
    tokens: int = 1,
    decode_step_s: float = 0.0,
    measured: str | None = None,
) -> dict[str, float]:
    """Fallback share, agreement and TTFT ratios (mean and median) of ``setting`` with ``margin``
    checked over ``tokens`` tokens (each look-ahead token costing ``decode_step_s``). A question
    that falls back agrees and pays a prefix-cached prefill on top, unless ``measured`` names a
    setting of the checkpoint that fell back on every question (``reuse+f0.999``): then its own
    agreement and TTFT (the cached pass and the fallback, as run) stand for it."""
    falls = [smallest_margin(r, setting, tokens) < margin for r in records]
    extra = (tokens - 1) * decode_step_s

    def fallen(r: dict) -> tuple[float, float]:
        if measured is None:
            return 1.0, r[setting]["ttft"] + r["prefix_cached_ttft"]
        if r[measured].get("backend", "fallback") != "fallback":
            raise ValueError(f"question {r.get('id')}: {measured} did not fall back; it cannot price the fallback")
        return r[measured]["agree"], r[measured]["ttft"]

    outcomes = [
        fallen(r) if f else (r[setting]["agree"], r[setting]["ttft"]) for r, f in zip(records, falls, strict=True)
    ]
    ttft = [t + extra for _, t in outcomes]
    full = [r["full"]["ttft"] for r in records]
    return {
        "margin": margin,
        "fallback": statistics.fmean(falls),
        "agreement": statistics.fmean(a for a, _ in outcomes),
        "ttft_speedup_mean": statistics.fmean(full) / statistics.fmean(ttft),
        "ttft_speedup_median": statistics.median(full) / statistics.median(ttft),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("setting", help="a setting the checkpoint holds, e.g. reuse")
    parser.add_argument("--step", type=float, default=0.005)
    parser.add_argument("--points", type=int, default=11)
    parser.add_argument("--tokens", type=int, default=1, help="answer tokens the margin is checked over")
    parser.add_argument("--decode-step", type=float, default=0.04, help="seconds per look-ahead token")
    parser.add_argument(
        "--measured", help="a setting that fell back on every question (e.g. reuse+f0.999): the fallback as run"
    )
    parser.add_argument("--top-k", type=int, default=3, help="the checkpoint's records of this top-k")
    parser.add_argument("--dtype", default="float32", help="the checkpoint's records of this weight dtype")
    args = parser.parse_args()
    # recompute_quality's own reader: one record per question, of this top-k and dtype, holding the settings
    needed = [args.setting] + ([args.measured] if args.measured else [])
    records = list(checkpointed(args.checkpoint, args.top_k, needed, args.dtype).values())
    if not records:
        raise SystemExit(
            f"{args.checkpoint} holds no top-{args.top_k} {args.dtype} record with every one of {needed}; "
            "name settings the checkpoint measured (recompute_quality.py --settings)"
        )
    run = one_run(records, args.checkpoint)  # one run's records only: stores and answer length alike
    print(f"run: {run or 'not recorded in the checkpoint (written before records named their run)'}")
    print(f"{len(records)} questions, setting {args.setting}, margin over {args.tokens} token(s)")
    print("| margin | falls back | agreement | TTFT vs full (mean) | (median) |\n|---|---|---|---|---|")
    for i in range(args.points):
        row = price(records, args.setting, round(i * args.step, 6), args.tokens, args.decode_step, args.measured)
        print(
            f"| < {row['margin']:.3f} | {100 * row['fallback']:.1f} % | {row['agreement']:.3f} | "
            f"{row['ttft_speedup_mean']:.2f}x | {row['ttft_speedup_median']:.2f}x |"
        )


if __name__ == "__main__":
    main()
