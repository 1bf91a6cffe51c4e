"""How often retrieval puts a passage's encoding neighbours in front of it (docs/recompute.md).

A store built with ``--context-neighbors N`` encoded each passage after its N most similar
passages (:mod:`ragcompress.indexing.neighbours`). That cache is exact when the passages retrieval
puts before it are exactly those neighbours in that order, and closer than an isolated encoding
when some of them are. For every question and every retrieved rank ``r >= 2``: the share of the
``r - 1`` passages before it that are among its encoding neighbours, whether all of them are, and
whether the context is exact (its encoding neighbours are exactly those passages, in that order:
with N above ``r - 1`` no context is). Embeddings only, no LLM.

    .venv/bin/python benchmarks/neighbour_overlap.py --neighbors 1 2 4 --top-k 3 5 \\
        --out docs/results/neighbour_overlap.json
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import numpy as np

from ragcompress.evaluation import read_questions
from ragcompress.indexing.inputs import iter_passages
from ragcompress.indexing.neighbours import neighbour_order
from ragcompress.retrieval import Embedder, exact_top_k

from common import SQUAD, results_meta


def overlap(passage_vectors: np.ndarray, question_vectors: np.ndarray, n: int, top_k: int) -> dict:
    contexts = neighbour_order(passage_vectors, passage_vectors, n, list(range(len(passage_vectors))))
    share, covered, exact = [], [], []
    for q in question_vectors:
        ranked = [int(i) for i in exact_top_k(q[None, :], passage_vectors, top_k)[0]]
        for rank in range(1, top_k):
            before, mine = ranked[:rank], contexts[ranked[rank]]
            hits = len(set(before) & set(mine))
            share.append(hits / len(before))
            covered.append(float(hits == len(before)))
            # the stored KV equal full prefill's only when the passage was encoded after exactly
            # these passages: more neighbours than predecessors is another context
            exact.append(float(list(mine) == before))
    return {
        "n": n,
        "top_k": top_k,
        "mean_share_of_predecessors_among_neighbours": statistics.fmean(share),
        "all_predecessors_among_neighbours": statistics.fmean(covered),
        "exact_context": statistics.fmean(exact),
        "slots": len(share),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--passages", type=Path, default=SQUAD / "passages.jsonl")
    parser.add_argument("--questions", type=Path, default=SQUAD / "questions.jsonl")
    parser.add_argument("--neighbors", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--top-k", type=int, nargs="+", default=[3, 5])
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    passages = list(iter_passages(args.passages))
    questions = read_questions(args.questions)
    embedder = Embedder()
    pv = embedder.embed([p.text for p in passages])
    qv = embedder.embed([q.question for q in questions])
    rows = [overlap(pv, qv, n, k) for k in args.top_k for n in args.neighbors]
    print("| N | top-k | predecessors among neighbours | all of them | exact context |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['n']} | {r['top_k']} | {r['mean_share_of_predecessors_among_neighbours']:.2f} | "
            f"{r['all_predecessors_among_neighbours']:.2f} | {r['exact_context']:.2f} |"
        )
    if args.out:
        meta = results_meta({"questions": len(questions), "model": embedder.name})
        args.out.write_text(json.dumps({"meta": meta, "passages": len(passages), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
