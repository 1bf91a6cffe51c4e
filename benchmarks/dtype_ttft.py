"""TTFT of full prefill and of a preset's cached path with the weights in each dtype, side by side.

``--dtype bfloat16`` halves a model's memory; on a CPU with bf16 matrix instructions (AVX512-BF16,
AMX) it is also faster, for full prefill and for answering from the stored caches alike. Which
answers it changes is ``recompute_quality.py --dtype``'s question (docs/recompute.md); this script
measures the time. One process holds one engine per ``--dtypes`` entry over the same store; for
each question the same retrieved passages are answered by full prefill and by the preset's
cached path in every dtype, the order of the runs rotating one place per question (the first
run of a question is not always the same dtype or path), one new token each. Reported: median
TTFT per dtype and path, each path's ratio to the first dtype's same path (how much faster the
dtype is), the cached path's ratio to full prefill in its own dtype and in the first dtype, and
how often each run's first token is float32 full prefill's (the first dtype's).

    .venv/bin/python benchmarks/dtype_ttft.py --store runs/faithful/qwen-faithful-bc --preset faithful \\
        --sample 20 --articles Apollo_program --out docs/results/dtype_ttft_qwen.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
from pathlib import Path
from typing import Any

import torch

from ragcompress.presets import answer_options
from ragcompress.runtime.engine import Engine

from common import SQUAD, pick_questions, question_article, results_meta, store_adaptors

PATHS = ("full", "cached")


def measure(engines: dict[str, Engine], questions: list[Any], top_k: int) -> list[dict[str, Any]]:
    """One record per question: every (dtype, path) run's TTFT and first token, in an order that
    rotates one place per question."""
    runs = [(dtype, path) for dtype in engines for path in PATHS]
    first = next(iter(engines.values()))
    records = []
    for number, question in enumerate(questions):
        entries = first.retrieve(question.question, top_k)  # one embedder: the same passages for every dtype
        shift = number % len(runs)
        record: dict[str, Any] = {"id": question.id, "passages": [e.id for e in entries]}
        for dtype, path in runs[shift:] + runs[:shift]:
            engine = engines[dtype]
            answer = (engine.answer_full if path == "full" else engine.answer_cached)(question.question, entries)
            record[f"{dtype}/{path}"] = {"ttft": answer.ttft_s, "first_token": answer.token_ids[:1]}
        records.append(record)
    return records


def summarize(records: list[dict[str, Any]], dtypes: list[str]) -> dict[str, Any]:
    """Medians, the ratios between them, and first-token agreement with the first dtype's full prefill."""
    base = dtypes[0]
    median = {f"{d}/{p}": statistics.median(r[f"{d}/{p}"]["ttft"] for r in records) for d in dtypes for p in PATHS}
    rows = {}
    for d in dtypes:
        rows[d] = {
            "full_ttft_s_median": median[f"{d}/full"],
            "cached_ttft_s_median": median[f"{d}/cached"],
            "full_speedup_vs_first_dtype": median[f"{base}/full"] / median[f"{d}/full"],
            "cached_speedup_vs_first_dtype": median[f"{base}/cached"] / median[f"{d}/cached"],
            "cached_vs_own_full": median[f"{d}/full"] / median[f"{d}/cached"],
            "cached_vs_first_dtype_full": median[f"{base}/full"] / median[f"{d}/cached"],
            "first_token_as_first_dtype_full": {
                p: statistics.fmean(
                    float(r[f"{d}/{p}"]["first_token"] == r[f"{base}/full"]["first_token"]) for r in records
                )
                for p in PATHS
            },
        }
    return {"n": len(records), "first_dtype": base, "rows": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--store", required=True)
    parser.add_argument("--questions", type=Path, default=SQUAD / "questions.jsonl")
    parser.add_argument("--sample", type=int, default=20, help="evenly spaced questions")
    parser.add_argument("--articles", action="append", default=[], help="questions of this article only (repeatable)")
    parser.add_argument("--top-k", type=int, default=3)
    parser.add_argument("--preset", default="faithful", help="the cached path's answering options")
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], help="the first is the reference")
    parser.add_argument("--threads", type=int, help="torch threads")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    options = answer_options(args.preset).replace(max_new_tokens=1, calibrate=False)
    questions = pick_questions(args.questions, args.sample, set(args.articles))
    # its first-token columns are answers: none from an article the store's adaptor was trained on;
    # the store is named by its folder in what store_adaptors says ("store NAME: ...")
    name = Path(args.store).resolve().name
    adaptors = store_adaptors({name: args.store}, {question_article(q) for q in questions})
    engines = {d: Engine.open(args.store, options=options, dtype=d) for d in args.dtypes}
    try:
        for engine in engines.values():
            engine.warm_up()
        records = measure(engines, questions, args.top_k)
    finally:
        for engine in engines.values():
            engine.close()
    result = {
        "store": args.store,
        "preset": args.preset,
        "top_k": args.top_k,
        **({"articles": sorted(args.articles)} if args.articles else {}),
        **({"adaptor": adaptors[name]} if adaptors else {}),
        "meta": {
            **results_meta(
                {**vars(args), "questions": len(questions), "repeats": 1, "model": engines[args.dtypes[0]].lm.ref}
            ),
            "cpu_flags_bf16": sorted(f for f in _cpu_flags() if "bf16" in f or f.startswith("amx")),
            "loadavg": os.getloadavg(),
        },
        **summarize(records, args.dtypes),
        "records": records,
    }
    for dtype, row in result["rows"].items():
        print(
            f"{dtype:>9}: full {row['full_ttft_s_median'] * 1e3:.0f} ms, {args.preset} {row['cached_ttft_s_median'] * 1e3:.0f} ms "
            f"({row['cached_vs_own_full']:.2f}x its full prefill, {row['cached_vs_first_dtype_full']:.2f}x "
            f"{args.dtypes[0]}'s); vs {args.dtypes[0]}: full {row['full_speedup_vs_first_dtype']:.2f}x, "
            f"cached {row['cached_speedup_vs_first_dtype']:.2f}x; first token as {args.dtypes[0]} full prefill's: "
            f"full {row['first_token_as_first_dtype_full']['full']:.2f}, cached {row['first_token_as_first_dtype_full']['cached']:.2f}"
        )
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n")


def _cpu_flags() -> set[str]:
    """The CPU's feature flags (Linux), to record whether it has bf16 instructions."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


if __name__ == "__main__":
    main()
