"""Changing a store in place: ``index --replace`` re-encodes passages whose text changed,
``remove`` deletes passages, and neither can leave a reader with an index that maps a row to the
wrong passage."""

from __future__ import annotations

import gc
import json
import os
import shutil
import sqlite3
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from test_store_reliability import BATCH, CONFIG, N_PASSAGES, _assert_readable, _index, _rows, _texts, _write

from ragcompress.errors import InputError, StoreError
from ragcompress.indexing import index, remove
from ragcompress.store import KVStore, StoreWriter
from ragcompress.store.catalogue import searchable_checksum
from ragcompress.store.compact import compact_store
from ragcompress.store.files import replace_store
from ragcompress.store.kvstore import INDEX, INDEX_META, read_index_meta
from ragcompress.store.verify import verify_store

import store_worker


@pytest.fixture
def store(tmp_path, tiny_lm):
    built = tmp_path / "store"
    _index(tiny_lm, _write(tmp_path / "passages.jsonl", _texts(N_PASSAGES)), built)
    return built


def _vector(text: str) -> np.ndarray:
    return store_worker.HashEmbedder().embed([text])[0]


def _top(kv: KVStore, text: str) -> str:
    return kv.search(_vector(text), 1)[0][0].id


def _checksums(path) -> dict[str, str]:
    with KVStore.open(path) as kv:
        return {e.id: e.checksum for e in kv.catalogue.entries()}


def test_replace_stores_what_a_fresh_build_of_the_changed_input_stores(tiny_lm, store, tmp_path):
    records = _texts(N_PASSAGES)
    records[3]["text"] = "Passage three now tells of lighthouses."
    records[17]["text"] = "Passage seventeen now tells of orchards. " * 3
    changed = _write(tmp_path / "changed.jsonl", records)

    report = _index(tiny_lm, changed, store, replace=True)

    assert (report.indexed, report.replaced, report.skipped) == (2, 2, N_PASSAGES - 2)
    fresh = tmp_path / "fresh"
    _index(tiny_lm, changed, fresh)
    assert _checksums(store) == _checksums(fresh)  # the same caches, byte for byte
    assert _assert_readable(store) == N_PASSAGES
    with KVStore.open(store) as kv:
        assert kv.entry("doc-017").text == records[17]["text"]
        assert _top(kv, records[17]["text"]) == "doc-017"
    assert any("removed or replaced" in note for note in verify_store(store).notes)  # the old blobs' bytes


class _PaddingEmbedder(store_worker.HashEmbedder):
    """Vectors whose last bits depend on the longest text of the batch they are embedded in, as a
    sentence-transformers model's do (it pads a batch to its longest text)."""

    def embed(self, texts: list[str]) -> np.ndarray:
        return super().embed(texts) * np.float32(1 + max(map(len, texts)) * 1e-7)


def _vectors(path) -> dict[str, bytes]:
    with KVStore.open(path) as kv:
        ids = {e.row: e.id for e in kv.catalogue.entries()}
        rows, vectors = kv.catalogue.embeddings()
    return {ids[row]: vector.tobytes() for row, vector in zip(rows, vectors, strict=True)}


@pytest.mark.parametrize("kind", ["all-MiniLM-L6-v2", "padding"])
def test_a_replaced_passage_is_embedded_in_its_batch_as_a_fresh_build_embeds_it(kind, tiny_lm, tmp_path, request):
    """``--replace`` embedded a changed passage alone, where a fresh build of the changed input
    embeds it with the rest of its batch: its vector was not the fresh build's (7.5e-8 apart with
    all-MiniLM-L6-v2), so a replaced store was not byte-equal to a fresh one. The whole batch is
    embedded, as it is encoded, and the vectors of the passages it re-encodes are kept."""
    if kind == "padding":
        embedder, config = _PaddingEmbedder(), CONFIG
    else:
        embedder, config = request.getfixturevalue("embedder"), replace(CONFIG, embedder=kind)
    records = _texts(8)
    settings = {"lm": tiny_lm, "embedder": embedder, "config": config, "batch_size": BATCH}
    store = tmp_path / "store"
    index(_write(tmp_path / "first.jsonl", records), store, **settings)
    records[2]["text"] = "Passage two now tells of lighthouses and harbours at night."
    changed = _write(tmp_path / "changed.jsonl", records)
    assert index(changed, store, replace=True, **settings).replaced == 1
    fresh = tmp_path / "fresh"
    index(changed, fresh, **settings)
    assert _vectors(store) == _vectors(fresh)
    assert _checksums(store) == _checksums(fresh)


def test_replace_with_unchanged_input_changes_nothing(tiny_lm, store, tmp_path):
    rows = _rows(store)
    report = _index(tiny_lm, _write(tmp_path / "same.jsonl", _texts(N_PASSAGES)), store, replace=True)
    assert (report.indexed, report.replaced) == (0, 0)
    assert _rows(store) == rows


def test_a_rerun_with_another_title_or_metadata_updates_them_in_place(tiny_lm, store, tmp_path):
    """The same id and text with an edited title or metadata was counted skipped and kept the old
    ones (the LlamaIndex ingestion updated them): the fields change, the caches stay, and the
    catalogue's meta checksum follows (``verify``)."""
    caches = _checksums(store)
    records = _texts(N_PASSAGES)
    records[3]["title"] = "A new title"
    records[5]["lang"] = "fr"
    edited = _write(tmp_path / "edited.jsonl", records)
    report = _index(tiny_lm, edited, store)
    assert (report.indexed, report.skipped, report.updated) == (0, N_PASSAGES, 2)
    assert report.to_json()["updated"] == 2
    with KVStore.open(store) as kv:
        assert (kv.entry("doc-003").title, kv.entry("doc-003").meta) == ("A new title", {})
        assert (kv.entry("doc-005").title, kv.entry("doc-005").meta) == ("T5", {"lang": "fr"})
    assert _checksums(store) == caches
    assert verify_store(store).ok, verify_store(store).problems
    assert _index(tiny_lm, edited, store).updated == 0


def test_chunks_an_edited_document_no_longer_has_are_named_not_left_silently(tiny_lm, tmp_path):
    """A folder document edited to fewer chunks: ``--replace`` re-encoded ``doc.md#0`` and left
    ``doc.md#1`` stored and searchable, holding text the document no longer has, without a word.
    They are named (``IndexReport.stale``), not removed; JSONL ids that look alike are the user's."""
    docs = tmp_path / "docs"
    docs.mkdir()
    words = lambda tag: " ".join(f"{tag}{i}" for i in range(150))  # noqa: E731 (one chunk each)
    (docs / "policy.md").write_text(f"{words('old')}\n\n{words('refund')}\n\n{words('more')}\n")
    (docs / "other.md").write_text("Kept as it is.\n")
    first = _index(tiny_lm, docs, tmp_path / "store")
    assert first.stale == ()
    (docs / "policy.md").write_text(f"{words('new')}\n")
    report = _index(tiny_lm, docs, tmp_path / "store", replace=True)
    assert (report.indexed, report.replaced, report.stale) == (1, 1, ("policy.md#1", "policy.md#2"))
    assert report.to_json()["stale"] == ["policy.md#1", "policy.md#2"]
    (docs / "policy.md").write_text("\n")  # blank: every stored chunk is stale
    assert _index(tiny_lm, docs, tmp_path / "store").stale == ("policy.md#0", "policy.md#1", "policy.md#2")
    remove(tmp_path / "store", ["policy.md#0", "policy.md#1", "policy.md#2"])
    assert _index(tiny_lm, docs, tmp_path / "store").stale == ()
    jsonl = _write(tmp_path / "p.jsonl", [{"id": "policy.md#7", "text": "a passage the user named so"}])
    assert _index(tiny_lm, jsonl, tmp_path / "store").stale == ()


def test_stale_chunks_are_found_without_reading_the_documents_again(tiny_lm, tmp_path, monkeypatch):
    """Finding the stale chunks read and chunked every document of the input once more after the
    run, a fourth pass; the chunk counts now come from the run's own encoding pass: each document
    is read three times (validation, the length check, encoding), and the stale chunks are the same."""
    from ragcompress.indexing import inputs

    reads: dict[str, int] = {}
    original = inputs.iter_document

    def counted(file, relative, *args, **kwargs):
        reads[relative] = reads.get(relative, 0) + 1
        return original(file, relative, *args, **kwargs)

    monkeypatch.setattr(inputs, "iter_document", counted)
    docs = tmp_path / "docs"
    docs.mkdir()
    words = lambda tag: " ".join(f"{tag}{i}" for i in range(150))  # noqa: E731 (one chunk each)
    (docs / "policy.md").write_text(f"{words('old')}\n\n{words('refund')}\n")
    (docs / "other.md").write_text("Kept as it is.\n")
    assert _index(tiny_lm, docs, tmp_path / "store").stale == ()
    assert reads == {"other.md": 3, "policy.md": 3}
    (docs / "policy.md").write_text(f"{words('new')}\n")
    reads.clear()
    assert _index(tiny_lm, docs, tmp_path / "store", replace=True).stale == ("policy.md#1",)
    assert reads == {"other.md": 3, "policy.md": 3}
    reads.clear()
    assert _index(tiny_lm, docs / "policy.md", tmp_path / "store").stale == ("policy.md#1",)  # one document
    assert reads == {"policy.md": 3}


def test_remove_deletes_passages_and_an_open_reader_stops_finding_them(store):
    texts = {r["id"]: r["text"] for r in _texts(N_PASSAGES)}
    with KVStore.open(store) as reader:
        assert _top(reader, texts["doc-005"]) == "doc-005"
        assert remove(store, ["doc-005", "doc-010", "doc-005"]) == 2
        assert len(reader) == N_PASSAGES - 2
        assert "doc-005" not in {entry.id for entry, _ in reader.search(_vector(texts["doc-005"]), 5)}
    assert _assert_readable(store) == N_PASSAGES - 2


def test_removing_an_unknown_id_removes_nothing(store):
    rows = _rows(store)
    with pytest.raises(InputError, match="1 of the ids to remove are not in .*'nope'; nothing was removed"):
        remove(store, ["doc-001", "nope"])
    assert _rows(store) == rows
    assert remove(store, ["doc-001", "nope"], missing_ok=True) == 1


def test_an_index_from_before_a_removal_is_not_used_when_a_new_row_takes_a_removed_rows_number(
    tiny_lm, store, tmp_path
):
    """SQLite gives a new row the number of a deleted last row. An index saved before the removal
    (here: put back, as if the writer had been killed before rewriting it) covers as many rows as
    the catalogue and passes its checksum, but maps that number to the removed passage's vector;
    the catalogue's generation tells readers and ``verify`` to rebuild it."""
    last = _rows(store)[-1]
    saved = {name: (store / name).read_bytes() for name in (INDEX, INDEX_META)}
    assert remove(store, [last[1]]) == 1
    newcomer = {"id": "doc-new", "text": "A passage about harbours, written later.", "title": "N"}
    _index(tiny_lm, _write(tmp_path / "new.jsonl", [newcomer]), store)
    assert _rows(store)[-1][:2] == (last[0], "doc-new")  # the removed row's number, reused
    for name, data in saved.items():
        (store / name).write_bytes(data)
    assert read_index_meta(store)["count"] == N_PASSAGES  # stale, yet the count matches

    report = verify_store(store)
    assert report.ok, [str(p) for p in report.problems]
    assert any("before passages were removed or replaced" in note for note in report.notes)
    with KVStore.open(store) as kv:
        assert _top(kv, newcomer["text"]) == "doc-new"
        assert "doc-new" not in {entry.id for entry, _ in kv.search(_vector(last[3]), 3)}


def test_an_index_json_without_a_generation_reads_as_generation_zero(store):
    meta = json.loads((store / INDEX_META).read_text())
    del meta["generation"]
    (store / INDEX_META).write_text(json.dumps(meta))
    assert read_index_meta(store)["generation"] == 0
    report = verify_store(store)
    assert report.ok and not report.notes  # a store that never removed anything: the index is current


def test_cli_remove(store, tmp_path, monkeypatch, capfd):
    from test_cli import run_cli

    copy = tmp_path / "copy"
    shutil.copytree(store, copy)
    code, out, err = run_cli(["remove", "--store", str(copy), "doc-002", "doc-004", "--json"], monkeypatch, capfd)
    assert code == 0, err
    assert json.loads(out) == {"store": str(copy), "requested": 2, "removed": 2}
    rows = _rows(copy)
    code, out, err = run_cli(["remove", "--store", str(copy), "doc-002"], monkeypatch, capfd)
    assert code == 1 and err.startswith("error: 1 of the ids to remove are not in") and len(err.splitlines()) == 1
    assert _rows(copy) == rows
    code, _, err = run_cli(["remove", "--store", str(copy)], monkeypatch, capfd)
    assert code == 1 and "no passage ids given" in err
    ids_file = tmp_path / "ids.txt"
    ids_file.write_text("\ufeffdoc-006\n\ndoc-007\n", encoding="utf-8")  # a BOM (Windows editors) is not part of an id
    code, out, err = run_cli(["remove", "--store", str(copy), "--ids-file", str(ids_file)], monkeypatch, capfd)
    assert code == 0 and out.strip() == f"removed 2 passages from {copy}"
    code, out, err = run_cli(["compact", "--store", str(copy), "--json"], monkeypatch, capfd)
    assert code == 0, err
    assert json.loads(out)["passages"] == N_PASSAGES - 4


def test_compact_keeps_every_cache_and_drops_the_unreferenced_bytes(tiny_lm, store, tmp_path):
    records = _texts(N_PASSAGES)
    records[5]["text"] = "Passage five, rewritten about canals."
    _index(tiny_lm, _write(tmp_path / "changed.jsonl", records), store, replace=True)
    remove(store, ["doc-001", "doc-020"])
    sums, before = _checksums(store), verify_store(store)
    assert any("compact" in note for note in before.notes)

    report = compact_store(store)

    assert report.passages == N_PASSAGES - 2 and report.bytes_after < report.bytes_before
    assert _checksums(store) == sums  # every stored cache, byte for byte, under its id
    after = verify_store(store)
    assert after.ok and not after.notes, after.notes
    with KVStore.open(store) as kv:
        assert _top(kv, records[5]["text"]) == "doc-005"
    assert not list(tmp_path.glob(".store.*"))  # nothing left beside the store


def test_compacting_a_store_with_nothing_removed_keeps_its_bytes(store, tmp_path):
    reference = tmp_path / "reference"
    shutil.copytree(store, reference)
    report = compact_store(store)
    assert report.bytes_after == report.bytes_before
    assert _rows(store) == _rows(reference)
    assert {p.name: p.read_bytes() for p in (store / "shards").iterdir()} == {
        p.name: p.read_bytes() for p in (reference / "shards").iterdir()
    }


def test_compact_refuses_while_another_writer_holds_the_store(store):
    from ragcompress.store.writer import StoreLock

    lock = StoreLock(store)
    try:
        with pytest.raises(StoreError, match="is being written by"):
            compact_store(store)
    finally:
        lock.release()
    assert verify_store(store).ok


def test_a_compaction_stopped_before_the_swap_leaves_the_store_as_it_was(store, monkeypatch):
    import ragcompress.store.compact as compact

    remove(store, ["doc-003"])
    rows = _rows(store)

    def killed(built, path):
        raise KeyboardInterrupt  # as if the process died between building the copy and the swap

    monkeypatch.setattr(compact, "replace_store", killed)
    with pytest.raises(KeyboardInterrupt):
        compact_store(store)
    assert _rows(store) == rows and verify_store(store).ok
    monkeypatch.undo()
    assert compact_store(store).passages == N_PASSAGES - 1  # the next run clears the half-built copy
    assert not list(store.parent.glob(".store.*"))


@pytest.mark.parametrize(
    "where, named", [("README-mine.txt", "README-mine.txt"), ("shards/notes.txt", "notes.txt"), (".git/HEAD", ".git")]
)
def test_compact_and_overwrite_refuse_a_store_folder_holding_the_users_files(tiny_lm, store, tmp_path, where, named):
    """Compaction replaces the store's folder whole, and so does ``index --overwrite``: a file of
    the user's in it, at the top or among the shards, is refused before anything is touched (both
    once deleted it, compaction with exit 0)."""
    mine = store / where
    mine.parent.mkdir(exist_ok=True)
    mine.write_text("keep me")
    rows = _rows(store)
    with pytest.raises(StoreError, match="refusing to compact") as refused:
        compact_store(store)
    assert named in str(refused.value)
    with pytest.raises(StoreError, match="refusing to overwrite"):
        _index(tiny_lm, _write(tmp_path / "again.jsonl", _texts(N_PASSAGES)), store, overwrite=True)
    assert mine.read_text() == "keep me" and _rows(store) == rows
    assert not list(store.parent.glob(".store.*"))


def test_a_failed_compaction_names_the_store_and_leaves_no_copy(store):
    """A damaged shard stops compaction with the passage named; the half-built copy beside the
    store (as large as what it had copied) is deleted, not left for the next run."""
    shard = next((store / "shards").glob("*.kvs"))
    with open(shard, "r+b") as handle:
        handle.truncate(shard.stat().st_size // 2)
    with pytest.raises(StoreError):
        compact_store(store)
    assert not list(store.parent.glob(".store.*"))
    (store / "manifest.json").write_text("{")
    with pytest.raises(StoreError, match=str(store / "manifest.json")):
        compact_store(store)
    assert not list(store.parent.glob(".store.*"))


def test_an_open_reader_follows_a_compaction_even_mid_request(store):
    """A reader (as ``serve`` holds one) keeps answering across ``compact``: its next search
    reopens the swapped-in store, and a blob read with a row found before the swap is read again
    from the new store (the old offsets point elsewhere once the gaps are gone)."""
    texts = {r["id"]: r["text"] for r in _texts(N_PASSAGES)}
    remove(store, ["doc-000", "doc-001", "doc-002"])  # gaps at the start: every later blob moves
    with KVStore.open(store) as reader:
        found = reader.search(_vector(texts["doc-012"]), 1)[0][0]
        compact_store(store)
        assert reader.load_kv(found).num_tokens == found.num_tokens  # a row from before the swap
        for entry, _ in reader.search(_vector(texts["doc-020"]), 5):
            reader.load_kv(entry)
        assert _top(reader, texts["doc-020"]) == "doc-020"


def test_an_open_reader_refuses_another_build_swapped_into_its_path(tiny_lm, store, tmp_path):
    from ragcompress.errors import StoreMismatchError
    from ragcompress.indexing import IndexConfig, index

    with KVStore.open(store) as reader:
        other = IndexConfig(quant="int4", embedder=store_worker.HashEmbedder.name)
        corpus = _write(tmp_path / "passages.jsonl", _texts(4))
        index(corpus, store, lm=tiny_lm, embedder=store_worker.HashEmbedder(), config=other, overwrite=True)
        with pytest.raises(StoreMismatchError, match="compression"):
            reader.search(_vector("anything"), 1)


def test_remove_on_a_folder_with_another_manifest_touches_nothing(tmp_path):
    """A folder holding some other program's manifest.json (and a file named ``lock``) is refused
    before the writer's lock is taken: it once overwrote that file with its pid."""
    folder = tmp_path / "app"
    folder.mkdir()
    (folder / "manifest.json").write_text('{"name": "a web app"}')
    (folder / "lock").write_text("the user's")
    with pytest.raises(StoreError):
        remove(folder, ["x"])
    assert (folder / "lock").read_text() == "the user's"
    assert sorted(p.name for p in folder.iterdir()) == ["lock", "manifest.json"]


def test_remove_refuses_one_string_for_a_list_of_ids(store):
    """``remove(store, "doc-001")`` read the string as the ids 'd', 'o', 'c', ...: with
    ``missing_ok`` it would delete passages of those names and report success."""
    with pytest.raises(
        TypeError, match=r"ids must be a list of passage ids, got the str 'doc-001': pass \['doc-001'\]"
    ):
        remove(store, "doc-001", missing_ok=True)


def _searchable(path, value: int, ids: list[str]) -> None:
    """Set rows' ``searchable`` as a query-time cache (0) or an ingested passage (1) has it,
    sealed (``searchable_checksum``) as a writer seals it."""
    db = sqlite3.connect(path / "catalogue.sqlite")
    with db:
        db.executemany(
            "UPDATE passages SET searchable = ?, searchable_checksum = ? WHERE id = ?",
            [(value, searchable_checksum(pid, value), pid) for pid in ids],
        )
    db.close()


def _seals(path) -> dict[str, str | None]:
    with sqlite3.connect(path / "catalogue.sqlite") as db:
        return dict(db.execute("SELECT id, searchable_checksum FROM passages"))


SEARCHABLE_FLAG_DAMAGED = "does not match its searchable_checksum"


@pytest.mark.parametrize("flip", ["hides-an-indexed-passage", "retrieves-a-query-time-cache"])
def test_a_flipped_searchable_flag_fails_verify(store, flip):
    """``searchable`` lay outside every checksum: a flipped flag hid an indexed passage from
    retrieval, or retrieved a query-time cache, and ``verify`` passed the store, counting the
    hidden passage as a query-time cache. The flag is sealed now, and the damage named."""
    if flip == "retrieves-a-query-time-cache":
        _searchable(store, 0, ["doc-004"])
    flipped = 0 if flip == "hides-an-indexed-passage" else 1
    with sqlite3.connect(store / "catalogue.sqlite") as db:
        db.execute("UPDATE passages SET searchable = ? WHERE id = 'doc-004'", (flipped,))
    report = verify_store(store)
    assert [(p.kind, p.passage_id) for p in report.problems] == [("catalogue", "doc-004")]
    assert SEARCHABLE_FLAG_DAMAGED in report.problems[0].message
    assert f"searchable flag ({flipped})" in str(report.problems[0])


def test_a_seal_copied_from_another_row_fails_verify(store):
    """The seal covers the row's id, not only its flag: without it a query-time row's seal, copied
    onto an indexed passage with its flag, sealed that passage out of retrieval unnoticed."""
    _searchable(store, 0, ["doc-003"])
    with sqlite3.connect(store / "catalogue.sqlite") as db:
        db.execute(
            "UPDATE passages SET searchable = 0, searchable_checksum = ? WHERE id = 'doc-004'",
            (_seals(store)["doc-003"],),
        )
    report = verify_store(store)
    assert [(p.kind, p.passage_id) for p in report.problems] == [("catalogue", "doc-004")]
    assert SEARCHABLE_FLAG_DAMAGED in report.problems[0].message


def test_the_catalogues_row_checksums_keep_their_format():
    """Golden values: every committed row carries these checksums, so a change to what they cover
    or how it is serialised makes every existing store fail ``verify``; without this such a change
    passed every test (they seal and check with the same function). Changing one needs a
    migration, and these values with it."""
    import struct

    from ragcompress.store.catalogue import meta_checksum

    assert searchable_checksum("doc-004", 0) == "15512e93570d36d0bb8aa783089c8375"
    assert searchable_checksum("doc-004", 1) == "afa7cf3fbc8df2800383bfe938b7fa4e"
    embedding = struct.pack("<2f", 0.5, -1.0)
    assert meta_checksum("doc-004", "T4", '{"lang": "en"}', "a" * 64, embedding) == "4ee5b6299145024bd9ebb921b7f6c98b"


def test_make_searchable_seals_the_flag_it_flips_and_compaction_keeps_the_seals(store):
    _searchable(store, 0, ["doc-004", "doc-009"])
    with StoreWriter(store) as writer:
        assert writer.make_searchable(["doc-004", "doc-005", "doc-004"]) == 1
        writer.write_index()
    assert _seals(store)["doc-004"] == searchable_checksum("doc-004", 1)
    assert _assert_readable(store) == N_PASSAGES - 1  # doc-009 stays a query-time cache
    seals = _seals(store)
    compact_store(store)
    assert _seals(store) == seals and verify_store(store).ok


def test_a_catalogue_from_before_the_searchable_checksum_verifies_and_a_writer_seals_new_flags(
    tiny_lm, store, tmp_path
):
    """Rows committed before the column hold no seal: their flag is not checked (nor sealed after
    the fact); the store opens and verifies, and a writer adds the column for the rows it writes."""
    _searchable(store, 0, ["doc-004", "doc-009"])
    with sqlite3.connect(store / "catalogue.sqlite") as db:
        db.execute("ALTER TABLE passages DROP COLUMN searchable_checksum")  # as stores were built before it
    assert _assert_readable(store) == N_PASSAGES - 2
    records = [*_texts(N_PASSAGES)[:9], {"id": "doc-new", "text": "A passage about lanterns.", "title": "New"}]
    _index(tiny_lm, _write(tmp_path / "more.jsonl", records), store)  # ingests doc-004, not doc-009
    seals = _seals(store)
    assert {pid for pid, seal in seals.items() if seal is not None} == {"doc-004", "doc-new"}
    assert _assert_readable(store) == N_PASSAGES
    with sqlite3.connect(store / "catalogue.sqlite") as db:
        db.execute("UPDATE passages SET searchable = 0 WHERE id IN ('doc-new', 'doc-001')")
    assert {p.passage_id for p in verify_store(store).problems} == {"doc-new"}  # doc-001 has no seal


def test_a_query_time_row_is_kept_out_of_retrieval_through_compaction_until_indexed(tiny_lm, store, tmp_path):
    """Rows a query cached (LlamaIndex's compute_missing) are never retrieved; ``compact`` keeps
    them so, and indexing the same passage makes it searchable without encoding it again."""
    _searchable(store, 0, ["doc-004"])
    text = _texts(N_PASSAGES)[4]["text"]
    with KVStore.open(store) as kv:
        assert len(kv) == N_PASSAGES - 1 and kv.entry("doc-004") is not None  # readable by id
        assert "doc-004" not in [entry.id for entry, _ in kv.search(_vector(text), N_PASSAGES)]
    report = verify_store(store)
    assert report.ok and any("1 passages are caches computed at query time" in n for n in report.notes)
    compact_store(store)
    with KVStore.open(store) as kv:
        assert len(kv) == N_PASSAGES - 1
    report = _index(tiny_lm, tmp_path / "passages.jsonl", store)
    assert report.indexed == 0 and report.skipped == N_PASSAGES
    with KVStore.open(store) as kv:
        assert len(kv) == N_PASSAGES and _top(kv, text) == "doc-004"
    assert verify_store(store).ok and not any("query time" in n for n in verify_store(store).notes)


def test_a_catalogue_from_before_the_searchable_column_reads_every_row_as_searchable(store):
    db = sqlite3.connect(store / "catalogue.sqlite")
    db.execute("ALTER TABLE passages DROP COLUMN searchable")
    db.commit()
    db.close()
    with KVStore.open(store) as kv:
        assert len(kv) == N_PASSAGES
    assert verify_store(store).ok
    remove(store, ["doc-001"])  # a writer adds the column, every row searchable
    with KVStore.open(store) as kv:
        assert len(kv) == N_PASSAGES - 1


def test_a_reader_open_before_a_writer_adds_the_searchable_column_sees_it(store):
    """A reader that opened an older catalogue (no ``searchable`` column) reads the column once a
    writer in another connection adds it and marks a query-time row: it is not retrieved."""
    db = sqlite3.connect(store / "catalogue.sqlite")
    db.execute("ALTER TABLE passages DROP COLUMN searchable")
    db.commit()
    db.close()
    text = _texts(N_PASSAGES)[4]["text"]
    with KVStore.open(store) as kv:
        assert len(kv) == N_PASSAGES
        remove(store, [])  # a writer opens it: the column is added, every row searchable
        _searchable(store, 0, ["doc-004"])  # then a query-time cache
        assert len(kv) == N_PASSAGES - 1
        assert "doc-004" not in [entry.id for entry, _ in kv.search(_vector(text), N_PASSAGES)]


def test_a_search_compares_the_generation_of_the_index_it_searched(tiny_lm, store, tmp_path, monkeypatch):
    """Threads sharing a store (the LlamaIndex retriever's async calls) rebuild its index in turn.
    A search that had searched the old index compared the *store's* latest generation, which
    another thread's rebuild had moved on, so the removed last passage's row number, reused by a
    new passage, came back as that passage with the removed one's score."""
    import threading

    from ragcompress.retrieval import VectorIndex

    last = _rows(store)[-1]
    newcomer = {"id": "doc-new", "text": "A passage about harbours, written later.", "title": "N"}
    with KVStore.open(store) as kv:
        query = _vector(last[3])
        kv.index()  # this thread holds the index of the store as built
        original = VectorIndex.search
        fired: list[bool] = []

        def search(self, vector, k):
            hits = original(self, vector, k)
            if not fired:  # between this thread's FAISS search and its catalogue read:
                fired.append(True)
                assert remove(store, [last[1]]) == 1  # a writer removes the last passage,
                _index(tiny_lm, _write(tmp_path / "new.jsonl", [newcomer]), store)  # reuses its row,
                other = threading.Thread(target=lambda: kv.search(query, 1))  # another thread rebuilds
                other.start()
                other.join()
            return hits

        monkeypatch.setattr(VectorIndex, "search", search)
        hits = kv.search(query, 1)
    assert _rows(store)[-1][:2] == (last[0], "doc-new")  # the removed row's number was reused
    assert [entry.id for entry, _ in hits] != ["doc-new"]
    assert last[1] not in {entry.id for entry, _ in hits}


def test_a_store_swapped_in_during_a_search_is_not_searched_through_the_old_catalogue(tiny_lm, store, tmp_path):
    """``index --overwrite`` landing between a search's check for a swapped-in store and its
    read of ``index.faiss``: the new store (as many rows, the same generation) had its index's row
    numbers resolved through the reader's old catalogue, so the search answered the old passages
    that held those row numbers, with the new passages' scores. The reader now builds its index
    from its own catalogue for that search and follows the new store at the next."""
    renamed = [{**r, "id": r["id"].replace("doc", "new"), "text": f"Other {r['text']}"} for r in _texts(N_PASSAGES)]
    corpus = _write(tmp_path / "other.jsonl", list(reversed(renamed)))  # the same rows, numbered backwards
    query = _vector(_texts(N_PASSAGES)[5]["text"])
    with KVStore.open(store) as reader:
        before = [(e.id, round(score, 5)) for e, score in reader.search(query, 3)]
        reader._indexed = None  # as a reader that has not searched yet (or whose index went stale)
        follow = reader.follow_replacement

        def follow_then_swap() -> bool:
            followed = follow()
            reader.follow_replacement = follow  # type: ignore[method-assign]
            _index(tiny_lm, corpus, store, overwrite=True)
            return followed

        reader.follow_replacement = follow_then_swap  # type: ignore[method-assign]
        during = [(e.id, round(score, 5)) for e, score in reader.search(query, 3)]
        after = [e.id for e, _ in reader.search(query, 3)]
    assert before[0][0] == "doc-005"
    assert during == before
    assert all(pid.startswith("new-") for pid in after)


def test_a_killed_compactions_copy_is_named_by_verify_and_removed_by_the_next_index(store, tiny_lm, tmp_path):
    """A killed ``compact`` left ``.NAME.compact`` (a copy of up to all live shard bytes) that
    only another compact removed: ``verify`` said OK without naming it, and ``index`` kept it.
    ``index`` now deletes it when it can take the store's writer lock (never a running
    compaction's, which holds the lock), and ``verify`` notes it with its size."""
    from ragcompress.store.files import remove_litter
    from ragcompress.store.writer import StoreLock

    copy = store.parent / f".{store.name}.compact"
    shutil.copytree(store, copy)  # what a compaction killed before its swap leaves
    report = verify_store(store)
    assert report.ok and any(str(copy) in note and "MB" in note for note in report.notes)
    lock = StoreLock(store)  # a compaction running now holds the lock: its copy is its work
    try:
        assert remove_litter(store) == [] and copy.is_dir()
    finally:
        lock.release()
    _index(tiny_lm, _write(tmp_path / "passages.jsonl", _texts(N_PASSAGES)), store)
    assert not copy.exists()
    assert not any(str(copy) in note for note in verify_store(store).notes)


# Four threads search one reader while the main thread swaps copies of the store into its path
# (the reader follows each) and then closes the reader, ROUNDS times. Prints each error a search
# raised other than the "was closed" of a search after the close began, and searches that did not
# stop after the close.
_SEARCH_WHILE_SWAPPED_AND_CLOSED = """
import shutil, sys, threading
from pathlib import Path
from ragcompress.errors import StoreError
from ragcompress.store import KVStore
from ragcompress.store.files import replace_store

path, rounds = Path(sys.argv[1]), int(sys.argv[2])
unexpected = []
for _ in range(rounds):
    store = KVStore.open(path)
    vector = store.catalogue.embeddings()[1][0]
    started, closing = threading.Barrier(5), threading.Event()

    def search():
        started.wait()
        try:
            while True:
                store.search(vector, 3)
        except StoreError as exc:
            if not closing.is_set() or "was closed" not in str(exc):
                unexpected.append(str(exc))
        except Exception as exc:
            unexpected.append(repr(exc))

    threads = [threading.Thread(target=search, daemon=True) for _ in range(4)]
    for thread in threads:
        thread.start()
    started.wait()
    for _ in range(2):
        copy = path.with_name("copy")
        shutil.copytree(path, copy)
        replace_store(copy, path)
        store.search(vector, 3)  # follows the copy while the threads search
    closing.set()
    store.close()
    for thread in threads:
        thread.join(timeout=60)
    if any(thread.is_alive() for thread in threads):
        unexpected.append("searches went on after close()")
        break
print("unexpected:", unexpected)
"""


def test_searches_on_other_threads_survive_the_reader_following_a_swap_and_closing(store):
    """Threads sharing a reader (an Engine answering from a thread pool, a LlamaIndex component
    closed while a cancelled ``aquery`` still ran in its worker thread) while ``compact`` swapped
    the store in or the reader was closed: closing the catalogue's sqlite3 connection while
    another thread's statement ran crashed the process (SIGSEGV), and a search that overlapped a
    swap failed with "store ... was closed". Run in a subprocess, so a crash fails the test."""
    ran = subprocess.run(
        [sys.executable, "-X", "faulthandler", "-c", _SEARCH_WHILE_SWAPPED_AND_CLOSED, str(store), "30"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert ran.returncode == 0, ran.stderr[-3000:]
    assert ran.stdout.strip() == "unexpected: []", ran.stdout[-3000:]


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="open files are counted in /proc/self/fd")
def test_a_reader_that_follows_a_swap_closes_the_old_catalogue_when_no_search_uses_it(store, tmp_path):
    """Following a swapped-in store no longer closes the old catalogue under the searches of other
    threads; it closes when the last of them lets go, not at a garbage collection (a sqlite3
    connection is in a reference cycle), so a server that follows many compactions holds the
    files of one catalogue, not of every store it ever followed."""

    def open_catalogue_files() -> int:
        return sum("catalogue.sqlite" in os.readlink(fd) for fd in Path("/proc/self/fd").iterdir() if fd.exists())

    gc.disable()  # what a collection would close must already be closed
    try:
        with KVStore.open(store) as reader:
            vector = _vector("anything")
            reader.search(vector, 3)
            before = open_catalogue_files()
            for _ in range(3):
                shutil.copytree(store, tmp_path / "copy")
                replace_store(tmp_path / "copy", store)
                reader.search(vector, 3)
            assert open_catalogue_files() == before
    finally:
        gc.enable()


def test_a_catalogue_that_fails_to_open_leaves_no_connection_open(tmp_path):
    """A catalogue refused by its schema check (a newer ragcompress's, or damage) kept its
    connection open until the cycle collector ran: a server opening many such stores ran out of
    file descriptors. The failed constructor's catalogue now closes it as it is dropped."""
    import os
    import sqlite3

    from ragcompress.errors import StoreError
    from ragcompress.store.catalogue import CATALOGUE, Catalogue

    path = tmp_path / CATALOGUE
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE passages (id TEXT, other BLOB)")
    db.close()

    def open_catalogue_files():
        return [fd for fd in os.listdir("/proc/self/fd") if os.path.realpath(f"/proc/self/fd/{fd}") == str(path)]

    assert open_catalogue_files() == []
    with pytest.raises(StoreError, match="catalogue"):
        Catalogue(tmp_path, readonly=True)
    assert open_catalogue_files() == []
