"""Stores that stay fast as they grow (issue 18): the FAISS index type chosen by size with its
parameters and recall in the manifest, verify on an HNSW index, the cached row count, the
overlap check in offset order, and docs/scaling.md's generated tables."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

from ragcompress.indexing import IndexConfig, index
from ragcompress.store import KVStore, Manifest, StoreWriter
from ragcompress.store.ann import FLAT_MAX, index_params, recall_at_k
from ragcompress.store.verify import verify_store
from ragcompress.testing import HashEmbedder

ROOT = Path(__file__).resolve().parents[1]
CONFIG = IndexConfig(quant="int8", embedder=HashEmbedder().name)


@pytest.fixture(scope="module")
def built(tmp_path_factory, tiny_lm) -> Path:
    root = tmp_path_factory.mktemp("scale-store")
    words = ["river", "castle", "comet", "violin", "glacier", "bridge", "harbour", "meadow"]
    rows = [{"id": f"d{i}", "text": " ".join(words[(i + j) % 8] for j in range(3 + i % 4))} for i in range(40)]
    corpus = root / "p.jsonl"
    corpus.write_text("".join(json.dumps(r) + "\n" for r in rows))
    index(corpus, root / "store", lm=tiny_lm, embedder=HashEmbedder(), config=CONFIG, batch_size=8)
    return root / "store"


@pytest.fixture
def store(built, tmp_path) -> Path:
    """A fresh copy of the 40-passage store for each test (they change it)."""
    return Path(shutil.copytree(built, tmp_path / "store"))


def test_index_type_follows_size():
    assert index_params(FLAT_MAX)["type"] == "flat"
    assert index_params(FLAT_MAX + 1)["type"] == "hnsw"


def test_small_store_is_flat_and_recorded(store):
    described = Manifest.read(store).index
    assert described == {"type": "flat", "metric": "inner_product", "count": 40}


def test_hnsw_index_verifies_records_recall_and_searches(store):
    with StoreWriter(store) as writer:
        writer.write_index(index_params(40, flat_max=0))
    described = Manifest.read(store).index
    assert described["type"] == "hnsw" and described["M"] == 32 and described["count"] == 40
    assert 0.5 <= described["recall_at_10"] <= 1.0
    report = verify_store(store)
    assert report.ok and not report.notes, (report.problems, report.notes)
    with KVStore.open(store) as opened:
        import faiss

        assert isinstance(faiss.downcast_index(opened.index().index.index), faiss.IndexHNSW)
        vector = HashEmbedder().embed(["river castle comet"])[0]
        hits = opened.search(vector, 3)
        assert len(hits) == 3 and all(opened.load_kv(entry).num_tokens > 0 for entry, _ in hits)


def test_recall_is_measured_not_assumed(store):
    """A deliberately poor HNSW (efSearch 1, M 2) must score below the default one."""
    import faiss

    from ragcompress.store.ann import new_index

    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((3000, 32)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    good = new_index(32, index_params(3000, flat_max=0))
    poor = new_index(32, {**index_params(3000, flat_max=0), "M": 2, "ef_search": 1, "ef_construction": 4})
    for built in (good, poor):
        built.add_with_ids(vectors, np.arange(3000, dtype=np.int64))
    assert recall_at_k(poor) < recall_at_k(good)
    flat = faiss.IndexIDMap2(faiss.IndexFlatIP(32))
    flat.add_with_ids(vectors, np.arange(3000, dtype=np.int64))
    assert recall_at_k(flat) == 1.0


def test_reader_count_follows_another_writers_commits(store, tiny_lm):
    with KVStore.open(store) as reader:
        assert len(reader) == 40
        with StoreWriter(store) as writer:
            from ragcompress.indexing import Indexer
            from ragcompress.indexing.inputs import PassageInput

            indexer = Indexer.for_store(reader.manifest, tiny_lm, HashEmbedder())
            writer.add(indexer.records([PassageInput("new", "a new passage about comets")]))
            assert writer.catalogue.count() == 41  # the writer's own commit
        assert len(reader) == 41  # data_version changed: recounted


def test_overlaps_are_checked_in_offset_order_not_row_order(store):
    """Ray workers write blobs in the order they finish batches: rows out of offset order but
    disjoint verify; a blob starting inside another does not."""
    import sqlite3

    cols = "shard, offset, length, checksum, num_tokens, kept"
    db = sqlite3.connect(store / "catalogue.sqlite")
    first, second = db.execute(f"SELECT row, {cols} FROM passages ORDER BY row LIMIT 2").fetchall()
    sets = ", ".join(f"{c.strip()} = ?" for c in cols.split(","))
    db.execute(f"UPDATE passages SET {sets} WHERE row = ?", (*second[1:], first[0]))
    db.execute(f"UPDATE passages SET {sets} WHERE row = ?", (*first[1:], second[0]))
    db.commit()
    assert verify_store(store).ok
    db.execute("UPDATE passages SET offset = offset + 1 WHERE row = ?", (second[0],))
    db.commit()
    db.close()
    assert any("overlaps another blob" in str(p) for p in verify_store(store).problems)


def test_scaling_doc_tables_equal_their_rendering():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import report

    problem = report.check(ROOT / "docs" / "scaling.md")
    assert problem is None, f"{problem}\nrun: .venv/bin/python benchmarks/report.py --readme docs/scaling.md"
