"""Writing nodes' caches into a store and finding them again (shared by all components).

:class:`CacheWriter` encodes nodes after the store's prefix, compresses and quantizes them with
the store's settings and commits them with ragcompress's :class:`~ragcompress.store.StoreWriter`.
A node's passage id is its node id; when that id is already stored with another text (the node
was edited), the passage id becomes ``"{node_id}~{sha256(text)[:16]}"`` so old and new caches
never mix. :class:`CacheResolver` maps nodes to store entries, computing missing ones.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import llama_index.core.instrumentation as instrument
from llama_index.core.schema import BaseNode
from llama_index.postprocessor.ragcompress._shared import (
    get_handle,
    json_safe,
    node_text,
    require_ragcompress,
    set_handle,
    shared_embedder,
    shared_model,
    store_path,
    text_sha,
)
from llama_index.postprocessor.ragcompress.events import KVCacheStoredEvent

dispatcher = instrument.get_dispatcher(__name__)


def alias_id(node_id: str, sha: str) -> str:
    return f"{node_id}~{sha[:16]}"


def _compressor_from_manifest(compression: dict[str, Any]) -> tuple[Any, Any]:
    from ragcompress.compressors import make_compressor
    from ragcompress.quant import QuantConfig

    params = {k: v for k, v in compression.items() if k not in ("method", "quant", "group_size")}
    compressor = make_compressor(compression["method"], **params)
    return compressor, QuantConfig(compression.get("quant", "none"), int(compression.get("group_size", 32)))


class CacheWriter:
    """Computes and commits caches for nodes; see :meth:`for_build` and :meth:`for_existing`."""

    def __init__(self, path: str, lm: Any, manifest: Any, batch_size: int = 8) -> None:
        from ragcompress.prompt import PromptTemplate

        self.path = store_path(path)
        self.lm = lm
        self.manifest = manifest
        self.batch_size = batch_size
        self.template = PromptTemplate.from_dict(manifest.template)
        self.compressor, self.quant = _compressor_from_manifest(manifest.compression)
        self.embedder = shared_embedder(manifest.embedder)
        self._encoder: Any = None

    @classmethod
    def for_build(cls, path: str, model: str | None, config: Any, embedder: str, batch_size: int = 8) -> CacheWriter:
        """Writer for a store built with ``model`` and ``config`` (an ``IndexConfig``); an existing
        store must have been built the same way (else ``StoreMismatchError``)."""
        require_ragcompress()
        from ragcompress.indexing import build_manifest
        from ragcompress.prompt import PromptTemplate
        from ragcompress.store import Manifest

        lm = shared_model(model)
        manifest = build_manifest(lm, PromptTemplate.from_tokenizer(lm.tokenizer), config, embedder)
        if (Path(path) / "manifest.json").is_file():
            existing = Manifest.read(Path(path))
            existing.check_same_build(manifest)
            manifest = existing
        return cls(path, lm, manifest, batch_size)

    @classmethod
    def for_existing(cls, path: str, lm: Any | None = None, batch_size: int = 8) -> CacheWriter:
        """Writer that adds to an existing store with its own model and settings."""
        require_ragcompress()
        from ragcompress.errors import StoreError
        from ragcompress.store import Manifest

        if not Path(path).is_dir():
            raise StoreError(f"store {path} does not exist; build it with KVCacheTransform or `ragcompress index`")
        manifest = Manifest.read(Path(path))
        lm = lm or shared_model(manifest.model_ref)
        check_model(manifest, lm, path)
        return cls(path, lm, manifest, batch_size)

    @property
    def encoder(self) -> Any:
        if self._encoder is None:
            from ragcompress.encoder import PassageEncoder

            self._encoder = PassageEncoder(self.lm, self.template)
        return self._encoder

    def write(self, nodes: Sequence[BaseNode], *, write_index: bool = True) -> list[str | None]:
        """Store the caches of ``nodes`` not yet stored; returns each node's passage id (None for
        a node without text). Attaches the handle to every node with text."""
        from ragcompress.compressors import CompressionContext
        from ragcompress.errors import InputError
        from ragcompress.store import StoreWriter, create_store
        from ragcompress.store.codec import encode

        start = time.perf_counter()
        path = Path(self.path)
        if not (path / "manifest.json").is_file():
            create_store(path, self.manifest, self.encoder.prefix_kv)
        ids: list[str | None] = []
        written: list[str] = []
        with StoreWriter(path) as writer:
            known = writer.known()
            todo: dict[str, tuple[BaseNode, str, str]] = {}
            for node in nodes:
                text = node_text(node)
                if not text.strip():
                    ids.append(None)
                    continue
                sha = text_sha(text)
                pid = node.node_id
                if known.get(pid, sha) != sha or (pid in todo and todo[pid][2] != sha):
                    pid = alias_id(node.node_id, sha)
                if pid not in known and pid not in todo:
                    todo[pid] = (node, text, sha)
                ids.append(pid)
            pending = list(todo.items())
            limit = int(getattr(self.lm.config, "max_position_embeddings", 1 << 30)) - self.encoder.prefix_len - 64
            for begin in range(0, len(pending), self.batch_size):
                batch = pending[begin : begin + self.batch_size]
                token_ids = [self.encoder.tokens.passage(text) for _, (_, text, _) in batch]
                for (pid, _), tokens in zip(batch, token_ids, strict=True):
                    if len(tokens) > limit:
                        raise InputError(
                            f"node {pid!r} has {len(tokens)} tokens, more than {self.lm.ref} "
                            f"can attend to ({limit}); split it with a node parser first"
                        )
                caches = self.encoder.encode(token_ids)
                vectors = self.embedder.embed([text for _, (_, text, _) in batch])
                items = []
                for (pid, (node, text, sha)), tokens, kv, vector in zip(batch, token_ids, caches, vectors, strict=True):
                    kept = self.compressor.compress(kv, CompressionContext(self.encoder, tokens))
                    items.append(
                        {
                            "id": pid,
                            "title": str(node.metadata.get("title", "")),
                            "text": text,
                            "meta": json_safe(node.metadata),
                            "text_sha": sha,
                            "blob": encode(kept, self.quant),
                            "num_tokens": kept.num_tokens,
                            "kept": kept.kept_tokens,
                            "embedding": vector,
                        }
                    )
                writer.add(items)
                written += [pid for pid, _ in batch]
            if written and write_index:
                writer.write_index()
        for node, pid in zip(nodes, ids, strict=True):
            if pid is not None:
                set_handle(node, self.path, pid)
        if written:
            dispatcher.event(
                KVCacheStoredEvent(store=self.path, passage_ids=written, seconds=time.perf_counter() - start)
            )
        return ids


def check_model(manifest: Any, lm: Any, path: str) -> None:
    """Raise ``StoreMismatchError`` when ``lm`` is not the model (or tokenizer) the store was built for."""
    from ragcompress.errors import StoreMismatchError

    manifest.check_model(lm.fingerprint, lm.ref)
    if lm.tokenizer_hash != manifest.tokenizer_hash:
        raise StoreMismatchError(f"store {path} was built with another tokenizer than {lm.ref}'s")


class CacheResolver:
    """Finds the store entries of nodes (by handle, node id or text alias), computing missing ones.

    ``store`` is an open ``KVStore``; ``lm`` (a LoadedModel) is loaded from the manifest only
    when a cache has to be computed, unless given.
    """

    def __init__(self, store: Any, lm: Any | None = None, compute_missing: bool = True) -> None:
        self.store = store
        self.path = store_path(store.path)
        self.lm = lm
        self.compute_missing = compute_missing
        self._writer: CacheWriter | None = None

    def _lookup(self, node: BaseNode) -> Any | None:
        sha = text_sha(node_text(node))
        handle = get_handle(node)
        candidates = [handle[1]] if handle and store_path(handle[0]) == self.path else []
        candidates += [node.node_id, alias_id(node.node_id, sha)]
        for pid in candidates:
            entry = self.store.catalogue.get(pid)
            if entry is not None and entry.text_sha == sha:
                return entry
        return None

    def resolve(self, nodes: Sequence[BaseNode]) -> tuple[list[Any], list[str]]:
        """Entries for ``nodes`` in order, and the passage ids computed on the fly.
        Every node gets its handle; nodes without text raise ``InputError``."""
        from ragcompress.errors import InputError, StoreError

        entries = [self._lookup(node) for node in nodes]
        missing = [node for node, entry in zip(nodes, entries, strict=True) if entry is None]
        computed: list[str] = []
        if missing:
            if not self.compute_missing:
                raise StoreError(
                    f"node {missing[0].node_id!r} has no cache in store {self.path}; "
                    "add it with KVCacheTransform or set compute_missing=True"
                )
            if self._writer is None:
                self._writer = CacheWriter.for_existing(self.path, self.lm)
            ids = self._writer.write(missing, write_index=False)
            for node, pid in zip(missing, ids, strict=True):
                if pid is None:
                    raise InputError(f"node {node.node_id!r} has no text to cache")
            computed = [pid for pid in ids if pid is not None]
            entries = [
                self._lookup(node) if entry is None else entry for node, entry in zip(nodes, entries, strict=True)
            ]
        for node, entry in zip(nodes, entries, strict=True):
            set_handle(node, self.path, entry.id)
        return entries, computed
