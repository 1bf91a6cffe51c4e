"""The dense path's memory: one passage dequantized at a time, the same cache as before.

``DenseStrategy.prepare`` dequantized every retrieved passage first and kept them all while the
cache was assembled: a peak of 2-3x the assembled cache (SmolLM2-135M, int8, top-16: 224 MiB over
a 110 MiB cache). It now parses every blob first (still quantized), sizes the cache from their
lengths, and dequantizes, writes and drops one passage at a time.
"""

from __future__ import annotations

import weakref

import pytest
import torch

from ragcompress.indexing import IndexConfig, index
from ragcompress.kv.cache import cache_layers
from ragcompress.models import load_model
from ragcompress.runtime.assemble import assemble
from ragcompress.runtime.engine import Engine
from ragcompress.runtime.prepare import DenseStrategy
from ragcompress.runtime.recompute import RecomputeConfig, repair
from ragcompress.store import KVStore
from ragcompress.store.codec import Segment
from ragcompress.testing import noisy_adaptor

QUESTIONS = ["What city is the sporting capital of Australia?", "Who won the game?"]
TOP_K = 4
MAX_NEW = 3

STORES = {
    "unquantized": dict(quant="none"),
    "uniform": dict(quant="int8"),
    "ragged": dict(method="kvzip", ratio=0.5, quant="int8"),  # heads keep different rows, layers alike
    "global-evicted": dict(method="global:kvzip", ratio=0.4, quant="int4"),  # layers of different lengths
    "latent": dict(quant="int8", rank=8, calibration_passages=4),
    "base-copy": dict(quant="int8", base_copy=True),  # the first passage read from its base copy
}


@pytest.fixture(scope="module")
def engines(tmp_path_factory, tiny_model_dir, embedder):
    from ragcompress.data import SAMPLE_PASSAGES

    root = tmp_path_factory.mktemp("prepare-memory")
    passages = root / "passages.jsonl"
    passages.write_text("\n".join(SAMPLE_PASSAGES.read_text().splitlines()[:8]) + "\n")
    lm = load_model(str(tiny_model_dir("llama")))
    adaptor = str(noisy_adaptor(lm, 4).save(root / "adaptor"))
    opened = {}
    for name, fields in STORES.items():
        extra = {"adaptor": adaptor} if fields.get("base_copy") else {}
        index(passages, root / name, lm=lm, embedder=embedder, config=IndexConfig(**fields, **extra))
        opened[name] = Engine(KVStore.open(root / name), lm, embedder)
    yield opened
    for engine in opened.values():
        engine.close()


def request(engine: Engine, question: str):
    entries = engine.retrieve(question, TOP_K)
    suffix = engine.tokens.suffix(question)
    return entries, suffix, [engine.tokens.passage(e.text) for e in entries]


def every_passage_first(engine: Engine, entries, suffix, passage_ids, recompute, keep_first):
    """The dense path as it was: every passage dequantized before the cache is assembled."""
    context = engine.context
    segments = [context.store.load_kv(entry, context.dtype, first=i == 0) for i, entry in enumerate(entries)]
    built = assemble(
        context.lm.config,
        context.rotary,
        context.prefix_keys,
        context.prefix,
        segments,
        context.dtype,
        len(suffix) + MAX_NEW,
    )
    logits = repair(
        context.lm.model,
        context.rotary,
        built,
        context.prefix,
        segments,
        passage_ids,
        recompute,
        first_exact=context.store.manifest.passages_exact,
        suffix=suffix,
    )
    return built, logits, segments[0] if keep_first else None


@pytest.mark.parametrize("keep_first", [False, True])
@pytest.mark.parametrize("recompute", [RecomputeConfig(), RecomputeConfig(ratio=0.3, sink_tokens=2)])
@pytest.mark.parametrize("store", list(STORES))
def test_one_passage_at_a_time_assembles_the_cache_of_all_at_once(engines, store, recompute, keep_first):
    """Bit for bit the cache, masks, first passage and answer logits of the old path."""
    engine = engines[store]
    assert engine.store.manifest.base_copy == (store == "base-copy")
    for question in QUESTIONS:
        entries, suffix, ids = request(engine, question)
        with torch.inference_mode():
            got = DenseStrategy(recompute, keep_first).prepare(engine.context, entries, suffix, MAX_NEW, ids)
            built, logits, first = every_passage_first(engine, entries, suffix, ids, recompute, keep_first)
        assert got.position == built.next_position
        for (k, v), (k_want, v_want) in zip(cache_layers(got.cache), cache_layers(built.cache), strict=True):
            assert torch.equal(k, k_want) and torch.equal(v, v_want)
        masks, masks_want = got.attention_kwargs, built.attention_kwargs()
        assert masks.keys() == masks_want.keys()
        for name in masks:
            assert all(torch.equal(m, w) for m, w in zip(masks[name], masks_want[name], strict=True))
        assert (got.first_logits is None) == (logits is None)
        if logits is not None:
            assert torch.equal(got.first_logits, logits)
        assert (got.first_passage is None) == (first is None)
        if first is not None:
            for name in ("keys", "values", "positions", "lengths"):
                assert torch.equal(getattr(got.first_passage, name), getattr(first, name))
        if logits is None:  # the question's prefill over each cache
            with torch.inference_mode():
                kwargs = built.attention_kwargs()
                want = got.__class__(built.cache, suffix, built.next_position, kwargs).prefilled(engine.lm.model)
                assert torch.equal(got.prefilled(engine.lm.model).first_logits, want.first_logits)


@pytest.mark.parametrize("keep_first", [False, True])
@pytest.mark.parametrize("store", ["uniform", "global-evicted", "latent"])
def test_dense_prepare_holds_one_dequantized_passage_at_a_time(engines, store, keep_first, monkeypatch):
    """Counted by a hook on the one dequantization (``Segment.dense``): when a passage is
    dequantized, no earlier one is still alive (the first one only where ``keep_first`` hands it
    on to the near-tie fallback). The old path held all of them: ``[0, 1, 2, 3]``."""
    made: list[tuple[weakref.ref, weakref.ref]] = []
    alive_at_each: list[int] = []
    dense = Segment.dense

    def counted(self, *args, **kwargs):
        alive_at_each.append(sum(k() is not None or v() is not None for k, v in made))
        kv = dense(self, *args, **kwargs)
        made.append((weakref.ref(kv.keys), weakref.ref(kv.values)))
        return kv

    monkeypatch.setattr(Segment, "dense", counted)
    engine = engines[store]
    entries, suffix, ids = request(engine, QUESTIONS[0])
    with torch.inference_mode():
        prepared = DenseStrategy(RecomputeConfig(), keep_first).prepare(engine.context, entries, suffix, MAX_NEW, ids)
    assert alive_at_each == [0] + [int(keep_first)] * (TOP_K - 1)
    assert (prepared.first_passage is not None) == keep_first
