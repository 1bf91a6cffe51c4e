"""Offline check of a whole store: ``verify_store(path) -> VerifyReport`` (``ragcompress verify``).

Checks, in order, each problem named with its passage id and shard where there is one:

1. the manifest parses and every value is valid (:meth:`Manifest.read`);
2. the prefix cache matches the manifest's sha256, decodes, and has the manifest's model shape;
3. the catalogue's schema is ours (:meth:`Catalogue._check_schema`), it passes SQLite's
   ``integrity_check`` and every row is readable;
4. every passage: shard name valid, blob inside its shard, checksum (xxh3-128) matches, blob decodes, cache
   shape matches the manifest's ``model_shape``, token counts match the row, text matches its
   ``text_sha``, the other fields match the row's ``meta_checksum`` (when it has one: rows
   committed before the column existed have none), the ``searchable`` flag matches the row's
   ``searchable_checksum`` (likewise), embedding has the store's dimension, blobs in a shard do
   not overlap (in offset order);
5. the FAISS index, when a reader would use it (its sha256 matches ``index.json`` and it was built
   at the catalogue's row count and generation), holds exactly the catalogue's rows with the
   catalogue's vectors.

*Problems* are states in which a reader could fail or serve wrong data; ``ok`` (intact) is true
only when there are none. An indexing run that stopped before its end is no damage but leaves a
store answering refuses: ``answerable`` is ``ok`` without one (``ragcompress verify`` exits 2 on
an intact store that is not answerable). *Notes* are states a killed writer leaves and readers handle safely (bytes past
the last commit, a missing or stale index that readers rebuild, temp files), which the next
writer repairs, and bytes no passage points at since passages were removed or replaced.
"""

from __future__ import annotations

import hashlib
import os
import shlex
import sqlite3
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ragcompress.errors import SegmentManifestMismatch, StoreAccessError, StoreError
from ragcompress.kv import ModelShape
from ragcompress.kv.lowrank import LowRankBasis
from ragcompress.kv.quant import QuantConfig
from ragcompress.paths import sha256_file
from ragcompress.store import codec
from ragcompress.store.ann import stored_vectors
from ragcompress.store.basis import read_basis
from ragcompress.store.catalogue import CATALOGUE, Catalogue, meta_checksum, searchable_checksum
from ragcompress.store.files import INDEX, PREFIX, compact_copy, overwrite_refusal, unfinished_run
from ragcompress.store.jsontext import loads_json
from ragcompress.store.kvstore import read_index_meta, read_prefix
from ragcompress.store.manifest import SETTINGS, Manifest
from ragcompress.store.shards import SHARD_DIR, is_shard_name, read_blob


@dataclass(frozen=True)
class Problem:
    """One failed check. ``kind`` is one of manifest, prefix, basis, catalogue, shard (a shard
    file missing, or shorter than the blobs committed into it), segment, index."""

    kind: str
    message: str
    passage_id: str | None = None
    shard: str | None = None

    def __str__(self) -> str:
        where = []
        if self.passage_id is not None and repr(self.passage_id) not in self.message:
            where.append(f"passage {self.passage_id!r}")
        if self.shard and self.shard not in self.message:
            where.append(f"shard {self.shard}")
        return f"[{self.kind}] " + (f"{', '.join(where)}: " if where else "") + self.message


@dataclass(frozen=True)
class VerifyReport:
    store: str
    passages: int = 0
    shards: int = 0
    problems: list[Problem] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    # what an indexing run that stopped before its end left (files.unfinished_run), else None
    unfinished: str | None = None

    @property
    def ok(self) -> bool:
        """Intact: no problem (an unfinished run is no damage; see :attr:`answerable`)."""
        return not self.problems

    @property
    def answerable(self) -> bool:
        """Intact and holding all of its input: answering does not refuse it (``verify`` exits 0)."""
        return self.ok and self.unfinished is None

    def remedy(self, input_hint: str = "INPUT") -> str:
        """What repairs the store, chosen by what is damaged (``ragcompress verify`` prints it):
        only damaged passages are removed and encoded again; a damaged manifest, prefix, basis,
        catalogue or shard (which every writer refuses) means rebuilding the store, with its
        settings given when the manifest that records them is what was lost; an index that does
        not match the catalogue is rewritten by the next indexing run."""
        store = shlex.quote(self.store)
        rebuild = f"`ragcompress index --input {input_hint} --store {store} --overwrite`"
        kinds = {p.kind for p in self.problems}
        if not kinds:
            return ""
        if "manifest" in kinds:
            refusal = overwrite_refusal(Path(self.store))
            if refusal is not None:  # --overwrite would refuse it: the rebuild advice cannot be followed
                return (
                    f"{self.store} {refusal}, and --overwrite deletes only a store: build the store in an empty or "
                    "new --store, or move the files you keep out of this folder first"
                )
            return (
                "the manifest that records the store's settings cannot be used (damaged, or of another store "
                f"format version: the problem above says which): rebuild the store with {rebuild} and {SETTINGS}"
            )
        whole = sorted(kinds & {"prefix", "basis", "catalogue", "shard"})
        if whole:
            return f"writers refuse a store whose {'/'.join(whole)} is damaged: rebuild it with {rebuild} (it keeps the store's settings)"
        damaged = list(dict.fromkeys(p.passage_id for p in self.problems if p.kind == "segment" and p.passage_id))
        if damaged:
            shown = " ".join(shlex.quote(pid) for pid in damaged[:5]) + (" ..." if len(damaged) > 5 else "")
            return (
                f"remove the {len(damaged)} damaged passages (`ragcompress remove --store {store} {shown}`), then "
                f"`ragcompress index --input {input_hint} --store {store}` encodes them again and rewrites the index"
            )
        return (
            f"re-run `ragcompress index --input {input_hint} --store {store}`: it rewrites the index from the catalogue"
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "answerable": self.answerable,
            "store": self.store,
            "passages": self.passages,
            "shards": self.shards,
            "problems": [asdict(p) for p in self.problems],
            "notes": list(self.notes),
        }


def busy_json(store: str, error: str) -> dict[str, Any]:
    """``verify --json``'s object for a store it did not check, another process holding its
    catalogue locked (:class:`~ragcompress.errors.StoreBusyError`): a report's keys, so that a
    script parses it as any other, with ``ok`` and ``answerable`` null, neither intact nor
    damaged (nor sound to an ``if report["ok"]``), the counts null, and ``busy`` and ``error``
    saying why."""
    unchecked = {"ok": None, "answerable": None, "passages": None, "shards": None}
    return {**VerifyReport(store).to_json(), **unchecked, "busy": True, "error": error}


def _check_prefix(root: Path, manifest: Manifest, shape: ModelShape, problems: list[Problem]) -> None:
    path = root / PREFIX
    if not path.is_file():
        problems.append(Problem("prefix", f"{PREFIX} is missing"))
        return
    try:
        blob = read_prefix(root, shape)
    except StoreError as exc:
        problems.append(Problem("prefix", str(exc)))
        return
    if not manifest.prefix_sha256:
        problems.append(Problem("prefix", "the manifest records no prefix checksum; rebuild the store"))
    elif hashlib.sha256(blob).hexdigest() != manifest.prefix_sha256:
        problems.append(Problem("prefix", "checksum mismatch with the manifest"))
        return
    try:
        codec.decode(blob, shape=shape)
    except StoreError as exc:
        problems.append(Problem("prefix", str(exc)))


def _is_json_object(text: Any) -> bool:
    try:
        return isinstance(loads_json(text), dict)
    except (TypeError, ValueError):
        return False


def _check_segments(
    root: Path,
    catalogue: Catalogue,
    shape: ModelShape,
    problems: list[Problem],
    basis: LowRankBasis | None = None,
    base_copy: bool = False,
    quant: QuantConfig | None = None,
) -> tuple[int, dict[str, int], int | None]:
    """Every catalogue row against its blob (and its base copy, in a store that keeps them);
    returns (rows, committed end per shard, embedding dim)."""
    ends: dict[str, int] = {}
    dim: int | None = None
    count = 0
    for row in catalogue.raw_rows():
        pid, title, text, text_sha, meta, shard, offset, length, digest, num_tokens, kept, embedding, row_sum = row[:13]
        searchable, seal = row[13:]
        count += 1
        emb_bytes = len(embedding) if isinstance(embedding, bytes) else None

        def fail(message: str, kind: str = "segment", pid: str = pid, shard: Any = shard) -> None:
            problems.append(Problem(kind, message, pid, shard if isinstance(shard, str) else None))

        if not isinstance(shard, str) or not is_shard_name(shard):
            fail(f"catalogue names shard {shard!r}, which is not a valid shard name")
            continue
        if isinstance(offset, int) and isinstance(length, int):
            ends[shard] = max(ends.get(shard, 0), offset + length)
        if not isinstance(text, str) or hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest() != text_sha:
            fail("passage text does not match its text_sha", "catalogue")
        if not _is_json_object(meta):  # every search that returns the passage would fail on it
            fail("passage metadata is not a JSON object", "catalogue")
        if row_sum is not None and (
            not isinstance(embedding, bytes) or meta_checksum(pid, title, meta, text_sha, embedding) != row_sum
        ):
            fail("row does not match its meta_checksum (id, title, metadata, text or embedding damaged)", "catalogue")
        if seal is not None and (not isinstance(searchable, int) or searchable_checksum(pid, searchable) != seal):
            # else a flipped flag hides a passage from retrieval, or retrieves a query-time cache
            fail(
                f"searchable flag ({searchable!r}) does not match its searchable_checksum: the row is damaged, and "
                "retrieval may skip an indexed passage or return a query-time cache",
                "catalogue",
            )
        if emb_bytes is None or emb_bytes % 4 or not emb_bytes:
            fail(f"embedding has {emb_bytes} bytes, not a float32 vector", "catalogue")
        elif dim is None:
            dim = emb_bytes // 4
        elif emb_bytes // 4 != dim:
            fail(f"embedding has dimension {emb_bytes // 4}, the store's others have {dim}", "catalogue")
        try:
            blob = read_blob(root, shard, offset, length, digest, pid)
            segment = codec.parse(blob, shape, quant)
            if segment.ranks and basis is None:
                fail("segment stores low-rank latents and the store has no readable basis")
                continue
            segment.dense(basis=basis)  # its tensors match the shapes its header declares
            if base_copy:
                segment.base_copy().dense()
        except SegmentManifestMismatch as exc:
            fail(str(exc), "manifest")
            continue
        except StoreError as exc:
            fail(str(exc))
            continue
        if segment.num_tokens != num_tokens or segment.kept_tokens != kept:
            fail(
                f"blob holds {segment.num_tokens} tokens / {segment.kept_tokens} kept, "
                f"its catalogue row says {num_tokens} / {kept}"
            )
    return count, ends, dim


def _check_overlaps(catalogue: Catalogue, problems: list[Problem], notes: list[str]) -> None:
    """No two rows' blobs share bytes. Rows are walked in (shard, offset) order, not row order:
    Ray workers write blobs in the order they finish batches, the driver commits in input order.
    Bytes between blobs (removed or replaced passages) are a note, not a problem."""
    shard_now, end = None, 0
    unreferenced: dict[str, int] = {}
    for pid, shard, offset, length in catalogue.locations():
        if not isinstance(shard, str) or not isinstance(offset, int) or not isinstance(length, int):
            continue  # reported by _check_segments
        if shard != shard_now:
            shard_now, end = shard, 0
        if offset > end:
            unreferenced[shard] = unreferenced.get(shard, 0) + offset - end
        if offset < end:
            problems.append(
                Problem(
                    "segment",
                    f"blob at offset {offset} overlaps another blob in this shard (ends at {end})",
                    pid,
                    shard,
                )
            )
        end = max(end, offset + length)
    if unreferenced:
        total = sum(unreferenced.values())
        notes.append(
            f"{total} bytes in {len(unreferenced)} shard(s) lie between committed blobs (passages removed "
            "or replaced, or a retried write); no passage points at them; `ragcompress compact` reclaims them"
        )


def _check_shard_files(root: Path, ends: dict[str, int], problems: list[Problem], notes: list[str]) -> None:
    """A shard missing or shorter than what is committed into it (every writer refuses such a
    store: the passages there are lost) is a problem; bytes past the last commit are notes."""
    directory = root / SHARD_DIR
    present = (
        {p.name: p.stat().st_size for p in directory.iterdir() if is_shard_name(p.name)} if directory.is_dir() else {}
    )
    for name, committed in sorted(ends.items()):
        if name not in present:
            problems.append(Problem("shard", "is missing but committed passages point into it", shard=name))
        elif present[name] < committed:
            problems.append(
                Problem("shard", f"has {present[name]} bytes but committed passages end at {committed}", shard=name)
            )
    for name, size in sorted(present.items()):
        end = ends.get(name)
        if end is None:
            notes.append(
                f"shard {name} holds {size} bytes no committed passage points at (its passages removed, or a "
                "killed write); the next writer removes it"
            )
        elif size > end:
            notes.append(
                f"shard {name} has {size - end} bytes past its last committed blob (a killed write, or "
                "passages removed); the next writer truncates them"
            )


def _check_index(root: Path, catalogue: Catalogue, count: int, problems: list[Problem], notes: list[str]) -> None:
    path = root / INDEX
    meta = read_index_meta(root)
    if not path.is_file() or meta is None:
        notes.append(f"{INDEX} or its index.json is missing; readers rebuild the index from the catalogue")
        return
    if sha256_file(path) != meta["sha256"]:
        notes.append(f"{INDEX} does not match the sha256 in index.json; readers ignore it and rebuild")
        return
    if meta["count"] != count:
        notes.append(f"{INDEX} covers {meta['count']} passages, the catalogue {count}; readers rebuild it")
        return
    if meta["generation"] != catalogue.generation():
        notes.append(f"{INDEX} was built before passages were removed or replaced; readers rebuild it")
        return
    from ragcompress.retrieval import VectorIndex

    try:
        index = VectorIndex.load(path).index
    except (RuntimeError, MemoryError) as exc:  # MemoryError: FAISS's bad_alloc for a huge declared array
        problems.append(Problem("index", f"{INDEX} matches its checksum but FAISS cannot read it ({exc})"))
        return
    if index.ntotal != count:
        problems.append(Problem("index", f"{INDEX} holds {index.ntotal} vectors, the catalogue {count} passages"))
        return
    import faiss

    id_map = faiss.vector_to_array(index.id_map) if hasattr(index, "id_map") else None
    if id_map is None:
        problems.append(Problem("index", f"{INDEX} is not an id-mapped index"))
        return
    position = {int(row): i for i, row in enumerate(id_map)}
    stored = stored_vectors(index)  # flat or IVF-Flat: their raw vectors are compared below
    if stored is None:
        problems.append(Problem("index", f"{INDEX} is neither a flat nor an IVF-Flat index"))
        return
    ids = catalogue.ids_by_row()
    for rows, vectors in catalogue.embedding_chunks():
        for row, vector in zip(rows.tolist(), vectors, strict=True):
            i = position.get(row)
            if i is None:
                problems.append(Problem("index", f"catalogue row {row} is missing from {INDEX}", ids.get(row)))
            elif vector.shape[0] != index.d or not np.array_equal(stored[i], vector):
                problems.append(Problem("index", f"{INDEX} holds another vector than the catalogue", ids.get(row)))


def _compact_copy_note(root: Path) -> str | None:
    """A note naming the copy ``compact`` builds beside the store, when one is there: a killed
    compaction leaves it (as large as the store's live shards), and nothing read it out before."""
    copy = compact_copy(root.resolve())
    if not copy.is_dir() or copy.is_symlink():
        return None
    size = 0
    for folder, _, files in os.walk(copy):  # a running compaction's copy changes meanwhile
        for name in files:
            try:
                size += os.lstat(os.path.join(folder, name)).st_size
            except OSError:
                pass
    return (
        f"{copy} ({size / 1e6:.1f} MB) beside the store is the copy of a `ragcompress compact` that was killed "
        "(or is running now); the next `index` or `compact` on the store deletes it, or delete it yourself"
    )


def verify_store(path: str | Path) -> VerifyReport:
    """Check everything in the store at ``path``; never raises for a damaged store (a
    :class:`~ragcompress.errors.StoreAccessError` says it cannot read an intact one here, a
    :class:`~ragcompress.errors.StoreBusyError` that another process holds its catalogue locked)."""
    root = Path(path)
    problems: list[Problem] = []
    notes: list[str] = []
    try:
        manifest = Manifest.read(root)
    except StoreError as exc:
        return VerifyReport(str(root), problems=[Problem("manifest", str(exc))])
    shape = manifest.shape
    _check_prefix(root, manifest, shape, problems)
    basis = None
    lowrank = manifest.compression.get("lowrank")
    if isinstance(lowrank, dict):  # a low-rank store: its latents are checked with its basis
        try:
            basis = read_basis(root, str(lowrank.get("basis_sha256", "")), shape)
        except (StoreError, ValueError) as exc:
            problems.append(Problem("basis", str(exc)))
    if not (root / CATALOGUE).is_file():
        problems.append(Problem("catalogue", f"{CATALOGUE} is missing"))
        return VerifyReport(str(root), problems=problems, notes=notes)
    try:
        catalogue = Catalogue(root, readonly=True)
    except StoreAccessError:  # an intact catalogue this process cannot read where it lies, or now: no damage
        raise
    except StoreError as exc:
        problems.append(Problem("catalogue", str(exc)))
        return VerifyReport(str(root), problems=problems, notes=notes)
    count, ends = 0, dict[str, int]()
    try:
        verdict = catalogue.integrity_problems()
        if verdict:
            problems.append(Problem("catalogue", "SQLite integrity_check: " + "; ".join(verdict[:5])))
        count, ends, _ = _check_segments(root, catalogue, shape, problems, basis, manifest.base_copy, manifest.quant)
        _check_overlaps(catalogue, problems, notes)
        _check_shard_files(root, ends, problems, notes)
        searchable = catalogue.count()
        if count > searchable:
            notes.append(
                f"{count - searchable} passages are caches computed at query time: answered when handed in "
                "again, never retrieved (ingesting them makes them searchable)"
            )
        _check_index(root, catalogue, searchable, problems, notes)  # the rows the index covers
    except StoreAccessError:  # a writer took the catalogue meanwhile (StoreBusyError): no damage
        raise
    except (sqlite3.DatabaseError, StoreError) as exc:
        problems.append(Problem("catalogue", f"cannot be read ({exc})"))
    except Exception as exc:  # damage no check foresaw: named as a problem, since verify never raises for it
        problems.append(Problem("catalogue", f"cannot be checked ({type(exc).__name__}: {exc})"))
    finally:
        catalogue.close()
    notes.extend(f"temporary file {p.name} left by a killed writer" for p in root.glob(".*.tmp"))
    copy_note = _compact_copy_note(root)
    if copy_note is not None:
        notes.append(copy_note)
    unfinished = unfinished_run(root)
    if unfinished is not None:  # intact, but not what its input asked for: answering refuses it
        notes.append(f"{unfinished} (answering refuses it until then)")
    return VerifyReport(str(root), count, len(ends), problems, notes, unfinished)
