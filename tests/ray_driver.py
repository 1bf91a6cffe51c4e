"""Subprocess side of tests/test_ray_indexing.py: a Ray indexing driver that SIGKILLs itself.

``python tests/ray_driver.py ADDRESS MODEL_DIR INPUT STORE BATCH KILL_AFTER`` joins the Ray cluster
at ``ADDRESS`` and indexes INPUT into STORE with two workers; right after its ``KILL_AFTER``-th
catalogue commit it sends itself SIGKILL (no cleanup, no ``finally``), leaving the store as a
driver killed mid-run leaves it: committed batches, fsynced blobs no row points at yet.
"""

from __future__ import annotations

import os
import signal
import sys


def main() -> None:
    address, model_dir, input_path, store, batch, kill_after = sys.argv[1:7]
    from ragcompress.indexing import IndexConfig
    from ragcompress.indexing.ray_runner import index_on_ray
    from ragcompress.models import load_model
    from ragcompress.store import StoreWriter
    from ragcompress.testing import HashEmbedder

    original = StoreWriter.commit
    commits = {"n": 0}

    def commit(self, rows, replace=False):
        original(self, rows, replace=replace)
        commits["n"] += 1
        if commits["n"] == int(kill_after):
            print("killing", flush=True)
            os.kill(os.getpid(), signal.SIGKILL)

    StoreWriter.commit = commit
    index_on_ray(
        input_path,
        store,
        address=address,
        workers=2,
        lm=load_model(model_dir),
        config=IndexConfig(quant="int8", embedder=HashEmbedder().name),
        batch_size=int(batch),
        embedder_factory=HashEmbedder,
    )
    print("done", flush=True)


if __name__ == "__main__":
    main()
