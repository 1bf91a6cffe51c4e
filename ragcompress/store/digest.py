"""A store's content as a comparable value: what two builds of the same input must share.

Two builds of one input (one process or a Ray cluster, resumed or not) may place blobs at other
shards and offsets; the digest reads each blob through its own row, so equal digests mean the same
passages, the same caches and the same settings, wherever the bytes lie.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from ragcompress.store.kvstore import KVStore
from ragcompress.store.manifest import Manifest
from ragcompress.store.shards import read_blob


def store_digest(path: str | Path) -> dict[str, Any]:
    """What two builds of a store must share to hold the same content: every catalogue row
    (row number, id, title, text, meta, text_sha, length, checksum, token counts, embedding) and
    the sha256 of every blob read through its own (shard, offset), which may differ between the
    builds, plus the prefix cache's sha256 and the manifest's compression and encoding settings
    (a low-rank basis's and an adaptor's hashes among them). ``index.faiss`` is derived and left out."""
    rows = []
    with KVStore.open(path) as store:
        row_numbers, vectors = store.catalogue.embeddings()
        embedding = {int(r): hashlib.sha256(v.tobytes()).hexdigest() for r, v in zip(row_numbers, vectors, strict=True)}
        for entry in store.catalogue.entries():
            blob = read_blob(store.path, entry.shard, entry.offset, entry.length, entry.checksum, entry.id)
            fields = {k: v for k, v in vars(entry).items() if k not in ("shard", "offset")}
            rows.append(
                {**fields, "embedding_sha256": embedding[entry.row], "blob_sha256": hashlib.sha256(blob).hexdigest()}
            )
    manifest = Manifest.read(Path(path))
    settings = {"compression": manifest.compression, "encoding": manifest.encoding}  # basis and adaptor hashes
    return {"prefix_sha256": manifest.prefix_sha256, "settings": settings, "rows": rows}
