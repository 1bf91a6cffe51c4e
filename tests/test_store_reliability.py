"""Store guarantees (docs/guarantees.md): crash safety, one writer, committed-only reads,
corruption detected and named, safe loading, no path traversal, bounded validation memory.

Kill tests run ``tests/store_worker.py`` in a subprocess that SIGKILLs itself at a chosen point,
then resume in this process and compare with an uninterrupted run byte for byte.
"""

from __future__ import annotations

import ast
import hashlib
import itertools
import json
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
import tracemalloc
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from ragcompress.errors import CorruptSegmentError, InputError, StoreError
from ragcompress.indexing import IndexConfig, index, remove
from ragcompress.indexing.inputs import validate
from ragcompress.kv import PassageKV
from ragcompress.kv.quant import QuantConfig
from ragcompress.runtime.options import AnswerOptions
from ragcompress.store import KVStore, Manifest, StoreWriter, codec
from ragcompress.store.kvstore import INDEX, INDEX_META, PREFIX
from ragcompress.store.verify import verify_store
from ragcompress.testing import point_row_at_appended_blob

sys.path.insert(0, str(Path(__file__).parent))
import store_worker  # noqa: E402
from conftest import FailingAtCall  # noqa: E402

WORKER = Path(__file__).parent / "store_worker.py"
REPO = Path(__file__).resolve().parents[1]
N_PASSAGES = 24
BATCH = 4
CONFIG = IndexConfig(quant="int8", embedder=store_worker.HashEmbedder.name)


def _texts(n: int) -> list[dict]:
    topics = ["rivers", "castles", "comets", "violins", "glaciers", "bridges"]
    return [
        {"id": f"doc-{i:03d}", "text": f"Passage {i} is about {topics[i % 6]}. " * (1 + i % 5), "title": f"T{i}"}
        for i in range(n)
    ]


def _write(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.fixture(autouse=True)
def small_shards(monkeypatch):
    """Shards roll over every few blobs here and in the worker, so kills hit shard boundaries."""
    from ragcompress.store import shards

    monkeypatch.setattr(shards, "MAX_SHARD_BYTES", store_worker.SHARD_BYTES)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return _write(tmp_path_factory.mktemp("corpus") / "passages.jsonl", _texts(N_PASSAGES))


def _index(lm, corpus: Path, store: Path, **kwargs):
    return index(corpus, store, lm=lm, embedder=store_worker.HashEmbedder(), config=CONFIG, batch_size=BATCH, **kwargs)


@pytest.fixture(scope="module")
def clean_store(tmp_path_factory, tiny_lm, corpus) -> Path:
    from ragcompress.store import shards

    saved = shards.MAX_SHARD_BYTES
    shards.MAX_SHARD_BYTES = store_worker.SHARD_BYTES
    try:
        store = tmp_path_factory.mktemp("clean") / "store"
        _index(tiny_lm, corpus, store)
    finally:
        shards.MAX_SHARD_BYTES = saved
    return store


@pytest.fixture
def store_copy(clean_store, tmp_path) -> Path:
    copy = tmp_path / "store"
    shutil.copytree(clean_store, copy)
    return copy


def _rows(store: Path) -> list[tuple]:
    db = sqlite3.connect(f"file:{store / 'catalogue.sqlite'}?mode=ro", uri=True)
    try:
        return db.execute("SELECT * FROM passages ORDER BY row").fetchall()
    finally:
        db.close()


def _shard_bytes(store: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((store / "shards").iterdir())}


def _same_content(store: Path, reference: Path) -> None:
    """Same catalogue rows (every column), same shard files byte for byte, same prefix and index."""
    assert _rows(store) == _rows(reference)
    assert _shard_bytes(store) == _shard_bytes(reference)
    assert (store / PREFIX).read_bytes() == (reference / PREFIX).read_bytes()
    assert (store / INDEX).read_bytes() == (reference / INDEX).read_bytes()
    assert Manifest.read(store) == Manifest.read(reference)  # ``created`` is not compared


def _assert_readable(store: Path) -> int:
    """The store opens, verifies, and every committed passage loads."""
    report = verify_store(store)
    assert report.ok, [str(p) for p in report.problems]
    with KVStore.open(store) as kv:
        for entry in kv.catalogue.entries():
            kv.load_kv(entry)
        return len(kv)


# --- crash safety -------------------------------------------------------------------------------

KILL_POINTS = ["create", "append:1", "append:7", "commit:3", "after:2", "append:18", "index"]


def _worker(model_dir: Path, corpus: Path, store: Path, mode: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, str(WORKER), str(model_dir), str(corpus), str(store), str(BATCH), mode],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
    )


def _forked_index(lm, corpus: Path, store: Path, kill: str) -> int:
    """Run ``index`` in a forked child that SIGKILLs itself at ``kill``; returns its exit code.

    Forking reuses this process's loaded torch and model (a fresh interpreter costs ~10 s of
    imports per kill point); the child is still a separate process killed by a real SIGKILL.
    """
    pid = os.fork()
    if pid == 0:  # child: never returns into pytest
        try:
            torch.set_num_threads(1)  # the parent's OpenMP pool does not survive fork
            store_worker.install(kill)
            _index(lm, corpus, store)
        finally:
            os._exit(3)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.05)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    raise AssertionError(f"forked indexer for kill point {kill!r} hung")


@pytest.mark.parametrize("kill", KILL_POINTS)
def test_sigkill_then_resume_equals_clean_run(kill, tiny_lm, corpus, clean_store, tmp_path):
    """SIGKILL while creating, mid-blob, between fsync and commit, after a commit, across a shard
    rollover and while writing the index: the store opens, verifies, and resumes to the bytes of
    an uninterrupted run."""
    store = tmp_path / "store"
    assert _forked_index(tiny_lm, corpus, store, kill) == -signal.SIGKILL
    if kill == "create":
        assert not store.exists()  # the half-built store is a hidden temp dir, never at the path
    else:
        committed = _assert_readable(store)
        assert committed % BATCH == 0  # batches commit atomically
        assert committed < N_PASSAGES or kill == "index"
    report = _index(tiny_lm, corpus, store)
    assert report.indexed + report.skipped == N_PASSAGES
    _assert_readable(store)
    _same_content(store, clean_store)
    assert not verify_store(store).notes


@pytest.mark.slow
def test_external_sigkill_mid_run_then_resume(tiny_model_dir, tiny_lm, corpus, clean_store, tmp_path):
    """A kill from outside (not a hook) after two committed batches: same guarantees. The worker's
    ``slow`` mode sleeps 0.3 s after each commit, so this kill usually lands in that sleep, between
    batches; ``test_external_sigkill_at_random_instants_then_resume`` kills during the work itself."""
    store = tmp_path / "store"
    proc = _worker(tiny_model_dir("llama"), corpus, store, "slow")
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if (store / "manifest.json").is_file():
                with KVStore.open(store) as reader:
                    if len(reader) >= 2 * BATCH:
                        break
            time.sleep(0.05)
        time.sleep(0.13)  # land somewhere inside the next batch
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    assert 0 < _assert_readable(store) < N_PASSAGES
    _index(tiny_lm, corpus, store)
    _same_content(store, clean_store)


# --- external SIGKILL at random instants ------------------------------------------------------
#
# A fresh interpreter runs ``index`` with phase markers (``store_worker.py --trace``) and no sleeps;
# the test SIGKILLs it from outside at seeded random instants spread over the measured duration of an
# uninterrupted run, plus two gated instants too short to hit by chance (inside a blob's write;
# inside ``--overwrite``'s final swap). Each kill's landing (the innermost phase open when it died)
# is recorded in ``kill_landings.json`` under the test's tmp dir and printed (``-s``).

KILL_SEED = int(os.environ.get("RAGCOMPRESS_KILL_SEED", "9"))
RANDOM_KILLS = 4  # plain runs: one per quarter of the run (stratified)
OVERWRITE_RANDOM_KILLS = 2  # --overwrite runs over an older store


def _traced_worker(model_dir: Path, corpus: Path, store: Path, mode: str, trace: Path, overwrite: bool):
    command = [sys.executable, str(WORKER), str(model_dir), str(corpus), str(store), str(BATCH), mode]
    command += ["--trace", str(trace)] + (["--overwrite"] if overwrite else [])
    with open(trace.with_suffix(".log"), "w") as log:
        return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)


def _trace_events(trace: Path) -> list[tuple[int, str, str, str]]:
    """``(ns, kind, phase, detail)`` per marker line; kind is ``+`` (enter), ``-`` (leave), ``=`` (note)."""
    events = []
    for line in trace.read_text().splitlines() if trace.exists() else []:
        stamp, _, rest = line.partition(" ")
        token, _, detail = rest.partition(" ")
        if stamp.isdigit() and token[:1] in "+-=" and len(token) > 1:
            events.append((int(stamp), token[0], token[1:], detail))
    return events


def _wait_for_marker(trace: Path, proc: subprocess.Popen, kind: str, phase: str, timeout: float = 180) -> int:
    deadline = time.monotonic() + timeout
    while True:
        for stamp, k, name, _ in _trace_events(trace):
            if (k, name) == (kind, phase):
                return stamp
        if proc.poll() is not None:
            log = trace.with_suffix(".log").read_text()[-2000:]
            raise AssertionError(f"worker exited ({proc.returncode}) before {kind}{phase}:\n{log}")
        assert time.monotonic() < deadline, f"no {kind}{phase} marker after {timeout} s"
        time.sleep(0.005)


def _landing(events: list[tuple[int, str, str, str]]) -> tuple[str, str]:
    """Where the process was when it died: the phases still open at the end of its trace
    (innermost last, ``run`` omitted) and the detail of the innermost one (or the last note)."""
    stack: list[tuple[str, str]] = []
    last_left = "start"
    for _, kind, name, detail in events:
        if kind == "+":
            stack.append((name, detail))
        elif kind == "-":
            while stack and stack.pop()[0] != name:
                pass
            last_left = name
        elif stack:
            stack[-1] = (stack[-1][0], detail)
    if not events:
        return "before the run", ""
    if not stack:
        return "finished", ""
    phases = [name for name, _ in stack if name != "run"]
    if not phases:
        return f"between phases (after {last_left})", ""
    return ">".join(phases), stack[-1][1]


def _phase_shares(events: list[tuple[int, str, str, str]]) -> dict[str, float]:
    """Share of an uninterrupted run's time spent with each phase innermost (what a random kill hits)."""
    shares: dict[str, float] = {}
    stack: list[str] = []
    for (stamp, kind, name, _), (following, *_) in zip(events, events[1:], strict=False):
        if kind == "+":
            stack.append(name)
        elif kind == "-":
            while stack and stack.pop() != name:
                pass
        where = stack[-1] if stack and stack[-1] != "run" else "between phases"
        if stack:
            shares[where] = shares.get(where, 0) + following - stamp
    total = sum(shares.values()) or 1
    return {k: round(v / total, 4) for k, v in sorted(shares.items(), key=lambda kv: -kv[1])}


def _uncommitted_bytes(store: Path) -> int:
    """Bytes in shard files past the last committed blob (what a killed write left)."""
    if not (store / "shards").is_dir():  # a kill between creating the store and opening its writer
        return 0
    db = sqlite3.connect(f"file:{store / 'catalogue.sqlite'}?mode=ro", uri=True)
    try:
        ends = dict(db.execute("SELECT shard, MAX(offset + length) FROM passages GROUP BY shard"))
    finally:
        db.close()
    return sum(p.stat().st_size - ends.get(p.name, 0) for p in (store / "shards").iterdir())


def _kill_and_check(
    kind: str, mode: str, offset_ns: int | None, overwrite: bool, ctx: dict, tmp_path: Path, number: int
) -> dict:
    """One worker run killed from outside (at ``offset_ns`` after its ``+run`` marker, or at its
    ``=stopped`` gate), then the guarantees checked and the run resumed; returns the table row."""
    tiny_lm, corpus, clean_store, old_store = ctx["lm"], ctx["corpus"], ctx["clean"], ctx["old"]
    folder = tmp_path / f"kill{number}"
    folder.mkdir()
    store, trace = folder / "store", folder / "trace.txt"
    if overwrite:
        shutil.copytree(old_store, store)
    proc = _traced_worker(ctx["model_dir"], corpus, store, mode, trace, overwrite)
    try:
        start = _wait_for_marker(trace, proc, "+", "run")
        if offset_ns is None:
            _wait_for_marker(trace, proc, "=", "stopped")
        else:
            delay = (start + offset_ns - time.monotonic_ns()) / 1e9
            if delay > 0:
                time.sleep(delay)
        killed_at = time.monotonic_ns()
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait(60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    landed, detail = _landing(_trace_events(trace))
    row = {
        "run": "--overwrite" if overwrite else "plain",
        "kill": "gated" if offset_ns is None else "random",
        "planned_ms": None if offset_ns is None else round(offset_ns / 1e6, 1),
        "killed_at_ms": round((killed_at - start) / 1e6, 1),
        "fraction_of_run": round((killed_at - start) / ctx["duration_ns"], 3),
        "returncode": proc.returncode,
        "landed": landed,
        "detail": detail,
    }
    if proc.returncode != -signal.SIGKILL:  # the process exited before the kill
        assert proc.returncode == 0 and landed == "finished", (row, trace.with_suffix(".log").read_text()[-2000:])
    if landed == "finished":  # the run was over (exiting, or exited) before the kill: a missed sample
        marks = [stamp for stamp, _, name, _ in _trace_events(trace) if name == "run"]
        row["run_ms"] = round((marks[-1] - marks[0]) / 1e6, 1)
    if overwrite:  # the old or the new complete store is at the path, never neither
        assert (store / "manifest.json").is_file(), row
        passages = _assert_readable(store)
        which = "new" if _rows(store) == _rows(clean_store) else "old"
        _same_content(store, clean_store if which == "new" else old_store)
        row["after_kill"] = f"{which} store at path ({passages} passages), verify ok"
    elif (store / "manifest.json").is_file():
        committed = _assert_readable(store)
        assert committed % BATCH == 0, row  # batches commit atomically
        row["after_kill"] = f"opens, verify ok, {committed} committed"
    else:
        assert not store.exists(), row  # a half-created store is a hidden temp dir, never at the path
        row["after_kill"] = "no store at path"
    row["uncommitted_bytes"] = _uncommitted_bytes(store) if store.exists() else 0
    row["litter"] = sorted(p.name for p in folder.iterdir() if p.name not in {"store", "trace.txt", "trace.log"})
    report = _index(tiny_lm, corpus, store, overwrite=overwrite)
    assert report.indexed + report.skipped == N_PASSAGES
    _assert_readable(store)
    _same_content(store, clean_store)
    assert not verify_store(store).notes
    left = sorted(p.name for p in folder.iterdir() if p.name not in {"store", "trace.txt", "trace.log"})
    assert left == [], (row, left)  # the killed process's half-built copies went with the resume
    row["resume"] = "identical to uninterrupted run"
    return row


@pytest.mark.slow
def test_external_sigkill_at_random_instants_then_resume(tiny_model_dir, tiny_lm, corpus, clean_store, tmp_path):
    """SIGKILL from outside at seeded random instants of a fresh interpreter's indexing run (no
    sleeps in the worker), inside a blob's write, and inside ``--overwrite``'s final swap: every
    time the store at the path opens and verifies (for ``--overwrite``: the old or the new complete
    store, never neither), and resuming gives the bytes of an uninterrupted run. Records where
    each kill landed (``benchmarks/report.py`` renders a recorded run in docs/guarantees.md)."""
    import random

    from report import kill_landing_table

    from common import results_meta  # benchmarks/, on pytest's pythonpath

    rng = random.Random(KILL_SEED)
    old_store = tmp_path / "old-store"  # what --overwrite replaces: other passages, other shards
    old_corpus = _write(
        tmp_path / "old.jsonl", [{"id": f"old-{i}", "text": f"An older passage, number {i}."} for i in range(10)]
    )
    _index(tiny_lm, old_corpus, old_store)
    ctx = {
        "lm": tiny_lm,
        "corpus": corpus,
        "clean": clean_store,
        "old": old_store,
        "model_dir": tiny_model_dir("llama"),
    }

    # two uninterrupted traced runs: the faster one's duration spreads the kills (a first run is
    # often slower, and instants past the end of a run are missed), its phases give each one's odds
    calibrations = []
    for attempt in range(2):
        calibration = tmp_path / f"calibration{attempt}"
        calibration.mkdir()
        trace = calibration / "trace.txt"
        proc = _traced_worker(ctx["model_dir"], corpus, calibration / "store", "none", trace, False)
        assert proc.wait(300) == 0, trace.with_suffix(".log").read_text()[-2000:]
        _same_content(calibration / "store", clean_store)  # a fresh interpreter writes the same bytes
        events = _trace_events(trace)
        run_marks = [stamp for stamp, kind, name, _ in events if name == "run"]
        calibrations.append((run_marks[1] - run_marks[0], events))
    ctx["duration_ns"], events = min(calibrations, key=lambda c: c[0])

    # (kind, worker mode, instant as a fraction of the run or None for a gate, --overwrite)
    plan: list[tuple[str, str, float | None, bool]] = []
    for i in range(RANDOM_KILLS):  # stratified: one instant in each quarter of the run
        plan.append(("random", "none", (i + rng.random()) / RANDOM_KILLS * 0.95, False))
    plan.append(("gated", f"stop:blob:{rng.randint(1, N_PASSAGES)}", None, False))
    for i in range(OVERWRITE_RANDOM_KILLS):
        plan.append(("random", "none", (i + rng.random()) / OVERWRITE_RANDOM_KILLS * 0.95, True))
    plan.append(("gated", "stop:swap", None, True))

    rows: list[dict] = []
    record = {
        "meta": results_meta({"model": "tiny random llama (tests/conftest.py)"}),
        "seed": KILL_SEED,
        "passages": N_PASSAGES,
        "batch": BATCH,
        "run_ms": round(ctx["duration_ns"] / 1e6, 1),
        "calibration_runs_ms": [round(c[0] / 1e6, 1) for c in calibrations],
        "phase_shares_of_uninterrupted_run": _phase_shares(events),
        "kills": rows,
    }
    out = tmp_path / "kill_landings.json"
    try:
        for kind, mode, fraction, overwrite in plan:
            offset = None if fraction is None else int(fraction * ctx["duration_ns"])
            rows.append(_kill_and_check(kind, mode, offset, overwrite, ctx, tmp_path, len(rows) + 1))
            if rows[-1]["landed"] == "finished":  # this run was faster than the calibration: retry
                offset = int(fraction * rows[-1]["run_ms"] * 1e6)  # once, scaled to the run just seen
                rows.append(_kill_and_check(kind, mode, offset, overwrite, ctx, tmp_path, len(rows) + 1))
                rows[-1]["retry_of"] = len(rows) - 1
    finally:
        out.write_text(json.dumps(record, indent=2))
        print(
            f"\nseed {KILL_SEED}; uninterrupted runs {record['calibration_runs_ms']} ms; phase shares "
            f"{record['phase_shares_of_uninterrupted_run']}\n{kill_landing_table(rows)}\n({out})"
        )
        if os.environ.get("RAGCOMPRESS_KILL_TABLE"):
            Path(os.environ["RAGCOMPRESS_KILL_TABLE"]).write_text(json.dumps(record, indent=2))
    landed = [r for r in rows if r["kill"] == "random" and r["landed"] != "finished"]
    assert len(landed) >= RANDOM_KILLS + OVERWRITE_RANDOM_KILLS - 2  # at most two missed even after a retry
    gated = [r for r in rows if r["kill"] == "gated"]
    assert [g["landed"] for g in gated] == ["blob-write", "overwrite-swap>cleanup"]
    assert gated[0]["uncommitted_bytes"] > 0  # half a blob was on disk past the last commit
    assert gated[1]["after_kill"].startswith("new store")  # the exchange had happened


def test_writer_repairs_uncommitted_tail_in_rolled_over_shards(store_copy, clean_store):
    shards = sorted((store_copy / "shards").iterdir())
    with open(shards[0], "ab") as handle:
        handle.write(b"garbage from a killed run")
    (store_copy / "shards" / "99999.kvs").write_bytes(b"uncommitted shard")
    report = verify_store(store_copy)
    assert report.ok and len(report.notes) == 2
    StoreWriter(store_copy).close()
    assert _shard_bytes(store_copy) == _shard_bytes(clean_store)


def test_new_folders_are_fsynced_into_their_parents_before_the_first_commit(tiny_lm, tmp_path, monkeypatch):
    """A new store's folder, the folders made above it and its shards/ folder are entries in their
    parents; each parent is fsynced before the first row commits, or a crash on a filesystem that
    does not order metadata could lose a folder that committed rows point into."""
    from ragcompress.store.catalogue import Catalogue

    store = tmp_path / "new" / "deeper" / "store"
    events: list[tuple] = []  # ("fsync", device, inode, shards/ exists) or ("commit",), in order
    real_fsync, real_add = os.fsync, Catalogue.add

    def fsync(fd):
        stat = os.fstat(fd)
        events.append(("fsync", stat.st_dev, stat.st_ino, (store / "shards").is_dir()))
        real_fsync(fd)

    def add(self, rows, replace=False):
        events.append(("commit",))
        real_add(self, rows, replace)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(Catalogue, "add", add)
    _index(tiny_lm, _write(tmp_path / "two.jsonl", _texts(2)), store)

    def identity(path: Path) -> tuple[int, int]:
        return os.stat(path).st_dev, os.stat(path).st_ino

    before = events[: events.index(("commit",))]
    synced = {(dev, ino) for _, dev, ino, _ in before}
    assert {identity(tmp_path), identity(tmp_path / "new"), identity(store.parent)} <= synced
    assert identity(store) in {(dev, ino) for _, dev, ino, shards in before if shards}


# --- concurrency --------------------------------------------------------------------------------


def _watch_concurrent_write(writer_pid: int, finished, tiny_lm, corpus: Path, store: Path, clean_store: Path) -> None:
    """While process ``writer_pid`` indexes ``corpus`` into ``store`` batch by batch: a second
    writer fails naming the holder, and a reader only ever sees whole committed batches whose
    blobs load and verify, with an index that follows the catalogue."""
    seen: list[int] = []
    reference = {row[1]: row for row in _rows(clean_store)}
    second_writer_error = None
    deadline = time.monotonic() + 300
    while not (store / "manifest.json").is_file():
        assert not finished() and time.monotonic() < deadline, "writer never created the store"
        time.sleep(0.02)
    with KVStore.open(store) as reader:
        while True:
            done = finished()
            entries = list(reader.catalogue.entries())
            for entry in entries:  # every visible row points at complete, verified bytes
                reader.load_kv(entry)
                assert entry.checksum == reference[entry.id][9]
            seen.append(len(entries))
            if entries:
                hits = reader.search(store_worker.HashEmbedder().embed([entries[-1].text])[0], 1)
                assert hits[0][0].id == entries[-1].id
            if second_writer_error is None and 0 < len(entries) < N_PASSAGES:
                with pytest.raises(StoreError) as caught:
                    _index(tiny_lm, corpus, store)
                second_writer_error = str(caught.value)
            if done:
                break
            assert time.monotonic() < deadline, "writer did not finish"
    assert second_writer_error is not None
    assert f"is being written by pid {writer_pid}; wait for it to finish (one writer at a time)" in second_writer_error
    assert seen == sorted(seen) and seen[-1] == N_PASSAGES
    assert all(n % BATCH == 0 for n in seen)  # never half a batch
    assert len(set(seen)) > 2  # the reader really watched the write progress
    _same_content(store, clean_store)  # the refused second writer changed nothing


def test_second_writer_fails_and_reader_sees_only_committed(tiny_lm, corpus, clean_store, tmp_path):
    store = tmp_path / "store"
    pid = os.fork()
    if pid == 0:  # child: the writer, sleeping 0.3 s after each committed batch
        code = 3
        try:
            torch.set_num_threads(1)
            store_worker.install("slow")
            _index(tiny_lm, corpus, store)
            code = 0
        finally:
            os._exit(code)
    status: list[int] = []

    def finished() -> bool:
        if not status:
            done, code = os.waitpid(pid, os.WNOHANG)
            if done:
                status.append(os.waitstatus_to_exitcode(code))
        return bool(status)

    try:
        _watch_concurrent_write(pid, finished, tiny_lm, corpus, store, clean_store)
    finally:
        if not finished():
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
    assert status == [0]


@pytest.mark.slow
def test_second_writer_and_reader_against_fresh_interpreter(tiny_model_dir, tiny_lm, corpus, clean_store, tmp_path):
    """The same with the writer in a fresh ``python`` process (no state shared through fork)."""
    store = tmp_path / "store"
    proc = _worker(tiny_model_dir("llama"), corpus, store, "slow")
    try:
        _watch_concurrent_write(proc.pid, lambda: proc.poll() is not None, tiny_lm, corpus, store, clean_store)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(120)
    assert proc.returncode == 0, proc.stderr.read()[-2000:]


def test_second_writer_in_process_fails_and_lock_is_released(store_copy):
    with StoreWriter(store_copy):
        with pytest.raises(StoreError, match=rf"being written by pid {os.getpid()}"):
            StoreWriter(store_copy)
    StoreWriter(store_copy).close()


@pytest.mark.parametrize("window", ["while-it-loads", "before-its-check", "before-its-rename"])
def test_losing_a_creation_race_asks_for_a_retry_that_opens_the_winners_store(
    window, tiny_lm, corpus, clean_store, tmp_path, monkeypatch
):
    """Two runs create the same store. The other one's store lands at the path after this run saw
    none: while it loads the model and reads the input (its widest window), just before
    ``create_store`` checks the path, or just before its own rename. This run is
    told to retry (never that the path "is not a store"), leaves nothing behind, and the retry
    resumes into the other run's store."""
    import ragcompress.indexing.run as run
    from ragcompress.store import files

    store = tmp_path / "store"

    def after_the_other_run_created_it(step):
        def staged(*args, **kwargs):
            if not store.exists():
                shutil.copytree(clean_store, store)
            return step(*args, **kwargs)

        return staged

    module, step = {
        "while-it-loads": (run, "run_indexer"),
        "before-its-check": (run, "create_store_for"),
        "before-its-rename": (files, "write_atomic"),
    }[window]
    with monkeypatch.context() as patch:
        patch.setattr(module, step, after_the_other_run_created_it(getattr(module, step)))
        with pytest.raises(StoreError, match=r"created by another process meanwhile; retry, and the run opens"):
            _index(tiny_lm, corpus, store)
    assert [p.name for p in tmp_path.iterdir()] == ["store"]  # no .store.init-* left
    report = _index(tiny_lm, corpus, store)
    assert (report.indexed, report.skipped) == (0, N_PASSAGES)
    _same_content(store, clean_store)


@pytest.mark.parametrize("change", ["replaced", "removed"])
def test_a_passage_changed_and_cut_off_under_a_reader_asks_for_a_retry(change, tiny_lm, store_copy, tmp_path):
    """A reader found a passage; a writer then replaced or removed it, and the next writer cut the
    old blob off the end of its shard. Reading the row the reader holds gives neither version's
    cache and is not reported as corruption: the error names the passage and asks for a retry."""
    from ragcompress.indexing import remove

    with KVStore.open(store_copy) as kv:
        entries = list(kv.catalogue.entries())
        first = min(e.shard for e in entries)
        victim = max((e for e in entries if e.shard == first), key=lambda e: e.offset)  # ends a full shard
        if change == "replaced":
            records = _texts(N_PASSAGES)
            records[int(victim.id[4:])]["text"] = "This passage now tells of lighthouses."
            _index(tiny_lm, _write(tmp_path / "changed.jsonl", records), store_copy, replace=True)
        else:
            remove(store_copy, [victim.id])
        StoreWriter(store_copy).close()  # truncates the bytes no committed row points at
        assert (store_copy / "shards" / victim.shard).stat().st_size == victim.offset
        with pytest.raises(StoreError, match=rf"passage '{victim.id}' was {change} .*retry the request") as caught:
            kv.load_kv(victim)
        assert not isinstance(caught.value, CorruptSegmentError)
        if change == "replaced":  # the retry finds the new row and reads the new cache
            current = kv.entry(victim.id)
            assert kv.load_kv(current).num_tokens == current.num_tokens != victim.num_tokens
    assert verify_store(store_copy).ok


def test_search_runs_again_when_rows_were_replaced_between_its_two_reads(store_copy, tiny_lm, tmp_path):
    """A search reads the index, then the rows it names. If a writer removes the last passage and
    adds another in between, SQLite gives the new passage the removed one's row number: the hit
    must not come back as the new passage with the removed one's score."""
    embedder = store_worker.HashEmbedder()
    with KVStore.open(store_copy) as kv:
        last = max(kv.catalogue.entries(), key=lambda e: e.row)
        query = embedder.embed([last.text])[0]
        kv.search(query, 1)  # the index is built before the race
        original = kv.catalogue.by_rows

        def racing(rows):
            kv.catalogue.by_rows = original
            with StoreWriter(store_copy) as writer:
                writer.remove([last.id])
            _index(
                tiny_lm,
                _write(tmp_path / "new.jsonl", [{"id": "newcomer", "text": "An unrelated passage."}]),
                store_copy,
            )
            return original(rows)

        kv.catalogue.by_rows = racing
        ((entry, score),) = kv.search(query, 1)
        assert kv.entry("newcomer").row == last.row  # the race really reused the row number
        assert entry.id != last.id
        assert score == pytest.approx(float(np.dot(embedder.embed([entry.text])[0], query)), abs=1e-5)


# --- corruption ---------------------------------------------------------------------------------


def _entry(store: Path, passage_id: str):
    with KVStore.open(store) as kv:
        return kv.entry(passage_id)


def _load(store: Path, passage_id: str):
    with KVStore.open(store) as kv:
        return kv.load_kv(kv.entry(passage_id))


def _problem_ids(store: Path) -> set[str | None]:
    report = verify_store(store)
    assert not report.ok
    return {p.passage_id for p in report.problems}


def test_flipped_byte_is_detected_and_named(store_copy):
    victim = _entry(store_copy, "doc-005")
    path = store_copy / "shards" / victim.shard
    data = bytearray(path.read_bytes())
    data[victim.offset + victim.length // 2] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(CorruptSegmentError, match=rf"passage 'doc-005'.*checksum mismatch in shard {victim.shard}"):
        _load(store_copy, "doc-005")
    _load(store_copy, "doc-004")  # neighbours are intact and still load
    assert _problem_ids(store_copy) == {"doc-005"}
    remedy = verify_store(store_copy).remedy("corpus.jsonl")  # what `verify` tells the user, and it works
    assert f"`ragcompress remove --store {store_copy} doc-005`" in remedy and "--overwrite" not in remedy
    remove(store_copy, ["doc-005"])
    assert verify_store(store_copy).ok


def test_truncated_shard_is_detected_and_named(tiny_lm, corpus, store_copy, clean_store):
    """A shard that lost committed bytes: the passage and the shard are named, every writer
    refuses the store naming the rebuild, and `verify`'s remedy is that rebuild, which works.
    One byte short is the least loss, and still a shard problem (an off-by-one let it pass)."""
    last = _entry(store_copy, f"doc-{N_PASSAGES - 1:03d}")
    path = store_copy / "shards" / last.shard
    with open(path, "r+b") as handle:
        handle.truncate(last.offset + last.length - 1)
    with pytest.raises(CorruptSegmentError, match=rf"passage '{last.id}': shard {last.shard} is truncated"):
        _load(store_copy, last.id)
    report = verify_store(store_copy)
    assert {(p.kind, p.passage_id) for p in report.problems} == {("segment", last.id), ("shard", None)}
    assert "shard" in report.remedy() and "--overwrite`, which" not in report.remedy()
    assert f"--store {store_copy} --overwrite` (it keeps the store's settings)" in report.remedy()
    for write in (lambda: StoreWriter(store_copy), lambda: remove(store_copy, [last.id])):
        with pytest.raises(StoreError, match=rf"the store is damaged .* --store {store_copy} --overwrite`"):
            write()  # a writer never appends after lost committed bytes
    _index(tiny_lm, corpus, store_copy, overwrite=True)
    assert verify_store(store_copy).ok and _rows(store_copy) == _rows(clean_store)


def test_missing_shard_is_detected_and_named(store_copy):
    victim = _entry(store_copy, "doc-000")
    (store_copy / "shards" / victim.shard).unlink()
    with pytest.raises(CorruptSegmentError, match=rf"passage 'doc-000': shard {victim.shard} is missing"):
        _load(store_copy, "doc-000")
    report = verify_store(store_copy)
    assert "doc-000" in {p.passage_id for p in report.problems}
    assert all(p.shard == victim.shard for p in report.problems)
    assert "shard" in {p.kind for p in report.problems} and "--overwrite" in report.remedy()
    with pytest.raises(StoreError, match=rf"shard {victim.shard} .* is missing .* the store is damaged"):
        StoreWriter(store_copy)  # never re-creates a shard that committed rows point into


@pytest.mark.parametrize(
    "update, message",
    [
        ("length = -5", "impossible location"),
        ("length = 1", "checksum mismatch"),  # the row now ends inside its blob: the "committed end" moved
        ("offset = 0", "checksum mismatch"),
    ],
)
def test_writer_never_truncates_by_a_damaged_row(store_copy, update, message):
    """A writer truncates a shard to its last committed blob only when every blob in that shard
    reads back whole: a damaged row would otherwise move the end and cut off a real passage."""
    with KVStore.open(store_copy) as kv:  # the last blob of a shard holding more than one
        last = max((e for e in kv.catalogue.entries() if e.offset > 0), key=lambda e: (e.shard, e.offset))
    path = store_copy / "shards" / last.shard
    assert path.stat().st_size == last.offset + last.length
    with open(path, "ab") as handle:
        handle.write(b"a killed run's tail")  # so a writer would truncate this shard
    before = _shard_bytes(store_copy)
    with sqlite3.connect(store_copy / "catalogue.sqlite") as db:
        db.execute(f"UPDATE passages SET {update} WHERE id = ?", (last.id,))
    with pytest.raises(StoreError, match=rf"passage '{last.id}'.*{message}.*the store is damaged.*nothing was changed"):
        StoreWriter(store_copy)
    assert _shard_bytes(store_copy) == before
    with sqlite3.connect(store_copy / "catalogue.sqlite") as db:  # the row repaired, the passage is whole
        db.execute("UPDATE passages SET offset = ?, length = ? WHERE id = ?", (last.offset, last.length, last.id))
    _load(store_copy, last.id)
    StoreWriter(store_copy).close()  # now the tail is cut, and only the tail
    assert path.read_bytes() == before[last.shard][: last.offset + last.length]


def test_a_huge_length_is_refused_before_reading(store_copy):
    with sqlite3.connect(store_copy / "catalogue.sqlite") as db:
        db.execute("UPDATE passages SET length = ? WHERE id = 'doc-007'", (1 << 40,))
    tracemalloc.start()
    try:
        with pytest.raises(CorruptSegmentError, match=r"passage 'doc-007': shard .* is truncated"):
            _load(store_copy, "doc-007")
        assert _problem_ids(store_copy) == {"doc-007", None}  # and the shard is shorter than that row's end
        assert tracemalloc.get_traced_memory()[1] < 64 << 20  # never allocated what the row claims
    finally:
        tracemalloc.stop()


def test_unreadable_metadata_is_a_verify_problem(store_copy):
    with sqlite3.connect(store_copy / "catalogue.sqlite") as db:
        db.execute("UPDATE passages SET meta = '{bad json' WHERE id = 'doc-007'")
    report = verify_store(store_copy)
    assert [(p.kind, p.passage_id, p.message) for p in report.problems] == [
        ("catalogue", "doc-007", "passage metadata is not a JSON object"),
        ("catalogue", "doc-007", META_CHECKSUM_MISMATCH),
    ]


META_CHECKSUM_MISMATCH = "row does not match its meta_checksum (id, title, metadata, text or embedding damaged)"


def _flip_first_bit(value):
    return bytes([value[0] ^ 1]) + value[1:] if isinstance(value, bytes) else chr(ord(value[0]) ^ 1) + value[1:]


@pytest.mark.parametrize("column", ["title", "embedding"])
def test_a_flipped_byte_in_a_rows_title_or_embedding_fails_verify(store_copy, column):
    with sqlite3.connect(store_copy / "catalogue.sqlite") as db:
        (value,) = db.execute(f"SELECT {column} FROM passages WHERE id = 'doc-007'").fetchone()
        db.execute(f"UPDATE passages SET {column} = ? WHERE id = 'doc-007'", (_flip_first_bit(value),))
    assert _problem_ids(store_copy) == {"doc-007"}
    assert ("catalogue", META_CHECKSUM_MISMATCH) in {(p.kind, p.message) for p in verify_store(store_copy).problems}


def test_a_store_from_before_meta_checksums_verifies_and_its_new_rows_carry_them(tiny_lm, store_copy, tmp_path):
    with sqlite3.connect(store_copy / "catalogue.sqlite") as db:
        db.execute("ALTER TABLE passages DROP COLUMN meta_checksum")  # as stores were built before it
    assert _assert_readable(store_copy) == N_PASSAGES  # opens, verifies, every passage loads
    records = [*_texts(N_PASSAGES), {"id": "doc-new", "text": "A passage about lanterns.", "title": "New"}]
    _index(tiny_lm, _write(tmp_path / "more.jsonl", records), store_copy)  # a writer adds the column
    with sqlite3.connect(store_copy / "catalogue.sqlite") as db:
        sums = dict(db.execute("SELECT id, meta_checksum FROM passages"))
        assert [pid for pid, value in sums.items() if value is not None] == ["doc-new"]
        db.execute("UPDATE passages SET title = 'Mew' WHERE id = 'doc-new'")
    assert _problem_ids(store_copy) == {"doc-new"}


def test_prefix_without_a_recorded_checksum_is_refused(store_copy):
    data = json.loads((store_copy / "manifest.json").read_text())
    data["prefix_sha256"] = ""
    (store_copy / "manifest.json").write_text(json.dumps(data))
    with KVStore.open(store_copy) as kv, pytest.raises(CorruptSegmentError, match="records no prefix checksum"):
        kv.prefix_kv()
    assert [p.kind for p in verify_store(store_copy).problems] == ["prefix"]


def test_prefix_is_decoded_in_each_dtype_asked_for(store_copy):
    with KVStore.open(store_copy) as kv:
        assert kv.prefix_kv(torch.float32).keys.dtype == torch.float32
        assert kv.prefix_kv(torch.bfloat16).keys.dtype == torch.bfloat16


def test_writer_refuses_store_without_catalogue(store_copy, clean_store):
    (store_copy / "catalogue.sqlite").unlink()
    with pytest.raises(StoreError, match="no catalogue.sqlite; the store is damaged"):
        StoreWriter(store_copy)
    assert _shard_bytes(store_copy) == _shard_bytes(clean_store)  # nothing deleted


@pytest.mark.parametrize(
    "update, message",
    [
        ("offset = 1000000000", "points past the end of shard"),
        ("shard = '../../etc/passwd'", "not a valid shard name"),
        ("length = -5", "invalid location"),
        ("checksum = 'deadbeef'", "checksum mismatch"),
    ],
)
def test_catalogue_row_pointing_nowhere_is_named(store_copy, update, message):
    with sqlite3.connect(store_copy / "catalogue.sqlite") as db:
        db.execute(f"UPDATE passages SET {update} WHERE id = 'doc-007'")
    with pytest.raises(CorruptSegmentError, match=rf"passage 'doc-007'.*{message}"):
        _load(store_copy, "doc-007")
    # a row pointing past its shard's end also makes the shard shorter than what is committed
    # into it, which every writer refuses (so `remove` cannot repair it either)
    assert _problem_ids(store_copy) == ({"doc-007", None} if "past the end" in message else {"doc-007"})


def test_a_kept_count_edited_in_the_catalogue_is_a_problem(store_copy):
    """A row's ``kept`` (stored entries, what memory and ratio reports count) must be its blob's:
    without comparing them an edited or mis-committed count verified clean."""
    with sqlite3.connect(store_copy / "catalogue.sqlite") as db:
        db.execute("UPDATE passages SET kept = kept - 1 WHERE id = 'doc-003'")
    problems = verify_store(store_copy).problems
    assert [(p.kind, p.passage_id) for p in problems] == [("segment", "doc-003")]
    assert re.search(r"blob holds (\d+) tokens / (\d+) kept, its catalogue row says \1 / (\d+)$", problems[0].message)


@pytest.mark.parametrize("overlap", ["same-blob", "one-byte"])
def test_rows_whose_blobs_share_bytes_are_an_overlap(store_copy, overlap):
    """Two rows pointing at one blob (each reads back whole, so no checksum notices), or a blob
    starting one byte before its neighbour ends: ``verify`` names the overlap. Without the check the
    first verified clean, and compaction or removal of one row would take the other's cache."""
    with KVStore.open(store_copy) as kv:
        entries = sorted(kv.catalogue.entries(), key=lambda e: (e.shard, e.offset))
    first, second = next((a, b) for a, b in itertools.pairwise(entries) if a.shard == b.shard)
    with sqlite3.connect(store_copy / "catalogue.sqlite") as db:
        if overlap == "same-blob":
            db.execute(
                "UPDATE passages SET (offset, length, checksum, num_tokens, kept) = "
                "(SELECT offset, length, checksum, num_tokens, kept FROM passages WHERE id = ?) WHERE id = ?",
                (first.id, second.id),
            )
        else:
            db.execute("UPDATE passages SET offset = offset - 1 WHERE id = ?", (second.id,))
    overlaps = [p for p in verify_store(store_copy).problems if "overlaps another blob" in p.message]
    assert [(p.kind, p.shard) for p in overlaps] == [("segment", second.shard)]
    assert overlaps[0].passage_id in {first.id, second.id}  # rows at one offset come in either order


def test_embeddings_of_another_dimension_than_the_stores_are_a_problem(store_copy):
    """Rows whose embeddings differ in length cannot share one index; with no ``index.faiss`` to
    disagree with (it is rebuilt from the rows) only the dimension check sees a row of another
    embedder's width, resealed as a writer seals it."""
    from ragcompress.store.catalogue import meta_checksum

    with sqlite3.connect(store_copy / "catalogue.sqlite") as db:
        title, meta, text_sha, embedding = db.execute(
            "SELECT title, meta, text_sha, embedding FROM passages WHERE id = 'doc-003'"
        ).fetchone()
        short = embedding[:16]  # four floats
        db.execute(
            "UPDATE passages SET embedding = ?, meta_checksum = ? WHERE id = 'doc-003'",
            (short, meta_checksum("doc-003", title, meta, text_sha, short)),
        )
    for name in (INDEX, INDEX_META):
        (store_copy / name).unlink(missing_ok=True)
    problems = verify_store(store_copy).problems
    assert [(p.kind, p.passage_id) for p in problems] == [("catalogue", "doc-003")]
    assert f"embedding has dimension 4, the store's others have {len(embedding) // 4}" == problems[0].message


def test_blob_with_wrong_model_shape_is_refused(store_copy):
    """A blob with a valid checksum but another model's shape never reaches the runtime."""
    foreign = PassageKV.full(torch.randn(3, 2, 5, 16), torch.randn(3, 2, 5, 16))
    blob = codec.encode(foreign, QuantConfig("int8"))
    point_row_at_appended_blob(store_copy, "doc-002", _entry(store_copy, "doc-002").shard, blob)
    with pytest.raises(
        CorruptSegmentError, match=r"passage 'doc-002'.*\(3, 2, 16\), the store's model has \(2, 2, 16\)"
    ):
        _load(store_copy, "doc-002")
    assert "doc-002" in _problem_ids(store_copy)


@pytest.mark.parametrize(
    ("first_head", "num_tokens", "refusal"),
    [
        ([1, 3, 5, 7], 3, "keeps up to 4 rows per head of a passage of 3 tokens"),
        ([1, 3, 3, 7], 10, "positions must increase within each head, but layer 0, head 0 keeps position 3 after 3"),
        ([1, 7, 3, 8], 10, "positions must increase within each head, but layer 0, head 0 keeps position 3 after 7"),
    ],
    ids=["more-rows-than-tokens", "repeated", "backwards"],
)
def test_blob_keeping_rows_no_passage_has_is_refused_and_named(store_copy, first_head, num_tokens, refusal):
    """Behind a matching checksum, a blob of the store's shape whose heads keep more rows than its
    passage has tokens, or whose first head's positions repeat or go backwards: each row is
    rotated to its position, so such a cache places rows where no token of the passage stood.
    Reading the passage and ``verify`` refuse it, naming the passage."""
    from ragcompress.testing import rewritten_blob

    kept = torch.tensor([1, 3, 5, 7]).expand(2, 2, 4)  # of 10 tokens, on every layer and head
    cache = PassageKV(torch.randn(2, 2, 4, 16), torch.randn(2, 2, 4, 16), kept, torch.full((2, 2), 4), 10)
    sound = codec.encode(cache, QuantConfig("int8"))
    positions = codec.parse(sound).tensors["positions"].clone()  # [16]: (layer, head, row) order
    positions[:4] = torch.tensor(first_head)
    blob = rewritten_blob(sound, {"positions": positions}, num_tokens=num_tokens)
    shard = _entry(store_copy, "doc-002").shard
    point_row_at_appended_blob(store_copy, "doc-002", shard, blob, num_tokens=num_tokens, kept=16)
    with pytest.raises(CorruptSegmentError, match=re.escape(f"passage 'doc-002' (shard {shard}): segment {refusal}")):
        _load(store_copy, "doc-002")
    problems = verify_store(store_copy).problems
    assert [(p.kind, p.passage_id, p.message) for p in problems] == [("segment", "doc-002", f"segment {refusal}")]


@pytest.mark.parametrize("where", ["tail", "inside-the-tensors"])
def test_corrupt_prefix_is_refused(store_copy, where):
    """A byte flipped near the end breaks decoding as well; one in the middle of the key/value
    data decodes into a plausible prefix cache that only the manifest's checksum can tell from the
    built one: without ``verify``'s checksum comparison that store verified clean."""
    data = bytearray((store_copy / PREFIX).read_bytes())
    data[-3 if where == "tail" else len(data) // 2] ^= 0xFF
    (store_copy / PREFIX).write_bytes(bytes(data))
    with KVStore.open(store_copy) as kv, pytest.raises(CorruptSegmentError, match="prefix cache.*checksum mismatch"):
        kv.prefix_kv()
    problems = verify_store(store_copy).problems
    assert [(p.kind, p.message) for p in problems] == [("prefix", "checksum mismatch with the manifest")]


def test_ask_on_corrupt_passage_fails_clearly(store_copy, tiny_lm):
    from ragcompress.runtime.engine import Engine

    victim = _entry(store_copy, "doc-003")
    path = store_copy / "shards" / victim.shard
    data = bytearray(path.read_bytes())
    data[victim.offset + 100] ^= 0x10
    path.write_bytes(bytes(data))
    engine = Engine(KVStore.open(store_copy), tiny_lm, store_worker.HashEmbedder(), AnswerOptions(max_new_tokens=4))
    try:
        with pytest.raises(CorruptSegmentError, match="passage 'doc-003'"):
            engine.answer_cached("What is it about?", [victim])
        healthy = engine.answer_cached("What is it about?", [_entry(store_copy, "doc-004")])
        assert healthy.passage_ids == ["doc-004"]
    finally:
        engine.close()


def test_damaged_faiss_index_is_ignored_and_rebuilt(store_copy):
    path = store_copy / INDEX
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    report = verify_store(store_copy)
    assert report.ok and any("sha256" in note for note in report.notes)
    with KVStore.open(store_copy) as kv:
        entry = kv.entry("doc-009")
        hit = kv.search(store_worker.HashEmbedder().embed([entry.text])[0], 1)[0][0]
        assert hit.id == "doc-009"


def test_faiss_index_disagreeing_with_catalogue_is_a_problem(store_copy):
    import faiss

    with KVStore.open(store_copy) as kv:
        rows, vectors = kv.catalogue.embeddings()
    index = faiss.IndexIDMap2(faiss.IndexFlatIP(vectors.shape[1]))
    index.add_with_ids(np.ascontiguousarray(vectors[::-1]), rows)  # right ids, wrong vectors
    faiss.write_index(index, str(store_copy / INDEX))
    meta = {"sha256": hashlib.sha256((store_copy / INDEX).read_bytes()).hexdigest(), "count": len(rows)}
    (store_copy / INDEX_META).write_text(json.dumps(meta))
    report = verify_store(store_copy)
    assert {p.kind for p in report.problems} == {"index"} and len(report.problems) == len(rows)


def test_damaged_catalogue_is_a_store_error(store_copy):
    (store_copy / "catalogue.sqlite").write_bytes(b"not a database" * 100)
    for name in ("catalogue.sqlite-wal", "catalogue.sqlite-shm"):
        (store_copy / name).unlink(missing_ok=True)
    with pytest.raises(StoreError, match="catalogue .* cannot be read"):
        KVStore.open(store_copy)
    assert [p.kind for p in verify_store(store_copy).problems] == ["catalogue"]


# --- safe loading -------------------------------------------------------------------------------

UNSAFE_MODULES = {"pickle", "cPickle", "dill", "joblib", "shelve", "marshal", "cloudpickle"}


def _unsafe_uses(source: str) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [a.name for a in node.names if a.name.split(".")[0] in UNSAFE_MODULES]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in UNSAFE_MODULES:
            found.append(node.module)
        elif (
            isinstance(node, ast.Attribute)
            and node.attr == "load"
            and isinstance(node.value, ast.Name)
            and node.value.id in {"torch", "np", "numpy", "pickle"}
        ):
            found.append(f"{node.value.id}.load")
        elif isinstance(node, ast.keyword) and node.arg in {"allow_pickle", "weights_only"}:
            found.append(node.arg)
    return found


def test_unsafe_loader_detector_catches_them():
    source = "import pickle\nfrom joblib import load\ntorch.load(f)\nnp.load(f, allow_pickle=True)\n"
    assert sorted(_unsafe_uses(source)) == ["allow_pickle", "joblib", "np.load", "pickle", "torch.load"]
    assert _unsafe_uses("from safetensors.torch import load\njson.load(f)\n") == []


def test_no_pickle_or_torch_load_anywhere_in_the_package():
    roots = [REPO / "ragcompress", REPO / "ragcompress_kernels"] + [REPO / "integrations"] * (
        REPO / "integrations"
    ).is_dir()
    offenders = {}
    for root in roots:
        for path in root.rglob("*.py"):
            uses = _unsafe_uses(path.read_text())
            if uses:
                offenders[str(path.relative_to(REPO))] = uses
    assert offenders == {}


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("model_shape", {"layers": 2, "kv_heads": 2, "head_dim": "16"}, "model_shape"),
        ("model_shape", {"layers": 0, "kv_heads": 2, "head_dim": 16}, "model_shape"),
        ("template", {"prefix": "x", "passage_format": "no marker", "suffix_format": "{question}"}, "template"),
        ("compression", {"method": "none", "quant": "int3", "group_size": 32}, "compression"),
        ("prefix_sha256", "../../etc/passwd", "prefix_sha256"),
        ("compression", {"method": "none", "quant": "int8", "group_size": 32, "lowrank": 1}, "lowrank"),
        (
            "compression",
            {"method": "none", "quant": "int8", "group_size": 32, "lowrank": {"basis_sha256": 5}},
            "lowrank",
        ),
        ("format_version", True, "format version"),
        ("model_ref", "", "model_ref"),
    ],
)
def test_manifest_values_are_validated_before_use(store_copy, field, value, message):
    data = json.loads((store_copy / "manifest.json").read_text())
    data[field] = value
    (store_copy / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(StoreError, match=message):
        KVStore.open(store_copy)
    assert [p.kind for p in verify_store(store_copy).problems] == ["manifest"]


def test_manifest_that_is_not_utf8_or_json_is_a_store_error(store_copy):
    (store_copy / "manifest.json").write_bytes(b"\xff\xfe{")
    with pytest.raises(StoreError, match="not UTF-8"):
        KVStore.open(store_copy)
    (store_copy / "manifest.json").write_text("[1, 2")
    with pytest.raises(StoreError, match="not valid JSON"):
        KVStore.open(store_copy)


TRAVERSAL_IDS = [
    "../../etc/passwd",
    "/etc/passwd",
    "..\\..\\windows\\win.ini",
    "shards/00000.kvs",
    "catalogue.sqlite",
    "%2e%2e%2f%2e%2e%2fx",
    "a/../../../b",
    "~/.ssh/id_rsa",
    "lock",
]


def test_path_traversal_ids_are_only_data(tiny_lm, tmp_path):
    corpus = _write(
        tmp_path / "in.jsonl", [{"id": pid, "text": f"text number {i}"} for i, pid in enumerate(TRAVERSAL_IDS)]
    )
    store = tmp_path / "store"
    before = {p for p in tmp_path.rglob("*")}
    _index(tiny_lm, corpus, store)
    created = {p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p not in before}
    allowed = {
        "store",
        "store/shards",
        "store/catalogue.sqlite",
        "store/manifest.json",
        "store/prefix.safetensors",
        "store/index.faiss",
        "store/index.json",
        "store/lock",
        "store/catalogue.sqlite-wal",
        "store/catalogue.sqlite-shm",
    }
    unexpected = {p for p in created - allowed if not re.fullmatch(r"store/shards/\d{5}\.kvs", p)}
    assert unexpected == set()
    with KVStore.open(store) as kv:
        assert sorted(e.id for e in kv.catalogue.entries()) == sorted(TRAVERSAL_IDS)
        for pid in TRAVERSAL_IDS:
            assert kv.load_kv(kv.entry(pid)).num_tokens > 0
    assert verify_store(store).ok


def test_overwrite_refuses_a_folder_that_is_not_a_store(tiny_lm, corpus, tmp_path):
    folder = tmp_path / "precious"
    folder.mkdir()
    (folder / "thesis.txt").write_text("do not delete")
    with pytest.raises(StoreError, match="not a ragcompress store"):
        _index(tiny_lm, corpus, folder, overwrite=True)
    assert (folder / "thesis.txt").read_text() == "do not delete"


@pytest.mark.parametrize(
    "contents",
    [
        {"manifest.json": '{"name": "My App"}', "index.html": "<html>"},  # a web app's manifest
        {"manifest.json": '{"format_version": 2}'},  # a manifest alone is not a store
    ],
    ids=["foreign-files", "manifest-only"],
)
def test_overwrite_refuses_a_folder_with_a_manifest_that_is_not_a_store(tiny_lm, corpus, tmp_path, contents):
    folder = tmp_path / "webapp"
    folder.mkdir()
    for name, text in contents.items():
        (folder / name).write_text(text)
    with pytest.raises(StoreError, match="not a ragcompress store.*refusing to overwrite it"):
        _index(tiny_lm, corpus, folder, overwrite=True)
    assert {p.name: p.read_text() for p in folder.iterdir()} == contents


def test_a_foreign_manifest_is_called_no_store_and_verify_does_not_advise_overwrite(tiny_lm, corpus, tmp_path):
    """A web app's ``manifest.json`` was read as a store of format version None, to be rebuilt
    with ``--overwrite``, which then refuses the folder: both now say it is not a store."""
    folder = tmp_path / "webapp"
    folder.mkdir()
    (folder / "manifest.json").write_text('{"name": "My App", "version": 3}')
    with pytest.raises(StoreError, match="is not a ragcompress manifest .* so .*webapp is not a ragcompress store"):
        _index(tiny_lm, corpus, folder)
    remedy = verify_store(folder).remedy()
    assert "--overwrite deletes only a store" in remedy and "rebuild" not in remedy
    assert [p.name for p in folder.iterdir()] == ["manifest.json"]


def test_verify_on_a_store_of_removed_passages_does_not_call_their_bytes_a_killed_write(store_copy):
    assert remove(store_copy, [row[1] for row in _rows(store_copy)]) == N_PASSAGES
    report = verify_store(store_copy)
    assert report.ok and report.passages == 0
    assert any("its passages removed, or a killed write" in note for note in report.notes), report.notes


def test_overwrite_refuses_a_store_holding_files_of_the_users(tiny_lm, corpus, store_copy):
    """A rebuild deletes the folder it replaces: a file the user put in the store stops it."""
    (store_copy / "notes.txt").write_text("mine")
    before = {p.name: p.stat().st_size for p in store_copy.iterdir()}
    with pytest.raises(StoreError, match=r"files that are not the store's \(notes.txt\)"):
        _index(tiny_lm, corpus, store_copy, overwrite=True)
    assert {p.name: p.stat().st_size for p in store_copy.iterdir()} == before
    assert verify_store(store_copy).ok


def test_a_store_that_lost_its_manifest_is_rebuilt_by_overwrite(tiny_lm, corpus, store_copy, clean_store):
    """What `verify` tells the user to do for a lost manifest works: plain `index` refuses the
    folder and names the remedy, `--overwrite` rebuilds the store in place."""
    (store_copy / "manifest.json").unlink()
    with pytest.raises(
        StoreError, match="lost its manifest: rebuild it with --overwrite and the settings it was built with"
    ):
        _index(tiny_lm, corpus, store_copy)
    assert "and the settings it was built with" in verify_store(store_copy).remedy()
    with pytest.raises(StoreError, match="lost its manifest.json; .*--overwrite` and the settings it was built with"):
        KVStore.open(store_copy)  # what `ask` and `serve` say
    with pytest.raises(StoreError, match="is a file; a store is the folder"):
        KVStore.open(store_copy / "catalogue.sqlite")
    with pytest.raises(StoreError, match="lost its manifest.json, so the settings it was built with are unknown"):
        index(corpus, store_copy, lm=tiny_lm, embedder=store_worker.HashEmbedder(), overwrite=True)  # none given
    report = _index(tiny_lm, corpus, store_copy, overwrite=True)
    assert report.indexed == N_PASSAGES
    assert verify_store(store_copy).ok and _rows(store_copy) == _rows(clean_store)


def _stop_after_two_batches(lm, corpus, store, *, config=CONFIG, batch_size=BATCH) -> None:
    """An ``index`` run into ``store`` whose embedder fails on its third batch: a run stopped
    midway, its first two batches committed and its marker left behind."""
    with pytest.raises(RuntimeError, match="mid-run"):
        index(
            corpus,
            store,
            lm=lm,
            embedder=FailingAtCall(store_worker.HashEmbedder(), 3),
            config=config,
            batch_size=batch_size,
        )


def test_a_run_removes_what_killed_runs_left_beside_the_store(tiny_lm, corpus, store_copy):
    """Half-built copies of a killed ``--overwrite`` or store creation are deleted by the next run
    on that path; a live process's are its work in progress and stay."""
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    parent, name = store_copy.parent, store_copy.name
    litter = [f".{name}.overwrite-{dead.pid}", f".{name}.init-{dead.pid}-x1", f"..{name}.overwrite-{dead.pid}.init-7-x"]
    litter.append(f".{name}.compact")  # no compaction holds the store's lock: a killed one's copy
    kept = [f".{name}.overwrite-{alive.pid}", f".{name}x.compact", f".{name}x.overwrite-{dead.pid}"]
    try:
        for entry in litter + kept:
            (parent / entry).mkdir()
            (parent / entry / "f").write_text("x")
        _index(tiny_lm, corpus, store_copy)
        assert sorted(p.name for p in parent.iterdir() if p.name != name) == sorted(kept)
    finally:
        alive.kill()
        alive.wait()


@pytest.mark.parametrize(
    "edit",
    [
        ("model_ref", "qwen2.5-coder-0.5b"),
        ("embedder", "another-embedder"),
        ("template", "prefix"),
        ("compression", "quant"),
        ("encoding", "context_neighbors"),
    ],
)
def test_a_manifest_edited_after_the_build_is_refused_by_every_reader_and_verify(store_copy, edit):
    """The fields a store's caches were computed with are sealed when it is created
    (``build_sha256``): an edit to any of them is refused when the manifest is read, by verify
    too, where a model, embedder or template edit once passed verify and failed (or, for an
    embedder of the same dimension, retrieved other passages) only at answering time."""
    manifest = json.loads((store_copy / "manifest.json").read_text())
    field, key = edit
    if isinstance(manifest[field], dict):
        manifest[field] = {**manifest[field], key: {"quant": "int4", "prefix": "x", "context_neighbors": 2}[key]}
    else:
        manifest[field] = key
    (store_copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(StoreError, match="was edited after the store was built"):
        KVStore.open(store_copy)
    report = verify_store(store_copy)
    assert [p.kind for p in report.problems] == ["manifest"] and "edited after" in report.problems[0].message
    del manifest["build_sha256"]  # a store created before the seal: read unchecked, as before
    (store_copy / "manifest.json").write_text(json.dumps(manifest))
    if field in ("model_ref", "compression"):
        KVStore.open(store_copy).close()


def test_a_manifest_changed_after_the_build_is_detected(store_copy):
    """Each segment records how it was quantized: a manifest edited to another scheme no longer
    describes the store, and verify and every load say so instead of reading on (in a store
    created before manifests were sealed, whose edit only the segments can reveal)."""
    manifest = json.loads((store_copy / "manifest.json").read_text())
    assert manifest["compression"]["quant"] == "int8"
    manifest["compression"]["quant"] = "int4"
    del manifest["build_sha256"]
    (store_copy / "manifest.json").write_text(json.dumps(manifest))
    report = verify_store(store_copy)
    assert not report.ok and "segment was written as int8, the store's manifest says int4" in report.problems[0].message
    # the segments are sound, the manifest is what changed: the repair is not to remove every passage
    assert {p.kind for p in report.problems} == {"manifest"}
    assert "ragcompress remove" not in report.remedy() and "manifest" in report.remedy()
    with KVStore.open(store_copy) as store, pytest.raises(CorruptSegmentError, match="manifest was changed"):
        store.load_kv(next(store.catalogue.entries()))


def test_adding_to_a_store_with_a_damaged_prefix_is_refused_before_writing(tiny_lm, corpus, store_copy):
    """Every passage is read after the prefix: adding passages beside a damaged one would report
    success over a store that cannot answer."""
    prefix = store_copy / PREFIX
    data = bytearray(prefix.read_bytes())
    data[len(data) // 2] ^= 0xFF
    prefix.write_bytes(bytes(data))
    rows = _rows(store_copy)
    with pytest.raises(CorruptSegmentError, match="prefix cache .*checksum mismatch; rebuild the store .*--overwrite"):
        _index(tiny_lm, corpus, store_copy)
    assert _rows(store_copy) == rows


def test_a_run_that_stopped_midway_is_refused_for_answering_until_finished(tiny_lm, corpus, tmp_path):
    """The store a stopped run leaves is intact (verify passes, with a note) but holds part of
    its input: answering refuses it, naming the remedy, until `index` is re-run and finishes."""
    from ragcompress.runtime.engine import Engine

    store = tmp_path / "store"
    _stop_after_two_batches(tiny_lm, corpus, store)
    assert 0 < len(_rows(store)) < N_PASSAGES
    report = verify_store(store)
    assert report.ok and any("stopped before its end" in note for note in report.notes)
    with KVStore.open(store) as opened, pytest.raises(StoreError) as refused:
        Engine(opened, tiny_lm, store_worker.HashEmbedder())
    message = str(refused.value)
    assert f"of an input of {N_PASSAGES} passages" in message and "re-run `ragcompress index`" in message
    _index(tiny_lm, corpus, store)  # resumes and finishes
    assert not any("stopped" in note for note in verify_store(store).notes)
    with KVStore.open(store) as opened:
        assert Engine(opened, tiny_lm, store_worker.HashEmbedder()).retrieve("rivers", 1)


def test_a_run_still_going_in_another_process_does_not_stop_readers(clean_store, tmp_path):
    """Readers of a store that another process is adding to see its committed passages (as
    always); only a run whose process is gone marks the store unfinished."""
    from ragcompress.store.files import RUN, unfinished_run

    store = tmp_path / "store"
    shutil.copytree(clean_store, store)
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (store / RUN).write_text(json.dumps({"pid": alive.pid, "passages": 40, "started": time.time()}))
        assert unfinished_run(store) is None
    finally:
        alive.kill()
        alive.wait()
    assert "stopped before its end" in unfinished_run(store)
    for damaged in ("{not json", '{"pid": 0}', '{"pid": -1}'):  # a damaged marker still marks the run unfinished
        (store / RUN).write_text(damaged)
        assert "stopped before its end" in unfinished_run(store)


def test_a_resume_keeps_the_batch_size_its_stopped_run_recorded(tiny_lm, corpus, tmp_path):
    """A cache's bytes depend on the batch it is encoded in (in bfloat16 enough to change which
    rows a compressor keeps: docs/guarantees.md), and a resume given another ``--batch-size``
    stored other bytes than the uninterrupted run, without a word. The stopped run's marker
    records its size: another is refused naming both before anything is written, and a rerun
    that names none resumes with it, equal to the uninterrupted run byte for byte (full-width
    rows, where a batch's last bits show)."""
    from ragcompress.errors import StoreMismatchError
    from ragcompress.store.files import RUN, unfinished_run

    store, config = tmp_path / "store", replace(CONFIG, quant="none")
    _stop_after_two_batches(tiny_lm, corpus, store, config=config, batch_size=3)
    rows, marker = _rows(store), (store / RUN).read_bytes()
    assert len(rows) == 6 and json.loads(marker)["batch_size"] == 3
    assert unfinished_run(store).endswith("and --batch-size 3 or none (it resumes where it stopped)")
    with pytest.raises(StoreMismatchError) as refused:
        index(corpus, store, lm=tiny_lm, embedder=store_worker.HashEmbedder(), config=config, batch_size=4)
    assert str(refused.value) == (
        f"store {store}: the indexing run that stopped in it encoded batches of 3 passages, this run asks for "
        "--batch-size 4 (batch_size= in Python), and a cache's bytes depend on its batch; resume with "
        "--batch-size 3 (or none), or rebuild the store with --overwrite"
    )
    assert (_rows(store), (store / RUN).read_bytes()) == (rows, marker)  # nothing written
    report = index(corpus, store, lm=tiny_lm, embedder=store_worker.HashEmbedder(), config=config)
    assert (report.indexed, report.skipped) == (N_PASSAGES - 6, 6)
    clean = tmp_path / "clean"
    index(corpus, clean, lm=tiny_lm, embedder=store_worker.HashEmbedder(), config=config, batch_size=3)
    _same_content(store, clean)
    assert unfinished_run(store) is None
    # finished: the next run is not a resume, and takes any size
    index(corpus, store, lm=tiny_lm, embedder=store_worker.HashEmbedder(), config=config, batch_size=5)


def test_a_stopped_run_whose_marker_records_no_batch_size_resumes_with_any(tiny_lm, corpus, tmp_path):
    """Markers written before the batch size was recorded say nothing of it: unknown, so no size
    is refused."""
    from ragcompress.store.files import RUN, stopped_run_batch_size

    store = tmp_path / "store"
    _stop_after_two_batches(tiny_lm, corpus, store, batch_size=3)
    record = json.loads((store / RUN).read_text())
    del record["batch_size"]
    (store / RUN).write_text(json.dumps(record))
    assert stopped_run_batch_size(store) is None
    report = _index(tiny_lm, corpus, store)  # batch_size=BATCH (4)
    assert (report.indexed, report.skipped) == (N_PASSAGES - 6, 6)
    assert not any("stopped" in note for note in verify_store(store).notes)


def test_failed_overwrite_releases_the_lock_and_leaves_no_copy(tiny_lm, corpus, store_copy, clean_store, tmp_path):
    """An --overwrite that fails (here the embedder) leaves the old store as it was, writable at
    once even while the caller keeps the exception (a notebook does), and no half-built copy."""

    with pytest.raises(RuntimeError, match="embedder failed") as caught:
        index(
            corpus,
            store_copy,
            lm=tiny_lm,
            embedder=FailingAtCall(store_worker.HashEmbedder(), 3),
            config=CONFIG,
            batch_size=BATCH,
            overwrite=True,
        )
    assert caught.value is not None  # the exception (and its frames) still held here
    StoreWriter(store_copy).close()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    _same_content(store_copy, clean_store)


def test_overwrite_replaces_store_atomically(tiny_lm, corpus, store_copy, tmp_path):
    _index(tiny_lm, corpus, store_copy, overwrite=True)
    assert verify_store(store_copy).ok
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


# --- input validation memory --------------------------------------------------------------------


def test_validate_memory_does_not_grow_with_ids(tmp_path):
    """Seen ids live in a temporary SQLite table, not a Python set: Python heap stays small."""

    def peak(n: int) -> int:
        path = tmp_path / f"ids{n}.jsonl"
        with open(path, "w") as handle:
            for i in range(n):
                handle.write(f'{{"id": "passage-with-a-long-identifier-{i:08d}", "text": "t"}}\n')
        tracemalloc.start()
        try:
            assert validate(path) == n
            return tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()

    small, large = peak(1_000), peak(10_000)
    assert large - small < 512 << 10, (small, large)  # a set of 10k ids would add ~1.2 MB


def test_validate_refuses_duplicates_across_batches(tmp_path):
    records = [{"id": f"p{i}", "text": "x"} for i in range(1500)] + [{"id": "p3", "text": "again"}]
    with pytest.raises(InputError, match=r"duplicate passage id 'p3'"):
        validate(_write(tmp_path / "dup.jsonl", records))


def test_changed_text_under_a_stored_id_is_refused_before_writing(tiny_lm, corpus, store_copy, tmp_path):
    records = _texts(N_PASSAGES)
    records[17]["text"] = "a different text"
    rows = _rows(store_copy)
    with pytest.raises(InputError, match="'doc-017' is already in .* with different text"):
        _index(tiny_lm, _write(tmp_path / "changed.jsonl", records), store_copy)
    assert _rows(store_copy) == rows


@pytest.mark.parametrize("scheme", ["none", "fp16", "int8", "int4"])
def test_blob_encoding_is_canonical(scheme):
    """Equal caches give equal bytes (safetensors alone orders its metadata at random)."""
    torch.manual_seed(0)
    kv = PassageKV.full(torch.randn(2, 2, 9, 16), torch.randn(2, 2, 9, 16))
    assert len({codec.encode(kv, QuantConfig(scheme)) for _ in range(16)}) == 1


def test_cli_verify_exit_codes_and_json(store_copy):
    """``ragcompress verify``: exit 0 on a sound store; exit 1, one stderr line, JSON naming the
    passage and shard after a flipped byte."""
    from typer.testing import CliRunner

    from ragcompress.cli import app

    command = ["verify", "--store", str(store_copy), "--json"]
    sound = CliRunner().invoke(app, command)
    assert sound.exit_code == 0, sound.stderr
    assert json.loads(sound.stdout) == {
        "ok": True,
        "answerable": True,
        "store": str(store_copy),
        "passages": N_PASSAGES,
        "shards": len(list((store_copy / "shards").iterdir())),
        "problems": [],
        "notes": [],
    }
    victim = _entry(store_copy, "doc-011")
    path = store_copy / "shards" / victim.shard
    data = bytearray(path.read_bytes())
    data[victim.offset + 7] ^= 0x40
    path.write_bytes(bytes(data))
    broken = CliRunner().invoke(app, command)
    assert broken.exit_code == 1
    report = json.loads(broken.stdout)
    assert report["ok"] is False
    assert [(p["passage_id"], p["shard"], p["kind"]) for p in report["problems"]] == [
        ("doc-011", victim.shard, "segment")
    ]
    assert len(broken.stderr.strip().splitlines()) == 1 and "doc-011" in broken.stderr
    assert f"To repair it, remove the 1 damaged passages (`ragcompress remove --store {store_copy} doc-011`)" in (
        broken.stderr
    )


def test_verify_reports_a_catalogue_a_writer_holds_locked_as_busy_not_damaged(store_copy, monkeypatch):
    """A catalogue another process holds locked (here a connection holding it exclusively; a WAL
    reader is not blocked by a writer's ordinary transaction) was a catalogue problem: ``verify`` exited 1, as for a damaged store, and
    advised rebuilding it with ``--overwrite``. Nothing says it is damaged: ``verify_store``
    raises ``StoreBusyError`` (when the catalogue opens, and when a check finds it locked later)
    and ``ragcompress verify`` says so in one line with the remedy, exit 3; released, the store
    verifies."""
    from typer.testing import CliRunner

    from ragcompress.cli import app
    from ragcompress.errors import StoreBusyError
    from ragcompress.store.catalogue import Catalogue

    busy = f"catalogue {store_copy / 'catalogue.sqlite'} is locked by another process writing it (database is locked)"
    holder = sqlite3.connect(store_copy / "catalogue.sqlite", isolation_level=None, timeout=0)
    holder.execute("PRAGMA locking_mode=EXCLUSIVE")
    holder.execute("BEGIN EXCLUSIVE")
    try:
        with pytest.raises(StoreBusyError) as raised:
            verify_store(store_copy)
        assert str(raised.value) == f"{busy}; retry when the writer finishes"
        result = CliRunner().invoke(app, ["verify", "--store", str(store_copy)])
        assert (result.exit_code, result.stdout) == (3, "")
        assert (
            result.stderr == f"error: store {store_copy} is busy, not checked: {busy}; retry when the writer finishes\n"
        )
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert verify_store(store_copy).answerable

    def locked_meanwhile(self):
        with self._guard():
            raise sqlite3.OperationalError("database is locked")

    monkeypatch.setattr(Catalogue, "integrity_problems", locked_meanwhile)
    with pytest.raises(StoreBusyError, match="retry when the writer finishes"):
        verify_store(store_copy)


def test_a_ray_worker_claims_a_shard_only_when_it_writes(tmp_path):
    """A worker given no batch leaves no empty shard behind (a Ray run under load once left one,
    which verify reports as a killed write); two workers never share a shard."""
    from ragcompress.store.shards import SHARD_DIR, ClaimedShards

    (tmp_path / SHARD_DIR).mkdir()
    idle, busy = ClaimedShards(tmp_path, max_bytes=64), ClaimedShards(tmp_path, max_bytes=64)
    idle.sync()
    assert list((tmp_path / SHARD_DIR).iterdir()) == []
    assert busy.append(b"x" * 40) == ("00000.kvs", 0)
    assert idle.append(b"y" * 10) == ("00001.kvs", 0)
    assert busy.append(b"z" * 40) == ("00002.kvs", 0)  # rolled over past max_bytes: a fresh claim
    for shards in (idle, busy):
        shards.close()
    sizes = {p.name: p.stat().st_size for p in (tmp_path / SHARD_DIR).iterdir()}
    assert sizes == {"00000.kvs": 40, "00001.kvs": 10, "00002.kvs": 40}
