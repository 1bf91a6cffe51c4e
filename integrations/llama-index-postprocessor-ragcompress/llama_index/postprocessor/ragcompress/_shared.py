"""What every component shares: the lazy ragcompress import, the cache handle, loaded models.

A node's *cache handle* is two metadata keys: the store directory and the passage id inside it.
Both are excluded from the text LLMs and embedders see, so attaching a handle changes neither a
prompt nor an embedding. Models are loaded once per process and shared by all components, so a
transform, a postprocessor, a synthesizer and the baseline LLM hold one copy of the weights.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import json
from collections.abc import AsyncGenerator, Iterator
from pathlib import Path
from typing import Any, TypeVar

from llama_index.core.schema import BaseNode, MetadataMode

STORE_KEY = "ragcompress_store"
PASSAGE_KEY = "ragcompress_passage_id"
HANDLE_KEYS = (STORE_KEY, PASSAGE_KEY)

T = TypeVar("T")


async def iterate_in_thread(items: Iterator[T]) -> AsyncGenerator[T, None]:
    """A blocking iterator (a token stream) as an async one: each item is computed on a worker
    thread, so the event loop keeps serving other tasks while the model decodes."""
    done = object()
    while True:
        item = await asyncio.to_thread(next, items, done)
        if item is done:
            return
        yield item  # type: ignore[misc]


_INSTALL_HINT = "`pip install ragcompress` (the KV-cache library this integration drives)"


def require_ragcompress() -> Any:
    """Import ragcompress on first use, with an actionable message when it is missing."""
    try:
        import ragcompress
    except ImportError as exc:
        raise ImportError(f"llama-index-postprocessor-ragcompress needs ragcompress: {_INSTALL_HINT}") from exc
    return ragcompress


def shared_model(ref: str | None) -> Any:
    """The ragcompress ``LoadedModel`` for ``ref`` (None: the embedded default), loaded once per
    process whatever spelling of the same model is used (None, its name, a relative path)."""
    require_ragcompress()
    from ragcompress.models import DEFAULT_MODEL

    ref = ref or DEFAULT_MODEL
    path = Path(ref).expanduser()
    return _load_model(str(path.resolve()) if path.is_dir() else ref)


@functools.lru_cache(maxsize=4)
def _load_model(ref: str) -> Any:
    from ragcompress.models import load_model

    return load_model(ref)


@functools.lru_cache(maxsize=4)
def shared_embedder(name: str) -> Any:
    require_ragcompress()
    from ragcompress.retrieval import Embedder

    return Embedder(name)


def store_path(path: str | Path) -> str:
    """Canonical (absolute, resolved) form of a store directory, as handles record it."""
    return str(Path(path).expanduser().resolve())


def node_text(node: BaseNode) -> str:
    """The text a cache is computed from: the node's content without metadata."""
    return node.get_content(metadata_mode=MetadataMode.NONE)


def text_sha(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def json_safe(meta: dict[str, Any]) -> dict[str, Any]:
    """Node metadata as plain JSON (what a store catalogue can record), handle keys dropped."""
    plain = {k: v for k, v in meta.items() if k not in HANDLE_KEYS}
    return json.loads(json.dumps(plain, default=str, sort_keys=True))


def set_handle(node: BaseNode, store: str, passage_id: str) -> None:
    """Record the cache handle in ``node.metadata`` (hidden from LLM and embedding text)."""
    node.metadata[STORE_KEY] = store
    node.metadata[PASSAGE_KEY] = passage_id
    for keys in (node.excluded_llm_metadata_keys, node.excluded_embed_metadata_keys):
        for key in HANDLE_KEYS:
            if key not in keys:
                keys.append(key)


def get_handle(node: BaseNode) -> tuple[str, str] | None:
    store, passage = node.metadata.get(STORE_KEY), node.metadata.get(PASSAGE_KEY)
    if isinstance(store, str) and isinstance(passage, str):
        return store, passage
    return None
