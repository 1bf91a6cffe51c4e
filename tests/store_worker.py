"""Subprocess side of the store reliability tests: index a corpus, optionally SIGKILL itself.

``python tests/store_worker.py MODEL_DIR INPUT STORE BATCH KILL [--overwrite] [--trace FILE]``
where ``KILL`` names the point at which the process sends itself SIGKILL (no cleanup, no
``finally``, no flush), or is ``none``:

``create``       store being created: prefix written, manifest not yet
``append:N``     right after the N-th blob reached the shard file, before its fsync and commit
``commit:N``     the N-th batch's blobs are fsynced, its catalogue rows not committed
``after:N``      right after the N-th batch committed
``index``        index.faiss replaced, index.json not yet written
``slow``         commit normally but sleep 0.3 s after every batch (readers watch)

``--trace FILE`` (opt-in instrumentation, used by the random-instant kill test) appends one line per
phase boundary to FILE, ``<CLOCK_MONOTONIC ns> +phase|-phase|=note [detail]``, each line one
``write(2)`` on an ``O_APPEND`` descriptor, so what a SIGKILLed worker wrote is in the file and the
innermost phase still open at the end of the file is where the kill landed. It adds no sleeps.
With it, two gated ``KILL`` modes freeze the worker (SIGSTOP) at an instant too short to hit by
chance, for the test to SIGKILL from outside:

``stop:blob:N``  inside the library's ``write`` of the N-th blob, with half of its bytes in the shard
``stop:swap``    in ``--overwrite``'s final swap: the exchange done, the old store half deleted

Shards roll over every ``SHARD_BYTES`` so kills also land around shard boundaries.
"""

from __future__ import annotations

import hashlib
import os
import signal
import sys
import time
from pathlib import Path

import numpy as np

SHARD_BYTES = 8 << 10


class HashEmbedder:
    """Deterministic 32-dim unit vectors from sha512 of the text: no model to load."""

    name = "hash-test-embedder"

    def embed(self, texts: list[str]) -> np.ndarray:
        raw = [np.frombuffer(hashlib.sha512(t.encode("utf-8")).digest()[:32], dtype=np.uint8) for t in texts]
        vectors = np.stack(raw).astype(np.float32) + 1.0
        return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def configure_shards() -> None:
    from ragcompress.store import shards

    shards.MAX_SHARD_BYTES = SHARD_BYTES


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def install(kill: str) -> None:
    """Patch the store modules so this process SIGKILLs itself at ``kill`` (see module doc)."""
    from ragcompress.store import catalogue, files, manifest, shards, writer

    point, _, arg = kill.partition(":")
    count = {"n": 0}
    if point == "create":
        manifest.Manifest.write = lambda self, directory: _die()
    elif point == "append":
        original_append = shards.ShardWriter.append

        def append(self, blob):
            result = original_append(self, blob)
            count["n"] += 1
            if count["n"] == int(arg):
                self._handle.flush()  # the bytes reach the file, as a kill during fsync would leave them
                _die()
            return result

        shards.ShardWriter.append = append
    elif point in ("commit", "after", "slow"):
        original_add = catalogue.Catalogue.add

        def add(self, rows, replace=False):
            count["n"] += 1
            if point == "commit" and count["n"] == int(arg):
                _die()
            original_add(self, rows, replace)
            if point == "after" and count["n"] == int(arg):
                _die()
            if point == "slow":
                time.sleep(0.3)

        catalogue.Catalogue.add = add
    elif point == "index":  # the writer records the FAISS index's sha256 last (StoreWriter.write_index)
        original_write = writer.write_atomic

        def dying_write(path, data):
            if path.name == files.INDEX_META:
                _die()
            original_write(path, data)

        writer.write_atomic = dying_write


class Trace:
    """Phase markers on an append-only file (see module doc): one ``write(2)`` per line."""

    def __init__(self, path: str) -> None:
        self.fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def mark(self, kind: str, name: str, detail: str = "") -> None:
        os.write(self.fd, f"{time.monotonic_ns()} {kind}{name} {detail}".rstrip().encode() + b"\n")

    def phase(self, name: str, function, detail=None):
        """``function`` wrapped so that calls are bracketed by ``+name`` / ``-name``."""
        mark = self.mark

        def traced(*args, **kwargs):
            mark("+", name, detail(*args, **kwargs) if detail else "")
            result = function(*args, **kwargs)
            mark("-", name)
            return result

        return traced


def _freeze(trace: Trace, what: str) -> None:
    """Stop here (SIGSTOP): the test sees ``=stopped`` and SIGKILLs this process from outside."""
    trace.mark("=", "stopped", what)
    os.kill(os.getpid(), signal.SIGSTOP)


def install_trace(path: str, kill: str) -> Trace:
    """Wrap the write path's phases with markers; arm the ``stop:`` gates (module doc).

    Phases: ``validate`` (input pass), ``setup`` (template, manifest), ``prefix-encoding`` (the
    shared prefix's forward pass), ``create`` (new store: prefix, catalogue, manifest, rename),
    ``open-writer`` (lock, repair), ``encoding`` (tokenize, forward, compress, quantize, embed),
    ``blob-write`` (``ShardWriter.append``), ``fsync`` (shard file and directory),
    ``catalogue-commit`` (one SQLite transaction), ``index-build`` (FAISS build, save, index.json),
    ``writer-close``, ``overwrite-swap`` (``replace_store``) and inside it ``exchange`` and ``cleanup``
    (deleting the old store). Nothing outside ``tests/`` is changed; the wrappers call the originals.
    """
    import shutil

    from ragcompress import paths
    from ragcompress.indexing import encoder, indexer, run
    from ragcompress.store import catalogue, files, shards

    trace = Trace(path)
    point, _, arg = kill.partition(":")
    gate = {"blob": int(arg.split(":")[1]) if arg.startswith("blob:") else 0, "armed": False, "n": 0}

    run.validate = trace.phase("validate", run.validate)
    indexer.Indexer.from_config = classmethod(trace.phase("setup", indexer.Indexer.from_config.__func__))
    encoder.PassageEncoder.__init__ = trace.phase("prefix-encoding", encoder.PassageEncoder.__init__)
    run.create_store = trace.phase("create", run.create_store)
    run.StoreWriter.__init__ = trace.phase("open-writer", run.StoreWriter.__init__)
    run.StoreWriter.write_index = trace.phase("index-build", run.StoreWriter.write_index)
    run.StoreWriter.close = trace.phase("writer-close", run.StoreWriter.close)
    indexer.Indexer.records = trace.phase(
        "encoding", indexer.Indexer.records, lambda self, passages, skip=(), pool=None: f"{len(passages)} passages"
    )
    catalogue.Catalogue.add = trace.phase(
        "catalogue-commit", catalogue.Catalogue.add, lambda self, rows, replace=False: f"{len(rows)} rows"
    )
    shards.ShardWriter.sync = trace.phase("fsync", shards.ShardWriter.sync)
    traced_swap = trace.phase("overwrite-swap", run.replace_store)

    def replace_store(built, path):
        gate["swapping"] = True
        traced_swap(built, path)
        gate["swapping"] = False

    run.replace_store = replace_store
    files._exchange = trace.phase("exchange", files._exchange)

    original_append = shards.ShardWriter.append

    def append(self, blob):
        gate["n"] += 1
        trace.mark("+", "blob-write", f"blob {gate['n']}, {len(blob)} bytes")
        gate["armed"] = gate["n"] == gate["blob"]
        result = original_append(self, blob)
        trace.mark("-", "blob-write", f"{result[0]} @ {result[1]}")
        return result

    shards.ShardWriter.append = append

    def gated(handle, file):
        """A shard handle opened to append whose ``write`` honours the blob gate."""
        write = handle.write

        def gated_write(data):
            if not gate["armed"]:
                return write(data)
            half = len(data) // 2
            write(bytes(data[:half]))
            handle.flush()  # the half blob reaches the file, as a kill inside write(2) leaves it
            _freeze(trace, f"inside write of blob {gate['n']}: {half} of {len(data)} bytes in {Path(file).name}")
            return write(bytes(data[half:]))

        handle.write = gated_write
        return handle

    # the writer opens its shards to append through ``_open_shard`` (never following a link)
    original_open_shard = shards._open_shard

    def open_shard(path, append):
        handle = original_open_shard(path, append)
        return gated(handle, path) if append else handle

    shards._open_shard = open_shard

    class _Shutil:
        """``files``'s and ``paths``'s ``shutil`` (``paths.remove_tree`` deletes the old store)
        with ``rmtree`` traced (as ``cleanup``) and, for ``stop:swap``, frozen with the old store
        half deleted."""

        def __getattr__(self, name):
            return getattr(shutil, name)

        @staticmethod
        def rmtree(target, *args, **kwargs):
            trace.mark("+", "cleanup", Path(target).name)
            if point == "stop" and arg == "swap" and gate.get("swapping"):
                files = sorted(p for p in Path(target).rglob("*") if p.is_file())
                for victim in files[: len(files) // 2]:
                    victim.unlink()
                _freeze(trace, f"old store in {Path(target).name}: {len(files) // 2} of {len(files)} files deleted")
            shutil.rmtree(target, *args, **kwargs)
            trace.mark("-", "cleanup")

    files.shutil = paths.shutil = _Shutil()
    return trace


def main() -> None:
    args = sys.argv[1:]
    overwrite = "--overwrite" in args
    args = [a for a in args if a != "--overwrite"]
    trace_path = None
    if "--trace" in args:
        at = args.index("--trace")
        trace_path = args[at + 1]
        del args[at : at + 2]
    model_dir, input_path, store, batch, kill = args[:5]
    configure_shards()
    trace = install_trace(trace_path, kill) if trace_path else None
    if not kill.startswith("stop:"):
        install(kill)
    from ragcompress.indexing import IndexConfig, index
    from ragcompress.models import load_model

    lm = load_model(model_dir)
    print("loaded", flush=True)
    if trace:
        trace.mark("+", "run", "overwrite" if overwrite else "")
    index(
        input_path,
        store,
        lm=lm,
        embedder=HashEmbedder(),
        config=IndexConfig(quant="int8", embedder=HashEmbedder.name),
        batch_size=int(batch),
        overwrite=overwrite,
    )
    if trace:
        trace.mark("-", "run")
    print("done", flush=True)


if __name__ == "__main__":
    main()
