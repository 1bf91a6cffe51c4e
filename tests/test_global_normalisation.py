"""``global:`` over scorers whose scale differs by layer: each layer's scores standardised first."""

from __future__ import annotations

import torch

from ragcompress.compressors import make_compressor
from ragcompress.compressors.adaptive import standardise_per_layer
from ragcompress.kv import PassageKV


def layered_cache() -> PassageKV:
    """Two layers of the same random keys, the second layer's ten times longer (key norms grow
    with depth in real models)."""
    gen = torch.Generator().manual_seed(0)
    keys = torch.randn(1, 2, 64, 16, generator=gen).expand(2, -1, -1, -1).clone()
    keys[1] *= 10
    return PassageKV.full(keys, torch.randn(2, 2, 64, 16, generator=gen))


def test_global_knorm_spends_the_budget_on_every_layer():
    kv = layered_cache()
    kept = make_compressor("global:knorm", ratio=0.25, keep_first=0, keep_last=0).compress(kv, None)  # type: ignore[arg-type]
    per_layer = kept.lengths.sum(-1)
    assert int(per_layer.sum()) == 2 * 2 * 16  # the whole budget is spent
    # raw minus-norms would give layer 0 everything (its scores are all higher); standardised,
    # identical keys up to scale rank identically, so both layers keep the same rows
    assert per_layer.tolist() == [32, 32]
    assert torch.equal(kept.positions[0], kept.positions[1])


def test_comparable_scores_are_not_standardised():
    kv = layered_cache()
    scores = torch.rand(2, 2, 64, generator=torch.Generator().manual_seed(1))
    scores[1] *= 0.01  # attention mass: a layer that spreads its attention keeps little
    kept = make_compressor("global:kvzip", ratio=0.25, keep_first=0, keep_last=0).select(kv, scores)  # type: ignore[attr-defined]
    assert kept.lengths.sum(-1).tolist() == [64, 0]


def test_standardise_per_layer_ignores_padding():
    scores = torch.tensor([[[1.0, 2.0, 3.0, 100.0]], [[10.0, 20.0, 30.0, 40.0]]])
    valid = torch.tensor([[[True, True, True, False]], [[True, True, True, True]]])
    out = standardise_per_layer(scores, valid)
    for layer in range(2):
        row = out[layer][valid[layer]]
        assert abs(float(row.mean())) < 1e-5 and abs(float(row.std(unbiased=False)) - 1) < 1e-4
