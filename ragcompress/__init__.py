"""ragcompress: answer RAG questions from precomputed, compressed passage KV caches.

Offline, :func:`index` runs each passage once through the LLM after a shared prompt prefix,
compresses its KV cache and writes it to a :class:`KVStore` (:func:`remove` deletes passages). At query time, :class:`Engine`
retrieves passages, places their stored caches at new positions and prefills only the question.
"""

from ragcompress.errors import RagCompressError
from ragcompress.indexing import IndexConfig, index, remove
from ragcompress.models import load_model
from ragcompress.presets import PRESETS, preset
from ragcompress.runtime.engine import Answer, Engine
from ragcompress.runtime.options import AnswerOptions
from ragcompress.store import KVStore

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
