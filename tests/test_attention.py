"""The registered attention (``ragcompress.runtime.attention``) on its own: Gemma-2's softcapped path."""

from __future__ import annotations

import torch

from ragcompress.indexing.encoder import PassageEncoder
from ragcompress.models import load_model
from ragcompress.prompt import PromptTemplate
from ragcompress.runtime.attention import softcapped_attention


class _Layer:
    scaling = 0.25


def test_softcapped_attention_gives_a_row_with_no_allowed_key_no_nan():
    """A row whose every key is masked (a right-padded position a window past a short passage's end)
    came out NaN from the softmax of ``-inf`` scores; it now reads as SDPA's does (finite), and every
    row with an allowed key is bit for bit what the ``-inf`` fill gave."""
    gen = torch.Generator().manual_seed(0)
    query, key, value = (torch.randn(1, 2, 5, 8, generator=gen) for _ in range(3))
    allowed = torch.ones(5, 5, dtype=torch.bool).tril()
    allowed[3] = False
    out, _ = softcapped_attention(_Layer(), query, key, value, allowed, softcap=5.0)
    assert bool(out.isfinite().all())
    scores = torch.tanh(query @ key.transpose(-1, -2) * _Layer.scaling / 5.0) * 5.0
    weights = torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1, dtype=torch.float32)
    expected = (weights @ value).transpose(1, 2)
    rows = [0, 1, 2, 4]
    assert torch.equal(out[:, rows], expected[:, rows])


def test_a_gemma2_batch_encodes_each_passage_as_alone(tiny_model_dir):
    """Gemma-2 (softcapped attention, sliding window) encoding a short and a long passage in one
    right-padded batch: the short one's pad positions past its window had no key to attend to, their
    NaN reached its real rows in later layers, and the store kept NaN caches silently."""
    lm = load_model(str(tiny_model_dir("gemma2", layers=4, sliding_window=8, attn_logit_softcapping=50.0)))
    encoder = PassageEncoder(lm, PromptTemplate.from_tokenizer(lm.tokenizer))
    ids = [list(range(100, 110)), list(range(200, 340))]
    together = encoder.encode(ids)
    for kv, passage in zip(together, ids, strict=True):
        alone = encoder.encode([passage])[0]
        assert bool(kv.keys.isfinite().all()) and bool(kv.values.isfinite().all())
        torch.testing.assert_close(kv.keys, alone.keys, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(kv.values, alone.values, atol=1e-5, rtol=1e-5)
