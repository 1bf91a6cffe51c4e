"""Subprocess side of the store reliability tests: index a corpus, optionally SIGKILL itself.

``python tests/store_worker.py MODEL_DIR INPUT STORE BATCH KILL`` where ``KILL`` names the point at
which the process sends itself SIGKILL (no cleanup, no ``finally``, no flush), or is ``none``:

``create``       store being created: prefix written, manifest not yet
``append:N``     right after the N-th blob reached the shard file, before its fsync and commit
``commit:N``     the N-th batch's blobs are fsynced, its catalogue rows not committed
``after:N``      right after the N-th batch committed
``index``        index.faiss replaced, index.json not yet written
``slow``         commit normally but sleep 0.3 s after every batch (readers watch)

Shards roll over every ``SHARD_BYTES`` so kills also land around shard boundaries.
"""

from __future__ import annotations

import hashlib
import os
import signal
import sys
import time

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
    from ragcompress.store import catalogue, kvstore, manifest, shards

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

        def add(self, rows):
            count["n"] += 1
            if point == "commit" and count["n"] == int(arg):
                _die()
            original_add(self, rows)
            if point == "after" and count["n"] == int(arg):
                _die()
            if point == "slow":
                time.sleep(0.3)

        catalogue.Catalogue.add = add
    elif point == "index":
        original_write = kvstore._write_atomic

        def write_atomic(path, data):
            if path.name == kvstore.INDEX_META:
                _die()
            original_write(path, data)

        kvstore._write_atomic = write_atomic


def main() -> None:
    model_dir, input_path, store, batch, kill = sys.argv[1:6]
    configure_shards()
    install(kill)
    from ragcompress.indexing import IndexConfig, index
    from ragcompress.models import load_model

    lm = load_model(model_dir)
    print("loaded", flush=True)
    index(
        input_path,
        store,
        lm=lm,
        embedder=HashEmbedder(),
        config=IndexConfig(quant="int8", embedder=HashEmbedder.name),
        batch_size=int(batch),
    )
    print("done", flush=True)


if __name__ == "__main__":
    main()
