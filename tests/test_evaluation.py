"""``summarize``: the ``eval`` JSON's byte figures are the store's own, as ``index`` reports them;
``Quality``: the per-question outcomes every quality figure is made of."""

from __future__ import annotations

import pytest

from ragcompress.cli import store_sizes
from ragcompress.evaluation import Question, iter_eval, summarize
from ragcompress.indexing import IndexConfig, index
from ragcompress.runtime.engine import Engine
from ragcompress.runtime.options import AnswerOptions
from ragcompress.store import KVStore
from ragcompress.testing import HashEmbedder


@pytest.mark.parametrize("rank", [None, 8])
def test_eval_over_every_passage_reports_the_bytes_index_reports(tiny_lm, passages_file, tmp_path, rank):
    """A low-rank store's basis is stored once; ``index`` counts it, and ``eval`` once left it
    out, reporting more compression than the store has."""
    embedder = HashEmbedder()
    config = IndexConfig(
        quant="int8", rank=rank, embedder=embedder.name, **({"calibration_passages": 4} if rank else {})
    )
    index(passages_file, tmp_path / "store", lm=tiny_lm, embedder=embedder, config=config)
    engine = Engine(KVStore.open(tmp_path / "store"), tiny_lm, embedder, AnswerOptions(max_new_tokens=1))
    try:
        passages = len(engine.store)
        results = list(iter_eval(engine, [Question("q", "Who won the game?", ["Melbourne"])], top_k=passages))
        assert len(results[0].retrieved) == passages
        summary = summarize(engine, results)
        expected = store_sizes(engine.store)
        assert (engine.store.basis_bytes > 0) == (rank is not None)
    finally:
        engine.close()
    assert summary["kv_bytes_per_token"] == pytest.approx(expected["kv_bytes_per_token"])
    assert summary["compression"] == pytest.approx(expected["compression"])


def test_which_side_goes_first_alternates_per_question():
    """Full prefill always ran first, so any order effect (page cache, allocator) favoured one
    side's TTFT in every question; the answers are paired as before."""
    calls: list[str] = []

    class Recording:
        def retrieve(self, question, top_k):
            return []

        def answer_full(self, question, entries, options):
            calls.append(f"full {question}")
            return f"full answer {question}"

        def answer_cached(self, question, entries, options):
            calls.append(f"cached {question}")
            return f"cached answer {question}"

    questions = [Question(str(i), f"q{i}", ["a"]) for i in range(4)]
    results = list(iter_eval(Recording(), questions, top_k=1))  # type: ignore[arg-type]
    assert calls == ["full q0", "cached q0", "cached q1", "full q1", "full q2", "cached q2", "cached q3", "full q3"]
    assert [(r.full, r.cached) for r in results] == [(f"full answer q{i}", f"cached answer q{i}") for i in range(4)]


def test_quality_compares_decoded_text_and_scores_against_the_golds():
    """Agreement is the answer's text equal to the reference's, as ``summarize`` compares
    ``Answer.answer``: not normalised (a re-punctuated answer is another answer), and not token
    ids (distill_eval compared ids where every other benchmark compared text)."""
    from ragcompress.evaluation import Quality, question_quality

    golds = [["Denver Broncos"], ["Santa Clara"], ["gold"]]
    quality = Quality.of(["the Denver Broncos", "Santa Clara.", "x"], golds, ["the Denver Broncos", "Santa Clara", "x"])
    assert quality.agree == [1.0, 0.0, 1.0]
    assert quality.sub_em == [1.0, 1.0, 0.0]
    assert quality.f1 == [1.0, 1.0, 0.0]
    assert quality.means() == {"sub_em": 2 / 3, "f1": 2 / 3, "agreement": 2 / 3}
    assert question_quality("Santa Clara.", ["Santa Clara"], "Santa Clara") == {"sub_em": 1.0, "f1": 1.0, "agree": 0.0}


@pytest.mark.parametrize(
    "predictions, golds, references",
    [(["a", "b"], [["a"], ["b"]], ["a"]), (["a", "b"], [["a"]], ["a", "b"]), (["a"], [["a"], ["b"]], ["a", "b"])],
)
def test_quality_of_lists_of_other_lengths_is_an_error(predictions, golds, references):
    """Paired by position: a short list once paired fewer questions and divided by all of them."""
    from ragcompress.evaluation import Quality

    with pytest.raises(ValueError, match="one of each per question"):
        Quality.of(predictions, golds, references)


def test_quality_intervals_are_the_bootstrap_of_each_per_question_list():
    from ragcompress.evaluation import Quality
    from ragcompress.stats import bootstrap_ci

    answers = ["red", "blue", "green", "grey"]
    quality = Quality.of(answers, [["red"], ["pink"], ["green"], ["green"]], ["red", "blue", "teal", "grey"])
    ci = quality.ci95()
    assert ci == {
        "sub_em": list(bootstrap_ci([1.0, 0.0, 1.0, 0.0])),
        "f1": list(bootstrap_ci([1.0, 0.0, 1.0, 0.0])),
        "agreement": list(bootstrap_ci([1.0, 1.0, 0.0, 1.0])),
    }
    assert ci["agreement"][0] < 0.75 < ci["agreement"][1]
