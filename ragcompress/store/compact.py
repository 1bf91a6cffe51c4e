"""Reclaim the bytes of removed and replaced passages (``ragcompress compact``).

``remove`` and ``index --replace`` change the catalogue in one commit and leave the old blobs in
the shards, where no passage points at them (``ragcompress verify`` counts them). Compaction
copies every committed blob, checksum-verified and unchanged, into fresh shards of a new store
built beside the old one, with the same manifest, prefix and basis files (and the marker of an
indexing run that stopped before its end: the copy holds the same part of its input), rebuilds the FAISS index
and swaps the new store in atomically (:func:`~ragcompress.store.files.replace_store`). No
passage is re-encoded, so no model is needed and every cache keeps its bytes. The old store's
writer lock is held throughout: no writer can change it meanwhile, and a killed compaction
leaves the old store in place (the half-built copy is deleted by the next compaction or
``index``, and ``verify`` names it; one that fails deletes its own). A store folder that holds files of the user's is refused, as
``index --overwrite`` refuses it, since the swap would delete them.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ragcompress.errors import StoreError
from ragcompress.paths import follow_umask
from ragcompress.store.basis import BASIS
from ragcompress.store.catalogue import CATALOGUE, Catalogue
from ragcompress.store.files import (
    PREFIX,
    RUN,
    compact_copy,
    overwrite_refusal,
    remove_tree,
    replace_store,
    write_atomic,
)
from ragcompress.store.manifest import MANIFEST, Manifest
from ragcompress.store.shards import SHARD_DIR, read_blob
from ragcompress.store.writer import StoreLock, StoreWriter

COMMIT_ROWS = 256  # rows per catalogue transaction while copying


@dataclass(frozen=True)
class CompactReport:
    """Passages copied and the shard bytes before and after."""

    store: str
    passages: int
    bytes_before: int
    bytes_after: int

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def shard_bytes(path: Path) -> int:
    """Total size of a store's shard files."""
    directory = path / SHARD_DIR
    return sum(p.stat().st_size for p in directory.iterdir() if p.is_file()) if directory.is_dir() else 0


def compact_store(path: str | Path) -> CompactReport:
    """Rewrite the store at ``path`` with only its committed blobs (see the module docstring). A
    store reached through a symbolic link is compacted where the link points, the link kept."""
    given = Path(path)
    path = given.resolve()
    if not (path / MANIFEST).is_file() or not (path / CATALOGUE).is_file():
        raise StoreError(f"{path} is not a ragcompress store (no {MANIFEST} or {CATALOGUE}); check the --store path")
    # the store's folder is replaced whole: a file of the user's in it would be deleted with it
    refusal = overwrite_refusal(path)
    if refusal is not None:
        raise StoreError(
            f"{path} {refusal}; refusing to compact it (compaction replaces the folder, deleting what else it "
            "holds): move those files out of the store, then compact"
        )
    Manifest.read(path)  # a damaged manifest is named at the user's path, not at the copy's
    lock = StoreLock(path)
    target = compact_copy(path)
    try:
        before = shard_bytes(path)
        remove_tree(target)  # what a killed compaction left
        target.mkdir()
        # the manifest last: a store is complete once it exists; an unfinished run's marker goes
        # along, or compacting a half-indexed store would make it answerable
        for name in (PREFIX, BASIS, RUN, MANIFEST):
            if (path / name).is_file():
                write_atomic(target / name, (path / name).read_bytes())
        Catalogue(target, readonly=False).close()
        source = Catalogue(path, readonly=True)
        copied = 0
        try:
            with StoreWriter(target) as writer:
                rows: list[dict[str, Any]] = []
                for row in source.rows():
                    blob = read_blob(path, row["shard"], row["offset"], row["length"], row["checksum"], row["id"])
                    row["shard"], row["offset"] = writer.shards.append(blob)
                    rows.append(row)
                    if len(rows) == COMMIT_ROWS:
                        writer.shards.sync()
                        writer.commit(rows)
                        copied, rows = copied + len(rows), []
                writer.shards.sync()
                writer.commit(rows)
                copied += len(rows)
                writer.write_index()
        finally:
            source.close()
        after = shard_bytes(target)
        follow_umask(target)  # as a new store does (SQLite created the catalogue 0644 whatever the umask)
        replace_store(target, path)
    except BaseException:
        remove_tree(target)  # a failed compaction leaves no half-built copy behind
        raise
    finally:
        lock.release()
    return CompactReport(str(given), copied, before, after)
