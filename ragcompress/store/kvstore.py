"""The KV-cache store: a directory that holds everything needed to answer from stored caches.

Layout (DESIGN §2)::

    DIR/manifest.json        what the store was built with (written last at creation)
    DIR/prefix.safetensors   the shared prefix cache, uncompressed
    DIR/basis.safetensors    a low-rank store's per-layer bases (``store/basis.py``), sha256 in the manifest
    DIR/catalogue.sqlite     passage id -> text, embedding, shard, offset, length, checksum (xxh3-128),
                             meta_checksum (xxh3-128 of the other fields), searchable (retrieval
                             covers the row) sealed by searchable_checksum (store/catalogue.py)
    DIR/shards/NNNNN.kvs     passage blobs (safetensors documents) back to back
    DIR/index.faiss          FAISS index over catalogue rows (derived; rebuilt when stale)
    DIR/index.json           sha256 and row count of index.faiss, written after it
    DIR/lock                 held by the one writer

One writer at a time (an exclusive ``flock``); any number of readers, which see only committed
passages. Nothing in a store is ever unpickled: blobs and the prefix are safetensors, the
manifest and index.json are JSON, the catalogue is SQLite, and index.faiss (FAISS's own binary
format, which cannot run code) is read only when its sha256 matches index.json, otherwise the
index is rebuilt from the catalogue's embeddings.
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ragcompress.errors import CorruptSegmentError, InputError, StoreError, StoreMismatchError, missing_store
from ragcompress.kv import ModelShape, PassageKV
from ragcompress.kv.lowrank import LowRankBasis
from ragcompress.kv.quant import QuantConfig
from ragcompress.paths import sha256_file
from ragcompress.retrieval import VectorIndex
from ragcompress.store import ann, codec
from ragcompress.store.basis import BASIS, read_basis
from ragcompress.store.catalogue import CATALOGUE, Catalogue, Entry
from ragcompress.store.files import INDEX, INDEX_META, PREFIX
from ragcompress.store.jsontext import loads_json
from ragcompress.store.manifest import MANIFEST, Manifest
from ragcompress.store.shards import read_blob


def build_index(catalogue: Catalogue, params: dict[str, Any] | None = None) -> tuple[VectorIndex, dict[str, Any]]:
    """FAISS index over every committed row, streamed from the catalogue chunk by chunk, and its
    description for the manifest. Its type (flat or IVF) is chosen by the row count
    (:mod:`ragcompress.store.ann`) unless ``params`` say; an IVF index is trained on an evenly
    spaced sample of the rows and its ``nprobe`` tuned to the recall target."""
    params = params or ann.index_params(catalogue.count())
    training = None
    if params["type"] == "ivf":
        training = catalogue.embedding_sample(ann.TRAINING_PER_CELL * int(params["nlist"]))
    index = None
    count = 0
    for rows, vectors in catalogue.embedding_chunks():
        if index is None:
            index = ann.new_index(vectors.shape[1], params, training)
            training = None  # trained: the sample (up to 256 vectors a cell) is not held while the rows are added
        elif vectors.shape[1] != index.d:
            raise StoreError(f"catalogue {catalogue.path}: embeddings change dimension at row {rows[0]}")
        index.add_with_ids(np.ascontiguousarray(vectors), rows)
        count += len(rows)
    if index is None:
        return VectorIndex(np.zeros(0, dtype=np.int64), np.zeros((0, 0), dtype=np.float32)), {**params, "count": 0}
    described: dict[str, Any] = {**params, "count": count}
    if params["type"] != "flat":
        nprobe, recall = ann.tune_nprobe(index)
        described["nprobe"] = nprobe
        if recall is not None:
            described.update({f"recall_at_{ann.RECALL_K}": round(recall, 4), "recall_queries": ann.RECALL_QUERIES})
    built = VectorIndex.__new__(VectorIndex)
    built.index, built.count = index, count
    return built, described


def read_index_meta(path: Path) -> dict[str, Any] | None:
    """``index.json`` as ``{"sha256": str, "count": int, "generation": int}``, or None when absent
    or malformed. ``generation`` is the catalogue's (:meth:`Catalogue.generation`) when the index
    was built; an index written before generations existed reads as 0."""
    try:
        meta = loads_json((path / INDEX_META).read_bytes())
    except (OSError, ValueError):
        return None
    if not isinstance(meta, dict) or not isinstance(meta.get("sha256"), str) or type(meta.get("count")) is not int:
        return None
    meta.setdefault("generation", 0)
    if type(meta["generation"]) is not int:
        return None
    return meta


def read_prefix(path: Path, shape: ModelShape) -> bytes:
    """The bytes of the store's ``prefix.safetensors``, refused unread when the file is larger than
    any prefix the manifest's ``shape`` allows (keys and values of the most elements a blob may
    decode, at 4 bytes each, with their lengths and a header): the checksum comes after the read,
    and a hostile store's sparse 64 GiB file would end in a MemoryError traceback."""
    file = path / PREFIX
    limit = 8 * codec.MAX_DECODED_ELEMENTS + 4 * shape.layers * shape.kv_heads + (1 << 20)
    try:
        size = file.stat().st_size
        if size > limit:
            raise CorruptSegmentError(
                f"prefix cache {file} has {size} bytes, more than a prefix of this model can ({limit}); rebuild the store"
            )
        return file.read_bytes()
    except OSError as exc:
        raise CorruptSegmentError(f"prefix cache {file} cannot be read ({exc})") from None
    except MemoryError:
        raise CorruptSegmentError(f"prefix cache {file} ({size} bytes) does not fit in memory") from None


def index_is_current(meta: dict[str, Any], count: int, generation: int) -> bool:
    """Whether the index ``meta`` (:func:`read_index_meta`) describes covers the catalogue's rows
    as they are now: the same number of rows, and none removed or replaced since it was built."""
    return meta["count"] == count and meta["generation"] == generation


def _directory_identity(path: Path) -> tuple[int, int]:
    """``(device, inode)`` of a store directory: changes when ``compact`` or ``--overwrite``
    swaps a new store into the path."""
    stat = os.stat(path)
    return stat.st_dev, stat.st_ino


@dataclass(frozen=True)
class _Opened:
    """The store a reader reads: its catalogue, with the manifest and directory identity
    (:func:`_directory_identity`) it was opened at. Replaced whole by one assignment when the
    reader follows a swapped-in store, so a thread reads one store's parts, never a mix."""

    catalogue: Catalogue
    manifest: Manifest
    identity: tuple[int, int]


class KVStore:
    """Read access to a store. Open with :meth:`open`; use as a context manager.

    A reader follows a store swapped into its path (``ragcompress compact``, ``index
    --overwrite``) when the new store is the same build with the same prefix: each search checks
    the directory's identity and reopens the catalogue, and a blob read that fails because the
    store was swapped mid-request is read again from the new store. Another build at the path is
    refused (:class:`StoreMismatchError`): the model and prefix this reader answers with would
    not match its caches.

    Threads may share a reader. When one of them follows a swapped-in store, the searches other
    threads have under way end on the catalogue they began with, which closes when the last of
    them lets go (:meth:`follow_replacement`). After :meth:`close`, a thread that uses the reader
    gets a :class:`StoreError` saying it was closed.
    """

    def __init__(self, path: Path, manifest: Manifest) -> None:
        self.path = path
        identity = _directory_identity(path)
        self._opened = _Opened(Catalogue(path, readonly=True), manifest, identity)
        self._closed = False
        self._swapping = threading.Lock()  # one thread follows a swap at a time, none after close()
        self._prefix: dict[torch.dtype, PassageKV] = {}
        # the index, the catalogue generation it covers and the catalogue whose rows it numbers
        self._indexed: tuple[VectorIndex, int, Catalogue] | None = None
        self._basis: LowRankBasis | None = None

    @classmethod
    def open(cls, path: str | Path) -> KVStore:
        path = Path(path)
        if not path.exists():
            raise missing_store(path)
        manifest = Manifest.read(path)
        for name in (PREFIX, CATALOGUE):
            if not (path / name).is_file():
                raise StoreError(f"store {path} is incomplete: {name} is missing; rebuild it")
        return cls(path, manifest)

    def __enter__(self) -> KVStore:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        with self._swapping:
            self._closed = True
            self.catalogue.close()

    @property
    def catalogue(self) -> Catalogue:
        return self._opened.catalogue

    @property
    def manifest(self) -> Manifest:
        return self._opened.manifest

    def __len__(self) -> int:
        return self.catalogue.count()

    @property
    def quant(self) -> QuantConfig:
        return self.manifest.quant

    @property
    def shape(self) -> ModelShape:
        """The cache shape every stored segment must have (validated manifest)."""
        return self.manifest.shape

    def prefix_kv(self, dtype: torch.dtype = torch.float32) -> PassageKV:
        """The shared prefix cache, checked against the manifest's sha256 and model shape (once
        per dtype asked for)."""
        if dtype not in self._prefix:
            blob = read_prefix(self.path, self.shape)
            expected = self.manifest.prefix_sha256
            if not expected:  # create_store always records it: a manifest without one was damaged
                raise CorruptSegmentError(f"{self.path / MANIFEST} records no prefix checksum; rebuild the store")
            if hashlib.sha256(blob).hexdigest() != expected:
                raise CorruptSegmentError(
                    f"prefix cache {self.path / PREFIX}: checksum mismatch; rebuild the store "
                    f"(`ragcompress index --input PASSAGES --store {self.path} --overwrite`)"
                )
            try:
                self._prefix[dtype] = codec.decode(blob, dtype, self.shape)
            except CorruptSegmentError as exc:
                raise CorruptSegmentError(f"prefix cache {self.path / PREFIX}: {exc}") from None
        return self._prefix[dtype]

    @property
    def basis(self) -> LowRankBasis | None:
        """A low-rank store's basis (read once, refused unless it is the manifest's); else None."""
        lowrank = self.manifest.compression.get("lowrank")
        if lowrank is None:
            return None
        if self._basis is None:
            self._basis = read_basis(self.path, str(lowrank.get("basis_sha256", "")), self.shape)
        return self._basis

    def entry(self, passage_id: str) -> Entry:
        found = self.catalogue.get(passage_id)
        if found is None:
            raise StoreError(f"passage {passage_id!r} is not in store {self.path}")
        return found

    def follow_replacement(self) -> bool:
        """Reopen the store at :attr:`path` if another one was swapped in since this reader opened
        it (see the class docstring); returns whether this call followed one (another thread may
        have, first). Raises ``StoreMismatchError`` when the new store is another build or has
        another prefix."""
        if self._replacement() is None:
            return False
        with self._swapping:  # asked again: another thread may have followed it, or closed this reader
            replacement = None if self._closed else self._replacement()
            if replacement is None:
                return False
            identity, manifest = replacement
            # The old catalogue is not closed here: other threads may be reading it (a search that
            # began before the swap ends on it). Dropped, it closes when the last of them lets go
            # (Catalogue.__del__); closing it under them would fail their requests as "closed".
            self._opened = _Opened(Catalogue(self.path, readonly=True), manifest, identity)
            self._indexed = None
            return True

    def check_replacement(self) -> None:
        """Raise what :meth:`follow_replacement` would (the store gone, or replaced by another
        build), changing nothing: a service's health check calls it from another thread."""
        self._replacement()

    def _replacement(self) -> tuple[tuple[int, int], Manifest] | None:
        """The identity and manifest of a store swapped into :attr:`path` that this reader can
        follow; None if none was."""
        opened = self._opened
        try:
            identity = _directory_identity(self.path)
        except OSError:
            raise StoreError(
                f"store {self.path} is gone; it was removed while this reader had it open: rebuild or restore it, "
                "then open it again (restart a `ragcompress serve` that reads it)"
            ) from None
        if identity == opened.identity:
            return None
        manifest = Manifest.read(self.path)
        difference = opened.manifest.build_difference(manifest)
        if difference is not None:
            what, ours, theirs = difference
            replaced_by = f"another build ({what} {theirs}, this reader's {ours})"
        elif manifest.prefix_sha256 != opened.manifest.prefix_sha256:
            replaced_by = "a store with another prefix cache"
        else:
            return identity, manifest
        raise StoreMismatchError(
            f"store {self.path} was replaced by {replaced_by}; this reader's model and prompt prefix do not "
            "match its caches: open the store again (restart a `ragcompress serve` that reads it)"
        )

    def read_segment(self, entry: Entry, first: bool = False) -> codec.Segment:
        """Read, verify (xxh3-128) and parse one passage's blob, checked against its catalogue row.
        The only place a query reads a passage (``verify``, ``compact`` and the Ray runner read
        blobs through :func:`shards.read_blob` for their own checks); errors name the passage and
        its shard.
        ``first``: the passage is retrieved first, directly after the prefix; a store with base
        copies (:attr:`Manifest.base_copy`) answers with the passage's base copy.

        A read that fails is told apart from damage by reading the passage's row again: a passage
        moved by a swapped-in store (``compact``) is read from its new place; one replaced or
        removed since ``entry`` was found (a writer may have truncated or reused its bytes since)
        is a :class:`StoreError` asking to retry the request, never another version's cache under
        ``entry``'s text. Only a failing blob that its current row still points at is corrupt."""
        try:
            blob = read_blob(self.path, entry.shard, entry.offset, entry.length, entry.checksum, entry.id)
        except CorruptSegmentError:
            swapped = self.follow_replacement()
            current = self.catalogue.get(entry.id)
            if current is None or current.checksum != entry.checksum:
                changed = "removed from" if current is None else "replaced in"
                raise StoreError(
                    f"passage {entry.id!r} was {changed} store {self.path} by a writer while this request "
                    "read it; retry the request (an entry retrieved from another store fails this way too: "
                    "answer with the entries this store's retrieve returns)"
                ) from None
            if current == entry and not swapped:
                raise
            entry = current
            blob = read_blob(self.path, entry.shard, entry.offset, entry.length, entry.checksum, entry.id)
        with _naming(entry):
            segment = codec.parse(blob, self.shape, self.quant)
        if segment.num_tokens != entry.num_tokens or segment.kept_tokens != entry.kept:
            raise CorruptSegmentError(
                f"passage {entry.id!r} (shard {entry.shard}): blob holds {segment.num_tokens} tokens / "
                f"{segment.kept_tokens} kept, its catalogue row says {entry.num_tokens} / {entry.kept}"
            )
        if first and self.manifest.base_copy:
            with _naming(entry):
                return segment.base_copy()
        return segment

    def load_kv(self, entry: Entry, dtype: torch.dtype = torch.float32, first: bool = False) -> PassageKV:
        """One passage's cache, dequantized (keys un-rotated): the dense runtime's form (``first``:
        as :meth:`read_segment`)."""
        return self.dequantize(entry, self.read_segment(entry, first), dtype)

    def dequantize(self, entry: Entry, segment: codec.Segment, dtype: torch.dtype = torch.float32) -> PassageKV:
        """``entry``'s segment as :meth:`read_segment` returned it, dequantized as :meth:`load_kv`
        does. Apart, so that the dense runtime can parse every retrieved passage first (to size
        the cache from their lengths) and hold only one of them dequantized at a time."""
        with _naming(entry):
            return segment.dense(dtype, self.basis)

    def load_packed(self, entry: Entry, first: bool = False) -> codec.QuantizedBlob:
        """One passage's quantized tensors, not dequantized: the fused kernel's form (``first``:
        as :meth:`read_segment`)."""
        segment = self.read_segment(entry, first)
        with _naming(entry):
            return segment.packed()

    def index(self) -> VectorIndex:
        """The FAISS index over committed rows.

        ``index.faiss`` is used only when its sha256 matches ``index.json`` and it covers exactly
        the committed rows (:func:`index_is_current`); otherwise (missing, stale, damaged) it is
        rebuilt from the catalogue. A reader opened during a write rebuilds the index if rows
        were committed, removed or replaced since.
        """
        return self._current_index(self._opened)[0]

    def _current_index(self, opened: _Opened) -> tuple[VectorIndex, int]:
        """:meth:`index` over ``opened``'s catalogue with the catalogue generation it covers, read
        as one pair: threads sharing the store rebuild it in turn, and a search must compare the
        generation of the index it searched (another thread's newer one let a removed row's
        number name a new passage), and search the index of its own catalogue (one built from
        a store another thread followed since numbers other passages)."""
        catalogue = opened.catalogue
        count = catalogue.count()
        generation = catalogue.generation()
        current = self._indexed
        if current is None or current[2] is not catalogue or current[0].count != count or current[1] != generation:
            path = self.path / INDEX
            meta = read_index_meta(self.path)
            loaded = None
            if (
                meta is not None
                and index_is_current(meta, count, generation)
                and path.is_file()
                and sha256_file(path) == meta["sha256"]
            ):
                try:
                    loaded = VectorIndex.load(path)
                except (RuntimeError, MemoryError):  # FAISS's bad_alloc: an index declaring a huge array
                    loaded = None
            if loaded is not None and not self._still_open_store(opened):
                loaded = None  # another store's index.faiss: its row numbers name other passages here
            if loaded is None or loaded.count != count:
                loaded, _ = build_index(catalogue)
            current = self._indexed = (loaded, generation, catalogue)  # one assignment: never part of it
        return current[0], current[1]

    def _still_open_store(self, opened: _Opened) -> bool:
        """Whether :attr:`path` is still the directory ``opened``'s catalogue was opened in. The
        index files are read by path: a store swapped in after :meth:`search` checked for one (a
        new build with as many rows at the same generation) would otherwise have its index's row
        numbers resolved through this reader's catalogue, answering other passages silently."""
        try:
            return _directory_identity(self.path) == opened.identity
        except OSError:
            return False

    def search(self, query_vector: np.ndarray, k: int) -> list[tuple[Entry, float]]:
        """The ``k`` nearest passages. The index and the rows it names are read in two steps; a
        commit that removed or replaced rows in between (the generation moved) could let SQLite
        give a removed row's number to a new passage, so the search is then run again."""
        if type(k) is not int or k < 1:
            raise InputError(f"k (top_k) must be a whole number of passages, at least 1; got {k!r}")
        self.follow_replacement()
        opened = self._opened  # one store throughout, whichever another thread follows meanwhile
        while True:
            index, generation = self._current_index(opened)
            hits = index.search(query_vector, k)
            entries = opened.catalogue.by_rows([row for row, _ in hits])
            if opened.catalogue.generation() == generation:
                return [(entries[row], score) for row, score in hits if row in entries]

    def stored_bytes(self, entries: list[Entry]) -> int:
        return sum(e.length for e in entries)

    def bytes_per_token(self, entries: list[Entry] | None = None) -> float:
        """Stored bytes per passage token of ``entries`` (every passage when None): their blobs as
        written (scales, positions and base copies included) over their tokens, plus the low-rank
        basis, stored once per store, spread over all the store's tokens. What ``index``, ``stats``,
        ``eval`` and the benchmarks report against fp16 (0 for no tokens)."""
        chosen = list(self.catalogue.entries()) if entries is None else entries
        tokens = sum(e.num_tokens for e in chosen)
        if tokens == 0:
            return 0.0
        return self.stored_bytes(chosen) / tokens + self.basis_bytes_per_token()

    def basis_bytes_per_token(self) -> float:
        """The low-rank basis's bytes spread over every passage token of the store (0 without a
        basis): what :meth:`bytes_per_token` adds to the blobs' bytes. Reads every catalogue row,
        so a caller pricing many sets of passages computes it once."""
        basis = self.basis_bytes  # a stat of the basis file
        if not basis:
            return 0.0
        tokens = sum(e.num_tokens for e in self.catalogue.entries())
        return basis / tokens if tokens else 0.0

    @property
    def basis_bytes(self) -> int:
        """Bytes of the low-rank basis (stored once per store; 0 without one)."""
        path = self.path / BASIS
        return path.stat().st_size if self.manifest.compression.get("lowrank") and path.is_file() else 0


@contextmanager
def _naming(entry: Entry) -> Iterator[None]:
    """Prefix a :class:`CorruptSegmentError` raised inside with the passage and its shard."""
    try:
        yield
    except CorruptSegmentError as exc:
        raise CorruptSegmentError(f"passage {entry.id!r} (shard {entry.shard}): {exc}") from None
