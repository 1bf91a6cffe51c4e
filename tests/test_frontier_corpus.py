"""``benchmarks/lowrank_frontier.py``'s ``~corpus`` rows (an ablation of issue 16): one score
threshold over every passage of the store, spending the rows the per-passage budgets would."""

from __future__ import annotations

import importlib

import torch

from ragcompress.compressors import make_compressor
from ragcompress.kv import PassageKV

frontier = importlib.import_module("lowrank_frontier")
GLOBAL = make_compressor("global:kvzip", ratio=0.2, keep_first=1, keep_last=0)


def _passages() -> tuple[dict[str, PassageKV], dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    full = {f"p{i}": PassageKV.full(torch.randn(3, 2, n, 8), torch.randn(3, 2, n, 8)) for i, n in enumerate((30, 50))}
    scores = {pid: torch.rand(3, 2, kv.num_tokens) for pid, kv in full.items()}
    return full, scores


def test_one_passage_is_global_select():
    full, scores = _passages()
    alone = frontier.corpus_select(GLOBAL, {"p1": full["p1"]}, {"p1": scores["p1"]})["p1"]
    expected = GLOBAL.select(full["p1"], scores["p1"])
    assert torch.equal(alone.positions, expected.positions)
    assert torch.equal(alone.lengths, expected.lengths)


def test_same_total_rows_moved_to_the_passage_that_scores_higher():
    full, scores = _passages()
    scores["p1"] = scores["p1"] + 1.0  # every row of p1 outranks every row of p0
    kept = frontier.corpus_select(GLOBAL, full, scores)
    per_passage = {pid: GLOBAL.select(kv, scores[pid]) for pid, kv in full.items()}
    assert sum(int(k.lengths.sum()) for k in kept.values()) == sum(int(k.lengths.sum()) for k in per_passage.values())
    assert int(kept["p0"].lengths.sum()) == 6  # only its protected first row, in each of 3 x 2 heads
    assert bool((kept["p0"].positions[..., 0] == 0).all())


def test_corpus_rows_parse():
    assert frontier.RowSpec.parse("global:kvzip@0.21/int4v2/r32k~corpus").corpus
    assert not frontier.RowSpec.parse("global:kvzip@0.21/int4v2/r32k~vnorm").corpus


def test_keep_rows_name_their_protection():
    """``~keepF-L`` sets the protected counts; without it an eviction row protects 1 and 0."""
    row = frontier.RowSpec.parse("global:kvzip@0.25/int4/-~keep4-4")
    assert (row.keep, row.index_config().keep_first, row.index_config().keep_last) == ((4, 4), 4, 4)
    plain = frontier.RowSpec.parse("global:kvzip@0.25/int4/-").index_config()
    assert (plain.keep_first, plain.keep_last) == (1, 0)
    assert frontier.RowSpec.parse("global:kvzip@0.25/int4/-~keep0-0").index_config().keep_first == 0
