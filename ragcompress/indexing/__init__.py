"""Offline indexing: passages -> embeddings + compressed KV caches in a store.

``config`` says what a store is built with, ``indexer`` turns passages into store records (the
one write path, shared with the LlamaIndex integration), ``run`` drives it over a JSONL file or
folder with resume, replace and overwrite (and ``remove`` deletes passages), ``inputs`` reads and validates passages, ``encoder`` computes
their caches.
"""

from ragcompress.indexing.config import IndexConfig, build_manifest, compressor_from_manifest
from ragcompress.indexing.indexer import Indexer
from ragcompress.indexing.run import IndexReport, index, remove

__all__ = ["IndexConfig", "IndexReport", "Indexer", "build_manifest", "compressor_from_manifest", "index", "remove"]
