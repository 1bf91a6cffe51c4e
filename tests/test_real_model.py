"""Real models on real data (slow): with one passage, answers from the store must equal full prefill."""

from __future__ import annotations

import pytest

from ragcompress.runtime.options import AnswerOptions

from conftest import SQUAD, require_squad

pytestmark = pytest.mark.slow


@pytest.fixture(autouse=True)
def _real_data() -> None:
    require_squad()


def top1_agreement(model: str, tmp_path, limit: int, quant: str = "none") -> tuple[float, list]:
    from ragcompress import Engine, IndexConfig, KVStore, index, load_model
    from ragcompress.evaluation import iter_eval, read_questions, summarize
    from ragcompress.retrieval import Embedder

    lm, embedder = load_model(model), Embedder()
    questions = read_questions(SQUAD / "questions.jsonl", limit)
    # Index only the passages these questions retrieve from the whole corpus (same top-1).
    import json

    records = [json.loads(line) for line in (SQUAD / "passages.jsonl").read_text().splitlines()]
    vectors = embedder.embed([r["text"] for r in records])
    wanted = {int((embedder.embed([q.question])[0] @ vectors.T).argmax()) for q in questions}
    subset = tmp_path / "passages.jsonl"
    subset.write_text("".join(json.dumps(records[i]) + "\n" for i in sorted(wanted)))
    index(subset, tmp_path / "store", lm=lm, embedder=embedder, config=IndexConfig(quant=quant))
    engine = Engine(KVStore.open(tmp_path / "store"), lm, embedder, AnswerOptions(max_new_tokens=24))
    results = list(iter_eval(engine, questions, top_k=1))
    return summarize(engine, results)["agreement"], results


def test_default_model_top1_reproduces_full_prefill(tmp_path):
    agreement, results = top1_agreement("smollm2-135m", tmp_path, limit=8)
    mismatches = [
        (r.question.question, r.cached.answer, r.full.answer) for r in results if r.cached.answer != r.full.answer
    ]
    assert agreement >= 0.98, mismatches


@pytest.mark.eval_model
def test_eval_model_top1_reproduces_full_prefill(tmp_path):
    agreement, results = top1_agreement("qwen2.5-coder-0.5b", tmp_path, limit=4)
    mismatches = [
        (r.question.question, r.cached.answer, r.full.answer) for r in results if r.cached.answer != r.full.answer
    ]
    assert agreement >= 0.98, mismatches
