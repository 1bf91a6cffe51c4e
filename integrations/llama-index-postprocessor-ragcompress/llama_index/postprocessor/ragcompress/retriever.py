"""A retriever over a store's FAISS index, so a ragcompress store serves as a LlamaIndex index.

The question is embedded with the store's own embedder (recorded in its manifest) and searched
in the store's inner-product FAISS index (``KVStore.search``); each hit comes back as a
``TextNode`` with the passage's id, text and metadata (excluded metadata keys and relationships
included, as the transform recorded them) and its cache handle attached.
"""

from __future__ import annotations

import asyncio
import operator
from pathlib import Path
from typing import Any

from llama_index.core.base.base_retriever import BaseRetriever
from llama_index.core.callbacks import CallbackManager
from llama_index.core.schema import NodeWithScore, QueryBundle

from llama_index.postprocessor.ragcompress._shared import (
    ClosesStore,
    StoreHandle,
    node_from_passage,
    reopen,
    require_ragcompress,
    set_handle,
    shared_embedder,
    store_path,
)


class KVStoreRetriever(ClosesStore, BaseRetriever):
    """Top-``similarity_top_k`` passages of a store by cosine similarity to the query.

    It holds its store open: :meth:`close` it, or use it as a context manager (a dropped one
    closes its store too, see :class:`~._shared.StoreHandle`)."""

    def __init__(
        self,
        store_path: str,
        similarity_top_k: int = 3,
        callback_manager: CallbackManager | None = None,
        verbose: bool = False,
    ) -> None:
        require_ragcompress()
        from ragcompress.store import KVStore
        from ragcompress.store.files import refuse_unfinished

        # a float or a string was accepted here and failed inside FAISS, or in this comparison
        try:
            if isinstance(similarity_top_k, bool):
                raise TypeError
            similarity_top_k = operator.index(similarity_top_k)  # an int or a numpy integer
        except TypeError:
            raise TypeError(
                "similarity_top_k (how many passages to return) must be an integer, "
                f"got {type(similarity_top_k).__name__} {similarity_top_k!r}"
            ) from None
        if similarity_top_k < 1:
            raise ValueError(f"similarity_top_k must be at least 1, got {similarity_top_k}")
        self.store_path = store_path
        self.similarity_top_k = similarity_top_k
        refuse_unfinished(Path(store_path))  # a stopped run's store holds part of its input: search would miss some
        self._store = KVStore.open(store_path)  # StoreError when missing or incomplete
        self._handle = StoreHandle(self._store)
        self._given = {"callback_manager": callback_manager, "verbose": verbose}  # pickled besides to_dict
        super().__init__(callback_manager=callback_manager, verbose=verbose)

    @classmethod
    def class_name(cls) -> str:
        return "KVStoreRetriever"

    def to_dict(self) -> dict[str, Any]:
        return {
            "class_name": self.class_name(),
            "store_path": self.store_path,
            "similarity_top_k": self.similarity_top_k,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any], **kwargs: Any) -> KVStoreRetriever:
        data = {k: v for k, v in {**data, **kwargs}.items() if k != "class_name"}
        return cls(data.pop("store_path"), **data)

    def __reduce__(self) -> tuple[Any, ...]:
        """Pickled as its configuration, opened again (``from_dict``) when unpickled: its open
        store cannot be pickled."""
        return (reopen, (type(self), self.to_dict(), self._given))

    @property
    def store(self) -> Any:
        return self._store

    def _retrieve(self, query_bundle: QueryBundle) -> list[NodeWithScore]:
        from ragcompress.runtime.engine import checked_question

        question = checked_question(query_bundle.query_str)  # an empty one is refused, as Engine.retrieve does
        store = self._store  # KVStore.index() rebuilds when passages were added since
        vector = shared_embedder(store.manifest.embedder).embed([question])[0]
        path = store_path(store.path)
        results = []
        for entry, score in store.search(vector, self.similarity_top_k):
            node = node_from_passage(entry.id, entry.text, entry.meta)
            set_handle(node, path, entry.id)
            results.append(NodeWithScore(node=node, score=score))
        return results

    async def _aretrieve(self, query_bundle: QueryBundle) -> list[NodeWithScore]:
        return await asyncio.to_thread(self._retrieve, query_bundle)

    def as_query_engine(self, **synthesizer_kwargs: Any) -> Any:
        """A ``RetrieverQueryEngine`` over this store answering with a :class:`KVCacheSynthesizer`."""
        from llama_index.core.query_engine import RetrieverQueryEngine

        from llama_index.postprocessor.ragcompress.synthesizer import KVCacheSynthesizer

        return RetrieverQueryEngine(
            self, response_synthesizer=KVCacheSynthesizer(self.store_path, **synthesizer_kwargs)
        )
