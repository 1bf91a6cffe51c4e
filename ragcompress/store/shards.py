"""Append-only shard files holding passage blobs back to back, addressed by (shard, offset, length).

A blob is written and fsynced *before* the catalogue row that points at it is committed, so a
committed row never points at bytes that may be missing. Bytes written after the last commit
(a killed run) are unreferenced; the next writer truncates the shard back to its committed end.
Shard names are generated here, never derived from passage ids.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

from ragcompress.errors import CorruptSegmentError

SHARD_DIR = "shards"
MAX_SHARD_BYTES = 256 << 20
_NAME = re.compile(r"^\d{5}\.kvs$")


def checksum(blob: bytes) -> str:
    return hashlib.sha256(blob).hexdigest()


def shard_path(root: Path, name: str) -> Path:
    """Path of a shard; refuses names that are not ours (a tampered catalogue cannot escape)."""
    if not _NAME.match(name):
        raise CorruptSegmentError(f"catalogue names shard {name!r}, which is not a valid shard name")
    return root / SHARD_DIR / name


def read_blob(root: Path, name: str, offset: int, length: int, expected: str, passage_id: str) -> bytes:
    """Read one blob and verify its sha256; any mismatch names the passage and the shard."""
    path = shard_path(root, name)
    try:
        with open(path, "rb") as handle:
            handle.seek(offset)
            blob = handle.read(length)
    except FileNotFoundError:
        raise CorruptSegmentError(f"passage {passage_id!r}: shard {name} is missing") from None
    if len(blob) != length:
        raise CorruptSegmentError(
            f"passage {passage_id!r}: shard {name} is truncated ({len(blob)} of {length} bytes at {offset})"
        )
    if checksum(blob) != expected:
        raise CorruptSegmentError(f"passage {passage_id!r}: checksum mismatch in shard {name} at {offset}")
    return blob


class ShardWriter:
    """Appends blobs to the newest shard, rolling over at ``max_bytes``."""

    def __init__(self, root: Path, committed_ends: dict[str, int], max_bytes: int = MAX_SHARD_BYTES) -> None:
        self.root = root
        self.max_bytes = max_bytes
        (root / SHARD_DIR).mkdir(exist_ok=True)
        existing = sorted(p.name for p in (root / SHARD_DIR).iterdir() if _NAME.match(p.name))
        self.name = existing[-1] if existing else "00000.kvs"
        path = shard_path(root, self.name)
        # Drop bytes a killed run appended after its last commit.
        with open(path, "ab") as handle:
            handle.truncate(committed_ends.get(self.name, 0))
        self._handle = open(path, "ab")

    def append(self, blob: bytes) -> tuple[str, int]:
        """Write ``blob``; returns ``(shard, offset)``. Not durable until :meth:`sync`."""
        offset = self._handle.tell()
        if offset and offset + len(blob) > self.max_bytes:
            self.sync()
            self._handle.close()
            self.name = f"{int(self.name[:5]) + 1:05d}.kvs"
            self._handle = open(shard_path(self.root, self.name), "ab")
            offset = 0
        self._handle.write(blob)
        return self.name, offset

    def sync(self) -> None:
        self._handle.flush()
        os.fsync(self._handle.fileno())

    def close(self) -> None:
        if not self._handle.closed:
            self.sync()
            self._handle.close()
