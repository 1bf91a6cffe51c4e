"""A store written by someone else (a downloaded tar or git repository): what its author can make
a reader or writer do. Each is refused with a named error; nothing outside the store is written,
nothing is allocated beyond what the store's files hold (docs/guarantees.md, Safe loading)."""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import struct
import sys
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch

from ragcompress.distill.adaptor import CONFIG, WEIGHTS, Adaptor
from ragcompress.errors import CorruptSegmentError, InputError, StoreError, StoreMismatchError
from ragcompress.indexing import IndexConfig, index, remove
from ragcompress.kv import ModelShape, PassageKV
from ragcompress.kv.quant import QuantConfig
from ragcompress.retrieval import VectorIndex
from ragcompress.store import KVStore, Manifest, StoreWriter, codec
from ragcompress.store.basis import BASIS, read_basis
from ragcompress.store.compact import compact_store
from ragcompress.store.files import RUN, unfinished_run, write_atomic
from ragcompress.store.kvstore import read_index_meta
from ragcompress.store.verify import verify_store
from ragcompress.testing import point_row_at_appended_blob

sys.path.insert(0, str(Path(__file__).parent))
import store_worker  # noqa: E402

VICTIM_TEXT = "IMPORTANT USER DATA\n"
# 200,000 levels of brackets: 400 KB, deeper than Python's recursion limit
DEEP_JSON = "[" * 200_000 + "]" * 200_000


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


# 2. sizes declared to allocate far more than the store holds


def test_a_huge_sparse_prefix_is_refused_unread(store):
    os.truncate(store / "prefix.safetensors", 64 << 30)  # sparse: no disk used
    tracemalloc.start()
    try:
        with KVStore.open(store) as kv, pytest.raises(CorruptSegmentError, match="more than a prefix of this model"):
            kv.prefix_kv()
        assert [p.kind for p in verify_store(store).problems] == ["prefix"]
        assert tracemalloc.get_traced_memory()[1] < 64 << 20
    finally:
        tracemalloc.stop()


def test_a_huge_sparse_basis_is_refused_unread(tmp_path):
    (tmp_path / BASIS).touch()
    os.truncate(tmp_path / BASIS, 64 << 30)
    with pytest.raises(StoreMismatchError, match="more than a basis of this model"):
        read_basis(tmp_path, "0" * 64, ModelShape(2, 2, 16))


def _padded_blob(rows: int, shape: ModelShape) -> bytes:
    """A blob whose heads keep no row but whose grid is padded to ``rows`` rows (the header
    edited as a hostile author would; the tensors are those of a valid blob)."""
    layers, heads, d = shape.as_tuple()
    zeros = torch.zeros(layers, heads, 4, d)
    kv = PassageKV(
        zeros, zeros, torch.zeros(layers, heads, 4, dtype=torch.long), torch.zeros(layers, heads, dtype=torch.long), 4
    )
    blob = codec.encode(kv, QuantConfig("int8"))
    (length,) = struct.unpack("<Q", blob[:8])
    header = json.loads(blob[8 : 8 + length])
    header["__metadata__"].update(n_max=str(rows), num_tokens=str(rows))
    text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + blob[8 + length :]


def test_a_blob_padded_beyond_its_longest_head_is_refused(store):
    """A 640-byte blob declaring 4,194,304 padded rows, every head keeping none, verified as
    sound while decoding allocated ~2.9 GiB (here 4096 rows, so that without the check nothing
    large is allocated either)."""
    shape = Manifest.read(store).shape
    blob = _padded_blob(4096, shape)
    with pytest.raises(CorruptSegmentError, match="pads its heads to 4096 rows but its longest keeps 0"):
        codec.parse(blob, shape, QuantConfig("int8"))
    point_row_at_appended_blob(store, "doc-0", "00000.kvs", blob, num_tokens=4096, kept=0)
    assert "doc-0" in {p.passage_id for p in verify_store(store).problems}


def test_a_faiss_index_declaring_a_huge_array_is_rebuilt_and_named_under_the_index(store, monkeypatch):
    """FAISS raises MemoryError (std::bad_alloc) for an index.faiss declaring a 256 GiB array:
    search ended in a traceback and verify named it a catalogue problem. (FAISS's failure is
    simulated: the test allocates nothing.)"""

    def bad_alloc(path):
        raise MemoryError("std::bad_alloc")

    monkeypatch.setattr(VectorIndex, "load", bad_alloc)
    with KVStore.open(store) as kv:
        assert len(kv.search(np.ones(32, dtype=np.float32) / np.sqrt(32), 3)) == 3
    problems = verify_store(store).problems
    assert [(p.kind, p.message.split(" (")[0]) for p in problems] == [
        ("index", "index.faiss matches its checksum but FAISS cannot read it")
    ]


# 3. JSON nested too deeply to parse


def test_a_deeply_nested_manifest_is_a_store_error(store):
    (store / "manifest.json").write_text(DEEP_JSON)
    with pytest.raises(StoreError, match="manifest.json is not valid JSON"):
        KVStore.open(store)
    assert [p.kind for p in verify_store(store).problems] == ["manifest"]


def test_a_deeply_nested_index_json_reads_as_a_missing_index(store):
    (store / "index.json").write_text(DEEP_JSON)
    assert read_index_meta(store) is None
    with KVStore.open(store) as kv:
        assert len(kv.search(np.ones(32, dtype=np.float32) / np.sqrt(32), 3)) == 3


def test_deeply_nested_metadata_is_a_store_error_and_a_verify_problem(store):
    with sqlite3.connect(store / "catalogue.sqlite") as db:
        db.execute("UPDATE passages SET meta = ? WHERE id = 'doc-0'", (DEEP_JSON,))
    with KVStore.open(store) as kv, pytest.raises(StoreError, match="'doc-0' has unreadable metadata"):
        kv.entry("doc-0")
    assert ("catalogue", "doc-0", "passage metadata is not a JSON object") in {
        (p.kind, p.passage_id, p.message) for p in verify_store(store).problems
    }


def test_a_deeply_nested_run_marker_reads_as_a_stopped_run(store):
    (store / RUN).write_text(DEEP_JSON)
    assert "stopped before its end" in (unfinished_run(store) or "")


def test_a_deeply_nested_adaptor_config_is_an_input_error(tmp_path):
    (tmp_path / CONFIG).write_text(DEEP_JSON)
    (tmp_path / WEIGHTS).write_bytes(b"")
    with pytest.raises(InputError, match="is unreadable"):
        Adaptor.load(tmp_path)
