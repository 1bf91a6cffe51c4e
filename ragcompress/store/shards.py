"""Append-only shard files holding passage blobs back to back, addressed by (shard, offset, length).

A blob is written and fsynced *before* the catalogue row that points at it is committed, so a
committed row never points at bytes that may be missing. Bytes written after the last commit
(a killed run) are unreferenced; the next writer truncates every shard back to its committed end
and deletes shards nothing committed points into, so a resumed run appends exactly where an
uninterrupted run would have (same shard, same offset). Shard names are generated here, never
derived from passage ids, and a name read back from the catalogue is checked before it is used.
"""

from __future__ import annotations

import errno
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO, NamedTuple

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


def _open_shard(path: Path, append: bool) -> BinaryIO:
    """A shard opened for a writer (``append``: to append, created if absent; else to truncate),
    never through a symbolic link: a writer truncates and appends by path, and a link would make
    those a file outside the store (the writer refuses a store holding one,
    ``files.refuse_links``; this holds even for a link made since)."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND if append else os.O_RDWR
    try:
        fd = os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666)
    except OSError as exc:
        if exc.errno != errno.ELOOP:
            raise
        raise StoreError(
            f"shard {path} is a symbolic link; a store must not contain links: no writer adds to it"
        ) from None
    return os.fdopen(fd, "ab") if append else os.fdopen(fd, "r+b")


class CommittedBlob(NamedTuple):
    """Where a committed catalogue row says its passage's blob lies, and the blob's checksum."""

    passage_id: str
    offset: int
    length: int
    checksum: str


def read_blob(root: Path, name: str, offset: int, length: int, expected: str, passage_id: str) -> bytes:
    """Read one blob and verify its checksum; any mismatch names the passage and the shard. The
    location is checked against the shard's size before anything is read, so a damaged length
    cannot allocate more than the shard holds."""
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
            if offset >= size:
                raise CorruptSegmentError(
                    f"{where}: catalogue row points past the end of shard {name} (offset {offset}, "
                    f"shard has {size} bytes)"
                )
            handle.seek(offset)
            blob = handle.read(min(length, size - offset))
    except FileNotFoundError:
        raise CorruptSegmentError(f"{where}: shard {name} is missing") from None
    except OSError as exc:
        raise CorruptSegmentError(f"{where}: shard {name} cannot be read ({exc.strerror or exc})") from None
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

    Batches go into a shard in increasing number (:meth:`start_batch`), so that what a killed
    driver left uncommitted is a shard's tail (the driver commits in batch order), which the
    next writer truncates, never bytes before a committed blob, which only ``compact`` reclaims.
    """

    def __init__(self, root: Path, max_bytes: int | None = None) -> None:
        self.root = root
        self.max_bytes = max_bytes or MAX_SHARD_BYTES
        self.name: str | None = None
        self._handle: BinaryIO | None = None
        self._last_batch: int | None = None

    def start_batch(self, number: int) -> None:
        """Begin the blobs of batch ``number``. Ray Data may hand a worker batch 2 before batch 1;
        a number not above the last one written starts a new shard at the next blob."""
        if self._last_batch is not None and number <= self._last_batch and self._handle is not None:
            self.close()
            self.name, self._handle = None, None
        self._last_batch = number

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

    ``committed`` lists, for each shard, the blobs its committed catalogue rows point at.
    Opening repairs what a killed writer left: bytes past the last committed blob are truncated
    and shards with no committed blob are removed. Truncation trusts the catalogue's locations, so
    before cutting a shard every committed blob in it is read back and checked: a damaged row
    (a wrong offset or length) would otherwise move the "committed end" and cut off a real
    passage's bytes. A shard *shorter* than its committed end, a row with an impossible location,
    or a blob that fails its check is damage, not an interrupted write: opening refuses and
    changes nothing. So is a catalogue that fails SQLite's ``quick_check`` when anything would be
    cut: a damaged page can drop rows without an error, and the blobs of rows it dropped would
    read as a killed run's tail (asked only then, since the check reads the whole catalogue). Opening fsyncs the shard folder and the store folder too, so the entries
    of a shard or a shard folder it created (or a killed writer created without an fsync) are
    durable before any row that points into them is committed.
    """

    def __init__(
        self,
        root: Path,
        committed: dict[str, list[CommittedBlob]],
        max_bytes: int | None = None,
        catalogue_problems: Callable[[], list[str]] | None = None,
    ) -> None:
        """``catalogue_problems``: SQLite's findings on the catalogue ``committed`` was read from,
        asked before anything is cut (see the class docstring)."""
        self.root = root
        self.max_bytes = max_bytes or MAX_SHARD_BYTES
        directory = root / SHARD_DIR
        directory.mkdir(exist_ok=True)
        rebuild = (
            f"rebuild it with `ragcompress index --input INPUT --store {root} --overwrite`, which keeps its settings "
            f"(`ragcompress verify --store {root}` lists what is damaged); nothing was changed"
        )
        damaged = f"the store is damaged and no writer can add to it (its passages there are lost): {rebuild}"
        for name, blobs in committed.items():
            if not shard_path(root, name).is_file():  # validates every name the catalogue holds
                raise StoreError(f"shard {name} in {root} is missing but committed passages point into it; {damaged}")
            for blob in blobs:
                if (
                    not isinstance(blob.offset, int)
                    or not isinstance(blob.length, int)
                    or blob.offset < 0
                    or blob.length <= 0
                ):
                    raise StoreError(
                        f"passage {blob.passage_id!r} has an impossible location in shard {name} (offset "
                        f"{blob.offset!r}, length {blob.length!r}); {damaged}"
                    )
        ends = {name: max(b.offset + b.length for b in blobs) for name, blobs in committed.items() if blobs}
        self.name = max(ends) if ends else "00000.kvs"
        paths = sorted(p for p in directory.iterdir() if _NAME.match(p.name))
        for path in paths:  # check every shard before changing any
            end = ends.get(path.name)
            size = path.stat().st_size
            if end is not None and size < end:
                raise StoreError(
                    f"shard {path.name} in {root} has {size} bytes but committed passages end at {end}; {damaged}"
                )
            if end is not None and size > end:
                for blob in committed[path.name]:
                    try:
                        read_blob(root, path.name, blob.offset, blob.length, blob.checksum, blob.passage_id)
                    except CorruptSegmentError as exc:
                        raise StoreError(
                            f"{exc}; a writer would truncate shard {path.name} at {end}: {damaged}"
                        ) from None
        cut = [path.name for path in paths if ends.get(path.name) is None or path.stat().st_size > ends[path.name]]
        problems = catalogue_problems() if cut and catalogue_problems is not None else []
        if problems:
            raise StoreError(
                f"the catalogue of {root} fails SQLite's quick_check ({'; '.join(problems[:3])}), and a writer cuts "
                f"the shards ({', '.join(cut[:5])}) back to the blobs its rows point at, some of which may be "
                f"lost: the store is damaged and no writer can add to it: {rebuild}"
            )
        for path in paths:
            end = ends.get(path.name)
            if end is None:
                path.unlink()  # no committed row points here: only a killed run's blobs
            elif path.stat().st_size > end:
                with _open_shard(path, append=False) as handle:
                    handle.truncate(end)
                    os.fsync(handle.fileno())
        self._handle = _open_shard(shard_path(root, self.name), append=True)
        fsync_dir(directory)
        fsync_dir(root)  # the shard folder's own entry (see the class docstring)

    def append(self, blob: bytes) -> tuple[str, int]:
        """Write ``blob``; returns ``(shard, offset)``. Not durable until :meth:`sync`."""
        offset = self._handle.tell()
        if offset and offset + len(blob) > self.max_bytes:
            self.sync()
            self._handle.close()
            self.name = f"{int(self.name[:5]) + 1:05d}.kvs"
            self._handle = _open_shard(shard_path(self.root, self.name), append=True)
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
