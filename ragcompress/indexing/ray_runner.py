"""Indexing on a Ray cluster: ``ragcompress index --ray [ADDRESS|local] --workers N``.

The work is the single-process write path (:mod:`ragcompress.indexing.run`) split in two:

* **workers** (a Ray Data actor pool, :class:`EncodeActor`): each actor loads the model, the
  embedder and the store's compressor once, then turns batches of validated passages into
  records with :meth:`Indexer.records <ragcompress.indexing.Indexer.records>` (the same code,
  settings read back from the store's manifest), appends the blobs to shard files only it writes
  (:class:`~ragcompress.store.shards.ClaimedShards`), fsyncs them and returns the catalogue rows;
* **the driver** (:func:`index_on_ray`) validates the input, creates the store, holds its
  writer lock, commits the rows batch by batch *in input order*, builds the FAISS index and
  finally truncates whatever no committed row points at.

Why the bytes are the single-process run's: batches are cut exactly as ``index()`` cuts them
(``batch_size`` passages in input order, a resumed batch re-encoded whole), a cache depends
only on its batch (not on the thread count, measured), and rows are committed in input order,
so catalogue rows (row numbers included) and segment bytes are the same; only the shard file
and offset of a blob differ (compare with :func:`ragcompress.store.digest.store_digest`).

Failure handling is Ray's and the store's: Ray Data restarts a killed actor (``max_restarts=-1``:
any number of times over a run) and retries its batch up to :data:`BATCH_RETRIES` times
(``max_task_retries``; Ray Data's default, -1, retried a batch that kills its worker every time,
an out-of-memory passage or a crash, forever, and the driver never returned). The restarted
actor claims a new shard, so a half-written blob is never appended to. A batch that killed its
worker on every try stops the run with one error naming the batch and its first and last
passage ids (:class:`BatchStarts` counts the tries; Ray's own error names only the dead actor);
the batches committed before it stay, the run stays marked unfinished, and a rerun resumes. Any
other exception on an actor is returned as data like a library error (:meth:`EncodeActor.__call__`),
raised in its batch's turn after the batches before it are committed. A killed
driver releases the lock (``flock``) and its job's actors die with it; the next run repairs
the shards (:class:`~ragcompress.store.shards.ShardWriter`) and skips committed passages, like
a resumed single-process run. An actor writes batches into a shard in increasing number (Ray
Data does not promise it gets them in order), so what the killed driver had not committed is
always a shard's tail, which that repair truncates.

Workers on several machines need the store (and a local model directory, if one is used) on a
filesystem they all mount at the same path: docs/scaling.md. With ``device="cuda"`` each actor
asks Ray for one GPU and runs the model's forwards there (Ray shows an actor only its own GPU,
as ``cuda``); the driver's model, which writes the prefix cache and fits a basis, stays on the CPU.
"""

from __future__ import annotations

import json
import signal
import socket
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import numpy as np

from ragcompress import errors
from ragcompress.distill.packaged import MATCHING, resolve_adaptor
from ragcompress.errors import InputError, RagCompressError, StoreError
from ragcompress.indexing.batch_starts import BatchStarts
from ragcompress.indexing.config import IndexConfig
from ragcompress.indexing.indexer import Indexer
from ragcompress.indexing.inputs import PassageInput, count_chunks, document_chunks, iter_passages
from ragcompress.indexing.run import (
    IndexReport,
    _batches,
    check_index_arguments,
    count_input,
    create_store_for,
    embedder_window,
    resume_batch_size,
    run_indexer,
    settings_for,
    stale_chunks,
    update_fields,
)
from ragcompress.interrupts import interrupt_on_stop_signals, raise_if_stopped
from ragcompress.models import LoadedModel, load_model
from ragcompress.retrieval import past_window
from ragcompress.store import KVStore, StoreWriter
from ragcompress.store.files import check_creatable, indexing_run, refuse_existing
from ragcompress.store.manifest import MANIFEST
from ragcompress.store.shards import ClaimedShards
from ragcompress.store.writer import catalogue_row

# Ray Data blocks: one per batch up to this many (finest retry and balance), then batches share
# blocks. A block is what a killed actor's retry re-runs.
MAX_BLOCKS = 4096
# Tries of a batch after the first when its actor dies (module doc): bounded, so a batch that kills
# its worker every time ends the run with its name instead of being retried forever.
BATCH_RETRIES = 3


def _passage_json(passage: PassageInput) -> dict[str, Any]:
    return {"id": passage.id, "text": passage.text, "title": passage.title, "meta": passage.meta}


def _error_json(exc: RagCompressError) -> str:
    """A library error as data: Ray Data hands the driver a traceback without the error itself."""
    return json.dumps([type(exc).__name__, str(exc)])


def _batch_label(number: int, payload: str) -> str:
    """``batch N (passages 'first' to 'last')``: how an error names a batch of the input."""
    ids = [p["id"] for p in json.loads(payload)]
    return f"batch {number} (passages {ids[0]!r} to {ids[-1]!r})" if ids else f"batch {number}"


def _unexpected_json(exc: Exception, where: str) -> str:
    """An exception that is not a library error (an embedder's bug, a torch error), as one line
    naming ``where`` it happened, returned like a library error instead of Ray's traceback."""
    reason = str(exc).splitlines()[0] if str(exc) else ""
    return _error_json(RagCompressError(f"{where} failed on a Ray worker: {type(exc).__name__}: {reason}".rstrip(": ")))


def _raise_error(payload: str) -> None:
    """Raise on the driver the library error an actor returned (:func:`_error_json`)."""
    kind, message = json.loads(payload)
    error = getattr(errors, kind, RagCompressError)
    raise (error if isinstance(error, type) and issubclass(error, RagCompressError) else RagCompressError)(message)


class EncodeActor:
    """One Ray Data actor: model, embedder and compressor loaded once; shards of its own.

    Called with a one-row batch ``{"batch", "passages", "skip"}`` (JSON strings), it writes the
    blobs of the passages not in ``skip``, fsyncs them and returns ``{"batch", "rows",
    "vectors", "past", "error"}``: the catalogue rows without embeddings (JSON), the embeddings
    (float32 bytes), how many of them are of passages longer than the embedder reads
    (:func:`~ragcompress.retrieval.past_window`) and ``""``, or no rows and the library error that refused the batch or the actor's
    start (:func:`_error_json`, e.g. a passage too long for the model), raised by the driver.
    Any other exception is returned the same way, as a
    :class:`~ragcompress.errors.RagCompressError` naming the batch (:func:`_unexpected_json`), so
    the driver commits the batches before it first (Ray Data would abort the run). ``starts``
    (:class:`BatchStarts`, None in process) is told of each batch before it is encoded, so that a
    batch that kills the process can be named.
    """

    def __init__(
        self,
        store: str,
        model_ref: str,
        threads: int,
        embedder_factory: Callable[[], Any] | None,
        max_shard_bytes: int | None = None,
        adaptor: str | None = None,
        device: str | None = None,
        starts: Any = None,
    ) -> None:
        import torch

        torch.set_num_threads(threads)
        root = Path(store)
        self.error = ""
        self.starts = starts
        try:
            with KVStore.open(root) as opened:  # the driver created it: settings, dtype, adaptor hash, basis
                lm = load_model(model_ref, dtype=opened.manifest.dtype, device=device)
                embedder = embedder_factory() if embedder_factory is not None else None
                # 'matching' was resolved by the driver: the manifest records the packaged adaptor's hash
                loaded = resolve_adaptor(adaptor, lm.ref, lm.fingerprint) if adaptor and adaptor != MATCHING else None
                self.indexer = Indexer.for_store(opened.manifest, lm, embedder, loaded).with_store_basis(opened)
            self.indexer.prefix_kv  # noqa: B018 - the prefix forward pass once, at start, not in the first batch
            self.shards = ClaimedShards(root, max_shard_bytes)
        except RagCompressError as exc:  # returned with the first batch, raised by the driver
            self.error = _error_json(exc)
        except Exception as exc:  # an embedder factory's or a library's bug: the same, as one line
            self.error = _unexpected_json(exc, "starting a worker (model, embedder, store)")

    def _encode(self, number: int, payload: str, skip: str) -> tuple[str, bytes, int]:
        """The catalogue rows (JSON, embeddings left out), the embeddings of batch ``number`` and
        how many of its passages are longer than the embedder reads."""
        passages = [PassageInput(**p) for p in json.loads(payload)]
        records = self.indexer.records(passages, skip=set(json.loads(skip)))
        self.shards.start_batch(number)
        rows = [catalogue_row(record, *self.shards.append(record.blob)) for record in records]
        self.shards.sync()  # durable before the driver can commit a row pointing here
        vectors = b"".join(row.pop("embedding") for row in rows)
        return json.dumps(rows), vectors, past_window(self.indexer.embedder, [r.text for r in records])

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out_batch, out_rows, out_vectors, out_past, out_errors = [], [], [], [], []
        for number, payload, skip in zip(batch["batch"], batch["passages"], batch["skip"], strict=True):
            rows, vectors, past, error = "[]", b"", 0, self.error
            if not error:
                if self.starts is not None:
                    import ray

                    ray.get(self.starts.start.remote(int(number)))  # recorded before a crash can lose it
                try:
                    rows, vectors, past = self._encode(int(number), payload, skip)
                except RagCompressError as exc:
                    error = _error_json(exc)
                except Exception as exc:
                    error = _unexpected_json(exc, _batch_label(int(number), payload))
            out_batch.append(int(number))
            out_rows.append(rows)
            out_vectors.append(vectors)
            out_past.append(past)
            out_errors.append(error)
        return {
            "batch": np.array(out_batch, dtype=np.int64),
            "rows": np.array(out_rows, dtype=object),
            "vectors": np.array(out_vectors, dtype=object),
            "past": np.array(out_past, dtype=np.int64),
            "error": np.array(out_errors, dtype=object),
        }


def _actor_adaptor(adaptor: str | None) -> str | None:
    """``adaptor`` as the actors resolve it: a folder made absolute (their working directory may
    not be the driver's), a packaged name (``default``, ``matching``, a model's) as given."""
    if adaptor is None or adaptor in ("default", MATCHING) or not Path(adaptor).exists():
        return adaptor
    return str(Path(adaptor).resolve())


def _ray() -> Any:
    """The ``ray`` module, or the remedy when it is not installed (checked before anything loads)."""
    try:
        import ray
    except ImportError:
        raise InputError("--ray needs Ray: pip install 'ragcompress-kv[ray]'") from None
    return ray


def _connect(address: str, cpus: int, gpus: bool = False) -> None:
    """Join the cluster at ``address`` (``auto``, ``ray://host:port``, ``host:port``), or start a
    local one with ``cpus`` CPUs for ``local``; an already connected driver (tests) is reused.
    ``gpus``: the actors ask for a GPU each, so a cluster without one is refused here rather than
    left waiting for one. A cluster that cannot be joined (none running for ``auto``, an address
    Ray cannot read) is one error naming the address, not Ray's traceback."""
    ray = _ray()
    if not ray.is_initialized():
        _check_reachable(address)
        kwargs: dict[str, Any] = {"log_to_driver": False, "include_dashboard": False}
        try:
            if address == "local":
                ray.init(num_cpus=cpus, **kwargs)
            else:
                ray.init(address=address, **kwargs)
            # SIGTERM as Ctrl-C (one line, exit 130), set after ray.init: the driver Ray starts installs
            # a handler of its own that dumped a C++ stack and aborted the process (SIGABRT)
            interrupt_on_stop_signals()
        except (ConnectionError, ValueError, RuntimeError) as exc:
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            if address == "local":
                raise InputError(f"--ray local: cannot start Ray on this machine ({reason})") from None
            raise InputError(
                f"--ray {address}: cannot join a Ray cluster there ({reason}); start one with "
                "`ray start --head` (then --ray auto) or index on this machine with --ray local"
            ) from None
    if gpus and not ray.cluster_resources().get("GPU", 0):
        raise InputError(f"--device cuda with --ray {address}: the Ray cluster has no GPU; index without --device")


@contextmanager
def _ray_session() -> Iterator[None]:
    """Around a run: a Ray driver the run started (``ray.init``: a local instance, or this
    process joined to a cluster) is shut down when the run ends, however it ends, and the
    caller's SIGTERM handler is put back (the run replaced it). A driver
    already running in the process (the caller's) is left as it is. Ray was never shut down, so a
    library caller kept the local instance the run started until its process ended. Shutting
    down a driver that joined a cluster disconnects it; the cluster keeps running. Each local
    instance leaves its logs in Ray's session folder (``/tmp/ray/session_*``; docs/scaling.md)."""
    ray = _ray()
    running = ray.is_initialized()
    main = threading.current_thread() is threading.main_thread()
    sigterm = signal.getsignal(signal.SIGTERM) if main else None
    try:
        yield
    finally:
        try:
            if not running and ray.is_initialized():
                ray.shutdown()
        finally:
            if main:
                signal.signal(signal.SIGTERM, sigterm if sigterm is not None else signal.SIG_DFL)


def _check_reachable(address: str, timeout_s: float = 5.0) -> None:
    """Refuse a ``host:port`` (or ``ray://host:port``) where nothing accepts a connection: Ray
    itself retries such an address for minutes before it gives up, so ``--ray 127.0.0.1:1`` hung
    instead of failing. ``local`` and ``auto`` (found by Ray from this machine) are left to Ray."""
    target = address.removeprefix("ray://")
    if address in ("local", "auto") or ":" not in target:
        return
    host, _, port = target.rpartition(":")
    if not port.isdigit():
        return  # Ray names what it cannot read
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s).close()
    except OSError as exc:
        raise InputError(
            f"--ray {address}: nothing answers there ({exc.strerror or exc}); check the address the head node "
            "printed (`ray start --head`), or index on this machine with --ray local"
        ) from None


def _work(
    writer: StoreWriter, input_path: Path, batch_size: int
) -> tuple[list[dict[str, Any]], int, int, int, dict[str, int] | None]:
    """The batches still to encode (input order, as ``index()`` cuts them), the passages skipped,
    those that will replace a stored one of another text (``replace``; validation refused those
    without it), the skipped ones given the input's other title or metadata (:func:`update_fields`)
    and the input's documents' chunk counts (:func:`stale_chunks`; None for JSONL).

    A batch whose passages are all committed with their text is left out; a partly committed one
    is sent whole with those ids to skip (its cache bits depend on the whole batch)."""
    items, skipped, stale, updated = [], 0, 0, 0
    chunks = document_chunks(input_path)
    for number, batch in enumerate(_batches(iter_passages(input_path), batch_size)):
        count_chunks(chunks, batch)
        known = writer.known_of([p.id for p in batch])
        unchanged = sorted(p.id for p in batch if known.get(p.id) == p.text_sha)
        writer.make_searchable(unchanged)  # ones a query had cached are part of the corpus now
        updated += update_fields(writer, batch, unchanged)
        skipped += len(unchanged)
        stale += len(known) - len(unchanged)
        if len(unchanged) == len(batch):
            continue
        items.append(
            {
                "batch": number,
                "passages": json.dumps([_passage_json(p) for p in batch]),
                "skip": json.dumps(unchanged),
            }
        )
    return items, skipped, stale, updated, chunks


def _results(
    items: list[dict[str, Any]],
    store: Path,
    model_ref: str,
    config: IndexConfig,
    workers: int,
    threads: int,
    embedder_factory: Callable[[], Any] | None,
    gpu: bool = False,
) -> Iterator[tuple[int, list[dict[str, Any]], int]]:
    """``(batch number, catalogue rows, passages longer than the embedder reads)`` in input order, as the actor pool finishes them; the
    library error an actor met is raised here, when its batch's turn comes. A batch that killed
    its actor on all its ``1 + BATCH_RETRIES`` tries is raised as a :class:`StoreError` naming it.
    Run inside :func:`_ray_data_settings`."""
    import ray
    import ray.data
    from ray.data import ActorPoolStrategy

    from ragcompress.store import shards

    starts: Any = ray.remote(num_cpus=0)(BatchStarts).remote()  # ends with its last handle (the dataset's)
    dataset = ray.data.from_items(items, override_num_blocks=min(len(items), MAX_BLOCKS))
    with warnings.catch_warnings():
        # Ray 2.60 deprecates passing remote arguments to map_batches ("will be removed in Ray
        # 2.64": pyproject pins below it) but names no replacement for max_task_retries, the bound
        # on a batch's tries this run needs; the warning, printed as the CLI's own, named nothing
        # a user could do.
        warnings.filterwarnings("ignore", message=r"`ray_remote_args` is deprecated")
        encoded = dataset.map_batches(
            EncodeActor,
            fn_constructor_kwargs={
                "store": str(store.resolve()),  # an actor's working directory may not be the driver's
                "model_ref": model_ref,
                "threads": threads,
                "embedder_factory": embedder_factory,
                "max_shard_bytes": shards.MAX_SHARD_BYTES,
                "adaptor": _actor_adaptor(config.adaptor),
                "device": "cuda" if gpu else None,  # Ray shows each actor its own GPU as cuda:0
                "starts": starts,
            },
            batch_size=1,
            batch_format="numpy",
            compute=ActorPoolStrategy(size=workers),
            num_cpus=threads,
            num_gpus=1 if gpu else None,
            max_restarts=-1,  # a killed actor is restarted, however often that happens over a run
            max_task_retries=BATCH_RETRIES,  # but a batch is tried a bounded number of times
        )
    done: set[int] = set()
    try:
        for row in encoded.iter_rows():
            if row["error"]:
                _raise_error(row["error"])
            done.add(int(row["batch"]))
            yield int(row["batch"]), catalogue_rows(row["rows"], bytes(row["vectors"])), int(row["past"])
    except ray.exceptions.RayActorError:
        counts: dict[int, int] = ray.get(starts.counts.remote())
        raise _worker_died(items, done, counts) from None


@contextmanager
def _ray_data_settings() -> Iterator[None]:
    """Ray Data's settings a run needs (batches back in input order, none of its own progress
    bars), for the run only: they live in the driver's process-wide ``DataContext``, so set and left
    set they made a caller's own Ray Data pipeline in the same driver run afterwards with ours. The
    caller's values come back when the block ends, however it ends (a context manager in
    :func:`index_on_ray`, not a ``finally`` in the :func:`_results` generator, which an error in the
    driver's loop leaves suspended, its ``finally`` unrun, until the generator is collected)."""
    from ray.data import DataContext

    context = DataContext.get_current()
    options = context.execution_options
    saved = options.preserve_order, context.enable_progress_bars
    options.preserve_order, context.enable_progress_bars = True, False
    try:
        yield
    finally:
        options.preserve_order, context.enable_progress_bars = saved


def _worker_died(items: list[dict[str, Any]], done: set[int], starts: dict[int, int]) -> StoreError:
    """The error for a run Ray stopped because an actor died once more than it may: the
    uncommitted batch started most often (the earliest of equals), or, where none started, the
    actors' start (loading the model, the embedder) named instead."""
    payloads = {item["batch"]: item["passages"] for item in items}
    tried = {number: count for number, count in starts.items() if number not in done and number in payloads}
    if not tried:
        return StoreError(
            "a Ray worker died while starting (loading the model or the embedder; out of memory?); "
            "the store keeps the batches committed so far; rerun to resume"
        )
    number = min(tried, key=lambda n: (-tried[n], n))
    return StoreError(
        f"{_batch_label(number, payloads[number])} killed its Ray worker on each of its {tried[number]} tries "
        "(out of memory, a crash); give the workers more memory or leave those passages out; the store keeps "
        "the batches committed before it; rerun to resume"
    )


def catalogue_rows(rows_json: str, vectors: bytes) -> list[dict[str, Any]]:
    """An actor's result as the rows the driver commits: each row given its embedding back
    (``EncodeActor`` returns the rows as JSON and the embeddings as one byte string)."""
    rows = json.loads(rows_json)
    width = len(vectors) // len(rows) if rows else 0
    for i, entry in enumerate(rows):
        entry["embedding"] = vectors[i * width : (i + 1) * width]
    return rows


def index_on_ray(
    input_path: str | Path,
    store_path: str | Path,
    *,
    address: str = "local",
    workers: int = 2,
    threads_per_worker: int = 1,
    model: str | None = None,
    config: IndexConfig | None = None,
    batch_size: int | None = None,
    progress: bool = False,
    lm: LoadedModel | None = None,
    embedder_factory: Callable[[], Any] | None = None,
    replace: bool = False,
    dtype: str | None = None,
    device: str | None = None,
    adaptor: str | None = None,
) -> IndexReport:
    """Index ``input_path`` into ``store_path`` with ``workers`` Ray actors (module doc).

    ``address``: ``local`` starts a Ray instance on this machine with ``workers *
    threads_per_worker`` CPUs; anything else is passed to ``ray.init(address=...)``.
    ``embedder_factory`` builds each actor's embedder (default: the one ``config.embedder``
    names); it is pickled to the actors, so it must be importable there. ``lm`` is the model the
    driver needs for the manifest and the prefix cache (loaded from ``model`` when not given).
    A store built with another model or settings is refused, as by ``index()``; ``replace``
    re-encodes passages stored under their id with another text and commits each in the place of
    the stored one, as ``index(replace=True)`` does; ``--overwrite`` is single-process only.
    ``dtype`` and ``batch_size`` as for ``index()`` (a stopped run, of either, is resumed with the
    batch size it recorded); the actors load the model in the dtype the manifest records.
    ``device``: ``cuda`` (any ``cuda:N``) gives each actor one GPU; ``cpu`` or None, none.
    ``adaptor`` (without ``config``) as for ``index()``.
    """
    start = time.perf_counter()
    check_index_arguments(config, batch_size, model, lm)
    if workers < 1 or threads_per_worker < 1:
        raise InputError("--workers and threads per worker must be at least 1")
    _ray()  # not installed: refused before the model loads or anything is written
    gpu = _wants_gpu(device, address)
    input_path, store_path = Path(input_path), Path(store_path)
    exists = (store_path / MANIFEST).is_file()
    total = count_input(input_path, store_path if exists else None, replace)
    if exists:  # another batch size for a stopped run: refused before Ray starts or the model loads
        resume_batch_size(store_path, batch_size)
    else:
        refuse_existing(store_path)
        check_creatable(store_path)
    config, model, dtype = settings_for(store_path if exists else None, config, model, dtype, adaptor)
    if config.context_neighbors:  # before Ray starts or the model loads (the store's own setting included)
        raise InputError(
            "--context-neighbors: not supported by --ray yet (it needs the whole input's neighbours); index in one process"
        )
    with _ray_session():  # a Ray driver this run starts is shut down when it ends
        if gpu or not exists:  # a new store has work: a cluster that cannot take it is refused before it is created
            _connect(address, workers * threads_per_worker, gpu)
        lm = lm or load_model(model, dtype=dtype)
        embedder = embedder_factory() if embedder_factory is not None else None
        # The driver fits (or, resuming, reads) the basis; actors read it back from the store.
        indexer = run_indexer(lm, config, embedder, input_path, store_path if exists else None)
        indexer.check_lengths(iter_passages(input_path))
        if not exists:
            create_store_for(store_path, indexer)

        indexed = past = 0
        # the lock, held to the end (opening repairs a killed run's shards); the run marked until it
        # ends, from when the cluster is joined (a complete store's rerun starts no Ray at all)
        with StoreWriter(store_path) as writer:
            size = resume_batch_size(store_path, batch_size)
            items, skipped, stale, updated, chunks = _work(writer, input_path, size)
            if items:
                _connect(address, workers * threads_per_worker, gpu)
            with indexing_run(store_path, total, batch_size=size) as finished:
                bar = None
                if progress and items:
                    from tqdm import tqdm

                    bar = tqdm(total=total - skipped, unit="passage", desc="indexing on ray")
                expected = iter(item["batch"] for item in items)
                results = (
                    _results(items, store_path, lm.ref, config, workers, threads_per_worker, embedder_factory, gpu)
                    if items
                    else iter(())
                )
                with _ray_data_settings() if items else nullcontext():  # a rerun with nothing to do imports no Ray Data
                    for number, rows, batch_past in results:
                        raise_if_stopped()  # a SIGTERM or Ctrl-C whose KeyboardInterrupt a finalizer swallowed
                        if number != next(expected):  # commits must follow input order (row numbers)
                            raise StoreError(
                                f"ray returned batch {number} out of order; nothing after it was committed"
                            )
                        writer.commit(rows, replace=replace)
                        indexed += len(rows)
                        past += batch_past
                        if bar is not None:
                            bar.update(len(rows))
                if bar is not None:
                    bar.close()
                writer.write_index()
                writer.repair_shards()  # truncate what no committed row points at (a killed actor's bytes)
                stale_ids = stale_chunks(writer, chunks)
                finished()
    seconds = time.perf_counter() - start
    window = embedder_window(indexer, past)
    return IndexReport(
        total,
        indexed,
        skipped,
        seconds,
        str(store_path),
        stale,
        updated,
        stale_ids,
        past_embedder_window=past,
        embedder_window=window,
    )


def _wants_gpu(device: str | None, address: str) -> bool:
    """Whether the actors take a GPU each: ``device`` names CUDA. On a local Ray instance the
    device is checked as :func:`~ragcompress.models.load_model` checks it (torch must see a GPU);
    a cluster's GPUs are checked on joining it (:func:`_connect`)."""
    from ragcompress.models import parse_device, usable_device

    if device is None:
        return False
    kind = (usable_device(device) if address == "local" else parse_device(device)).type
    if kind not in ("cpu", "cuda"):
        raise InputError(f"--ray indexes on cpu or cuda, not {device!r}")
    return kind == "cuda"
