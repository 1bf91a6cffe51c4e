"""The one writer of a store: its lock, catalogue rows, and the appends and commits of passages.

``StoreLock`` is an exclusive ``flock`` on ``DIR/lock`` (one writer at a time, released even when
its holder is killed); ``StoreWriter`` holds it, repairs what a killed writer left when it opens,
appends blobs to the shards (fsynced) and then commits their catalogue rows in one transaction.
Readers (``kvstore.KVStore``) see only committed rows.
"""

from __future__ import annotations

import dataclasses
import errno
import fcntl
import json
import os
import stat
import time
from collections.abc import Iterable
from pathlib import Path
from typing import IO, Any

from ragcompress.errors import StoreBusyError, StoreError
from ragcompress.paths import sha256_file
from ragcompress.store.catalogue import CATALOGUE, Catalogue, meta_checksum
from ragcompress.store.files import INDEX, INDEX_META, LOCK, links_refused, refuse_links, write_atomic
from ragcompress.store.kvstore import build_index
from ragcompress.store.manifest import Manifest
from ragcompress.store.record import PassageRecord
from ragcompress.store.shards import ShardWriter, checksum

# swapped-in stores a writer follows while taking the lock (each swap is a whole compaction or rebuild)
_MAX_SWAPS = 16


def _open_lock(path: Path) -> IO[str]:
    """``DIR/lock``, opened for reading and writing without following a link: a store is someone
    else's bytes (a tar, a git repository), and its writer truncates the lock and writes its pid
    into it, so a ``lock`` linked to a file of the user's would overwrite that file."""
    try:
        fd = os.open(path / LOCK, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666)
    except OSError as exc:
        if exc.errno != errno.ELOOP:
            raise
        raise links_refused(path, LOCK) from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise StoreError(f"{path / LOCK} is not a regular file; a store's lock is one: delete it and retry")
    return os.fdopen(fd, "r+")


def _is_the_lock(fd: int, path: Path) -> bool:
    """Whether the lock file open as ``fd`` is the one at ``DIR/lock`` now (not one a swap replaced)."""
    held = os.fstat(fd)
    try:
        current = os.stat(path / LOCK)
    except FileNotFoundError:
        return False
    return held.st_nlink > 0 and (held.st_dev, held.st_ino) == (current.st_dev, current.st_ino)


def _held_shared(handle: IO[str]) -> bool:
    """Whether the lock ``handle`` could not take exclusively is held shared (by readers,
    :func:`hold_shared`), not by a writer; closes ``handle`` when it is."""
    try:
        fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    handle.close()  # releases the shared hold just taken
    return True


def hold_shared(path: Path) -> int | None:
    """The writer lock of the store at ``path`` held shared, as a descriptor whose closing
    releases it; None when a writer holds it now. While it is held no writer starts: each holds
    the lock exclusively for as long as it writes (:class:`StoreLock`). Opened for reading only
    (a reader may not write the store), without following a link; an ``OSError`` when there is
    no lock file this user can read. A lock swapped out of the path meanwhile (``compact``) is
    let go for the one there now, as :class:`StoreLock` does."""
    for _ in range(_MAX_SWAPS):
        fd = os.open(path / LOCK, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise OSError(errno.EINVAL, f"{path / LOCK} is not a regular file")
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        except BaseException:
            os.close(fd)
            raise
        if _is_the_lock(fd, path):
            return fd
        os.close(fd)
    raise OSError(errno.ESTALE, f"the lock file of store {path} kept changing; keep the store on a local filesystem")


class StoreLock:
    """The exclusive writer lock of a store (``flock`` on ``DIR/lock``, released on close or exit).

    The kernel drops the lock when its holder dies, even by SIGKILL, so a killed writer never
    blocks the next one. ``compact`` and ``index --overwrite`` swap a new store folder, with its
    own lock file, in place of the old one while holding the old one's lock: a writer that opened
    the old file before the swap gets its lock once they release it, a lock on a file no longer
    at the path that excludes nobody. So a lock counts only when the file locked is still
    ``DIR/lock``; otherwise the file at the path now is opened and locked instead.
    """

    def __init__(self, path: Path, wait_s: float = 0.0) -> None:
        """``wait_s``: how long to wait for another writer to finish (0: refuse at once). Two
        threads of one process exclude each other too (each opens the lock file itself)."""
        self.path = path
        deadline = time.monotonic() + wait_s
        swaps = 0
        while True:
            self._handle = _open_lock(path)
            try:
                fcntl.flock(self._handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if time.monotonic() < deadline:
                    self._handle.close()
                    time.sleep(0.05)
                    continue
                waited = f" (waited {wait_s:g} s)" if wait_s else ""
                if _held_shared(self._handle):
                    raise StoreBusyError(
                        f"store {path} is open read-only by a reader that holds its lock{waited} (a reader of a "
                        "catalogue left without its -wal and -shm files, somewhere it cannot create them, keeps "
                        "writers out while it reads); close that reader, then retry"
                    ) from None
                self._handle.seek(0)
                holder = self._handle.read().strip() or "another process"
                self._handle.close()
                raise StoreBusyError(
                    f"store {path} is being written by {holder}{waited}; wait for it to finish (one writer at a time)"
                ) from None
            if _is_the_lock(self._handle.fileno(), path):
                break
            # the store was swapped since the file was opened: lock the new store's file (its
            # swapper released the old one; a writer holding the new one makes this wait or refuse)
            self._handle.close()
            swaps += 1
            if swaps > _MAX_SWAPS:  # a filesystem whose inode numbers are not stable: never loop forever
                raise StoreError(
                    f"the lock file of store {path} changed {swaps} times while this writer took it; "
                    "keep the store on a local filesystem (docs/guarantees.md, Limits)"
                )
        self._handle.seek(0)
        self._handle.truncate()
        self._handle.write(f"pid {os.getpid()}")
        self._handle.flush()

    def release(self) -> None:
        if not self._handle.closed:
            fcntl.flock(self._handle, fcntl.LOCK_UN)
            self._handle.close()

    def __enter__(self) -> StoreLock:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()


def _remove_temporaries(path: Path) -> None:
    """Delete temp files a killed writer left (``.NAME.PID.tmp``); only called under the lock."""
    for tmp in path.glob(".*.tmp"):
        if tmp.is_file() or tmp.is_symlink():  # a link: write_atomic would write through it
            tmp.unlink()


def meta_json(meta: dict[str, Any]) -> str:
    """A passage's metadata as its catalogue row stores it: JSON in the metadata's own key order,
    which callers show to LLMs (rows written before kept keys sorted; ``meta_checksum`` covers
    the stored text either way, so both verify)."""
    return json.dumps(meta, ensure_ascii=False)


def catalogue_row(record: PassageRecord, shard: str, offset: int) -> dict[str, Any]:
    """The catalogue row of ``record`` whose blob lies at ``(shard, offset)``: the one place a
    record becomes a row, for :meth:`StoreWriter.add` and for Ray workers that write blobs."""
    meta, embedding = meta_json(record.meta), record.embedding.tobytes()
    return {
        "id": record.id,
        "title": record.title,
        "text": record.text,
        "meta": meta,
        "text_sha": record.text_sha,
        "shard": shard,
        "offset": offset,
        "length": len(record.blob),
        "checksum": checksum(record.blob),
        "num_tokens": record.num_tokens,
        "kept": record.kept,
        "embedding": embedding,
        "meta_checksum": meta_checksum(record.id, record.title, meta, record.text_sha, embedding),
    }


class StoreWriter:
    """The single writer of a store: holds the lock, appends blobs, commits catalogue rows.

    Opening repairs what a killed writer left behind (uncommitted shard tails, temp files).
    """

    def __init__(self, path: Path, wait_s: float = 0.0) -> None:
        """``wait_s``: how long to wait for another writer's lock (:class:`StoreLock`)."""
        self.path = path
        self._lock = StoreLock(path, wait_s)
        try:
            if not (path / CATALOGUE).is_file():  # create_store writes it before the manifest
                raise StoreError(f"store {path} has no {CATALOGUE}; the store is damaged, rebuild it")
            refuse_links(path)
            _remove_temporaries(path)
            self.catalogue = Catalogue(path, readonly=False)
            self.shards = self._repaired_shards()
        except BaseException:
            if hasattr(self, "catalogue"):
                self.catalogue.close()
            self._lock.release()
            raise

    def __enter__(self) -> StoreWriter:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def known(self) -> dict[str, str]:
        """Committed passage ids and the sha256 of their text (memory grows with the store)."""
        return self.catalogue.text_shas()

    def known_of(self, ids: list[str]) -> dict[str, str]:
        """Those of ``ids`` already committed, with their text sha256 (bounded memory)."""
        return self.catalogue.shas_of(ids)

    def add(self, records: list[PassageRecord], replace: bool = False, searchable: bool = True) -> None:
        """Store a batch: blobs appended and fsynced, then their rows committed together.
        ``replace``: records whose id is stored replace the stored passages (same transaction).
        ``searchable`` False: caches computed at query time, which retrieval never returns
        (:mod:`ragcompress.store.catalogue`)."""
        rows = [
            {**catalogue_row(record, *self.shards.append(record.blob)), "searchable": int(searchable)}
            for record in records
        ]
        self.shards.sync()
        self.catalogue.add(rows, replace=replace)

    def make_searchable(self, ids: Iterable[str]) -> int:
        """Make stored passages that a query had cached searchable (ingested now); returns how
        many changed. The caller rewrites the index (:meth:`write_index`) when any did."""
        return self.catalogue.make_searchable(ids)

    def remove(self, ids: list[str]) -> int:
        """Delete the passages ``ids`` in one transaction; returns how many were stored."""
        return self.catalogue.remove(ids)

    def update_meta(self, passages: list[tuple[str, str, dict[str, Any]]]) -> int:
        """Set the title and metadata of stored passages, given as ``(id, title, meta)``, in one
        transaction; their text, cache, embedding and row number stay (nothing is encoded and the
        FAISS index stays current). Returns how many were stored."""
        return self.catalogue.update_meta([(pid, title, meta_json(meta)) for pid, title, meta in passages])

    def commit(self, rows: list[dict[str, Any]], replace: bool = False) -> None:
        """Commit rows (:func:`catalogue_row`) whose blobs another process already wrote and fsynced
        into shards it claimed (:class:`~ragcompress.store.shards.ClaimedShards`): a Ray worker.
        ``replace``: as :meth:`add`."""
        self.catalogue.add(rows, replace=replace)

    def write_index(self, params: dict[str, Any] | None = None) -> None:
        """Build the FAISS index (streamed from the catalogue), save it, then record its sha256;
        the manifest's ``index`` records its type, parameters and measured recall@10."""
        built, described = build_index(self.catalogue, params)
        built.save(self.path / INDEX)
        meta = {
            "sha256": sha256_file(self.path / INDEX),
            "count": built.count,
            "generation": self.catalogue.generation(),
        }
        write_atomic(self.path / INDEX_META, json.dumps(meta).encode())
        manifest = Manifest.read(self.path)
        if manifest.index != described:
            dataclasses.replace(manifest, index=described).write(self.path)

    def repair_shards(self) -> None:
        """Repair the shards again, as opening does, still holding the lock: a Ray run's driver
        calls it last, when the killed actors' bytes that no committed row points at are known."""
        self.shards.close()
        self.shards = self._repaired_shards()

    def _repaired_shards(self) -> ShardWriter:
        """The shards cut back to the committed blobs, once the catalogue passed SQLite's
        ``quick_check`` where anything is cut (a damaged page can drop rows silently)."""
        return ShardWriter(
            self.path, self.catalogue.committed_blobs(), catalogue_problems=self.catalogue.quick_check_problems
        )

    def close(self) -> None:
        self.shards.close()
        self.catalogue.close()
        self._lock.release()
