"""Issue #2 quality/speed table: cached answering vs full prefill on squad-dev.

Builds one store per quantization (none / int8 / int4) over all squad-dev passages, then runs
`eval` (same retrieved passages both ways, greedy, one process) at top-1 and top-3: every answer
goes through `Engine.answer_cached` / `Engine.answer_full` with the default `AnswerOptions`
(32 new tokens, `auto` backend). Prints a markdown table and writes the raw JSON next to it.

    python benchmarks/core_eval.py --model smollm2-135m --limit 60 --out docs/results/core_smollm2.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from ragcompress import Engine, IndexConfig, KVStore, index, load_model
from ragcompress.evaluation import intervals, iter_eval, outcomes, read_questions, summarize
from ragcompress.retrieval import Embedder
from ragcompress.runtime.options import AnswerOptions

from common import SQUAD, results_meta


def needed_passages(embedder: Embedder, questions, top_k: int, out: Path) -> Path:
    """The passages the questions retrieve (top-k over the *whole* corpus), as a JSONL file.

    Retrieval over this subset returns exactly what it returns over the whole corpus (each
    question's top-k are all in it), so the table is unchanged while indexing costs less.
    """
    records = [json.loads(line) for line in (SQUAD / "passages.jsonl").read_text().splitlines()]
    vectors = embedder.embed([r["text"] for r in records])
    queries = embedder.embed([q.question for q in questions])
    keep = set()
    for row in np.argsort(-(queries @ vectors.T), axis=1)[:, :top_k]:
        keep.update(int(i) for i in row)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(json.dumps(records[i]) + "\n" for i in sorted(keep)))
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--limit", type=int, default=60)
    parser.add_argument("--runs", type=Path, default=Path("runs/core_eval"))
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--rows", default="none:1,none:3,int8:3,int4:3", help="quant:top_k,...")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    # Taken when the run starts: the code that runs is the code imported now, whatever is committed later.
    meta = results_meta({"repeats": 1, "limit": args.limit, "questions": args.limit, "model": args.model})
    lm = load_model(args.model)
    embedder = Embedder()
    questions = read_questions(SQUAD / "questions.jsonl", args.limit)
    passages = needed_passages(
        embedder,
        questions,
        max(int(r.split(":")[1]) for r in args.rows.split(",")),
        args.runs / "passages-needed.jsonl",
    )
    rows = []
    for spec in args.rows.split(","):
        quant, top_k = spec.split(":")
        store = args.runs / f"{args.model.replace('/', '_')}-{quant}"
        index(passages, store, lm=lm, embedder=embedder, config=IndexConfig(quant=quant))
        with Engine(KVStore.open(store), lm, embedder, AnswerOptions()) as engine:
            engine.warm_up()  # as Engine.open does: the first timed answer pays no one-time setup
            results = list(iter_eval(engine, questions, int(top_k)))
            summary = summarize(engine, results)
        summary.update(intervals(results))
        summary.update({"quant": quant, "top_k": int(top_k), "model": args.model, "per_question": outcomes(results)})
        summary["meta"] = meta
        rows.append(summary)
        print(json.dumps(summary), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(rows, indent=1))
    print(
        "\n| model | quant | top-k | n | sub-EM full | sub-EM cached | F1 full | F1 cached | agreement | "
        "TTFT full (ms) | TTFT cached (ms) | speedup | bytes/token (fp16) | compression |"
    )
    print("|" + "---|" * 14)
    for r in rows:
        print(
            f"| {r['model']} | {r['quant']} | {r['top_k']} | {r['n']} | {r['full']['sub_em']:.3f} | "
            f"{r['compressed']['sub_em']:.3f} | {r['full']['f1']:.3f} | {r['compressed']['f1']:.3f} | "
            f"{r['agreement']:.3f} | {r['full']['ttft_s_median'] * 1000:.0f} | "
            f"{r['compressed']['ttft_s_median'] * 1000:.0f} | {r['ttft_speedup']:.1f}x | "
            f"{r['kv_bytes_per_token']['stored']:.0f} ({r['kv_bytes_per_token']['fp16']:.0f}) | "
            f"{r['compression']:.2f}x |"
        )


if __name__ == "__main__":
    main()
