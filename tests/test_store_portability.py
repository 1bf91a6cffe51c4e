"""A store used where it was not written: a read-only place (a read-only mount or image, a folder
of another user), files another user's process created, a umask that shares what is created.
Each test is named after the bug it pins.

Root ignores permission bits and a read-only mount needs privileges, so a reader in a read-only
place is SQLite's own ``readonly_shm`` URI parameter here (:func:`read_only_place`): SQLite then
opens ``catalogue.sqlite-shm`` for reading only and creates neither it nor ``-wal``, which is what
a folder it cannot write means to it (seen the same under ``chmod -R a-w`` as another uid and under
a read-only bind mount)."""

from __future__ import annotations

import os
import shutil
import sqlite3
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from test_store_reliability import N_PASSAGES, REPO, _index, _texts, _write

from ragcompress.errors import StoreAccessError, StoreError
from ragcompress.indexing import remove
from ragcompress.store import KVStore
from ragcompress.store.catalogue import CATALOGUE
from ragcompress.store.compact import compact_store
from ragcompress.store.files import unfinished_run
from ragcompress.store.verify import verify_store
from ragcompress.store.writer import StoreLock, StoreWriter

from conftest import as_another_uid


@pytest.fixture
def read_only_place(monkeypatch):
    """Every read-only SQLite connection this process opens cannot create or write the catalogue's
    ``-wal`` and ``-shm``, as in a place it cannot write (module docstring)."""
    connect = sqlite3.connect

    def connect_read_only(database, *args, uri=False, **kwargs):
        if uri and "mode=ro" in str(database):
            database = f"{database}&readonly_shm=1"
        return connect(database, *args, uri=uri, **kwargs)

    monkeypatch.setattr(sqlite3, "connect", connect_read_only)


@pytest.mark.parametrize("change", ["index", "remove", "compact"])
def test_a_store_reads_in_a_read_only_place_whatever_writer_wrote_it_last(store, change, request):
    """``remove`` and ``compact`` closed their writer last, and SQLite deleted ``catalogue.sqlite-wal``
    and ``-shm`` with it; a WAL catalogue cannot be opened read-only without them where they cannot
    be created, so such a store made read-only failed ask, eval and verify ("attempt to write a
    readonly database"), and verify called it damaged and advised rebuilding it with --overwrite."""
    expected = N_PASSAGES
    if change == "remove":
        remove(store, ["doc-003"])
        expected -= 1
    elif change == "compact":
        compact_store(store)
    assert {p.name for p in store.glob(f"{CATALOGUE}-*")} == {f"{CATALOGUE}-wal", f"{CATALOGUE}-shm"}
    request.getfixturevalue("read_only_place")  # then the store is made read-only
    with KVStore.open(store) as reader:
        assert len(reader) == expected
        assert reader.entry("doc-005").id == "doc-005"
        StoreLock(store).release()  # read through its WAL, as ever: the reader keeps no writer out
    report = verify_store(store)
    assert report.ok, report.problems
    assert report.passages == expected


def _drop_wal_files(store) -> None:
    """What a writer of an earlier version left after ``remove`` or ``compact``: no ``-wal``/``-shm``."""
    for suffix in ("-wal", "-shm"):
        (store / f"{CATALOGUE}{suffix}").unlink(missing_ok=True)


def test_a_catalogue_left_without_its_wal_files_reads_in_a_read_only_place_and_keeps_writers_out(
    store, read_only_place
):
    """A store an earlier version's ``remove`` or ``compact`` left has no ``-wal``/``-shm``: read
    as an immutable file, which is safe only while no writer can change it, so the reader holds
    the store's lock shared and a writer is refused, naming the reader, until it closes."""
    _drop_wal_files(store)
    with KVStore.open(store) as reader:
        assert len(reader) == N_PASSAGES
        with pytest.raises(StoreError, match="is open read-only by a reader that holds its lock"):
            StoreWriter(store)
    assert verify_store(store).ok
    StoreWriter(store).close()  # the reader's hold went with it


def test_a_catalogue_whose_wal_holds_commits_is_never_read_without_them(store, request):
    """Read as an immutable file, a catalogue whose ``-wal`` still holds commits (its ``-shm``
    lost) would silently miss them: such a one is refused, not read stale, and not called damaged
    (verify raises the access error rather than report a damaged catalogue)."""
    holder = sqlite3.connect(f"file:{store / CATALOGUE}?mode=ro", uri=True)  # keeps the WAL from being checkpointed
    holder.execute("SELECT 1 FROM passages LIMIT 1").fetchall()
    writer = sqlite3.connect(store / CATALOGUE)
    writer.execute("PRAGMA wal_autocheckpoint = 0")
    with writer:
        writer.execute("DELETE FROM passages WHERE id = 'doc-003'")
    writer.close()
    holder.close()
    (store / f"{CATALOGUE}-shm").unlink()
    assert (store / f"{CATALOGUE}-wal").stat().st_size > 0
    request.getfixturevalue("read_only_place")
    with pytest.raises(StoreAccessError, match=r"catalogue.sqlite-wal holds changes not yet in it") as refused:
        KVStore.open(store)
    assert "damaged" not in str(refused.value) and "rebuild" not in str(refused.value)
    with pytest.raises(StoreAccessError, match="holds changes not yet in it"):  # not a verify problem: no damage
        verify_store(store)


@pytest.fixture
def unwritable_wal_files(monkeypatch):
    """Every read-write SQLite connection this process opens can read but not write the
    catalogue's ``-shm``, as a writer whose ``-wal``/``-shm`` another user's reader created (SQLite
    gives them that user, and the catalogue's mode ``0644``); :func:`read_only_place` says why a
    URI parameter stands for permission bits here."""
    connect = sqlite3.connect

    def connect_unwritable(database, *args, uri=False, **kwargs):
        if not uri and Path(database).name == CATALOGUE:
            database, uri = f"{Path(database).resolve().as_uri()}?readonly_shm=1", True
        return connect(database, *args, uri=uri, **kwargs)

    monkeypatch.setattr(sqlite3, "connect", connect_unwritable)


def test_a_writer_that_cannot_write_the_catalogue_fails_before_marking_its_run(store, tiny_lm, unwritable_wal_files):
    """The owner's ``index`` opened a catalogue whose ``-wal``/``-shm`` a reader of another uid had
    created, and failed only at its first commit, after it had written the unfinished-run marker:
    an intact store was left marked unfinished, and ``ask`` refused it for everyone."""
    corpus = _write(store.parent / "more.jsonl", _texts(N_PASSAGES + 4))
    with pytest.raises(StoreAccessError, match=f"cannot write to store {store}") as refused:
        _index(tiny_lm, corpus, store)
    assert str(store / CATALOGUE) in str(refused.value) and "intact" in str(refused.value)
    assert unfinished_run(store) is None
    with pytest.raises(StoreAccessError, match="cannot write to store"):
        remove(store, ["doc-003"])
    assert verify_store(store).answerable


@pytest.mark.skipif(
    os.geteuid() == 0 and shutil.which("setpriv") is None, reason="root needs setpriv to be another uid"
)
def test_a_writer_names_the_catalogue_files_it_cannot_write_and_their_owner(built):
    """A writer that cannot write the catalogue's ``-wal``/``-shm`` (another uid's reader created
    them) names them with their owner in one line, not "cannot be read ...; rebuild the store".
    As root the writer runs as uid 65534 (root writes any file); otherwise the files are made
    read-only (``chmod``)."""
    place = Path(tempfile.mkdtemp())  # under /tmp: another uid can reach it, unlike pytest's tmp_path
    try:
        place.chmod(0o755)
        store = place / "store"
        shutil.copytree(built, store)
        wal_files = [store / f"{CATALOGUE}-wal", store / f"{CATALOGUE}-shm"]
        prefix = as_another_uid()
        if prefix is None:
            for file in wal_files:
                file.chmod(0o444)
            owner = os.geteuid()
        else:  # the store is uid 65534's; its -wal and -shm are a reader's, uid 65533
            for file in [store, *store.rglob("*")]:
                os.chown(file, 65534, 65534)
            for file in wal_files:
                os.chown(file, 65533, 65533)
            owner = 65533
        code = "import sys; from pathlib import Path; from ragcompress.store.writer import StoreLock, StoreWriter; StoreWriter(Path(sys.argv[1]))"
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
        done = subprocess.run(
            [*(prefix or []), sys.executable, "-c", code, str(store)], capture_output=True, text=True, env=env
        )
        assert done.returncode != 0, "the writer opened a catalogue it cannot write"
        line = done.stderr.strip().splitlines()[-1]
        assert "StoreAccessError: cannot write to store" in line, done.stderr
        for file in wal_files:
            assert f"{file.name} (uid {owner})" in line
        assert "intact" in line and "rebuild" not in line
    finally:
        shutil.rmtree(place, ignore_errors=True)


def test_a_store_its_rebuild_and_its_compaction_follow_the_umask(tiny_lm, tmp_path):
    """A new store was built in ``mkdtemp`` (0700 whatever the umask) and its catalogue created by
    SQLite (0644), so no other user or group member could read it (``--store`` "not readable"),
    and ``index --overwrite`` reset a store made 0755 to 0700, while ``compact`` followed the
    umask. Every folder gets 0777 and every file 0666, less the umask."""
    store = tmp_path / "store"
    corpus = _write(tmp_path / "passages.jsonl", _texts(8))
    old = os.umask(0o002)
    try:
        for build in ("create", "overwrite", "compact"):
            if build == "compact":
                compact_store(store)
            else:
                _index(tiny_lm, corpus, store, overwrite=build == "overwrite")
            modes = {str(p.relative_to(store)): stat.S_IMODE(p.stat().st_mode) for p in [store, *store.rglob("*")]}
            folders = {".", "shards"}
            assert {name: mode for name, mode in modes.items() if name in folders} == dict.fromkeys(folders, 0o775)
            assert {name: mode for name, mode in modes.items() if name not in folders} == dict.fromkeys(
                set(modes) - folders, 0o664
            ), build
    finally:
        os.umask(old)


def test_a_store_being_written_whose_catalogue_cannot_be_read_here_meanwhile_is_busy(store, read_only_place):
    """A reader that cannot create the catalogue's ``-wal``/``-shm`` reads it only while it keeps
    writers out; while one holds the store, that is "being written": busy (``StoreBusyError``,
    ``verify`` exit 3, retry later), as a catalogue a writer holds locked is, not exit 1, which
    says damaged."""
    from typer.testing import CliRunner

    from ragcompress.cli import app
    from ragcompress.errors import StoreBusyError

    _drop_wal_files(store)
    writer = StoreLock(store)
    try:
        with pytest.raises(StoreBusyError, match="is being written, and its catalogue cannot be read here meanwhile"):
            verify_store(store)
        result = CliRunner().invoke(app, ["verify", "--store", str(store)])
        assert result.exit_code == 3, result.output
        assert "is busy, not checked" in result.stderr
    finally:
        writer.release()
    assert verify_store(store).ok
