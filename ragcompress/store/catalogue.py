"""The sqlite3 catalogue: passage id -> text, embedding and where its cache blob lives.

WAL mode lets readers query while one writer commits; a reader only ever sees committed rows,
and every row it sees points at a blob that was fsynced before the row was committed.
"""

from __future__ import annotations

import json
import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np

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
    embedding  BLOB    NOT NULL
);
"""


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
    row[4] = json.loads(row[4])
    return Entry(*row)


class Catalogue:
    def __init__(self, root: Path, *, readonly: bool) -> None:
        path = root / CATALOGUE
        if readonly:
            self.db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, check_same_thread=False)
        else:
            self.db = sqlite3.connect(path, check_same_thread=False)
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=FULL")
            self.db.executescript(_SCHEMA)
            self.db.commit()

    def close(self) -> None:
        self.db.close()

    def get(self, passage_id: str) -> Entry | None:
        cur = self.db.execute(f"SELECT {_COLUMNS} FROM passages WHERE id = ?", (passage_id,))
        found = cur.fetchone()
        return _entry(found) if found else None

    def by_rows(self, rows: list[int]) -> dict[int, Entry]:
        marks = ",".join("?" * len(rows))
        cur = self.db.execute(f"SELECT {_COLUMNS} FROM passages WHERE row IN ({marks})", rows)
        return {e.row: e for e in map(_entry, cur.fetchall())}

    def entries(self) -> Iterator[Entry]:
        yield from map(_entry, self.db.execute(f"SELECT {_COLUMNS} FROM passages ORDER BY row"))

    def text_shas(self) -> dict[str, str]:
        return dict(self.db.execute("SELECT id, text_sha FROM passages"))

    def count(self) -> int:
        return self.db.execute("SELECT COUNT(*) FROM passages").fetchone()[0]

    def embeddings(self) -> tuple[np.ndarray, np.ndarray]:
        """``(rows [N] int64, vectors [N, dim] float32)`` in row order."""
        rows, vectors = [], []
        for row, blob in self.db.execute("SELECT row, embedding FROM passages ORDER BY row"):
            rows.append(row)
            vectors.append(np.frombuffer(blob, dtype=np.float32))
        if not rows:
            return np.zeros(0, dtype=np.int64), np.zeros((0, 0), dtype=np.float32)
        return np.asarray(rows, dtype=np.int64), np.stack(vectors)

    def committed_ends(self) -> dict[str, int]:
        """End of the last committed blob in each shard."""
        return dict(self.db.execute("SELECT shard, MAX(offset + length) FROM passages GROUP BY shard"))

    def add(self, rows: list[dict[str, Any]]) -> None:
        """Insert rows in one transaction: all of a batch becomes visible at once, or none."""
        with self.db:
            self.db.executemany(
                "INSERT INTO passages (id, title, text, meta, text_sha, shard, offset, length, "
                "checksum, num_tokens, kept, embedding) VALUES (:id, :title, :text, :meta, "
                ":text_sha, :shard, :offset, :length, :checksum, :num_tokens, :kept, :embedding)",
                rows,
            )
