"""What a writer hands the store for one passage: :class:`PassageRecord`.

One typed record, rather than a dict of agreed keys, is the single contract between whatever
computes a passage's cache (``ragcompress.indexing.Indexer``, or a benchmark that compresses
caches itself) and :meth:`StoreWriter.add <ragcompress.store.StoreWriter.add>`: a missing or
misspelt field is an error where the record is made, not a ``KeyError`` mid-commit.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass(frozen=True, eq=False)  # identity equality: arrays and bytes make value equality costly
class PassageRecord:
    """One passage ready to commit: its catalogue row and its encoded cache.

    id, title, text, meta: the passage as given (``meta`` must be JSON-serialisable)
    text_sha:   sha256 hex of ``text`` (how a resumed run recognises a stored passage)
    blob:       the cache as ``ragcompress.store.codec.encode`` wrote it (compressed, quantized)
    num_tokens: tokens of the passage; ``kept``: (layer, head, token) entries the blob keeps
    embedding:  the passage's unit-norm float32 vector under the store's embedder
    """

    id: str
    title: str
    text: str = field(repr=False)
    meta: dict[str, Any]
    text_sha: str
    blob: bytes = field(repr=False)
    num_tokens: int
    kept: int
    embedding: np.ndarray = field(repr=False)

    def __post_init__(self) -> None:
        vector = np.ascontiguousarray(self.embedding, dtype=np.float32)
        if vector.ndim != 1:
            raise ValueError(f"passage {self.id!r}: embedding must be one vector, got shape {vector.shape}")
        object.__setattr__(self, "embedding", vector)
