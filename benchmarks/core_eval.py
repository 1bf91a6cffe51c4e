"""Issue #2 quality/speed table: cached answering vs full prefill on squad-dev.

Builds one store per quantization (none / int8 / int4) over all squad-dev passages, then runs
`eval` (same retrieved passages both ways, greedy, one process) at top-1 and top-3: every answer
goes through `Engine.answer_cached` / `Engine.answer_full` with the default `AnswerOptions`
(32 new tokens, `auto` backend). Prints a markdown table and writes the raw JSON next to it.

    python benchmarks/core_eval.py --model smollm2-135m --limit 60 --out docs/results/core_smollm2.json

Long runs can be split over processes and resumed: ``--checkpoint DIR --shard I/N`` answers every
N-th question starting at I, appending each question's result to a JSON-lines file in DIR (a killed
run resumes after its last line); the process that finds every question answered writes ``--out``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch

from ragcompress import Engine, IndexConfig, KVStore, index, load_model
from ragcompress.evaluation import Question, QuestionResult, intervals, iter_eval, outcomes, read_questions, summarize
from ragcompress.retrieval import Embedder, exact_top_k
from ragcompress.runtime.engine import Answer
from ragcompress.runtime.options import AnswerOptions

from common import SQUAD, measured_by, model_slug, results_meta


def needed_passages(embedder: Embedder, questions, top_k: int, out: Path) -> Path:
    """The passages the questions retrieve (top-k over the *whole* corpus), as a JSONL file.

    Retrieval over this subset returns exactly what it returns over the whole corpus (each
    question's top-k are all in it), so the table is unchanged while indexing costs less.
    """
    records = [json.loads(line) for line in (SQUAD / "passages.jsonl").read_text().splitlines()]
    vectors = embedder.embed([r["text"] for r in records])
    queries = embedder.embed([q.question for q in questions])
    keep: set[int] = set()
    for row in exact_top_k(queries, vectors, top_k):
        keep.update(int(i) for i in row)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(json.dumps(records[i]) + "\n" for i in sorted(keep)))
    return out


def _answer(data: dict) -> Answer:
    return Answer(
        data["answer"], data["passage_ids"], data["ttft_s"], data["total_s"], data["token_ids"], data["backend"]
    )


def checkpointed(
    engine: Engine, questions: list[Question], top_k: int, folder: Path, name: str, shard: str, run: dict[str, Any]
) -> tuple[list[QuestionResult] | None, dict[str, list[str]]]:
    """Answer this shard's questions not yet in ``folder/name-shard*.jsonl``, appending each result
    with ``run`` (the code revision and threads that answered it); all questions' results in
    question order once every shard has finished, else ``None``, and the revisions and threads
    that answered them (``not recorded`` for rows written before rows named them)."""
    index_, count = (int(x) for x in shard.split("/"))
    folder.mkdir(parents=True, exist_ok=True)
    by_id = {q.id: q for q in questions}

    def rows() -> dict[str, dict]:
        found = {}
        for path in folder.glob(f"{name}-shard*.jsonl"):
            for line in path.read_text().splitlines():
                row = json.loads(line)
                found[row["id"]] = row
        return {qid: row for qid, row in found.items() if qid in by_id}

    def as_result(row: dict) -> QuestionResult:
        return QuestionResult(by_id[row["id"]], row["retrieved"], _answer(row["cached"]), _answer(row["full"]))

    answered = rows()
    mine = [q for q in questions[index_::count] if q.id not in answered]
    with open(folder / f"{name}-shard{index_}.jsonl", "a") as handle:
        for result in iter_eval(engine, mine, top_k):
            row = {"id": result.question.id, "retrieved": result.retrieved, "run": run}
            for side in ("cached", "full"):
                answer = getattr(result, side)
                row[side] = {**answer.to_json(), "token_ids": answer.token_ids, "backend": answer.backend}
            handle.write(json.dumps(row) + "\n")
            handle.flush()
    answered = rows()
    measured = measured_by(row.get("run", {}) for row in answered.values())
    if any(q.id not in answered for q in questions):
        return None, measured
    return [as_result(answered[q.id]) for q in questions], measured


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--limit", type=int, default=60)
    parser.add_argument("--runs", type=Path, default=Path("runs/core_eval"))
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--rows", default="none:1,none:3,int8:3,int4:3", help="quant:top_k,...")
    parser.add_argument("--checkpoint", type=Path, help="folder of per-question results (resumable, shardable)")
    parser.add_argument("--shard", default="0/1", help="I/N: answer questions I, I+N, I+2N, ...")
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
        store = args.runs / f"{model_slug(args.model)}-{quant}"
        index(passages, store, lm=lm, embedder=embedder, config=IndexConfig(quant=quant))
        with Engine(KVStore.open(store), lm, embedder, AnswerOptions()) as engine:
            engine.warm_up()  # as Engine.open does: the first timed answer pays no one-time setup
            if args.checkpoint is None:
                results = list(iter_eval(engine, questions, int(top_k)))
            else:
                name = f"{model_slug(args.model)}-{quant}-top{top_k}"
                run = {"git": meta["git"], "threads": args.threads}
                done, measured = checkpointed(engine, questions, int(top_k), args.checkpoint, name, args.shard, run)
                if done is None:
                    print(f"{name}: this shard is done; another shard writes {args.out}", flush=True)
                    return
                results = done
            summary = summarize(engine, results)
        summary.update(intervals(results))
        summary.update({"quant": quant, "top_k": int(top_k), "model": args.model, "per_question": outcomes(results)})
        summary["meta"] = meta if args.checkpoint is None else {**meta, "measured_by": measured}
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
