"""``ragcompress index --ray`` (ragcompress/indexing/ray_runner.py) on a local Ray cluster that the
module starts (two CPUs, loopback): the same catalogue rows and segment bytes as the
single-process run; a worker killed mid-batch is retried by Ray; a driver killed mid-run resumes;
every store verifies. The kill tests are ``slow`` (each restarts Ray actors, tens of seconds on
two shared cores)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import warnings
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import pytest

ray = pytest.importorskip("ray")

from ragcompress.errors import InputError  # noqa: E402
from ragcompress.indexing import IndexConfig, index  # noqa: E402
from ragcompress.indexing.ray_runner import index_on_ray  # noqa: E402
from ragcompress.store import shards  # noqa: E402
from ragcompress.store.digest import store_digest  # noqa: E402
from ragcompress.store.verify import verify_store  # noqa: E402
from ragcompress.testing import HashEmbedder, noisy_adaptor  # noqa: E402

from conftest import FailingAtCall  # noqa: E402

DRIVER = Path(__file__).parent / "ray_driver.py"
BATCH = 4
N_PASSAGES = 24
CONFIG = IndexConfig(quant="int8", embedder=HashEmbedder().name)
SHARD_BYTES = 8 << 10  # shards roll over every few blobs, so workers claim several


def _texts(n: int) -> list[dict]:
    topics = ["rivers", "castles", "comets", "violins", "glaciers", "bridges"]
    return [
        {"id": f"doc-{i:03d}", "text": f"Passage {i} is about {topics[i % 6]}. " * (1 + i % 5), "title": f"T{i}"}
        for i in range(n)
    ]


@contextmanager
def small_shard_files():
    """Shards of ``SHARD_BYTES`` (rolled over every few blobs), for every test and for the
    module-scoped builds (``monkeypatch`` is per test)."""
    saved, shards.MAX_SHARD_BYTES = shards.MAX_SHARD_BYTES, SHARD_BYTES
    try:
        yield
    finally:
        shards.MAX_SHARD_BYTES = saved


@pytest.fixture(autouse=True)
def small_shards():
    with small_shard_files():
        yield


@pytest.fixture(scope="module")
def cluster():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("ray-corpus") / "passages.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in _texts(N_PASSAGES)))
    return path


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_lm, corpus) -> dict:
    """The single-process store's digest: what every Ray run must reproduce."""
    store = tmp_path_factory.mktemp("ray-reference") / "store"
    with small_shard_files():
        index(corpus, store, lm=tiny_lm, embedder=HashEmbedder(), config=CONFIG, batch_size=BATCH)
    return store_digest(store)


class WindowedHashEmbedder(HashEmbedder):
    """A stand-in with a window of ``window`` words (two of them its markers, as MiniLM's ``[CLS]``
    and ``[SEP]``), counted as :meth:`~ragcompress.retrieval.Embedder.count_past_window` counts."""

    window = 12

    def count_past_window(self, texts):
        return sum(len(t.split()) + 2 > self.window for t in texts)


@pytest.fixture(scope="module")
def ray_store(cluster, tmp_path_factory, tiny_lm, corpus) -> tuple[Path, object]:
    """One Ray build of the corpus (two actors) and its report, shared by the tests that start
    from it (each copies it) or read what the build did: a Ray index of the corpus costs tens of
    seconds beside the other test worker. Its actors' embedder is :class:`WindowedHashEmbedder`
    (:class:`HashEmbedder`'s vectors, so the one-process ``reference`` bytes), whose count of the
    passages past its window the counting test reads from the report."""
    from ray.data import DataContext

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the embedder class, defined here

    store = tmp_path_factory.mktemp("ray-store") / "store"
    context = DataContext.get_current()
    before = _ray_data_settings(context)
    with small_shard_files(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = _ray_index(corpus, store, tiny_lm, factory=WindowedHashEmbedder, workers=2)
    _RAY_STORE_BUILD.update(warnings=[str(w.message) for w in caught], settings=(before, _ray_data_settings(context)))
    return store, report


_RAY_STORE_BUILD: dict[str, list] = {}  # what the ray_store build warned, and the Ray Data settings around it


def _ray_data_settings(context) -> tuple[bool, bool]:
    return context.execution_options.preserve_order, context.enable_progress_bars


def _ray_index(corpus: Path, store: Path, lm, factory=HashEmbedder, workers: int = 1, batch_size: int | None = BATCH):
    """A Ray run of ``corpus`` into ``store``. One actor unless a test is about several (the shared
    build and the killed worker; the killed driver's own run, tests/ray_driver.py, has two): an
    actor's start (a fresh process importing torch and loading the model, about 8 CPU seconds) is
    most of a run's cost, and two starting at once share two busy cores."""
    return index_on_ray(
        corpus, store, lm=lm, config=CONFIG, batch_size=batch_size, workers=workers, embedder_factory=factory
    )


def _clean(store: Path) -> None:
    report = verify_store(store)
    assert report.ok, report.problems
    assert report.notes == [], report.notes  # no unreferenced shard bytes left behind
    assert report.passages == N_PASSAGES


def test_ray_store_has_the_single_process_bytes(ray_store, tmp_path, tiny_lm, corpus, reference):
    built, report = ray_store
    store = tmp_path / "store"
    shutil.copytree(built, store)
    assert (report.indexed, report.skipped) == (N_PASSAGES, 0)
    _clean(store)
    digest = store_digest(store)
    assert digest == reference  # rows (numbers included), blobs, embeddings, prefix
    assert len({p.name for p in (store / "shards").iterdir()}) > 1  # workers' own, rolled-over shards
    again = _ray_index(corpus, store, tiny_lm)
    assert (again.indexed, again.skipped) == (0, N_PASSAGES)


def test_a_ray_run_shows_none_of_rays_deprecation_warnings(ray_store):
    """Ray 2.60 warns that remote arguments to ``map_batches`` are deprecated, without a named
    replacement for the bound on a batch's tries the run needs; the CLI printed it as its own
    ``warning: ...`` line, which named nothing a user could do. (Read from the shared build.)"""
    assert [message for message in _RAY_STORE_BUILD["warnings"] if "ray_remote_args" in message] == []


def test_a_ray_rerun_with_another_title_updates_it_as_one_process_does(tmp_path, tiny_lm, corpus):
    """``_work`` skips what is stored with its text as ``index()`` does, and gives those passages
    the input's other title or metadata (nothing is encoded: no cluster is joined)."""
    store = tmp_path / "store"
    index(corpus, store, lm=tiny_lm, embedder=HashEmbedder(), config=CONFIG, batch_size=BATCH)
    records = _texts(N_PASSAGES)
    records[2]["title"] = "A new title"
    edited = tmp_path / "edited.jsonl"
    edited.write_text("".join(json.dumps(r) + "\n" for r in records))
    report = _ray_index(edited, store, tiny_lm)
    assert (report.indexed, report.skipped, report.updated) == (0, N_PASSAGES, 1)
    _clean(store)


def test_replace_on_ray_has_the_single_process_bytes(ray_store, tmp_path, tiny_lm, corpus):
    """``index --replace --ray``: passages whose text changed are re-encoded by the actors and
    take their stored ones' places; the store equals the one ``index(replace=True)`` leaves in one
    process from the same starting store (rows, numbers, blobs, embeddings)."""
    shutil.copytree(ray_store[0], tmp_path / "ray")
    shutil.copytree(tmp_path / "ray", tmp_path / "single")
    records = _texts(N_PASSAGES)
    for i in (1, 9):  # two batches, each partly changed
        records[i]["text"] += " Changed."
    changed = tmp_path / "changed.jsonl"
    changed.write_text("".join(json.dumps(r) + "\n" for r in records))
    with pytest.raises(InputError, match="--replace"):
        _ray_index(changed, tmp_path / "ray", tiny_lm)
    report = index_on_ray(
        changed,
        tmp_path / "ray",
        lm=tiny_lm,
        config=CONFIG,
        batch_size=BATCH,
        workers=1,
        embedder_factory=HashEmbedder,
        replace=True,
    )
    assert (report.indexed, report.replaced, report.skipped) == (2, 2, N_PASSAGES - 2)
    index(
        changed, tmp_path / "single", lm=tiny_lm, embedder=HashEmbedder(), config=CONFIG, batch_size=BATCH, replace=True
    )
    verified = verify_store(tmp_path / "ray")  # the replaced blobs stay, unreferenced, until compact
    assert verified.ok and verified.passages == N_PASSAGES, verified.problems
    digest = store_digest(tmp_path / "ray")
    assert digest == store_digest(tmp_path / "single")
    assert {row["id"]: row["text"] for row in digest["rows"]}["doc-009"].endswith("Changed.")


def test_device_cuda_asks_a_gpu_per_actor_and_is_refused_where_there_is_none(cluster, tmp_path, tiny_lm, corpus):
    """``--device cuda`` gives each actor one GPU; a Ray cluster without one (this one), or a
    local machine where torch sees none, is refused before anything is written, by name."""
    import torch

    from ragcompress.errors import ModelError
    from ragcompress.indexing.ray_runner import _wants_gpu

    assert not _wants_gpu(None, "local") and not _wants_gpu("cpu", cluster) and _wants_gpu("cuda:1", cluster)
    with pytest.raises(ModelError, match="'tpu:x' is not a torch device"):
        _wants_gpu("tpu:x", cluster)
    store = tmp_path / "store"
    with pytest.raises(InputError, match="the Ray cluster has no GPU"):
        index_on_ray(corpus, store, address=cluster, lm=tiny_lm, config=CONFIG, device="cuda")
    if not torch.cuda.is_available():
        with pytest.raises(ModelError, match="torch sees no CUDA GPU"):
            index_on_ray(corpus, store, address="local", lm=tiny_lm, config=CONFIG, device="cuda")
    assert not store.exists()


def test_ray_missing_or_unreachable_is_one_error_before_anything_is_written(tmp_path, tiny_lm, corpus, monkeypatch):
    """Without Ray, or with a cluster that cannot be joined (``--ray auto`` with none running, an
    address Ray cannot read), the run is refused with one error naming the remedy, before a new
    store is created; adding to an existing store leaves it as it was, not marked mid-run (the
    store was created, or marked, before Ray was joined, so every reader refused it afterwards)."""
    from ragcompress.store.files import unfinished_run

    store = tmp_path / "store"
    with monkeypatch.context() as patch:
        patch.setitem(sys.modules, "ray", None)  # not installed
        with pytest.raises(InputError, match=r"--ray needs Ray: pip install"):
            index_on_ray(corpus, store, lm=tiny_lm, config=CONFIG)
    assert not store.exists()

    def no_cluster(**kwargs):
        raise ConnectionError("Could not find any running Ray instance. Please specify the one to connect to.")

    monkeypatch.setattr(ray, "is_initialized", lambda: False)  # as in a fresh driver (the module's may be up)
    monkeypatch.setattr(ray, "init", no_cluster)
    with pytest.raises(
        InputError, match=r"^--ray auto: cannot join a Ray cluster there \(Could not find .*ray start --head"
    ):
        index_on_ray(corpus, store, address="auto", lm=tiny_lm, config=CONFIG)
    assert not store.exists()
    half = tmp_path / "half.jsonl"
    half.write_text("".join(json.dumps(r) + "\n" for r in _texts(N_PASSAGES)[: N_PASSAGES // 2]))
    index(half, store, lm=tiny_lm, embedder=HashEmbedder(), config=CONFIG, batch_size=BATCH)
    with pytest.raises(InputError, match="cannot join a Ray cluster"):
        index_on_ray(corpus, store, address="auto", lm=tiny_lm, config=CONFIG)
    assert unfinished_run(store) is None and verify_store(store).ok
    # an address where nothing listens: Ray retried it for minutes; refused at once, before ray.init
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()  # bound then closed: nothing accepts there
    for address in (f"127.0.0.1:{port}", f"ray://127.0.0.1:{port}"):
        with pytest.raises(InputError, match=rf"^--ray {address}: nothing answers there .*--ray local"):
            index_on_ray(corpus, store, address=address, lm=tiny_lm, config=CONFIG)
    assert unfinished_run(store) is None and verify_store(store).ok


def test_an_input_error_on_an_actor_is_the_one_line_error_of_one_process(cluster, tmp_path, tiny_lm, monkeypatch):
    """A passage too long for the model is refused by the actor that encodes it; the driver raises
    that ``InputError`` (the CLI's one line), not Ray's wrapped traceback, and the batches
    committed before it stay a store that verifies. (The driver checks every passage's length
    before Ray starts; that check is switched off here, in the driver only, to reach the actor.)"""
    from ragcompress.indexing.indexer import Indexer

    monkeypatch.setattr(Indexer, "check_lengths", lambda self, passages: None)
    records = _texts(2 * BATCH) + [{"id": "long", "text": "word " * 5000}]
    path = tmp_path / "long.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    with pytest.raises(InputError, match=r"^passage 'long' has \d+ tokens, more than .* can attend to"):
        _ray_index(path, tmp_path / "store", tiny_lm)
    assert verify_store(tmp_path / "store").ok


class BoomEmbedder(HashEmbedder):
    """Raises an ordinary exception (not a library error) on a batch holding ``BOOM``."""

    def embed(self, texts):
        if any("BOOM" in t for t in texts):
            raise RuntimeError("embedder exploded on BOOM")
        return super().embed(texts)


def test_a_python_error_on_an_actor_is_one_line_naming_the_batch_after_the_batches_before_it(
    cluster, tmp_path, tiny_lm
):
    """An exception that is not a library error (an embedder's bug) surfaced as Ray's 2,000-char
    traceback, and Ray Data aborted the run before the driver committed the batches before it.
    The actor returns it as a library error naming the batch, raised in that batch's turn."""
    from ragcompress.errors import RagCompressError
    from ragcompress.store.files import unfinished_run

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    records = _texts(3 * BATCH)
    records[2 * BATCH + 1]["text"] = "BOOM " + records[2 * BATCH + 1]["text"]
    path = tmp_path / "boom.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    message = (
        r"^batch 2 \(passages 'doc-008' to 'doc-011'\) failed on a Ray worker: RuntimeError: embedder exploded on BOOM$"
    )
    with pytest.raises(RagCompressError, match=message):
        _ray_index(path, tmp_path / "store", tiny_lm, factory=BoomEmbedder)
    report = verify_store(tmp_path / "store")
    assert report.ok and report.passages == 2 * BATCH, report.problems  # the two batches before it
    assert unfinished_run(tmp_path / "store")  # marked: a rerun resumes


def test_a_ray_run_leaves_the_callers_ray_data_settings_as_they_were(ray_store, tmp_path, tiny_lm, monkeypatch):
    """A run set ``preserve_order`` and hid the progress bars in the driver's process-wide Ray
    Data context and left them so: a caller's own pipeline in the same driver afterwards ran with
    our settings. The caller's values come back after a run (the shared build: Ray Data's
    defaults, the opposite of a run's), and after one that fails in the driver's commit loop (an
    error there left the settings of the suspended generator behind)."""
    from ray.data import DataContext

    from ragcompress.store import StoreWriter

    before, after = _RAY_STORE_BUILD["settings"]
    assert before == after == (False, True)
    context = DataContext.get_current()
    monkeypatch.setattr(context.execution_options, "preserve_order", False)
    monkeypatch.setattr(context, "enable_progress_bars", True)
    path = tmp_path / "passages.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in _texts(2 * BATCH)))

    def failing_commit(self, rows, replace=False):
        raise OSError("disk full")

    monkeypatch.setattr(StoreWriter, "commit", failing_commit)
    with pytest.raises(OSError, match="disk full"):
        _ray_index(path, tmp_path / "other", tiny_lm)
    assert _ray_data_settings(context) == (False, True)


def test_a_ray_run_counts_the_passages_longer_than_the_embedder_reads(ray_store, tmp_path, tiny_lm, corpus):
    """The actors count the passages they embed past the embedder's window, as one process
    does, and the report holds their sum and the window (the CLI's warning). (The shared build's
    report: its actors' embedder is :class:`WindowedHashEmbedder`.)"""
    built, report = ray_store
    past = 14  # the corpus's passages of 15, 20 or 25 words (i % 5 >= 2 in _texts): past the window's 10
    assert (report.past_embedder_window, report.embedder_window) == (past, WindowedHashEmbedder.window)
    single = index(
        corpus, tmp_path / "one", lm=tiny_lm, embedder=WindowedHashEmbedder(), config=CONFIG, batch_size=BATCH
    )
    assert (single.past_embedder_window, single.embedder_window) == (past, WindowedHashEmbedder.window)
    store = tmp_path / "store"
    shutil.copytree(built, store)
    # all stored already: none embedded again, none counted (the embedder that counts, or this could not fail)
    assert _ray_index(corpus, store, tiny_lm, factory=WindowedHashEmbedder).past_embedder_window == 0


def test_ray_refuses_context_neighbors_before_ray_starts_or_the_model_loads(
    tmp_path, tiny_lm, tiny_model_dir, monkeypatch
):
    """``--ray --context-neighbors`` (given, or an existing store's own setting) is refused
    before Ray is joined or the model is loaded (it started a local cluster and loaded the model,
    seconds to minutes, before the refusal)."""
    from ragcompress.indexing import ray_runner

    def must_not_run(*args, **kwargs):
        raise AssertionError("Ray joined or model loaded before --context-neighbors was refused")

    neighbours = replace(CONFIG, context_neighbors=2)
    store = tmp_path / "store"
    index(_write(tmp_path / "few.jsonl", _texts(3)), store, lm=tiny_lm, embedder=HashEmbedder(), config=neighbours)
    monkeypatch.setattr(ray_runner, "_connect", must_not_run)
    monkeypatch.setattr(ray_runner, "load_model", must_not_run)
    model = str(tiny_model_dir("llama"))
    corpus = _write(tmp_path / "more.jsonl", _texts(6))
    with pytest.raises(InputError, match="--context-neighbors: not supported by --ray"):
        index_on_ray(corpus, tmp_path / "new", model=model, config=neighbours)  # a new store
    with pytest.raises(InputError, match="--context-neighbors: not supported by --ray"):
        index_on_ray(corpus, store, model=model)  # the existing store's setting
    assert not (tmp_path / "new").exists()


def _write(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_adaptor_low_rank_and_relative_paths_on_ray_have_the_single_process_bytes(
    cluster, tmp_path, tiny_lm, corpus, monkeypatch
):
    """The actors load the store's adaptor and read the basis the driver fitted: same rows, blobs,
    basis and adaptor hash as one process with the same settings. The store and adaptor folder
    are given relative to the driver's working directory: actors whose working directory is
    another (a cluster started elsewhere; here Ray's, started before the driver moved) get them
    resolved, so they open the store the driver created instead of failing. (One Ray build for
    both: each costs tens of seconds beside the other test worker.)"""
    adaptor = noisy_adaptor(tiny_lm, seed=7).save(tmp_path / "adaptor")
    config = replace(CONFIG, adaptor=str(adaptor), rank=8)
    index(corpus, tmp_path / "single", lm=tiny_lm, embedder=HashEmbedder(), config=config, batch_size=BATCH)
    monkeypatch.chdir(tmp_path)
    report = index_on_ray(
        corpus,
        Path("ray"),
        lm=tiny_lm,
        config=replace(config, adaptor=adaptor.name),
        batch_size=BATCH,
        workers=1,
        embedder_factory=HashEmbedder,
    )
    assert report.indexed == N_PASSAGES
    _clean(tmp_path / "ray")
    digest = store_digest(tmp_path / "ray")
    assert digest["settings"]["encoding"]["adaptor"] and digest["settings"]["compression"]["lowrank"]
    assert digest == store_digest(tmp_path / "single")


def test_an_actor_given_batches_out_of_order_leaves_a_killed_driver_only_shard_tails(tmp_path, tiny_lm, tiny_model_dir):
    """Ray Data may hand an actor batch 2 before batch 1. Were both appended to one shard, a driver
    killed after committing batch 1 would leave batch 2's bytes *before* a committed blob, where
    no repair can cut them (only ``compact``). The actor starts a new shard for a batch numbered
    below one it wrote, so what a killed driver did not commit is always a shard's tail, and the
    next writer truncates it. In process (the actor class without Ray): batch 0 indexed, then
    the actor encodes batch 2 and batch 1 in that order, the driver commits batch 1 only."""
    from ragcompress.indexing.inputs import PassageInput
    from ragcompress.indexing.ray_runner import EncodeActor, _passage_json, catalogue_rows
    from ragcompress.store import StoreWriter

    records = _texts(3 * BATCH)
    first = tmp_path / "first.jsonl"
    first.write_text("".join(json.dumps(r) + "\n" for r in records[:BATCH]))
    store = tmp_path / "store"
    index(first, store, lm=tiny_lm, embedder=HashEmbedder(), config=CONFIG, batch_size=BATCH)
    actor = EncodeActor(str(store), str(tiny_model_dir("llama")), 1, HashEmbedder, max_shard_bytes=1 << 20)
    assert not actor.error, actor.error

    def encode(number: int) -> list[dict]:
        chunk = records[number * BATCH : (number + 1) * BATCH]
        payload = json.dumps([_passage_json(PassageInput(**r)) for r in chunk])
        out = actor({"batch": [number], "passages": [payload], "skip": ["[]"]})
        assert not out["error"][0], out["error"][0]
        return catalogue_rows(out["rows"][0], out["vectors"][0])

    with StoreWriter(store) as writer:  # the driver holds the writer; commits batch 1, then is killed
        encode(2)
        writer.commit(encode(1))
    actor.shards.close()
    with StoreWriter(store):  # the next run opens the store: repairs the shards
        pass
    report = verify_store(store)
    assert report.ok, report.problems
    shard_notes = [note for note in report.notes if "index.faiss" not in note]  # killed before the index
    assert shard_notes == [], shard_notes  # nothing left between committed blobs, no tail
    assert report.passages == 2 * BATCH


class KillOnceEmbedder(HashEmbedder):
    """Kills the actor process it runs in (SIGKILL) at its ``at``-th call: mid-batch, after the
    forward pass. Only the first actor to get there dies (an ``O_EXCL`` marker), so the retry on the
    restarted actor goes through."""

    def __init__(self, marker: str, at: int) -> None:
        super().__init__()
        self.marker, self.at, self.calls = marker, at, 0

    def embed(self, texts):
        self.calls += 1
        if self.calls == self.at:
            try:
                os.close(os.open(self.marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            except FileExistsError:
                pass
            else:
                os.kill(os.getpid(), signal.SIGKILL)
        return super().embed(texts)


@pytest.mark.slow
def test_killed_worker_is_retried(cluster, tmp_path, tiny_lm, corpus, reference):
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    marker = tmp_path / "killed"
    store = tmp_path / "store"
    report = _ray_index(corpus, store, tiny_lm, factory=lambda: KillOnceEmbedder(str(marker), at=3), workers=2)
    assert marker.exists()  # an actor did die mid-batch
    assert report.indexed == N_PASSAGES
    _clean(store)
    assert store_digest(store) == reference


@pytest.mark.slow
def test_killed_driver_resumes(cluster, tmp_path, tiny_lm, tiny_model_dir, corpus, reference):
    store = tmp_path / "store"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    args = [sys.executable, str(DRIVER), cluster, str(tiny_model_dir("llama")), str(corpus), str(store), str(BATCH)]
    done = subprocess.run([*args, "2"], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == -signal.SIGKILL, done.stderr[-2000:]
    partial = verify_store(store)
    assert partial.ok and partial.passages == 2 * BATCH  # the two committed batches, nothing else
    report = _ray_index(corpus, store, tiny_lm)
    assert (report.indexed, report.skipped) == (N_PASSAGES - 2 * BATCH, 2 * BATCH)
    _clean(store)
    assert store_digest(store) == reference


class BatchSizeLogEmbedder(HashEmbedder):
    """Appends the number of passages of each batch it embeds (a whole batch, skipped passages
    included) to the file ``log``: the batches an actor, another process, was given."""

    def __init__(self, log: str) -> None:
        super().__init__()
        self.log = log

    def embed(self, texts):
        with open(self.log, "a") as out:
            out.write(f"{len(texts)}\n")
        return super().embed(texts)


def test_a_ray_resume_keeps_the_batch_size_its_stopped_run_recorded(cluster, tmp_path, tiny_lm, corpus):
    """As in one process (docs/guarantees.md): a stopped run's batch size, recorded in its marker,
    is kept by a Ray rerun that names none (the store then equals the uninterrupted one-process
    run), and another is refused before Ray starts or anything is written. The actors' batches are
    read from their embedder: the tiny float32 model's bytes do not depend on the batch cut, so the
    digests alone were equal with batches of 4 too."""
    from ragcompress.errors import StoreMismatchError

    store = tmp_path / "store"
    with pytest.raises(RuntimeError, match="mid-run"):
        index(corpus, store, lm=tiny_lm, embedder=FailingAtCall(HashEmbedder(), 3), config=CONFIG, batch_size=3)
    with pytest.raises(StoreMismatchError, match=r"batches of 3 passages, this run asks for --batch-size 4"):
        _ray_index(corpus, store, tiny_lm)
    assert verify_store(store).passages == 6
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    sizes = tmp_path / "batch-sizes"
    report = _ray_index(corpus, store, tiny_lm, factory=lambda: BatchSizeLogEmbedder(str(sizes)), batch_size=None)
    assert (report.indexed, report.skipped) == (N_PASSAGES - 6, 6)
    assert sizes.read_text().split() == ["3"] * 6  # batches 2 to 7, as the stopped run cut them
    clean = tmp_path / "clean"
    index(corpus, clean, lm=tiny_lm, embedder=HashEmbedder(), config=CONFIG, batch_size=3)
    assert store_digest(store) == store_digest(clean)


class DieEmbedder(HashEmbedder):
    """Ends its actor's process (``os._exit``, as the OOM killer or a segfault does) on every batch
    holding ``DIE``, up to ``cap`` deaths counted in ``marker`` (so that, were the retries
    unbounded, the test would end, failing, instead of hanging)."""

    def __init__(self, marker: str, cap: int) -> None:
        super().__init__()
        self.marker, self.cap = marker, cap

    def embed(self, texts):
        if any("DIE" in t for t in texts):
            with open(self.marker, "a+") as deaths:
                deaths.seek(0)
                if len(deaths.read()) < self.cap:
                    deaths.write("x")
                    deaths.close()
                    os._exit(1)
        return super().embed(texts)


@pytest.mark.slow
def test_a_batch_that_kills_its_worker_every_time_ends_the_run_naming_it(cluster, tmp_path, tiny_lm, monkeypatch):
    """A batch whose actor process dies on every try (out of memory, a segfault) was retried
    forever (Ray Data's ``max_task_retries=-1``): the driver never returned nor named it. It is
    tried ``1 + BATCH_RETRIES`` times, then the run stops with one error naming the batch and its
    first and last passage ids; the store keeps what was committed and stays resumable. One retry
    here instead of the shipped three (docs/scaling.md's 4 tries): each try restarts the actor, a
    fresh process loading the model, and the bound is the same code whatever its value."""
    from ragcompress.errors import StoreError
    from ragcompress.indexing import ray_runner
    from ragcompress.store.files import unfinished_run

    assert ray_runner.BATCH_RETRIES == 3  # as docs/scaling.md says
    monkeypatch.setattr(ray_runner, "BATCH_RETRIES", 1)
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    records = _texts(2 * BATCH)
    records[BATCH + 1]["text"] += " DIE"
    path = _write(tmp_path / "die.jsonl", records)
    marker = tmp_path / "deaths"
    tries = 2  # 1 + ray_runner.BATCH_RETRIES
    cap = 2 * tries  # unbounded retries would go on past it and then succeed
    store = tmp_path / "store"
    with pytest.raises(
        StoreError,
        match=rf"^batch 1 \(passages 'doc-004' to 'doc-007'\) killed its Ray worker on each of its {tries} tries",
    ):
        _ray_index(path, store, tiny_lm, factory=lambda: DieEmbedder(str(marker), cap))
    assert len(marker.read_text()) == tries
    assert unfinished_run(store) and verify_store(store).ok


def test_the_batch_counting_actor_imports_neither_torch_nor_transformers():
    """A Ray worker imports the module that defines its actor's class: the batch counter
    (:class:`~ragcompress.indexing.ray_runner.BatchStarts`) was defined in ``ray_runner``, whose
    imports (the indexing package, torch, transformers) cost its worker 2-3.5 CPU seconds a run."""
    from ragcompress.indexing import ray_runner

    module = ray_runner.BatchStarts.__module__
    code = f"import sys, {module}; print(sorted({{'torch', 'transformers'}} & set(sys.modules)))"
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert loaded.strip() == "[]", f"importing {module} loads {loaded.strip()}"


def test_a_ray_run_shuts_down_only_the_ray_it_started(tmp_path, tiny_lm, corpus, monkeypatch):
    """``--ray local`` started a Ray instance and never shut it down (a library caller kept it
    until its process ended); a run now shuts down the Ray it started, even when it fails, and
    leaves a driver the caller had started running. The caller's SIGTERM handler is put back."""
    from ragcompress.errors import StoreError
    from ragcompress.indexing import ray_runner

    state = {"up": False, "inits": 0, "shutdowns": 0}

    def init(**kwargs):
        state["up"], state["inits"] = True, state["inits"] + 1

    def shutdown():
        state["up"], state["shutdowns"] = False, state["shutdowns"] + 1

    def stop(*args, **kwargs):
        raise StoreError("stopped on purpose")

    monkeypatch.setattr(ray, "is_initialized", lambda: state["up"])
    monkeypatch.setattr(ray, "init", init)
    monkeypatch.setattr(ray, "shutdown", shutdown)
    monkeypatch.setattr(ray_runner, "_results", stop)
    handler = signal.getsignal(signal.SIGTERM)
    with pytest.raises(StoreError, match="stopped on purpose"):
        index_on_ray(corpus, tmp_path / "started", lm=tiny_lm, config=CONFIG, batch_size=BATCH)
    assert (state["inits"], state["shutdowns"], state["up"]) == (1, 1, False)
    assert signal.getsignal(signal.SIGTERM) is handler
    state["up"] = True  # the caller's own driver
    with pytest.raises(StoreError, match="stopped on purpose"):
        index_on_ray(corpus, tmp_path / "joined", lm=tiny_lm, config=CONFIG, batch_size=BATCH)
    assert (state["inits"], state["shutdowns"], state["up"]) == (1, 1, True)


@pytest.mark.slow
def test_sigterm_to_a_local_ray_run_is_the_interrupted_line(tmp_path, tiny_model_dir):
    """SIGTERM to ``index --ray local`` ended in Ray's C++ stack dump and SIGABRT (the driver Ray
    starts has a SIGTERM handler of its own); it is now Ctrl-C's one line and exit status 130,
    and the store resumes like one interrupted by Ctrl-C."""
    from ragcompress.testing import sigterm_once_marked

    corpus = tmp_path / "passages.jsonl"  # long enough to be running two seconds after Ray started
    corpus.write_text("".join(json.dumps(r) + "\n" for r in _texts(400)))
    store = tmp_path / "store"
    command = [sys.executable, "-m", "ragcompress.cli", "index", "--input", str(corpus), "--store", str(store)]
    command += ["--model", str(tiny_model_dir("llama")), "--quant", "int8", "--ray", "local", "--workers", "1"]
    command += ["--batch-size", "2"]
    code, err = sigterm_once_marked(command, store, settle_s=2)  # the run is marked once Ray has started
    assert code == 130, err[-2000:]
    assert err.rstrip().splitlines()[-1] == "error: interrupted (run it again: it resumes where it stopped)"
    assert "SIGTERM received" not in err and "Traceback" not in err
    assert verify_store(store).ok
