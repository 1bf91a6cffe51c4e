"""The sqlite3 catalogue: passage id -> text, embedding and where its cache blob lives.

WAL mode lets readers query while one writer commits; a reader only ever sees committed rows,
and every row it sees points at a blob that was fsynced before the row was committed.

A row's blob fields (location, checksum, token counts) are checked against the blob; its other
fields against ``meta_checksum`` (:func:`meta_checksum`). That column came later: a catalogue
without it gains it when a writer opens it, and rows committed before then hold NULL there,
which ``ragcompress verify`` reads as "no checksum", so older stores still open and verify.

A row is *searchable* (the FAISS index and :meth:`Catalogue.count` cover it) unless it holds a
cache computed at query time (the LlamaIndex components cache nodes that came from elsewhere):
such a row answers when its node is handed in again but is never retrieved, so a query cannot
add passages to the corpus, or bring back one that was removed. Ingesting the same passage
makes it searchable. The column came later too: a catalogue without it gains it (every row
searchable) when a writer opens it, and a reader reads every row of one without it as searchable.

``meta_checksum`` does not cover the flag, so a flipped flag would silently hide a passage from
retrieval or retrieve a query-time cache, and ``verify`` would count it as a query-time cache.
``searchable_checksum`` (:func:`searchable_checksum`) seals it: written with every row and by
:meth:`Catalogue.make_searchable` in the transaction that flips the flag, checked by ``verify``.
It came last, as ``meta_checksum`` did: a writer adds it to a catalogue without it, rows committed
before hold NULL there (read as "no checksum": their flag is not checked, and is never sealed
after the fact, which could seal a damaged one), and a reader reads it as NULL where it is absent.

A WAL catalogue opens read-only only with its ``-wal`` and ``-shm`` beside it, or where SQLite can
create them, and SQLite deletes them when the last connection closes: a store made read-only after
that (a read-only mount or image, ``chmod -R a-w``, another user's folder) could not be read. So a
writer leaves them in place when it closes (:meth:`Catalogue.close`), and a reader that finds a
catalogue without them where it cannot create them (an earlier version's ``remove`` or ``compact``
left it so) reads it as a file that does not change, holding the store's writer lock shared so
that none can change it meanwhile (:meth:`Catalogue._open_unchanging`).

One connection serves every thread that shares a store (an Engine answering from a thread pool),
and SQLite's mutex does not cover closing it: CPython's sqlite3 crashed the process when one
thread closed the connection while another's statement ran. So every statement, with its rows
fetched, and :meth:`Catalogue.close` run under one lock per catalogue (:meth:`Catalogue._guard`);
a streamed query fetches a chunk at a time under it and hands the chunk out after releasing it
(a generator paused with the lock held would stall every other thread). A thread that uses a
catalogue after its close gets the :class:`StoreError` saying so, never a crash.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
from collections.abc import Iterable, Iterator
from contextlib import closing, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ragcompress.errors import StoreAccessError, StoreBusyError, StoreError, StoreMismatchError
from ragcompress.store.jsontext import loads_json
from ragcompress.store.shards import CommittedBlob, checksum

CATALOGUE = "catalogue.sqlite"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS passages (
    row        INTEGER PRIMARY KEY,
    id         TEXT    NOT NULL UNIQUE,
    title      TEXT    NOT NULL,
    text       TEXT    NOT NULL,
    meta       TEXT    NOT NULL,
    text_sha   TEXT    NOT NULL,
    shard      TEXT    NOT NULL,
    offset     INTEGER NOT NULL,
    length     INTEGER NOT NULL,
    checksum   TEXT    NOT NULL,
    num_tokens INTEGER NOT NULL,
    kept       INTEGER NOT NULL,
    embedding  BLOB    NOT NULL,
    meta_checksum TEXT,
    searchable INTEGER NOT NULL DEFAULT 1,
    searchable_checksum TEXT
);
"""


def _declared_types() -> dict[str, str]:
    """Every column's declared type, as SQLite reads ``_SCHEMA`` (the later three may be absent,
    see the module docstring): derived, so the check cannot drift from the table it checks."""
    with closing(sqlite3.connect(":memory:")) as db:
        db.executescript(_SCHEMA)
        return {name: kind.upper() for _, name, kind, _, _, _ in db.execute("PRAGMA table_info(passages)")}


_COLUMN_TYPES = _declared_types()
_LATER_COLUMNS = {"meta_checksum", "searchable", "searchable_checksum"}


def meta_checksum(passage_id: Any, title: Any, meta: Any, text_sha: Any, embedding: bytes) -> str:
    """xxh3-128 of a row's fields that its blob does not check: id, title, metadata (the stored
    JSON), ``text_sha`` (which covers the text) and embedding."""
    return checksum(json.dumps([passage_id, title, meta, text_sha]).encode() + embedding)


def searchable_checksum(passage_id: Any, searchable: Any) -> str:
    """xxh3-128 of a row's id and ``searchable`` flag, which ``meta_checksum`` leaves out (module
    docstring); the id makes it the row's own, so a flag cannot pass with another row's seal."""
    return checksum(json.dumps(["searchable", passage_id, searchable]).encode())


@dataclass(frozen=True)
class Entry:
    """One catalogue row. ``kept`` counts stored (token, layer, head) entries."""

    row: int
    id: str
    title: str
    text: str
    meta: dict[str, Any]
    text_sha: str
    shard: str
    offset: int
    length: int
    checksum: str
    num_tokens: int
    kept: int


_COLUMNS = "row, id, title, text, meta, text_sha, shard, offset, length, checksum, num_tokens, kept"


def _entry(values: tuple) -> Entry:
    row = list(values)
    try:
        row[4] = loads_json(row[4])
    except (TypeError, ValueError):
        raise StoreError(f"catalogue row for passage {row[1]!r} has unreadable metadata") from None
    return Entry(*row)


# SQLite's result code for "database or disk is full" (sqlite3.SQLITE_FULL from Python 3.11)
_SQLITE_FULL = 13
# the primary result codes of a connection that cannot create or write a file it needs, whatever
# the extended code says why (SQLITE_READONLY_DIRECTORY, SQLITE_READONLY_CANTINIT, ...)
_SQLITE_READONLY, _SQLITE_CANTOPEN = 8, 14


def _cannot_write(exc: sqlite3.Error) -> bool:
    """Whether ``exc`` is SQLite failing to create or write a file, not damage."""
    return (getattr(exc, "sqlite_errorcode", 0) & 0xFF) in (_SQLITE_READONLY, _SQLITE_CANTOPEN)


# Query parameters per statement, well under SQLite's default limit of 32766.
_CHUNK = 900


class Catalogue:
    """The catalogue database. Any SQLite failure surfaces as a :class:`StoreError` naming it."""

    def __init__(self, root: Path, *, readonly: bool) -> None:
        self._lock = threading.RLock()  # held by every use of self.db (module docstring)
        self.path = root / CATALOGUE
        self._counted: tuple[int, int] | None = None  # (data_version, row count), see count()
        self._closed = False  # set by close(): an error after it names the close, not damage
        self._writer = not readonly
        self._held: int | None = None  # the store's writer lock, held shared by an unchanging read (_open_unchanging)
        with self._guard():
            if readonly:
                try:
                    self.db = self._connect("mode=ro")
                except sqlite3.OperationalError as exc:
                    if not _cannot_write(exc):
                        raise
                    self._open_unchanging()
                self._check_schema()
            else:
                self.db = sqlite3.connect(self.path, check_same_thread=False)
                self.db.execute("PRAGMA journal_mode=WAL")
                self.db.execute("PRAGMA synchronous=FULL")
                self._check_writable()
                self.db.executescript(_SCHEMA)
                self._check_schema()  # before a column is added to a table that is not ours
                if not self._has_column("meta_checksum"):  # a store from before the column (module docstring)
                    self.db.execute("ALTER TABLE passages ADD COLUMN meta_checksum TEXT")
                if not self._has_column("searchable"):
                    self.db.execute("ALTER TABLE passages ADD COLUMN searchable INTEGER NOT NULL DEFAULT 1")
                if not self._has_column("searchable_checksum"):
                    self.db.execute("ALTER TABLE passages ADD COLUMN searchable_checksum TEXT")
                self.db.commit()
        self._columns: set[str] = set()  # later columns seen in this catalogue (see _column)

    def _connect(self, query: str) -> sqlite3.Connection:
        """A connection to the catalogue's URI with ``query``, which has read from it."""
        uri = f"{self.path.resolve().as_uri()}?{query}"
        db = sqlite3.connect(uri, uri=True, check_same_thread=False)
        try:
            db.execute("SELECT 1 FROM passages LIMIT 1").fetchall()
        except BaseException:
            db.close()
            raise
        return db

    def _open_unchanging(self) -> None:
        """Read a catalogue that SQLite cannot open read-only here (no ``-wal``/``-shm`` beside it,
        and none can be created: module docstring) as an unchanging file (``immutable=1``: SQLite
        takes no lock and reads no WAL), once nothing can change it while it is read.

        That holds while this reader holds the store's writer lock shared (``writer.hold_shared``,
        until :meth:`close`): every writer holds it exclusively for as long as it writes, so none
        writes now and none starts meanwhile (a writer is refused, told a reader holds the lock).
        Every commit is then in the file itself, unless a ``-wal`` with frames or a ``-journal``
        is there (a ``-shm`` lost, a writer killed): reading those needs what cannot be created
        here, so such a catalogue is refused rather than read without its last commits."""
        from ragcompress.store.writer import hold_shared

        root, uid = self.path.parent, os.geteuid()
        if not os.access(self.path, os.R_OK):
            raise StoreAccessError(
                f"catalogue {self.path} is not readable by this user (uid {uid}; it belongs to uid "
                f"{self.path.stat().st_uid}); let its owner make the store readable (`chmod -R a+rX {root}`)"
            )
        here = (
            f"SQLite needs {CATALOGUE}-wal and {CATALOGUE}-shm beside it, and this user (uid {uid}) cannot create "
            f"them in {root}"
        )
        once = (
            f"open the store once as a user who can write to {root} (`ragcompress verify --store {root}`), then retry"
        )
        try:
            held = hold_shared(root)
        except OSError as exc:
            raise StoreAccessError(
                f"catalogue {self.path} cannot be read here: {here}, nor read its lock file ({exc.strerror or exc}) "
                f"to keep writers out while it reads the catalogue without them; {once}"
            ) from None
        if held is None:  # busy, as a catalogue a writer holds locked is: retry, not damage
            raise StoreBusyError(
                f"store {root} is being written, and its catalogue cannot be read here meanwhile ({here}); "
                "retry when the writer finishes"
            )
        try:
            try:  # a writer that ran since the first try left the files
                self.db = self._connect("mode=ro")
                return
            except sqlite3.OperationalError as exc:
                if not _cannot_write(exc):
                    raise
            for pending in (self.path.with_name(f"{CATALOGUE}-wal"), self.path.with_name(f"{CATALOGUE}-journal")):
                if pending.exists() and pending.stat().st_size > 0:
                    raise StoreAccessError(
                        f"catalogue {self.path} cannot be read here: {pending.name} holds changes not yet in it, "
                        f"and {here} to read them; the store is intact: {once}"
                    )
            self.db = self._connect("mode=ro&immutable=1")
        except BaseException:
            os.close(held)
            raise
        self._held = held

    def _check_writable(self) -> None:
        """Refuse now, naming them, catalogue files this user cannot write. SQLite finds out only
        at the first write, which for ``index`` came after it had marked its run
        (``files.indexing_run``): an intact store was left marked unfinished, and refused for
        answering. The usual cause: a reader running as another user created the ``-wal`` and
        ``-shm`` (SQLite gives them that user, and the catalogue's mode) where a writer had left
        none, as writers did before they left them (:meth:`close`). Taking the write lock
        (``BEGIN IMMEDIATE``) needs both writable, and changes nothing."""
        try:
            self.db.execute("BEGIN IMMEDIATE")
            self.db.execute("ROLLBACK")
        except sqlite3.OperationalError as exc:
            if not _cannot_write(exc):
                raise
            raise StoreAccessError(self._unwritable(exc)) from None

    def _unwritable(self, exc: sqlite3.Error) -> str:
        """The error for catalogue files this user cannot write (:meth:`_check_writable`)."""
        root, uid = self.path.parent, os.geteuid()
        files = [
            file
            for file in (self.path, *(self.path.with_name(f"{CATALOGUE}{end}") for end in ("-wal", "-shm")))
            if file.exists() and not os.access(file, os.W_OK)
        ]
        if not files:
            return (
                f"cannot write to store {root}: its catalogue {self.path} cannot be written ({exc}); the store is "
                "intact: let this user write the store's folder and files, then retry"
            )
        named = " ".join(str(file) for file in files)
        owners = {file.stat().st_uid for file in files}
        fix = f"`chmod u+w {named}`" if owners == {uid} else f"as root, `chown {uid} {named}`"
        return (
            f"cannot write to store {root}: this user (uid {uid}) cannot write "
            f"{', '.join(f'{file.name} (uid {file.stat().st_uid})' for file in files)} (SQLite gives a -wal or -shm "
            f"the user of the process that created it, a reader's included); the store is intact: {fix}, then retry"
        )

    def _check_schema(self) -> None:
        """Refuse a ``passages`` table whose columns are not ours. SQLite keeps the schema as
        text, so a flipped bit there (``row INTEGER PRIMARY0KEY``) passes ``integrity_check``
        and changes what every query returns: ``row`` no longer the primary key reads as NULL
        in every row, and search found nothing."""
        found = {name: (kind.upper(), pk) for _, name, kind, _, _, pk in self.db.execute("PRAGMA table_info(passages)")}
        wrong = [
            f"{name} {found[name][0] or 'untyped'}, not {kind}" if name in found else f"{name} missing"
            for name, kind in _COLUMN_TYPES.items()
            if (name in found or name not in _LATER_COLUMNS) and found.get(name, ("",))[0] != kind
        ]
        unknown = [name for name in found if name not in _COLUMN_TYPES]
        if "row" in found and found["row"][1] != 1:
            wrong.append("row is not the primary key")
        if unknown and not wrong and _LATER_COLUMNS <= set(found):
            # every column of ours is there, as declared: columns beside them were added by a
            # newer ragcompress (as this one adds its later columns), not a flipped bit, which
            # renames one of ours (then one is missing); rebuilding would throw the store away
            raise StoreMismatchError(
                f"catalogue {self.path} has columns this ragcompress does not know ({', '.join(unknown[:3])}): it "
                "was written by a newer ragcompress; upgrade (`pip install -U ragcompress-kv`) to read it, do not rebuild it"
            )
        wrong += [f"unknown column {name}" for name in unknown]
        if wrong:
            raise StoreError(
                f"catalogue {self.path} has a damaged schema (table passages: {'; '.join(wrong[:3])}); the store "
                f"cannot be read or written: rebuild it with `ragcompress index --input INPUT --store "
                f"{self.path.parent} --overwrite`, which keeps its settings"
            )

    def _has_column(self, name: str) -> bool:
        with self._guard():
            return any(column[1] == name for column in self.db.execute("PRAGMA table_info(passages)"))

    def _column(self, name: str, absent: str) -> str:
        """``name``, or the SQL ``absent`` stands for in a catalogue from before the column. Asked
        again while missing: a writer in another process adds the column to a store this reader
        already has open (a long-running ``serve`` beside a LlamaIndex app that caches at query
        time), and a reader that decided once would read its non-searchable rows as searchable."""
        if name not in self._columns:
            if not self._has_column(name):
                return absent
            self._columns.add(name)
        return name

    @property
    def _meta_checksum(self) -> str:
        return self._column("meta_checksum", "NULL")

    @property
    def _searchable(self) -> str:
        """The rows retrieval covers: every row of a catalogue from before the column."""
        return self._column("searchable", "1")

    @property
    def _searchable_checksum(self) -> str:
        return self._column("searchable_checksum", "NULL")

    @contextmanager
    def _guard(self) -> Iterator[None]:
        """Hold the catalogue's lock (module docstring) and name any SQLite failure inside."""
        with self._lock, self._naming():
            yield

    @contextmanager
    def _naming(self) -> Iterator[None]:
        try:
            yield
        except sqlite3.OperationalError as exc:
            if getattr(exc, "sqlite_errorcode", None) == _SQLITE_FULL or "disk is full" in str(exc):
                # not damage: the transaction that could not grow the file was rolled back whole
                raise StoreError(
                    f"catalogue {self.path}: the disk is full ({exc}); free disk space and run the command "
                    "again: the store is intact, and `ragcompress index` resumes where it stopped"
                ) from None
            if "locked" in str(exc) or "busy" in str(exc):  # another process holds a write transaction
                raise StoreBusyError(
                    f"catalogue {self.path} is locked by another process writing it ({exc}); retry when the writer "
                    "finishes"
                ) from None
            raise StoreError(
                f"catalogue {self.path} cannot be read ({exc}); run `ragcompress verify` or rebuild the store"
            ) from None
        except sqlite3.ProgrammingError as exc:
            if self._closed:  # a ProgrammingError is a DatabaseError: it read as a damaged store
                raise StoreError(
                    f"store {self.path.parent} was closed (its close() ran, or its `with` block ended); open it "
                    "again (KVStore.open, or a new Engine) to use it"
                ) from None
            raise StoreError(
                f"catalogue {self.path} cannot be read ({exc}); run `ragcompress verify` or rebuild the store"
            ) from None
        except sqlite3.DatabaseError as exc:
            raise StoreError(
                f"catalogue {self.path} cannot be read ({exc}); run `ragcompress verify` or rebuild the store"
            ) from None

    def close(self) -> None:
        """Close the database; using the catalogue after is a :class:`StoreError` saying so. Waits
        for a statement another thread is running (module docstring); a second close does nothing.

        A writer leaves ``-wal`` and ``-shm`` beside the catalogue (module docstring), owned by
        its user: SQLite deletes them when its last connection closes, unless that connection is
        read-only (it cannot checkpoint), so a read-only connection is open while the writer's
        closes. The WAL is checkpointed into the file first, without waiting for readers, so the
        file alone holds every commit whenever none was reading an older snapshot (as when SQLite
        deleted the WAL)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._release()

    def __del__(self) -> None:
        # A catalogue no one holds any more, which no thread can be using: one a reader swapped
        # out for a new store (KVStore.follow_replacement), or one whose constructor failed, is
        # closed here, not by the cycle collector (a sqlite3 connection and its statement cache
        # refer to each other), and its shared hold on the store's lock let go.
        if hasattr(self, "_lock"):
            try:
                self.close()
            except Exception:  # noqa: BLE001 - at interpreter exit the modules it needs may be gone
                pass

    def _release(self) -> None:
        if hasattr(self, "db"):
            keeper = None
            if self._writer:
                try:
                    self.db.execute("PRAGMA busy_timeout = 0")
                    self.db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
                    keeper = self._connect("mode=ro")
                except sqlite3.Error:  # the files then go as they used to; a reader copes (_open_unchanging)
                    pass
            self.db.close()
            if keeper is not None:
                keeper.close()
        if self._held is not None:
            os.close(self._held)
            self._held = None

    def _stream(self, sql: str, size: int = 256) -> Iterator[list[tuple[Any, ...]]]:
        """The rows of ``sql`` in chunks of up to ``size``, each fetched under the lock and handed
        out after it is released (module docstring)."""
        with self._guard():
            cursor = self.db.execute(sql)
        while True:
            with self._guard():
                chunk = cursor.fetchmany(size)
            if not chunk:
                return
            yield chunk

    def get(self, passage_id: str) -> Entry | None:
        with self._guard():
            cur = self.db.execute(f"SELECT {_COLUMNS} FROM passages WHERE id = ?", (passage_id,))
            found = cur.fetchone()
        return _entry(found) if found else None

    def _rows_of(self, columns: str, ids: Iterable[str]) -> list[tuple[Any, ...]]:
        """``columns`` of the stored rows among ``ids``: one ``IN (...)`` query per chunk of ids
        (SQLite caps a statement's parameters), bounded memory per query."""
        ids = list(ids)
        rows: list[tuple[Any, ...]] = []
        with self._guard():
            for start in range(0, len(ids), _CHUNK):
                chunk = ids[start : start + _CHUNK]
                marks = ",".join("?" * len(chunk))
                rows += self.db.execute(f"SELECT {columns} FROM passages WHERE id IN ({marks})", chunk).fetchall()
        return rows

    def get_many(self, ids: Iterable[str]) -> dict[str, Entry]:
        """``{id: entry}`` for those of ``ids`` that are stored, a query per chunk of ids rather
        than one per id (an ingestion re-run compares every stored node's fields)."""
        return {entry.id: entry for entry in map(_entry, self._rows_of(_COLUMNS, ids))}

    def by_rows(self, rows: list[int]) -> dict[int, Entry]:
        marks = ",".join("?" * len(rows))
        with self._guard():
            cur = self.db.execute(f"SELECT {_COLUMNS} FROM passages WHERE row IN ({marks})", rows)
            found = cur.fetchall()
        return {e.row: e for e in map(_entry, found)}

    def entries(self) -> Iterator[Entry]:
        for chunk in self._stream(f"SELECT {_COLUMNS} FROM passages ORDER BY row"):
            yield from map(_entry, chunk)

    def integrity_problems(self) -> list[str]:
        """SQLite's own ``integrity_check`` findings (empty when the database is sound)."""
        with self._guard():
            verdict = [row[0] for row in self.db.execute("PRAGMA integrity_check")]
        return [] if verdict == ["ok"] else verdict

    def quick_check_problems(self) -> list[str]:
        """SQLite's ``quick_check`` findings (empty when sound): a damaged page can drop rows from
        every query without an error, which a writer must know before it cuts shards by them."""
        with self._guard():
            verdict = [row[0] for row in self.db.execute("PRAGMA quick_check")]
        # one finding a line, for a one-line error (SQLite heads them "*** in database main ***")
        return [] if verdict == ["ok"] else [line for row in verdict for line in row.splitlines() if "***" not in line]

    def raw_rows(self) -> Iterator[tuple[Any, ...]]:
        """Every row as SQLite holds it, unvalidated, for :mod:`ragcompress.store.verify`: ``(id,
        title, text, text_sha, meta, shard, offset, length, checksum, num_tokens, kept, embedding,
        meta_checksum, searchable, searchable_checksum)``, each checksum None in a row committed
        before its column existed (``searchable`` 1 in a catalogue without that column)."""
        for chunk in self._stream(
            "SELECT id, title, text, text_sha, meta, shard, offset, length, checksum, num_tokens, kept, "
            f"embedding, {self._meta_checksum}, {self._searchable}, {self._searchable_checksum} "
            "FROM passages ORDER BY row"
        ):
            yield from chunk

    def rows(self) -> Iterator[dict[str, Any]]:
        """Every row in row order as :func:`~ragcompress.store.writer.catalogue_row` shapes it
        (metadata as stored JSON, embedding as bytes), streamed: what a copy of the store needs.
        Its checksums as stored, so a copy keeps a damaged row detectable and an unsealed one unsealed."""
        names = "id title text meta text_sha shard offset length checksum num_tokens kept embedding".split()
        columns = ", ".join([*names, self._meta_checksum, self._searchable, self._searchable_checksum])
        for chunk in self._stream(f"SELECT {columns} FROM passages ORDER BY row"):
            for values in chunk:
                yield dict(zip([*names, "meta_checksum", "searchable", "searchable_checksum"], values, strict=True))

    def locations(self) -> Iterator[tuple[Any, ...]]:
        """``(id, shard, offset, length)`` of every row in (shard, offset) order, streamed, unvalidated."""
        for chunk in self._stream("SELECT id, shard, offset, length FROM passages ORDER BY shard, offset"):
            yield from chunk

    def ids_by_row(self) -> dict[int, str]:
        """Row number -> passage id of every committed row (memory grows with the store)."""
        with self._guard():
            return {row: pid for row, pid in self.db.execute("SELECT row, id FROM passages")}

    def text_shas(self) -> dict[str, str]:
        """Every id and its text hash (memory grows with the store; prefer :meth:`shas_of`)."""
        with self._guard():
            return dict(self.db.execute("SELECT id, text_sha FROM passages"))

    def ids_starting(self, prefix: str) -> list[str]:
        """Stored ids that start with ``prefix``: a range on the id index, not a scan."""
        with self._guard():
            cur = self.db.execute(
                "SELECT id FROM passages WHERE id >= ? AND id < ? ORDER BY id",
                (prefix, prefix[:-1] + chr(ord(prefix[-1]) + 1)),
            )
            return [row[0] for row in cur.fetchall()]

    def shas_of(self, ids: Iterable[str]) -> dict[str, str]:
        """``{id: text_sha}`` for those of ``ids`` that are stored."""
        return dict(self._rows_of("id, text_sha", ids))

    def count(self) -> int:
        """Committed searchable rows: what retrieval covers (module docstring). ``COUNT(*)`` scans
        a table index (milliseconds at 100k rows) and a reader asks on every search whether its
        FAISS index is stale, so the count is cached until ``PRAGMA data_version`` says another
        connection committed (our own commits reset it)."""
        with self._guard():
            version = self.db.execute("PRAGMA data_version").fetchone()[0]
            if self._counted is None or self._counted[0] != version:
                found = self.db.execute(f"SELECT COUNT(*) FROM passages WHERE {self._searchable}").fetchone()[0]
                self._counted = (version, found)
            return self._counted[1]

    def make_searchable(self, ids: Iterable[str]) -> int:
        """Make the stored rows of ``ids`` searchable (a passage ingested that a query had cached
        before); returns how many were not. Each flag is sealed anew (``searchable_checksum``) in
        the transaction that flips it; SQLite cannot compute the seal, so the rows to flip are
        looked up first (an indexing re-run hands in every unchanged passage, rarely a hidden one).
        The caller rewrites the index when any changed."""
        ids = list(ids)
        changed = 0
        with self._guard(), self.db:
            for start in range(0, len(ids), _CHUNK):
                chunk = ids[start : start + _CHUNK]
                marks = ",".join("?" * len(chunk))
                hidden = self.db.execute(f"SELECT id FROM passages WHERE NOT searchable AND id IN ({marks})", chunk)
                changed += self.db.executemany(
                    "UPDATE passages SET searchable = 1, searchable_checksum = ? WHERE id = ?",
                    [(searchable_checksum(pid, 1), pid) for (pid,) in hidden.fetchall()],
                ).rowcount
        if changed:
            self._counted = None
        return changed

    def embedding_chunks(self, size: int = 4096, everyone: bool = False) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """``(rows [n] int64, vectors [n, dim] float32)`` chunks of the searchable rows (every
        row with ``everyone``) in row order, streamed."""
        where = "1" if everyone else self._searchable
        for chunk in self._stream(f"SELECT row, embedding FROM passages WHERE {where} ORDER BY row", size):
            rows = np.fromiter((r for r, _ in chunk), dtype=np.int64, count=len(chunk))
            sizes = {len(b) for _, b in chunk}
            if len(sizes) != 1 or next(iter(sizes)) % 4:
                raise StoreError(
                    f"catalogue {self.path}: embeddings of rows {rows[0]}..{rows[-1]} "
                    "have inconsistent sizes; rebuild the store"
                )
            vectors = np.frombuffer(b"".join(b for _, b in chunk), dtype=np.float32)
            yield rows, vectors.reshape(len(chunk), -1)

    def embedding_sample(self, n: int) -> np.ndarray:
        """``[<= n, dim]`` embeddings of evenly spaced rows (every row when there are fewer):
        a training sample that spans the whole store, not only its first documents."""
        with self._guard():
            total = self.db.execute(f"SELECT COUNT(*) FROM passages WHERE {self._searchable}").fetchone()[0]
            step = max(1, -(-total // max(n, 1)))
            found = self.db.execute(
                "SELECT embedding FROM (SELECT embedding, ROW_NUMBER() OVER (ORDER BY row) - 1 AS i FROM passages "
                f"WHERE {self._searchable}) WHERE i % ? = 0",
                (step,),
            ).fetchall()
        if not found:
            return np.zeros((0, 0), dtype=np.float32)
        return np.frombuffer(b"".join(b for (b,) in found), dtype=np.float32).reshape(len(found), -1)

    def embeddings(self) -> tuple[np.ndarray, np.ndarray]:
        """``(rows [N] int64, vectors [N, dim] float32)`` of every row, in row order."""
        chunks = list(self.embedding_chunks(everyone=True))
        if not chunks:
            return np.zeros(0, dtype=np.int64), np.zeros((0, 0), dtype=np.float32)
        return np.concatenate([r for r, _ in chunks]), np.concatenate([v for _, v in chunks])

    def committed_blobs(self) -> dict[str, list[CommittedBlob]]:
        """Each shard's committed blobs (id, offset, length, checksum): what a writer checks
        before it truncates a shard to the end of its last one."""
        found: dict[str, list[CommittedBlob]] = {}
        with self._guard():
            for shard, *blob in self.db.execute("SELECT shard, id, offset, length, checksum FROM passages"):
                found.setdefault(shard, []).append(CommittedBlob(*blob))
        return found

    def generation(self) -> int:
        """How many commits have removed or replaced rows (SQLite's ``user_version``, 0 in a store
        that never had one). A FAISS index built at another generation may map a row number to
        another passage (SQLite gives a new row the number of a deleted last row), so an index
        records the generation it was built at and readers rebuild it when the two differ."""
        with self._guard():
            return int(self.db.execute("PRAGMA user_version").fetchone()[0])

    def _delete(self, ids: list[str]) -> int:
        """Delete the rows of ``ids`` inside the caller's transaction; returns how many existed."""
        removed = 0
        for start in range(0, len(ids), _CHUNK):
            chunk = ids[start : start + _CHUNK]
            marks = ",".join("?" * len(chunk))
            removed += self.db.execute(f"DELETE FROM passages WHERE id IN ({marks})", chunk).rowcount
        if removed:  # in the same transaction as the delete: both are committed, or neither
            self.db.execute(f"PRAGMA user_version = {self.generation() + 1}")
        return removed

    def remove(self, ids: list[str]) -> int:
        """Delete the rows of ``ids`` in one transaction; returns how many were stored. Their blobs
        stay in the shards, unreferenced (``ragcompress verify`` counts them), until ``ragcompress
        compact``; a writer truncates those at the end of a shard when it opens."""
        self._counted = None
        with self._guard(), self.db:
            return self._delete(list(ids))

    def update_meta(self, rows: list[tuple[str, str, str]]) -> int:
        """Set ``(id, title, meta)`` (metadata as stored JSON) of stored rows in one transaction,
        each row's ``meta_checksum`` computed anew; returns how many rows were stored."""
        updated = 0
        with self._guard(), self.db:
            for pid, title, meta in rows:
                found = self.db.execute("SELECT text_sha, embedding FROM passages WHERE id = ?", (pid,)).fetchone()
                if found is not None:
                    digest = meta_checksum(pid, title, meta, *found)
                    self.db.execute(
                        "UPDATE passages SET title = ?, meta = ?, meta_checksum = ? WHERE id = ?",
                        (title, meta, digest, pid),
                    )
                    updated += 1
        return updated

    def add(self, rows: list[dict[str, Any]], replace: bool = False) -> None:
        """Insert rows in one transaction: all of a batch becomes visible at once, or none.
        ``replace``: a row whose id is stored takes the stored row's place in the same
        transaction (a reader sees the old passage or the new one, never neither). A row without
        ``searchable`` is searchable; one without ``searchable_checksum`` is sealed here (a copied
        row, :meth:`rows`, keeps the one it has, NULL included)."""
        rows = [{"searchable": 1, **row} for row in rows]
        rows = [{"searchable_checksum": searchable_checksum(row["id"], row["searchable"]), **row} for row in rows]
        self._counted = None
        with self._guard(), self.db:
            if replace:
                self._delete([row["id"] for row in rows])
            self.db.executemany(
                "INSERT INTO passages (id, title, text, meta, text_sha, shard, offset, length, "
                "checksum, num_tokens, kept, embedding, meta_checksum, searchable, searchable_checksum) VALUES "
                "(:id, :title, :text, :meta, :text_sha, :shard, :offset, :length, :checksum, :num_tokens, :kept, "
                ":embedding, :meta_checksum, :searchable, :searchable_checksum)",
                rows,
            )
