"""A store's durability where processes meet it: the writer lock across a swapped-in store, the
unfinished-run marker through compaction and failures, stores reached through a symlink, a
damaged catalogue schema, a full disk. Each test is named after the bug it pins."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from test_store_reliability import CONFIG, N_PASSAGES, _index, _rows, _stop_after_two_batches, _texts, _write

from ragcompress.errors import StoreError
from ragcompress.indexing import index, remove
from ragcompress.store.compact import compact_store
from ragcompress.store.files import refuse_unfinished, unfinished_run
from ragcompress.store.verify import verify_store
from ragcompress.store.writer import StoreLock, StoreWriter


@pytest.fixture(scope="module")
def stopped_run(tmp_path_factory, tiny_lm):
    """A store whose indexing run failed midway in this (still running) process."""
    store = tmp_path_factory.mktemp("stopped") / "store"
    corpus = _write(store.parent / "passages.jsonl", _texts(N_PASSAGES))
    _stop_after_two_batches(tiny_lm, corpus, store, batch_size=4)
    assert 0 < len(_rows(store)) < N_PASSAGES
    return store


@pytest.fixture
def stopped(stopped_run, tmp_path):
    copy = tmp_path / "stopped"
    shutil.copytree(stopped_run, copy)
    return copy


def test_a_writer_waiting_on_a_store_that_compaction_swaps_locks_the_new_store(store, monkeypatch):
    """A writer that opened ``DIR/lock`` before ``compact`` swapped the store got its ``flock``
    once compaction released the old store's lock: a lock on a deleted file, so a second writer
    locked the new store beside it (two writers at once)."""
    import ragcompress.store.compact as compact
    import ragcompress.store.writer as writer

    polling = threading.Event()
    real_sleep = writer.time.sleep

    class Clock:  # the waiting writer's clock: says when it polls the lock
        monotonic = staticmethod(writer.time.monotonic)

        @staticmethod
        def sleep(seconds: float) -> None:
            polling.set()
            real_sleep(seconds)

    monkeypatch.setattr(writer, "time", Clock)
    waiting: dict[str, StoreLock] = {}
    thread = threading.Thread(target=lambda: waiting.setdefault("lock", StoreLock(store, wait_s=30)))
    real_replace = compact.replace_store

    def replace_store(built, path):  # compaction holds the old store's lock here
        thread.start()
        assert polling.wait(30)
        real_replace(built, path)

    monkeypatch.setattr(compact, "replace_store", replace_store)
    compact_store(store)
    thread.join(30)
    assert "lock" in waiting
    try:
        with pytest.raises(StoreError, match="being written by"):
            StoreWriter(store)
    finally:
        waiting["lock"].release()
    StoreWriter(store).close()


def test_compacting_a_store_whose_run_stopped_keeps_it_refused_for_answering(stopped):
    """Compaction copied the prefix, basis and manifest but not the unfinished-run marker, so a
    half-indexed store became answerable, missing the rest of its input without a word."""
    compact_store(stopped)
    assert "stopped before its end" in unfinished_run(stopped)
    with pytest.raises(StoreError, match="stopped before its end"):
        refuse_unfinished(stopped)


def test_a_run_that_failed_in_a_process_that_goes_on_is_unfinished_for_other_processes(stopped):
    """A run that failed in a notebook or a service left its live pid in the marker, which every
    other process read as a run still going: they answered from the partial store."""
    code = "import sys; from pathlib import Path; from ragcompress.store.files import unfinished_run; "
    code += "print(unfinished_run(Path(sys.argv[1])))"
    seen = subprocess.run([sys.executable, "-c", code, str(stopped)], capture_output=True, text=True, check=True)
    assert "stopped before its end" in seen.stdout
    assert "stopped before its end" in unfinished_run(stopped)


@pytest.mark.skipif(not Path("/proc/self/stat").is_file(), reason="process start times are read from /proc")
def test_a_marker_whose_pid_was_reused_reads_as_a_stopped_run(stopped):
    """A marker's pid alone named any later process that reused it (or pid 1, alive in every
    container), so a killed run's store read as still being indexed, and was answered from."""
    from ragcompress.store.files import RUN

    def start_time(pid: int) -> int:  # /proc/PID/stat field 22, ticks since boot
        stat = Path(f"/proc/{pid}/stat").read_text()
        return int(stat[stat.rindex(")") + 2 :].split()[19])

    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        for pid in (alive.pid, 1):
            record = {"pid": pid, "pid_start": start_time(pid), "passages": N_PASSAGES, "started": time.time()}
            (stopped / RUN).write_text(json.dumps(record))
            assert unfinished_run(stopped) is None  # that very process: a run still going
            (stopped / RUN).write_text(json.dumps({**record, "pid_start": record["pid_start"] + 1}))
            assert "stopped before its end" in unfinished_run(stopped)  # another process under that pid
    finally:
        alive.kill()
        alive.wait()


@pytest.mark.parametrize("refused", [True, False])
def test_a_run_stopped_by_what_it_refused_is_not_told_to_run_again_as_it_was(tmp_path, refused):
    """A run that an ``InputError`` stopped (a passage whose cache overflowed: ``codec.encode``
    refuses it) was noted as any stopped run: "re-run `ragcompress index` with the same input",
    which stops at the same passage again. Its note names the refusal and says to change what it
    names; a run stopped otherwise (killed, a failing disk) is still told to re-run as it was."""
    from ragcompress.errors import UnstorableCacheError
    from ragcompress.store.files import finish_index, indexing_run

    message = "passage 'b': the cache holds inf or NaN (keys of layer 0): ...; or leave the passage out of the input"
    failure = UnstorableCacheError(message) if refused else OSError("disk failed")
    with pytest.raises(type(failure)), indexing_run(tmp_path, 3):
        raise failure
    note = unfinished_run(tmp_path)
    assert note.startswith("the indexing run started on ") and "stopped before its end" in note
    if refused:
        assert note.endswith(
            f"the store holds only part of an input of 3 passages. It refused {message}; the same input and settings "
            "stop there again: make that change, then index into this store again"
        )
    else:
        assert note.endswith(f"the store holds only part of an input of 3 passages; to finish it, {finish_index()}")


def test_cli_verify_exits_2_on_an_intact_store_whose_run_stopped(stopped):
    """``verify`` exited 0 on a store whose indexing run stopped midway, which every answering
    command refuses: a script checking the store before serving it went ahead."""
    from typer.testing import CliRunner

    from ragcompress.cli import app

    result = CliRunner().invoke(app, ["verify", "--store", str(stopped)])
    assert result.exit_code == 2, result.output
    assert result.stdout.startswith(f"UNFINISHED: {stopped}: ") and "note: the indexing run started" in result.stdout
    assert result.stderr.strip().splitlines() == [
        f"error: store {stopped} is intact but not answerable: {unfinished_run(stopped)}"
    ]
    report = json.loads(CliRunner().invoke(app, ["verify", "--store", str(stopped), "--json"]).stdout)
    assert (report["ok"], report["answerable"]) == (True, False)


def test_compact_and_overwrite_of_a_store_reached_through_a_symlink_keep_the_link(tiny_lm, store, tmp_path):
    """The swap renamed the symbolic link itself: the link became the new store, the old store's
    bytes stayed where it pointed, a `.NAME.compact` link stayed behind, and the next compaction
    failed with a raw FileExistsError."""
    link = tmp_path / "link"
    link.symlink_to(store)
    remove(link, ["doc-003", "doc-007"])
    before = sum(p.stat().st_size for p in (store / "shards").iterdir())
    for _ in range(2):  # the second finds nothing left behind by the first
        report = compact_store(link)
        assert report.passages == N_PASSAGES - 2 and report.store == str(link)
        assert link.is_symlink() and link.resolve() == store
        assert sum(p.stat().st_size for p in (store / "shards").iterdir()) < before
        assert sorted(p.name for p in tmp_path.iterdir()) == ["link", "store"]
    _index(tiny_lm, _write(tmp_path / "all.jsonl", _texts(N_PASSAGES)), link, overwrite=True)
    assert link.is_symlink() and link.resolve() == store
    assert sorted(p.name for p in tmp_path.iterdir()) == ["all.jsonl", "link", "store"]
    assert len(_rows(store)) == N_PASSAGES and verify_store(link).answerable


def test_a_flipped_bit_in_the_catalogue_schema_is_a_store_error_and_a_verify_problem(store):
    """``row INTEGER PRIMARY KEY`` -> ``INTEGER PRIMARY0KEY`` passes SQLite's integrity_check:
    every row's number read as NULL, search returned nothing, and verify raised TypeError."""
    from typer.testing import CliRunner

    from ragcompress.cli import app
    from ragcompress.store import KVStore

    path = store / "catalogue.sqlite"
    data = path.read_bytes()
    assert data.count(b"INTEGER PRIMARY KEY") == 1
    path.write_bytes(data.replace(b"INTEGER PRIMARY KEY", b"INTEGER PRIMARY0KEY"))
    with pytest.raises(StoreError, match=f"catalogue {path} has a damaged schema .*row is not the primary key"):
        KVStore.open(store)
    with pytest.raises(StoreError, match="damaged schema"):
        StoreWriter(store)
    report = verify_store(store)
    assert [p.kind for p in report.problems] == ["catalogue"] and "damaged schema" in report.problems[0].message
    assert "--overwrite" in report.remedy()
    assert CliRunner().invoke(app, ["verify", "--store", str(store)]).exit_code == 1


def test_a_column_added_by_a_newer_version_is_named_as_such_not_as_damage_to_rebuild(store):
    """Each version adds its later columns to an older catalogue; the one before it read a column
    it did not know as a damaged schema and told the user to rebuild the store with --overwrite
    (the audit's 478cc11 on a store a later version had written to). A renamed column of ours
    (a flipped bit: one of ours then missing) is still damage."""
    import sqlite3
    from contextlib import closing

    from ragcompress.errors import StoreMismatchError
    from ragcompress.store import KVStore

    path = store / "catalogue.sqlite"
    with closing(sqlite3.connect(path)) as db:
        db.execute("ALTER TABLE passages ADD COLUMN from_a_newer_version TEXT")
        db.commit()
    for open_it in (KVStore.open, StoreWriter):
        with pytest.raises(StoreMismatchError, match="newer ragcompress; upgrade") as refused:
            open_it(store)
        assert "--overwrite" not in str(refused.value)
    with closing(sqlite3.connect(path)) as db:
        db.execute("ALTER TABLE passages RENAME COLUMN searchable_checksum TO searchable_checksun")
        db.commit()
    with pytest.raises(StoreError, match="damaged schema") as refused:
        KVStore.open(store)
    assert not isinstance(refused.value, StoreMismatchError)


def test_a_write_to_a_store_from_before_build_sha256_adds_no_such_field(store):
    """A manifest without ``build_sha256`` (stores created before the field) gained
    ``"build_sha256": ""`` on the next write, which the version that built the store refuses
    as an unknown field."""
    from ragcompress.store import Manifest

    manifest_path = store / "manifest.json"
    data = json.loads(manifest_path.read_text())
    del data["build_sha256"]
    manifest = Manifest.from_json(json.dumps(data), manifest_path)
    assert manifest.build_sha256 == "" and "build_sha256" not in json.loads(manifest.to_json())
    assert json.loads(manifest.sealed().to_json())["build_sha256"] == manifest.sealed().build_sha256 != ""


def test_verify_names_an_unforeseen_failure_of_its_catalogue_checks_as_a_problem(store, monkeypatch):
    """verify_store promises never to raise for a damaged store; an exception no check foresaw
    (the damaged schema above raised TypeError) escaped it as a traceback."""
    import ragcompress.store.verify as verify

    def damaged(*args, **kwargs):
        raise TypeError("'<' not supported between instances of 'NoneType' and 'int'")

    monkeypatch.setattr(verify, "_check_overlaps", damaged)
    report = verify_store(store)
    assert [str(p) for p in report.problems] == [
        "[catalogue] cannot be checked (TypeError: '<' not supported between instances of 'NoneType' and 'int')"
    ]


def test_an_os_error_in_a_store_command_is_one_line_saying_the_store_is_intact(store, monkeypatch, capfd):
    """A full disk (or an I/O error, a name too long) during `compact`, `index` or `remove`
    printed a raw traceback: only RagCompressError was turned into one line."""
    import errno

    from test_cli import run_cli

    from ragcompress.cli.root import os_error_line

    rows = _rows(store)

    def full(fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    with monkeypatch.context() as patched:
        patched.setattr("os.fsync", full)
        code, out, err = run_cli(["compact", "--store", str(store)], monkeypatch, capfd)
    assert (code, out) == (1, "")
    assert err.splitlines() == [
        "error: No space left on device; the store is intact (it is as it was; run it again after freeing disk space)"
    ]
    assert _rows(store) == rows and verify_store(store).answerable
    gone = OSError(errno.ENAMETOOLONG, "File name too long", str(store / ("x" * 300)))
    assert os_error_line(gone, "ask") == f"{gone.filename}: File name too long"


def test_a_full_disk_under_the_catalogue_says_so_not_that_the_store_is_damaged(tiny_lm, store, tmp_path, monkeypatch):
    """SQLite's "database or disk is full" was reported as a catalogue that cannot be read, with
    the remedy "run verify or rebuild the store", for a store that is intact and resumes."""
    from ragcompress.store import catalogue

    opened = catalogue.Catalogue.__init__

    def capped(self, root, *, readonly):  # the file cannot grow: SQLITE_FULL at the next page
        opened(self, root, readonly=readonly)
        if not readonly:
            pages = self.db.execute("PRAGMA page_count").fetchone()[0]
            self.db.execute(f"PRAGMA max_page_count = {pages}")

    more = _write(tmp_path / "more.jsonl", _texts(N_PASSAGES + 40))
    rows = _rows(store)
    with monkeypatch.context() as patched:
        patched.setattr(catalogue.Catalogue, "__init__", capped)
        with pytest.raises(StoreError) as full:
            _index(tiny_lm, more, store)
    message = str(full.value)
    assert "the disk is full" in message and "free disk space" in message and "resumes" in message
    assert "verify" not in message and "rebuild" not in message
    assert _rows(store)[: len(rows)] == rows and verify_store(store).ok  # intact, batches committed whole
    _index(tiny_lm, more, store)
    assert len(_rows(store)) == N_PASSAGES + 40


def test_a_catalogue_that_silently_lost_rows_stops_the_writer_cutting_their_blobs(store):
    """A damaged page of the catalogue can drop rows from every query without an error (SQLite's
    integrity_check finds it, queries do not): the next writer took the dropped rows' blobs for a
    killed run's tail and truncated them off the shard, real passages lost."""
    import sqlite3

    path = store / "catalogue.sqlite"
    db = sqlite3.connect(path)
    size = db.execute("PRAGMA page_size").fetchone()[0]
    page = db.execute("SELECT rootpage FROM sqlite_master WHERE name = 'passages'").fetchone()[0]
    db.close()
    data = bytearray(path.read_bytes())
    while data[(page - 1) * size] == 0x05:  # an interior page: down its right-most child
        page = int.from_bytes(data[(page - 1) * size + 8 : (page - 1) * size + 12], "big")
    header = (page - 1) * size  # the last leaf of the table, holding the last rows
    assert data[header] == 0x0D
    cells = int.from_bytes(data[header + 3 : header + 5], "big")
    data[header + 3 : header + 5] = (cells - 1).to_bytes(2, "big")  # its last row is gone, without an error
    path.write_bytes(bytes(data))
    assert 0 < len(_rows(store)) < N_PASSAGES
    shards = {p.name: p.read_bytes() for p in (store / "shards").iterdir()}
    with pytest.raises(StoreError, match="fails SQLite's quick_check .* the store is damaged and no writer") as refused:
        StoreWriter(store)
    assert "\n" not in str(refused.value)
    assert {p.name: p.read_bytes() for p in (store / "shards").iterdir()} == shards


def test_a_store_path_that_cannot_be_created_is_refused_before_the_model_loads(tmp_path, monkeypatch):
    """``index --store FILE/sub`` loaded the model (about 20 s) and then failed with a
    FileExistsError traceback; a read-only parent the same with PermissionError."""
    import os

    import ragcompress.indexing.run as run

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the store path was checked")

    monkeypatch.setattr(run, "run_indexer", no_model)
    corpus = _write(tmp_path / "passages.jsonl", _texts(2))
    (tmp_path / "afile").write_text("")
    with pytest.raises(StoreError, match=r"cannot create store .*afile/sub/store: .*afile is a file"):
        index(corpus, tmp_path / "afile" / "sub" / "store", config=CONFIG)
    monkeypatch.setattr(os, "access", lambda path, mode: Path(path) != tmp_path / "locked")
    (tmp_path / "locked").mkdir()
    with pytest.raises(StoreError, match=r"locked is not writable by this user"):
        index(corpus, tmp_path / "locked" / "store", config=CONFIG)
