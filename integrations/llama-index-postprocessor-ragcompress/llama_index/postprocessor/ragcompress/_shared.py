"""What every component shares: the lazy ragcompress import, the cache handle, loaded models.

A node's *cache handle* is two metadata keys: the store directory and the passage id inside it.
Both are excluded from the text LLMs and embedders see, so attaching a handle changes neither a
prompt nor an embedding. Models are loaded once per process and shared by all components, so a
postprocessor, a synthesizer and the baseline LLM hold one copy of the weights; writing caches
(a transform, ``compute_missing``) uses a second copy, see :func:`writer_model`.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import json
import threading
import weakref
from collections.abc import AsyncGenerator, Callable, Iterable, Iterator
from contextvars import ContextVar
from pathlib import Path
from typing import Any, Self, TypeVar

from llama_index.core.schema import BaseNode, MetadataMode, NodeWithScore, TextNode

STORE_KEY = "ragcompress_store"
PASSAGE_KEY = "ragcompress_passage_id"
HANDLE_KEYS = (STORE_KEY, PASSAGE_KEY)
# Passage metadata key of the node fields a store keeps beside the metadata (see passage_meta).
NODE_KEY = "ragcompress_node"
NODE_FIELDS = ("excluded_embed_metadata_keys", "excluded_llm_metadata_keys", "relationships")

T = TypeVar("T")

# The cancellation of the async call a worker thread runs for (in_thread), seen from that thread.
_CANCELLED: ContextVar[threading.Event | None] = ContextVar("ragcompress_cancelled", default=None)


def scored_nodes(nodes: Any, where: str) -> list[NodeWithScore]:
    """``nodes`` as the list of ``NodeWithScore`` a retriever returns, or a TypeError that says
    what was passed instead (a bare node, or one node alone, fails later with an AttributeError)."""
    if isinstance(nodes, (str, BaseNode, NodeWithScore)) or not isinstance(nodes, (list, tuple)):
        raise TypeError(f"{where} takes a list of NodeWithScore, got {type(nodes).__name__}")
    for node in nodes:
        if not isinstance(node, NodeWithScore):
            raise TypeError(
                f"{where} takes a list of NodeWithScore (what a retriever returns), got a {type(node).__name__} "
                "in it; wrap a node as NodeWithScore(node=node)"
            )
    return list(nodes)


def first_of_each(items: Iterable[T], key: Callable[[T], str]) -> list[T]:
    """``items`` in order without the repeats of a key: each kept where it first appears (a node
    given twice is placed once, at its better-ranked place)."""
    kept: dict[str, T] = {}
    for item in items:
        kept.setdefault(key(item), item)
    return list(kept.values())


def plain_nodes(nodes: Any, where: str) -> list[BaseNode]:
    """``nodes`` as a list of nodes (documents or chunks), or a TypeError naming what was passed."""
    if isinstance(nodes, (str, BaseNode, NodeWithScore)) or not isinstance(nodes, (list, tuple)):
        raise TypeError(f"{where} takes a list of nodes, got {type(nodes).__name__}")
    for node in nodes:
        if not isinstance(node, BaseNode):
            hint = "; pass each one's .node" if isinstance(node, NodeWithScore) else ""
            raise TypeError(f"{where} takes a list of nodes, got a {type(node).__name__} in it{hint}")
    return list(nodes)


def reopen(cls: Any, data: dict[str, Any], kwargs: dict[str, Any]) -> Any:
    """What unpickling a component that holds an open store calls: ``cls.from_dict(data,
    **kwargs)``, the store opened again (a sqlite connection and a loaded model cannot be
    pickled, and a copy must not share another process's connection)."""
    return cls.from_dict(data, **kwargs)


class StoreHandle:
    """A component's open ``KVStore``: closed by :meth:`close` (a component's ``close()`` or
    ``with`` block), else as soon as the last component holding this handle is dropped.

    An unclosed sqlite3 connection is freed only by the cycle collector (the connection and its
    statement cache refer to each other), so each component created and dropped without
    ``close()`` kept its catalogue's file descriptors open until a collection happened to run:
    hundreds in a loop that builds components per request. The finalizer sits on this handle,
    not on the component, so a shallow copy of a component (``model_copy``) shares the handle
    and dropping the original does not close the store the copy still reads. Each component
    opens a store of its own; the models and embedders it shares (:func:`shared_model`) are
    never closed here."""

    def __init__(self, store: Any) -> None:
        self.store = store
        self._finalizer = weakref.finalize(self, store.close)

    def close(self) -> None:
        """Close the store now (once: later calls, and the finalizer, do nothing)."""
        self._finalizer()


class ClosesStore:
    """``close()`` and ``with`` for a component holding a :class:`StoreHandle` in ``_handle``: the
    store it opened is closed; the models and embedder it uses stay loaded (they are shared)."""

    _handle: Any

    def close(self) -> None:
        """Close the store this component opened (the models and embedder stay: they are shared)."""
        self._handle.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


async def iterate_in_thread(items: Iterator[T]) -> AsyncGenerator[T, None]:
    """A blocking iterator (a token stream) as an async one: each item is computed on a worker
    thread, so the event loop keeps serving other tasks while the model decodes."""
    done = object()
    while True:
        item = await asyncio.to_thread(next, items, done)
        if item is done:
            return
        yield item  # type: ignore[misc]


async def in_thread(func: Callable[..., T], *args: Any) -> T:
    """``func(*args)`` on a worker thread, as ``asyncio.to_thread``, told when the awaiting task is
    cancelled (``asyncio.wait_for`` timing out, a client gone): a thread cannot be killed, and one
    answering for nobody went on decoding to ``max_new_tokens``; the token streams it runs under
    :func:`until_cancelled` now stop before their next decoding step."""
    cancelled = threading.Event()

    def run() -> T:
        _CANCELLED.set(cancelled)  # in the thread's own copy of the caller's context
        return func(*args)

    try:
        return await asyncio.to_thread(run)
    except asyncio.CancelledError:
        cancelled.set()
        raise


@contextlib.contextmanager
def until_cancelled(stream: Any) -> Iterator[Any]:
    """``stream`` (a ragcompress ``TokenStream``), stopped when the async call this thread runs
    for (:func:`in_thread`) is cancelled, which then raises ``CancelledError`` here, in its
    thread, instead of reporting (events, callbacks) an answer cut short that nobody awaits;
    ``stream`` unchanged outside such a call."""
    cancelled = _CANCELLED.get()
    if cancelled is None:
        yield stream
        return

    def unless_cancelled() -> None:
        if cancelled.is_set():
            raise asyncio.CancelledError("the async call this answer was decoded for was cancelled")

    unless_cancelled()  # before the prefill
    stream.stop = cancelled
    yield stream
    unless_cancelled()


_INSTALL_HINT = "`pip install ragcompress-kv` (the KV-cache library this integration drives, imported as ragcompress)"


def require_ragcompress() -> Any:
    """Import ragcompress on first use, with an actionable message when it is missing."""
    try:
        import ragcompress
    except ImportError as exc:
        raise ImportError(f"llama-index-postprocessor-ragcompress needs ragcompress: {_INSTALL_HINT}") from exc
    return ragcompress


def shared_model(ref: str | None, dtype: str | None = None, device: str | None = None) -> Any:
    """The ragcompress ``LoadedModel`` for ``ref`` (None: the embedded default) in ``dtype``
    (None: float32) on ``device`` (None: the CPU), loaded once per process whatever spelling of
    the same model is used (None, its name, a relative path) and shared by every component that
    asks for it so. Only plain forwards may run on it (answering, prompt sizing): several
    threads use it at once. Encoding caches runs on :func:`writer_model`'s copy."""
    return _load_model(*_model_key(ref, dtype, device), "answer")


def writer_model(ref: str | None, dtype: str | None = None, device: str | None = None) -> Any:
    """The copy of :func:`shared_model`'s model that caches are encoded with, loaded once per
    process on first use; every use of it holds :func:`encoding`'s lock.

    Encoding changes the model object it runs on while it runs: kvzip, snapkv and
    expected-attention register hooks on every attention layer (``run_probe``), a forward
    adaptor swaps its weights into the module (``torch.func.functional_call``), a cache adaptor
    hooks the key projections (``ProjectionInputs``). A forward of the same object on another
    thread meanwhile (a concurrent ``aquery``) answered with adapted weights or fired the hooks,
    which then recorded its attention into the cache being stored: answers changed, and caches
    were stored with valid checksums and wrong bytes. Answering therefore never shares the
    object encoding runs on; a lock around every answering forward would have stopped answers
    from running in parallel and made them wait for every encoding. The cost is a second copy
    of the weights in a process that both answers and writes (about 0.5 GB for the default
    SmolLM2-135M in float32), loaded only when a cache is first encoded."""
    return _load_model(*_model_key(ref, dtype, device), "writer")


_ENCODING_LOCKS: dict[int, threading.RLock] = {}
_ENCODING_GUARD = threading.Lock()


def encoding(lm: Any) -> threading.RLock:
    """The lock held around every use of a :func:`writer_model` copy (writers of two stores in
    one process share it, and one's hooks must not fire in the other's forwards)."""
    with _ENCODING_GUARD:
        return _ENCODING_LOCKS.setdefault(id(lm), threading.RLock())


def _model_key(ref: str | None, dtype: str | None, device: str | None) -> tuple[str, str, str]:
    require_ragcompress()
    from ragcompress.models import DEFAULT_MODEL

    ref = ref or DEFAULT_MODEL
    path = Path(ref).expanduser()
    return str(path.resolve()) if path.is_dir() else ref, dtype or "float32", device or "cpu"


_LOADS: dict[tuple[str, str, str, str], threading.Lock] = {}
_LOADS_GUARD = threading.Lock()


def _load_model(ref: str, dtype: str, device: str, role: str) -> Any:
    """:func:`_loaded` under a lock of its own per model and role: the first uses of a model come
    on several worker threads at once (``LocalLLM``'s ``acomplete`` calls in ``asyncio.gather``),
    and each loaded a copy, one after another, the cache keeping the last. Now the first loads it
    and the others get that object; a model already loaded waits for no other model's load."""
    with _LOADS_GUARD:
        lock = _LOADS.setdefault((ref, dtype, device, role), threading.Lock())
    with lock:
        return _loaded(ref, dtype, device, role)


@functools.lru_cache(maxsize=8)
def _loaded(ref: str, dtype: str, device: str, role: str) -> Any:
    """``role`` ``answer`` or ``writer``: two objects with the same weights (see :func:`writer_model`)."""
    from ragcompress.models import load_model

    return load_model(ref, dtype=dtype, device=device)


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
    """Node metadata as plain JSON (what a store catalogue can record), handle keys dropped, in
    the node's own key order: the order LlamaIndex writes metadata into LLM and embedding text."""
    plain = {k: v for k, v in meta.items() if k not in HANDLE_KEYS}
    return json.loads(json.dumps(plain, default=str))


def passage_meta(node: BaseNode) -> dict[str, Any]:
    """What a store records as a node's passage metadata: :func:`json_safe` of its metadata and,
    under ``NODE_KEY``, those of :data:`NODE_FIELDS` that are set (handle keys dropped), so
    :func:`node_from_passage` can rebuild the node."""
    fields = json_safe(node.model_dump(include=set(NODE_FIELDS)))
    for name in ("excluded_embed_metadata_keys", "excluded_llm_metadata_keys"):
        fields[name] = [key for key in fields[name] if key not in HANDLE_KEYS]
    extra = {name: fields[name] for name in NODE_FIELDS if fields[name]}
    return {**json_safe(node.metadata), **({NODE_KEY: extra} if extra else {})}


def node_from_passage(passage_id: str, text: str, meta: dict[str, Any]) -> TextNode:
    """The ``TextNode`` of a stored passage: its metadata and what :func:`passage_meta` recorded
    under ``NODE_KEY`` (absent in stores written before it was recorded, or by ``ragcompress index``)."""
    metadata = dict(meta)
    extra = metadata.pop(NODE_KEY, None)
    fields = {name: extra[name] for name in NODE_FIELDS if name in extra} if isinstance(extra, dict) else {}
    return TextNode(id_=passage_id, text=text, metadata=metadata, **fields)


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
