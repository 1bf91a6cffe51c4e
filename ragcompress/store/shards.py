"""Append-only shard files holding passage blobs back to back, addressed by (shard, offset, length).

A blob is written and fsynced *before* the catalogue row that points at it is committed, so a
committed row never points at bytes that may be missing. Bytes written after the last commit
(a killed run) are unreferenced; the next writer truncates every shard back to its committed end
and deletes shards nothing committed points into, so a resumed run appends exactly where an
uninterrupted run would have (same shard, same offset). Shard names are generated here, never
derived from passage ids, and a name read back from the catalogue is checked before it is used.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import BinaryIO

import xxhash

from ragcompress.errors import CorruptSegmentError, StoreError

SHARD_DIR = "shards"
MAX_SHARD_BYTES = 256 << 20
_NAME = re.compile(r"^\d{5}\.kvs$")


def checksum(blob: bytes) -> str:
    """xxh3-128 hex digest of a blob: the corruption check run on every read, ~10x cheaper than
    sha256 (at top-16 a request reads tens of MB). It detects damage (flipped bits, truncation,
    a blob from elsewhere), not an adversary, who could rewrite the catalogue as well."""
    return xxhash.xxh3_128_hexdigest(blob)


def fsync_dir(path: Path) -> None:
    """Make a directory's entries (a created or renamed file) durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def is_shard_name(name: str) -> bool:
    return bool(_NAME.match(name))


def shard_path(root: Path, name: str) -> Path:
    """Path of a shard; refuses names that are not ours (a tampered catalogue cannot escape)."""
    if not isinstance(name, str) or not _NAME.match(name):
        raise CorruptSegmentError(f"catalogue names shard {name!r}, which is not a valid shard name")
    return root / SHARD_DIR / name


def read_blob(root: Path, name: str, offset: int, length: int, expected: str, passage_id: str) -> bytes:
    """Read one blob and verify its sha256; any mismatch names the passage and the shard."""
    where = f"passage {passage_id!r}"
    if not isinstance(name, str) or not is_shard_name(name):
        raise CorruptSegmentError(f"{where}: catalogue names shard {name!r}, which is not a valid shard name")
    if not isinstance(offset, int) or not isinstance(length, int) or offset < 0 or length <= 0:
        raise CorruptSegmentError(
            f"{where}: catalogue row has an invalid location (shard {name}, offset {offset!r}, length {length!r})"
        )
    path = shard_path(root, name)
    try:
        with open(path, "rb") as handle:
            size = os.fstat(handle.fileno()).st_size
            handle.seek(offset)
            blob = handle.read(length)
    except FileNotFoundError:
        raise CorruptSegmentError(f"{where}: shard {name} is missing") from None
    except OSError as exc:
        raise CorruptSegmentError(f"{where}: shard {name} cannot be read ({exc.strerror or exc})") from None
    if offset >= size:
        raise CorruptSegmentError(
            f"{where}: catalogue row points past the end of shard {name} (offset {offset}, shard has {size} bytes)"
        )
    if len(blob) != length:
        raise CorruptSegmentError(
            f"{where}: shard {name} is truncated ({len(blob)} of {length} bytes at offset {offset})"
        )
    if checksum(blob) != expected:
        raise CorruptSegmentError(f"{where}: checksum mismatch in shard {name} at offset {offset}")
    return blob


class ClaimedShards:
    """Appends one worker's blobs to shards that only this worker writes (a Ray indexing actor).

    Each shard is claimed with ``O_CREAT | O_EXCL`` under the first number above every shard in
    the folder, so workers sharing a store (on one machine or over a shared filesystem) never
    write into the same file, and a restarted worker starts a fresh shard instead of appending
    after whatever its killed predecessor half-wrote. The driver holds the store's lock, commits
    the rows, and its next :class:`ShardWriter` repair truncates or removes what no row points at.
    A shard is claimed at the first blob, not before: a worker that is given no batch (Ray may
    send every batch to the other actors) leaves no empty shard in the finished store.
    """

    def __init__(self, root: Path, max_bytes: int | None = None) -> None:
        self.root = root
        self.max_bytes = max_bytes or MAX_SHARD_BYTES
        self.name: str | None = None
        self._handle: BinaryIO | None = None

    def _claim(self) -> tuple[str, BinaryIO]:
        directory = self.root / SHARD_DIR
        numbers = [int(p.name[:5]) for p in directory.iterdir() if _NAME.match(p.name)]
        number = max(numbers, default=-1) + 1
        while number < 100_000:
            name = f"{number:05d}.kvs"
            try:
                fd = os.open(directory / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND, 0o644)
            except FileExistsError:
                number += 1
                continue
            fsync_dir(directory)
            return name, os.fdopen(fd, "ab")
        raise StoreError(f"{directory} has no free shard name left (00000..99999)")

    def append(self, blob: bytes) -> tuple[str, int]:
        """Write ``blob``; returns ``(shard, offset)``. Not durable until :meth:`sync`."""
        if self._handle is None or self.name is None:
            self.name, self._handle = self._claim()
        offset = self._handle.tell()
        if offset and offset + len(blob) > self.max_bytes:
            self.sync()
            self._handle.close()
            self.name, self._handle = self._claim()
            offset = 0
        self._handle.write(blob)
        return self.name, offset

    def sync(self) -> None:
        if self._handle is None:
            return  # nothing written yet
        self._handle.flush()
        os.fsync(self._handle.fileno())

    def close(self) -> None:
        if self._handle is not None and not self._handle.closed:
            self.sync()
            self._handle.close()


class ShardWriter:
    """Appends blobs to the newest committed shard, rolling over at ``max_bytes``.

    ``committed_ends`` maps each shard to the end of its last committed blob (from the catalogue).
    Opening repairs what a killed writer left: bytes past a committed end are truncated and shards
    with no committed blob are removed. A shard *shorter* than its committed end has lost data a
    committed row points at; that is damage, not an interrupted write, and opening refuses.
    """

    def __init__(self, root: Path, committed_ends: dict[str, int], max_bytes: int | None = None) -> None:
        self.root = root
        self.max_bytes = max_bytes or MAX_SHARD_BYTES
        directory = root / SHARD_DIR
        directory.mkdir(exist_ok=True)
        for name in committed_ends:
            if not shard_path(root, name).is_file():  # validates every name the catalogue holds
                raise StoreError(
                    f"shard {name} in {root} is missing but committed passages point into it; the store "
                    f"is damaged (run `ragcompress verify --store {root}`)"
                )
        self.name = max(committed_ends) if committed_ends else "00000.kvs"
        for path in sorted(p for p in directory.iterdir() if _NAME.match(p.name)):
            end = committed_ends.get(path.name)
            if end is None:
                path.unlink()  # no committed row points here: only a killed run's blobs
                continue
            size = path.stat().st_size
            if size < end:
                raise StoreError(
                    f"shard {path.name} in {root} has {size} bytes but committed passages end at "
                    f"{end}; the store is damaged (run `ragcompress verify --store {root}`)"
                )
            if size > end:
                with open(path, "r+b") as handle:
                    handle.truncate(end)
                    os.fsync(handle.fileno())
        self._handle = open(shard_path(root, self.name), "ab")
        fsync_dir(directory)

    def append(self, blob: bytes) -> tuple[str, int]:
        """Write ``blob``; returns ``(shard, offset)``. Not durable until :meth:`sync`."""
        offset = self._handle.tell()
        if offset and offset + len(blob) > self.max_bytes:
            self.sync()
            self._handle.close()
            self.name = f"{int(self.name[:5]) + 1:05d}.kvs"
            self._handle = open(shard_path(self.root, self.name), "ab")
            offset = self._handle.tell()
        self._handle.write(blob)
        return self.name, offset

    def sync(self) -> None:
        """Flush and fsync the open shard and the shard directory (a new shard's entry)."""
        self._handle.flush()
        os.fsync(self._handle.fileno())
        fsync_dir(self.root / SHARD_DIR)

    def close(self) -> None:
        if not self._handle.closed:
            self.sync()
            self._handle.close()
