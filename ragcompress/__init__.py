"""ragcompress: answer RAG questions from precomputed, compressed passage KV caches.

Offline, :func:`index` runs each passage once through the LLM after a shared prompt prefix,
compresses its KV cache and writes it to a :class:`KVStore` (:func:`remove` deletes passages). At query time, :class:`Engine`
retrieves passages, places their stored caches at new positions and prefills only the question.

The names below are imported on first use (PEP 562): importing a light submodule such as
``ragcompress.errors`` -- the command line does, for ``--help`` and its input errors -- does not
load torch and transformers (about 4 s on a 2-core CPU).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ragcompress.lazy import lazy_exports

if TYPE_CHECKING:
    from ragcompress.errors import RagCompressError
    from ragcompress.indexing import IndexConfig, index, remove
    from ragcompress.models import load_model
    from ragcompress.presets import PRESETS, preset
    from ragcompress.runtime.engine import Answer, Engine
    from ragcompress.runtime.options import AnswerOptions
    from ragcompress.store import KVStore

_EXPORTS = {
    "Answer": "ragcompress.runtime.engine",
    "AnswerOptions": "ragcompress.runtime.options",
    "Engine": "ragcompress.runtime.engine",
    "IndexConfig": "ragcompress.indexing",
    "KVStore": "ragcompress.store",
    "RagCompressError": "ragcompress.errors",
    "index": "ragcompress.indexing",
    "load_model": "ragcompress.models",
    "preset": "ragcompress.presets",
    "PRESETS": "ragcompress.presets",
    "remove": "ragcompress.indexing",
}

__all__ = [
    "Answer",
    "AnswerOptions",
    "Engine",
    "IndexConfig",
    "KVStore",
    "RagCompressError",
    "index",
    "load_model",
    "preset",
    "PRESETS",
    "remove",
]

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
