"""An ``IngestionPipeline`` transformation that precomputes and stores nodes' compressed caches."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

from llama_index.core.bridge.pydantic import Field, PrivateAttr, field_validator
from llama_index.core.schema import BaseNode, TransformComponent
from llama_index.postprocessor.ragcompress._shared import require_ragcompress

DEFAULT_EMBEDDER = "all-MiniLM-L6-v2"


class KVCacheTransform(TransformComponent):
    """Encodes each node after the store's shared prefix, compresses and quantizes its cache and
    commits it to the store at ``store_path`` (created on first use), keyed by the node id.

    Nodes are returned unchanged except for their cache handle in metadata (hidden from LLM and
    embedding text). Nodes already stored with the same text are skipped, so re-running a
    pipeline only encodes new or edited nodes. The configuration is all in pydantic fields, so
    ``to_dict()`` is deterministic and LlamaIndex's ingestion cache recognises the transform.
    A store built with another model, prompt template, compression or embedder is refused with
    ``StoreMismatchError``.
    """

    store_path: str = Field(description="Directory of the ragcompress store (created if absent).")
    model: str | None = Field(
        default=None, description="Embedded model name or local HF directory; None for SmolLM2-135M-Instruct."
    )
    method: str = Field(default="none", description="KV compression method registered in ragcompress.compressors.")
    ratio: float | None = Field(
        default=None, description="Fraction of tokens the method keeps, in (0, 1]; None for the method's default."
    )
    quant: str = Field(default="none", description="Cache quantization: none, int8, int4 or int2 (KIVI).")
    group_size: int = Field(default=32, gt=0, description="Quantization group size.")
    embedder: str = Field(
        default=DEFAULT_EMBEDDER, description="Sentence-transformers model for the store's FAISS index."
    )
    batch_size: int = Field(default=8, gt=0, description="Passages encoded per forward pass.")

    _writer: Any = PrivateAttr(default=None)

    @field_validator("store_path")
    @classmethod
    def _path_is_set(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("store_path must be a directory path")
        return value

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        require_ragcompress()
        from ragcompress.indexing import IndexConfig

        IndexConfig(self.method, self.ratio, self.quant, self.group_size).compressor()  # validate early

    @classmethod
    def class_name(cls) -> str:
        return "KVCacheTransform"

    @property
    def writer(self) -> Any:
        """The ``CacheWriter`` (loads the model and checks an existing store on first use)."""
        if self._writer is None:
            from llama_index.postprocessor.ragcompress.cache import CacheWriter

            from ragcompress.indexing import IndexConfig

            config = IndexConfig(self.method, self.ratio, self.quant, self.group_size)
            self._writer = CacheWriter.for_build(self.store_path, self.model, config, self.embedder, self.batch_size)
        return self._writer

    def __call__(self, nodes: Sequence[BaseNode], **kwargs: Any) -> Sequence[BaseNode]:
        self.writer.write(nodes)
        return nodes

    async def acall(self, nodes: Sequence[BaseNode], **kwargs: Any) -> Sequence[BaseNode]:
        return await asyncio.to_thread(self.__call__, nodes, **kwargs)
