"""``global:`` over scorers whose scale differs by layer: each layer's scores standardised first."""

from __future__ import annotations

import json

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


def test_a_constant_layer_scores_zero_whatever_its_scale():
    """A layer whose keys all have the same norm carries no information: its fp32 mean was off by
    a rounding error, which divided by a deviation of the same size gave ±1, 0 or anything, so
    it got nothing or half the pool depending on the keys' scale. It scores 0 now, at any scale."""
    gen = torch.Generator().manual_seed(0)
    keys, values = torch.randn(3, 2, 64, 16, generator=gen), torch.randn(3, 2, 64, 16, generator=gen)
    valid = torch.ones(3, 2, 64, dtype=torch.bool)
    row = torch.randn(16, generator=gen)
    kept = []
    for scale in (1.0, 7.3, 100.0):
        scaled = keys.clone()
        scaled[1] = row * scale  # every row of layer 1 the same key
        scores = standardise_per_layer(-scaled.norm(dim=-1), valid)
        assert not bool(scores[1].any())
        compressor = make_compressor("global:knorm", ratio=0.25, keep_first=0, keep_last=0)
        kept.append(compressor.compress(PassageKV.full(scaled, values), None).lengths.tolist())  # type: ignore[arg-type]
    assert kept[0] == kept[1] == kept[2]
    for constant in (0.1, -1.7, -300.3, -4321.9):
        scores = torch.randn(3, 2, 64, generator=gen)
        scores[1] = constant
        assert not bool(standardise_per_layer(scores, valid)[1].any())


def standardise_per_layer_fp32_ref(scores: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """The standardisation before it moved to float64 and zeroed constant layers."""
    weight = valid.float()
    count = weight.sum((1, 2), keepdim=True).clamp_min(1.0)
    mean = (scores * weight).sum((1, 2), keepdim=True) / count
    var = (((scores - mean) * weight) ** 2).sum((1, 2), keepdim=True) / count
    return (scores - mean) / var.sqrt().clamp_min(1e-6)


def test_global_keeps_the_same_tokens_as_the_fp32_standardisation_on_real_scores(tiny_model_dir, monkeypatch):
    """float64 statistics move a standardised score by about 1e-6; on real key norms of tiny
    models (eight passages, four ratios, with and without protected tokens) that changes no kept
    token."""
    import ragcompress.compressors.adaptive as adaptive
    from ragcompress.data import SAMPLE_PASSAGES
    from ragcompress.indexing.encoder import PassageEncoder
    from ragcompress.models import load_model
    from ragcompress.prompt import PromptTemplate

    texts = [json.loads(line)["text"] for line in SAMPLE_PASSAGES.read_text().splitlines()[:8]]
    compared = 0
    for arch, layers in (("llama", 4), ("qwen2", 2)):
        lm = load_model(str(tiny_model_dir(arch, layers=layers)))
        encoder = PassageEncoder(lm, PromptTemplate.from_tokenizer(lm.tokenizer))
        for kv in encoder.encode([encoder.tokens.passage(text) for text in texts]):
            for ratio in (0.1, 0.25, 0.5, 0.75):
                for protect in (0, 4):
                    compressor = make_compressor("global:knorm", ratio=ratio, keep_first=protect, keep_last=protect)
                    scores = compressor.inner.score(kv, None)  # type: ignore[attr-defined, arg-type]
                    kept = compressor.select(kv, scores)  # type: ignore[attr-defined]
                    with monkeypatch.context() as patch:
                        patch.setattr(adaptive, "standardise_per_layer", standardise_per_layer_fp32_ref)
                        before = compressor.select(kv, scores)  # type: ignore[attr-defined]
                    assert torch.equal(kept.lengths, before.lengths) and torch.equal(kept.positions, before.positions)
                    compared += 1
    assert compared == 2 * 8 * 4 * 2
