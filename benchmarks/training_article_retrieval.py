"""How often a held-out question's retrieved passages come from an adaptor's training articles.

Every figure of a KV-Distill adaptor is measured on questions of articles it never saw, but the
store holds every article's passages, and retrieval may put a passage of a training article among
a held-out question's top-k: that cache was encoded through an adaptor trained on that very text.
For each packaged adaptor's split (its ``train_articles``; one row per distinct split), over the
SQuAD-dev questions of the other articles: how many questions retrieve at least one passage of a
training article, and how many of the retrieved slots are such passages, at each top-k. Embeddings
only (the store's embedder over all passages, as the stores are built), no LLM.

    .venv/bin/python benchmarks/training_article_retrieval.py --out docs/results/training_article_retrieval.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from ragcompress.distill.packaged import packaged_configs
from ragcompress.evaluation import read_questions
from ragcompress.indexing.inputs import iter_passages
from ragcompress.retrieval import Embedder, exact_top_k

from common import SQUAD, results_meta


def reach(
    passage_vectors: np.ndarray,
    passage_articles: list[str],
    question_vectors: np.ndarray,
    trained: set[str],
    top_k: int,
) -> dict[str, int]:
    """Questions whose top-k holds a passage of a ``trained`` article, and such slots, of all."""
    top = exact_top_k(question_vectors, passage_vectors, top_k)
    hits = [sum(passage_articles[j] in trained for j in row) for row in top]
    return {
        "questions": len(hits),
        "questions_reaching_training_articles": sum(h > 0 for h in hits),
        "slots": len(hits) * top_k,
        "slots_from_training_articles": sum(hits),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--passages", type=Path, default=SQUAD / "passages.jsonl")
    parser.add_argument("--questions", type=Path, default=SQUAD / "questions.jsonl")
    parser.add_argument("--top-k", type=int, nargs="+", default=[3, 5])
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    splits: dict[tuple[str, ...], list[str]] = {}
    for folder, meta in packaged_configs():
        splits.setdefault(tuple(sorted(meta["train_articles"])), []).append(folder.name)
    passages = list(iter_passages(args.passages))
    articles = [p.id.split("#")[0] for p in passages]  # as the benchmarks name a question's article
    questions = read_questions(args.questions)
    embedder = Embedder()
    pv = embedder.embed([p.text for p in passages])
    rows = []
    for trained, adaptors in sorted(splits.items()):
        held_out = [q for q in questions if q.article not in trained]
        qv = embedder.embed([q.question for q in held_out])
        for k in args.top_k:
            rows.append(
                {"train_articles": list(trained), "adaptors": sorted(adaptors), "top_k": k}
                | reach(pv, articles, qv, set(trained), k)
            )
    for r in rows:
        print(
            f"trained on {'+'.join(r['train_articles'])}, top-{r['top_k']}: {r['questions_reaching_training_articles']}"
            f"/{r['questions']} held-out questions, {r['slots_from_training_articles']}/{r['slots']} slots"
        )
    if args.out:
        meta = results_meta({"questions": len(questions), "model": embedder.name, "repeats": 1})
        args.out.write_text(json.dumps({"meta": meta, "passages": len(passages), "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
