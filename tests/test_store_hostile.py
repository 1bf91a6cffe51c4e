"""A store written by someone else (a downloaded tar or git repository): what its author can make
a reader or writer do. Each is refused with a named error; nothing outside the store is written
(docs/guarantees.md, Safe loading)."""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import pytest

from ragcompress.errors import StoreError
from ragcompress.indexing import IndexConfig, index, remove
from ragcompress.store import KVStore, StoreWriter
from ragcompress.store.compact import compact_store
from ragcompress.store.files import write_atomic

sys.path.insert(0, str(Path(__file__).parent))
import store_worker  # noqa: E402

VICTIM_TEXT = "IMPORTANT USER DATA\n"


@pytest.fixture(scope="module")
def clean_store(tmp_path_factory, tiny_lm) -> Path:
    root = tmp_path_factory.mktemp("hostile")
    topics = ["rivers", "castles", "comets"]
    records = [{"id": f"doc-{i}", "text": f"Passage {i} is about {topics[i % 3]}. " * (1 + i % 3)} for i in range(6)]
    (root / "passages.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    store = root / "store"
    config = IndexConfig(quant="int8", embedder=store_worker.HashEmbedder.name)
    index(root / "passages.jsonl", store, lm=tiny_lm, embedder=store_worker.HashEmbedder(), config=config)
    return store


@pytest.fixture
def store(clean_store, tmp_path) -> Path:
    """A copy of the clean store at ``tmp/store``, beside a file of the user's at ``tmp/victim.txt``."""
    copy = tmp_path / "store"
    shutil.copytree(clean_store, copy)
    (tmp_path / "victim.txt").write_text(VICTIM_TEXT)
    return copy


def _tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# 1. links inside a store


@pytest.mark.parametrize("writer", ["StoreWriter", "remove", "compact"])
def test_a_writer_never_writes_through_a_lock_linked_out_of_the_store(store, writer):
    """Every writer truncated the file a ``lock`` link points at and wrote its pid into it."""
    victim = store.parent / "victim.txt"
    (store / "lock").unlink(missing_ok=True)
    os.symlink("../victim.txt", store / "lock")
    with pytest.raises(StoreError, match=r"holds a symbolic link, lock; a store must not contain links"):
        {"StoreWriter": StoreWriter, "remove": lambda s: remove(s, ["doc-0"]), "compact": compact_store}[writer](store)
    assert victim.read_text() == VICTIM_TEXT


@pytest.mark.parametrize("entry", ["shards", "shards/00000.kvs", "catalogue.sqlite-wal", "index.faiss"])
def test_a_writer_refuses_a_store_holding_a_link(store, entry):
    """Through a linked ``shards`` folder a writer created and deleted shard files outside the
    store; through a linked shard it truncated and appended to the file linked."""
    outside = store.parent / "outside"
    if entry == "shards":
        (store / "shards").rename(outside)
    else:
        outside.mkdir()
        target = outside / Path(entry).name
        if (store / entry).exists():
            (store / entry).rename(target)  # else a dangling link: SQLite would create its WAL there
    os.symlink(outside if entry == "shards" else outside / Path(entry).name, store / entry)
    (outside / "extra.kvs").write_text(VICTIM_TEXT)  # a file of the user's beside it
    before = _tree(outside)
    with pytest.raises(StoreError, match=rf"holds a symbolic link, {entry}; a store must not contain links"):
        StoreWriter(store)
    assert _tree(outside) == before
    if entry.startswith("shards"):  # readers read through links: what they read is checksummed
        with KVStore.open(store) as kv:
            assert len(kv) == 6


def test_write_atomic_never_writes_through_a_link_at_its_temporary_name(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text(VICTIM_TEXT)
    os.symlink(victim, tmp_path / f".index.json.{os.getpid()}.tmp")
    write_atomic(tmp_path / "index.json", b"{}")
    assert victim.read_text() == VICTIM_TEXT
    assert (tmp_path / "index.json").read_bytes() == b"{}"
