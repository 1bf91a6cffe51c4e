"""The registered attention (``ragcompress.runtime.attention``) on its own: Gemma-2's softcapped path and the masked SDPA call of grouped KV heads."""

from __future__ import annotations

import pytest
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


@pytest.fixture
def kv_copies(monkeypatch):
    """The ``n_rep`` of every ``repeat_kv`` call transformers' SDPA path makes while a test runs:
    each one copies a layer's keys or values once per query head."""
    import transformers.integrations.sdpa_attention as sdpa

    copies: list[int] = []
    original = sdpa.repeat_kv
    monkeypatch.setattr(sdpa, "repeat_kv", lambda x, n: copies.append(n) or original(x, n))
    return copies


class _GroupedLayer:
    scaling = 0.25
    num_key_value_groups = 3


def test_masked_sdpa_reads_grouped_heads_without_copies_bit_for_bit(kv_copies):
    """A masked call (a cached question, a recompute pass, per-head rows) of a model with grouped KV
    heads: transformers copies every KV head per query head (``repeat_kv``, its SDPA's grouped mode
    only without a mask); :func:`masked_sdpa` reads them grouped, with the same bits, for the mask
    transformers builds and for the per-head rows of ``allowed_keys``, in float32 and bfloat16."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from ragcompress.runtime.attention import allowed_keys, masked_sdpa

    gen = torch.Generator().manual_seed(0)
    kv_mask = torch.rand(2, 33, generator=gen) > 0.3  # per KV head: which cached rows are real
    masks = {
        "shared": torch.ones(7, 40, dtype=torch.bool).tril(33)[None, None],
        "per-head": allowed_keys(kv_mask, 6, 7, 40),
    }
    for dtype in (torch.float32, torch.bfloat16):
        query = torch.randn(1, 6, 7, 16, generator=gen).to(dtype)
        key, value = (torch.randn(1, 2, 40, 16, generator=gen).to(dtype) for _ in range(2))
        for name, mask in masks.items():
            kv_copies.clear()
            grouped, _ = masked_sdpa(_GroupedLayer(), query, key, value, mask, scaling=0.25, is_causal=False)
            assert kv_copies == [], name
            expected, _ = sdpa_attention_forward(
                _GroupedLayer(), query, key, value, mask, scaling=0.25, is_causal=False
            )
            assert kv_copies == [3, 3], name  # what transformers' own call did, and masked_sdpa no longer does
            assert torch.equal(grouped, expected), (name, dtype)


def test_a_question_after_cached_rows_gives_the_same_logits_without_kv_copies(tiny_model_dir, monkeypatch, kv_copies):
    """The model's own masked prefill of new tokens after cached rows (the cached path's question)
    through the registered attention: no KV head is copied, and the logits are transformers' bit
    for bit (its SDPA path patched back in for the reference)."""
    import transformers.integrations.sdpa_attention as sdpa
    from transformers import DynamicCache

    import ragcompress.runtime.attention as attention

    lm = load_model(str(tiny_model_dir("qwen2", layers=2)))
    prompt = torch.arange(100, 140).unsqueeze(0)
    question = torch.arange(200, 209).unsqueeze(0)

    def question_logits() -> torch.Tensor:
        cache = DynamicCache(config=lm.model.config)
        with torch.inference_mode():
            lm.model(prompt, past_key_values=cache, use_cache=True)
            return lm.model(question, past_key_values=cache, use_cache=True).logits

    grouped = question_logits()
    assert kv_copies == []
    monkeypatch.setattr(attention, "masked_sdpa", sdpa.sdpa_attention_forward)
    reference = question_logits()
    assert kv_copies, "the reference ran transformers' copying path"
    assert torch.equal(grouped, reference)
