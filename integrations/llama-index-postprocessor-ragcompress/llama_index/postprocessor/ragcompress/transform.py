"""An ``IngestionPipeline`` transformation that precomputes and stores nodes' compressed caches.

Its store settings are one ragcompress :class:`~ragcompress.indexing.IndexConfig` field rather
than copies of its fields, so every index option (ratio or budget, protected tokens, quantization,
embedder, and any added later) is reachable here, validated by ragcompress itself, and part of
``to_dict()`` (which LlamaIndex's ingestion cache hashes).
"""

from __future__ import annotations

import asyncio
import dataclasses
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from llama_index.core.bridge.pydantic import BaseModel, Field, PrivateAttr, field_validator, model_validator
from llama_index.core.schema import BaseNode, TransformComponent

from llama_index.postprocessor.ragcompress._shared import plain_nodes, require_ragcompress

require_ragcompress()  # IndexConfig is a field type, so it is needed when the class is defined

from ragcompress.indexing import IndexConfig  # noqa: E402

_CONFIG_FIELDS = frozenset(f.name for f in dataclasses.fields(IndexConfig))


class KVCacheTransform(TransformComponent):
    """Encodes each node after the store's shared prefix, compresses and quantizes its cache and
    commits it to the store at ``store_path`` (created on first use), keyed by the node id.

    Returns copies of the nodes, each with its cache handle in metadata (hidden from LLM and
    embedding text); the input nodes are not changed. Nodes already stored with the same text are
    not encoded again, so re-running a pipeline only encodes new or edited nodes (a stored node's
    changed metadata, excluded metadata keys or relationships are written to its row); an edited
    node's cache is stored beside the old one under an alias id, or replaces it with
    ``replace_edited=True``. The configuration is all in pydantic fields, so ``to_dict()`` is
    deterministic and LlamaIndex's ingestion cache recognises the transform.
    A store built with another model, prompt template, compression or embedder is refused with
    ``StoreMismatchError``; ``config=None`` (and ``model=None``) add to an existing store with its
    own settings (and model), as ``ragcompress index`` given none does.

    ``IngestionPipeline(num_workers=N)`` pickles the transform into N processes, each storing its
    share of the nodes (one writer at a time; each loads the model itself). A neighbour-conditioned
    transform (``IndexConfig(context_neighbors=...)``) refuses to be pickled: each share would be
    its own neighbour pool, so the store would hold other caches than one process stores.

    Example: ``KVCacheTransform(store_path="store", config=IndexConfig(method="global:kvzip",
    ratio=0.5, quant="int4"))``.
    """

    store_path: str = Field(description="Directory of the ragcompress store (created if absent).")
    model: str | None = Field(
        default=None,
        description=(
            "Embedded model name or local HF directory; None: an existing store's own model, "
            "else SmolLM2-135M-Instruct."
        ),
    )
    config: IndexConfig | None = Field(
        default_factory=IndexConfig,
        description=(
            "Store settings (ragcompress.indexing.IndexConfig): compression method, ratio or budget, "
            "protected tokens, quantization and the embedder of the store's FAISS index; None: an "
            "existing store's own settings (as `ragcompress index` given none), the defaults for a new store."
        ),
    )
    batch_size: int = Field(default=8, gt=0, description="Passages encoded per forward pass.")
    dtype: str | None = Field(
        default=None,
        description="The model's weights: float32, bfloat16 or float16; None: an existing store's own, else float32.",
    )
    device: str | None = Field(
        default=None, description="Where the model's forwards run: None or 'cpu' (the CPU), 'cuda', 'cuda:N'."
    )
    replace_edited: bool = Field(
        default=False,
        description=(
            "A node stored under its id with another text replaces that cache (as `ragcompress index "
            "--replace`); by default the edited text is stored beside it under an alias id, so nodes still "
            "holding the old text keep resolving to their own cache."
        ),
    )

    _writer: Any = PrivateAttr(default=None)

    @model_validator(mode="before")
    @classmethod
    def _no_loose_settings(cls, data: Any) -> Any:
        """Store settings given beside ``config`` (e.g. ``quant="int8"``) would be silently dropped."""
        if isinstance(data, dict):
            loose = sorted(_CONFIG_FIELDS & set(data))
            if loose:
                settings = ", ".join(f"{name}={data[name]!r}" for name in loose)
                raise ValueError(f"store settings go in config: pass config=IndexConfig({settings})")
        return data

    @field_validator("store_path")
    @classmethod
    def _path_is_set(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("store_path must be a directory path")
        return value

    @field_validator("config", mode="before")
    @classmethod
    def _config_keys_are_known(cls, value: Any) -> Any:
        """A dict (``from_dict``, JSON) with a misspelt key fails instead of falling back to a default."""
        if isinstance(value, dict):
            unknown = sorted(set(value) - _CONFIG_FIELDS)
            if unknown:
                raise ValueError(f"unknown IndexConfig settings {unknown}; known: {sorted(_CONFIG_FIELDS)}")
        return value

    @classmethod
    def class_name(cls) -> str:
        return "KVCacheTransform"

    @property
    def writer(self) -> Any:
        """The ``CacheWriter`` (loads the model and checks an existing store on first use)."""
        if self._writer is None:
            from llama_index.postprocessor.ragcompress.cache import CacheWriter

            self._writer = CacheWriter.for_build(
                self.store_path,
                self.model,
                self.config,
                self.batch_size,
                self.replace_edited,
                dtype=self.dtype,
                device=self.device,
            )
        return self._writer

    def _context_neighbors(self) -> int:
        """The neighbours each passage is encoded after: the config's, else (``config=None``) the
        existing store's, which the writer will use."""
        if self.config is not None:
            return self.config.context_neighbors
        from ragcompress.store import Manifest
        from ragcompress.store.manifest import MANIFEST

        path = Path(self.store_path)
        return int(Manifest.read(path).encoding.get("context_neighbors", 0)) if (path / MANIFEST).is_file() else 0

    def __getstate__(self) -> dict[Any, Any]:
        """Pickled (``IngestionPipeline(num_workers=...)`` workers) without the loaded writer, which
        each process sets up for itself; a neighbour-conditioned transform is refused."""
        neighbours = self._context_neighbors()
        if neighbours:
            raise TypeError(  # what pickle raises for any object it cannot pickle (no pickle import here)
                f"KVCacheTransform with context_neighbors={neighbours} cannot run in worker processes "
                "(IngestionPipeline num_workers > 1): each worker would draw neighbours from its own share of "
                "the nodes only, and the store would hold other caches than one process stores. Run the "
                "pipeline with num_workers=1 (neighbours come from all its nodes), or build the store with "
                f"`ragcompress index --context-neighbors {neighbours}` (one process)"
            )
        state = BaseModel.__getstate__(self)  # BaseComponent's would pickle the writer's model to test it
        state["__pydantic_private__"] = {**(state["__pydantic_private__"] or {}), "_writer": None}
        return state

    def __call__(self, nodes: Sequence[BaseNode], **kwargs: Any) -> Sequence[BaseNode]:
        """Copies of ``nodes`` with their cache handles. The inputs are left as they were: an
        ``IngestionPipeline`` hashes its input documents for its docstore and cache after the
        transformations have run, and a handle written into them would make every re-run see
        changed documents."""
        nodes = plain_nodes(nodes, "KVCacheTransform")
        if not nodes:  # a pipeline whose docstore filtered every document: no model to load, no store to create
            return []
        handled = [
            node.model_copy(
                update={
                    "metadata": dict(node.metadata),
                    "excluded_llm_metadata_keys": list(node.excluded_llm_metadata_keys),
                    "excluded_embed_metadata_keys": list(node.excluded_embed_metadata_keys),
                }
            )
            for node in nodes
        ]
        ids = self.writer.write(handled, update_fields=True)
        skipped = [node.node_id for node, pid in zip(handled, ids, strict=True) if pid is None]
        if skipped:  # nothing to cache: the synthesizer will refuse these nodes, say so now
            shown = ", ".join(skipped[:5]) + (f" and {len(skipped) - 5} more" if len(skipped) > 5 else "")
            warnings.warn(
                f"KVCacheTransform: {len(skipped)} nodes have no text and were not cached ({shown})", stacklevel=2
            )
        return handled

    async def acall(self, nodes: Sequence[BaseNode], **kwargs: Any) -> Sequence[BaseNode]:
        return await asyncio.to_thread(self.__call__, nodes, **kwargs)
