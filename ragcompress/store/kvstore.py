"""The KV-cache store: a directory that holds everything needed to answer from stored caches.

Layout (DESIGN §2)::

    DIR/manifest.json        what the store was built with (written last at creation)
    DIR/prefix.safetensors   the shared prefix cache, uncompressed
    DIR/catalogue.sqlite     passage id -> text, embedding, shard, offset, length, checksum
    DIR/shards/NNNNN.kvs     passage blobs (safetensors documents) back to back
    DIR/index.faiss          FAISS index over catalogue rows (derived; rebuilt when stale)
    DIR/lock                 held by the one writer

One writer at a time (an exclusive ``flock``); any number of readers, which see only committed
passages. Nothing in a store is ever unpickled.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ragcompress.errors import StoreError
from ragcompress.kv import PassageKV
from ragcompress.quant import QuantConfig
from ragcompress.retrieval import VectorIndex
from ragcompress.store import codec
from ragcompress.store.catalogue import CATALOGUE, Catalogue, Entry
from ragcompress.store.manifest import MANIFEST, Manifest
from ragcompress.store.shards import ShardWriter, checksum, read_blob

PREFIX = "prefix.safetensors"
INDEX = "index.faiss"
LOCK = "lock"


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def create_store(path: Path, manifest: Manifest, prefix_kv: PassageKV) -> None:
    """Initialise an empty store at ``path`` atomically (built in a temp dir, then renamed).

    ``path`` must not exist or be an empty directory: ragcompress never writes into a folder it
    did not create.
    """
    if path.exists():
        if not path.is_dir() or any(path.iterdir()):
            raise StoreError(f"{path} exists and is not an empty directory or a ragcompress store")
        path.rmdir()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.init-", dir=path.parent))
    try:
        blob = codec.encode(prefix_kv, QuantConfig("none"))
        _write_atomic(tmp / PREFIX, blob)
        Catalogue(tmp, readonly=False).close()
        manifest.write(tmp)
        os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


class KVStore:
    """Read access to a store. Open with :meth:`open`; use as a context manager."""

    def __init__(self, path: Path, manifest: Manifest) -> None:
        self.path = path
        self.manifest = manifest
        self.catalogue = Catalogue(path, readonly=True)
        self._prefix: PassageKV | None = None
        self._index: VectorIndex | None = None

    @classmethod
    def open(cls, path: str | Path) -> "KVStore":
        path = Path(path)
        if not path.exists():
            raise StoreError(f"store {path} does not exist; build it with `ragcompress index --store {path}`")
        manifest = Manifest.read(path)
        for name in (PREFIX, CATALOGUE):
            if not (path / name).is_file():
                raise StoreError(f"store {path} is incomplete: {name} is missing; rebuild it")
        return cls(path, manifest)

    def __enter__(self) -> "KVStore":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        self.catalogue.close()

    def __len__(self) -> int:
        return self.catalogue.count()

    @property
    def quant(self) -> QuantConfig:
        comp = self.manifest.compression
        return QuantConfig(comp.get("quant", "none"), int(comp.get("group_size", 32)))

    def prefix_kv(self, dtype: torch.dtype = torch.float32) -> PassageKV:
        if self._prefix is None:
            self._prefix = codec.decode((self.path / PREFIX).read_bytes(), dtype)
        return self._prefix

    def entry(self, passage_id: str) -> Entry:
        found = self.catalogue.get(passage_id)
        if found is None:
            raise StoreError(f"passage {passage_id!r} is not in store {self.path}")
        return found

    def load_kv(self, entry: Entry, dtype: torch.dtype = torch.float32) -> PassageKV:
        """Read, verify (sha256) and decode one passage's cache; errors name the passage."""
        blob = read_blob(self.path, entry.shard, entry.offset, entry.length, entry.checksum, entry.id)
        kv = codec.decode(blob, dtype)
        if kv.num_tokens != entry.num_tokens or kv.kept_tokens != entry.kept:
            raise StoreError(f"passage {entry.id!r}: blob does not match its catalogue row")
        return kv

    def index(self) -> VectorIndex:
        """The FAISS index; rebuilt in memory from catalogue embeddings when missing or stale."""
        if self._index is None:
            count = len(self)
            path = self.path / INDEX
            loaded = VectorIndex.load(path) if path.is_file() else None
            if loaded is None or loaded.count != count:
                loaded = VectorIndex(*self.catalogue.embeddings())
            self._index = loaded
        return self._index

    def search(self, query_vector: np.ndarray, k: int) -> list[tuple[Entry, float]]:
        hits = self.index().search(query_vector, k)
        entries = self.catalogue.by_rows([row for row, _ in hits])
        return [(entries[row], score) for row, score in hits if row in entries]

    def stored_bytes(self, entries: list[Entry]) -> int:
        return sum(e.length for e in entries)


class StoreWriter:
    """The single writer of a store: holds the lock, appends blobs, commits catalogue rows."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = open(path / LOCK, "a+")
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock.seek(0)
            holder = self._lock.read().strip() or "another process"
            self._lock.close()
            raise StoreError(
                f"store {path} is being written by {holder}; wait for it to finish (one writer at a time)"
            ) from None
        self._lock.seek(0)
        self._lock.truncate()
        self._lock.write(f"pid {os.getpid()}")
        self._lock.flush()
        self.catalogue = Catalogue(path, readonly=False)
        self.shards = ShardWriter(path, self.catalogue.committed_ends())

    def __enter__(self) -> "StoreWriter":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def known(self) -> dict[str, str]:
        """Committed passage ids and the sha256 of their text."""
        return self.catalogue.text_shas()

    def add(self, items: list[dict[str, Any]]) -> None:
        """Store a batch: blobs appended and fsynced, then their rows committed together.

        Each item has ``id, title, text, meta, text_sha, blob, num_tokens, kept, embedding``.
        """
        rows = []
        for item in items:
            shard, offset = self.shards.append(item["blob"])
            rows.append({
                "id": item["id"], "title": item["title"], "text": item["text"],
                "meta": json.dumps(item["meta"], sort_keys=True, ensure_ascii=False),
                "text_sha": item["text_sha"], "shard": shard, "offset": offset,
                "length": len(item["blob"]), "checksum": checksum(item["blob"]),
                "num_tokens": item["num_tokens"], "kept": item["kept"],
                "embedding": np.ascontiguousarray(item["embedding"], dtype=np.float32).tobytes(),
            })
        self.shards.sync()
        self.catalogue.add(rows)

    def write_index(self) -> None:
        VectorIndex(*self.catalogue.embeddings()).save(self.path / INDEX)

    def close(self) -> None:
        self.shards.close()
        self.catalogue.close()
        if not self._lock.closed:
            fcntl.flock(self._lock, fcntl.LOCK_UN)
            self._lock.close()
