"""Neighbour-conditioned encoding (``index --context-neighbors N``).

Anchors: ``N = 0`` is today's encoding bit for bit; when retrieval puts exactly a passage's
encoding neighbours before it, in the encoding order, its stored KV are the KV full prefill
computes for it; the neighbour choice is deterministic; a store records N and refuses another.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import DynamicCache

from ragcompress.errors import StoreMismatchError
from ragcompress.indexing import IndexConfig, index
from ragcompress.indexing.neighbours import neighbour_order
from ragcompress.kv.cache import cache_layers
from ragcompress.runtime.engine import Engine
from ragcompress.runtime.generate import forward_step
from ragcompress.runtime.options import AnswerOptions
from ragcompress.store import KVStore

QUESTION = "What city is the sporting capital of Australia?"


def test_neighbour_order_is_most_similar_adjacent_and_excludes_itself():
    pool = np.eye(4, dtype=np.float32)
    pool[1] = [0.9, 0.1, 0.0, 0.0]
    pool[2] = [0.5, 0.5, 0.0, 0.0]
    pool /= np.linalg.norm(pool, axis=1, keepdims=True)
    order = neighbour_order(pool[:1], pool, 2, [0])
    assert order == [[2, 1]]  # 1 is most like 0, so it sits right before it
    assert neighbour_order(pool[:1], pool, 0, [0]) == [[]]
    ties = np.ones((3, 2), dtype=np.float32) / np.sqrt(2)
    assert neighbour_order(ties[:1], ties, 2, [0]) == [[2, 1]]  # ties break by pool order
    assert neighbour_order(ties[:1], ties, 5, [0]) == [[2, 1]]  # never more than the pool holds


@pytest.fixture(scope="module")
def neighbour_stores(tmp_path_factory, tiny_model_dir, embedder):
    """Stores of the first 8 sample passages (tiny qwen2, unquantized) for N in 0, 1, 2 and a
    store built with the default config."""
    from ragcompress.data import SAMPLE_PASSAGES

    root = tmp_path_factory.mktemp("neighbours")
    passages = root / "passages.jsonl"
    passages.write_text("\n".join(SAMPLE_PASSAGES.read_text().splitlines()[:8]) + "\n")
    model = str(tiny_model_dir("qwen2"))
    built = {}
    for name, config in (
        ("default", IndexConfig()),
        ("n0", IndexConfig(context_neighbors=0)),
        ("n1", IndexConfig(context_neighbors=1)),
        ("n2", IndexConfig(context_neighbors=2)),
    ):
        index(passages, root / name, model=model, config=config, embedder=embedder, batch_size=3)
        built[name] = root / name
    return passages, built


def blobs(store_path) -> dict[str, str]:
    """Every passage's segment checksum (xxh3-128 of its bytes), after verifying each segment."""
    with KVStore.open(store_path) as store:
        return {e.id: (store.read_segment(e), e.checksum)[1] for e in store.catalogue.entries()}


def test_zero_neighbours_is_todays_store_bit_for_bit(neighbour_stores):
    _, stores = neighbour_stores
    assert blobs(stores["n0"]) == blobs(stores["default"])
    with KVStore.open(stores["n1"]) as store:
        assert store.manifest.encoding == {"context_neighbors": 1}
    assert blobs(stores["n1"]) != blobs(stores["default"])


@pytest.mark.parametrize("n", [1, 2])
def test_exact_neighbours_in_encoding_order_give_full_prefill_kv(neighbour_stores, n, embedder):
    _, stores = neighbour_stores
    with Engine.open(stores[f"n{n}"]) as engine:
        entries = {e.id: e for e in engine.store.catalogue.entries()}
        ids = sorted(entries)
        vectors = engine.embedder.embed([entries[i].text for i in ids])
        target = 3
        context = [ids[j] for j in neighbour_order(vectors[target : target + 1], vectors, n, [target])[0]]
        order = [entries[i] for i in context] + [entries[ids[target]]]
        prompt = engine.full_prompt_ids(QUESTION, order)
        with torch.inference_mode():
            out = engine.lm.model(torch.tensor([prompt]), cache=DynamicCache(config=engine.lm.config), use_cache=True)
        full = cache_layers(out.cache if hasattr(out, "cache") else out.past_key_values)
        stored = engine.store.load_kv(order[-1])
        start = engine.prefix.num_tokens + sum(e.num_tokens for e in order[:-1])
        length = order[-1].num_tokens
        positions = torch.arange(start, start + length)
        for layer, (keys, values) in enumerate(full):
            k = keys[0, :, start : start + length]
            unrotated = engine.rotary.unrotate(k, positions.expand(k.shape[0], -1), layer)
            torch.testing.assert_close(stored.keys[layer], unrotated, atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(stored.values[layer], values[0, :, start : start + length], atol=1e-4, rtol=1e-4)


def test_store_refuses_another_neighbour_count(neighbour_stores, tiny_model_dir, embedder):
    passages, stores = neighbour_stores
    with pytest.raises(StoreMismatchError, match="passage encoding"):
        index(
            passages,
            stores["n1"],
            model=str(tiny_model_dir("qwen2")),
            config=IndexConfig(context_neighbors=2),
            embedder=embedder,
        )


def test_config_rejects_bad_counts():
    with pytest.raises(ValueError, match="context_neighbors"):
        IndexConfig(context_neighbors=-1)


def test_full_recompute_of_a_neighbour_store_reproduces_full_prefill(neighbour_stores):
    """A neighbour-conditioned store's first passage was encoded after its neighbours, not after
    the prefix alone, so recompute must not treat it as exact (as it may an unquantized plain store)."""
    _, stores = neighbour_stores
    with Engine.open(stores["n2"]) as engine:
        assert not engine.store.manifest.passages_exact
        entries = engine.retrieve(QUESTION, 3)
        recomputed = engine.prepare(QUESTION, entries, AnswerOptions(recompute=1.0)).first_logits
        with torch.inference_mode():
            ids = torch.tensor([engine.full_prompt_ids(QUESTION, entries)])
            full = forward_step(engine.lm.model, ids, DynamicCache(config=engine.lm.config), 0)
        torch.testing.assert_close(recomputed, full, atol=1e-4, rtol=1e-4)


def test_a_context_is_cut_to_the_models_positions_from_its_far_end(tiny_model_dir, embedder, tmp_path, monkeypatch):
    """Neighbours' tokens never carry prefix + context + passage past the model's positions: the
    context keeps its last tokens (those nearest the passage), and a passage that fits alone is
    still encoded after as much of its neighbours as fits."""
    import json

    from ragcompress.data import SAMPLE_PASSAGES
    from ragcompress.indexing.encoder import PassageEncoder
    from ragcompress.indexing.indexer import POSITION_HEADROOM

    model_dir = tmp_path / "short"
    import shutil

    shutil.copytree(tiny_model_dir("qwen2"), model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    config["max_position_embeddings"] = 400
    (model_dir / "config.json").write_text(json.dumps(config))
    passages = tmp_path / "passages.jsonl"
    passages.write_text("\n".join(SAMPLE_PASSAGES.read_text().splitlines()[:4]) + "\n")
    seen: list[tuple[int, int, list[int]]] = []
    encode = PassageEncoder.encode

    def recording(self, batch, contexts=None):
        seen.extend(
            (self.prefix_len, len(ids), ctx) for ids, ctx in zip(batch, contexts or [[]] * len(batch), strict=True)
        )
        return encode(self, batch, contexts)

    monkeypatch.setattr(PassageEncoder, "encode", recording)
    index(
        passages, tmp_path / "store", model=str(model_dir), config=IndexConfig(context_neighbors=2), embedder=embedder
    )
    budget = 400 - POSITION_HEADROOM
    assert seen and all(prefix + len(ctx) + n <= budget for prefix, n, ctx in seen)
    assert any(prefix + len(ctx) + n == budget for prefix, n, ctx in seen)  # a context was cut, not dropped


def test_passages_given_fewer_neighbours_than_the_store_records_are_counted(tmp_path, tiny_model_dir, embedder):
    """Neighbours are drawn from the run's own input: a passage appended alone to a store built
    with N = 2 was encoded after none, silently, while the manifest says 2. The report counts
    such passages (the CLI warns); an input of more than N passages gives every one its N."""
    import json

    from ragcompress.data import SAMPLE_PASSAGES

    lines = SAMPLE_PASSAGES.read_text().splitlines()
    first, more, one = tmp_path / "first.jsonl", tmp_path / "more.jsonl", tmp_path / "one.jsonl"
    first.write_text("\n".join(lines[:3]) + "\n")
    more.write_text("\n".join(lines[3:5]) + "\n")  # 2 passages: 1 other each
    one.write_text(json.dumps({**json.loads(lines[5]), "id": "alone"}) + "\n")
    store, model = tmp_path / "store", str(tiny_model_dir("qwen2"))
    built = index(first, store, model=model, config=IndexConfig(context_neighbors=2), embedder=embedder)
    assert (built.indexed, built.short_context) == (3, 0)
    assert index(more, store, model=model, embedder=embedder).short_context == 2
    report = index(one, store, model=model, embedder=embedder)
    assert report.short_context == 1 and report.to_json()["short_context"] == 1
