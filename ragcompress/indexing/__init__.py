"""Offline indexing: passages -> embeddings + compressed KV caches in a store.

``config`` says what a store is built with, ``indexer`` turns passages into store records (the
one write path, shared with the LlamaIndex integration), ``run`` drives it over a JSONL file or
folder with resume, replace and overwrite (and ``remove`` deletes passages), ``inputs`` reads and validates passages, ``encoder`` computes
their caches.

The names below are imported on first use (:mod:`ragcompress.lazy`): the Ray actor that counts
a run's batch tries (``batch_starts``) imports no more than its own module.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ragcompress.lazy import lazy_exports

if TYPE_CHECKING:
    from ragcompress.indexing.config import IndexConfig, build_manifest, compressor_from_manifest
    from ragcompress.indexing.indexer import Indexer
    from ragcompress.indexing.run import IndexReport, index, remove

_EXPORTS = {
    "IndexConfig": "ragcompress.indexing.config",
    "IndexReport": "ragcompress.indexing.run",
    "Indexer": "ragcompress.indexing.indexer",
    "build_manifest": "ragcompress.indexing.config",
    "compressor_from_manifest": "ragcompress.indexing.config",
    "index": "ragcompress.indexing.run",
    "remove": "ragcompress.indexing.run",
}

__all__ = ["IndexConfig", "IndexReport", "Indexer", "build_manifest", "compressor_from_manifest", "index", "remove"]

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
