"""``summarize``: the ``eval`` JSON's byte figures are the store's own, as ``index`` reports them."""

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
    config = IndexConfig(quant="int8", rank=rank, calibration_passages=4, embedder=embedder.name)
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
