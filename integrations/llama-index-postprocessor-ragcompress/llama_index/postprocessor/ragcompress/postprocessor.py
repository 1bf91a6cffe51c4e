"""A node postprocessor that links retrieved nodes to their stored KV caches."""

from __future__ import annotations

import math
from typing import Any

import llama_index.core.instrumentation as instrument
from llama_index.core.bridge.pydantic import BaseModel, Field, PrivateAttr
from llama_index.core.callbacks.schema import CBEventType, EventPayload
from llama_index.core.postprocessor.types import BaseNodePostprocessor
from llama_index.core.schema import NodeWithScore, QueryBundle

from llama_index.postprocessor.ragcompress._shared import (
    ClosesStore,
    StoreHandle,
    first_of_each,
    require_ragcompress,
    scored_nodes,
    shared_model,
    store_path,
)
from llama_index.postprocessor.ragcompress.cache import CacheResolver
from llama_index.postprocessor.ragcompress.events import KVCacheAttachedEvent

dispatcher = instrument.get_dispatcher(__name__)


class KVCacheNodePostprocessor(ClosesStore, BaseNodePostprocessor):
    """Orders nodes by score, drops those below ``similarity_cutoff`` or beyond ``top_n``, and
    attaches each remaining node's cache handle (``ragcompress_store``, ``ragcompress_passage_id``
    in its metadata, hidden from LLM and embedding text). A node whose cache is not in the store
    has one computed with the store's model and settings and committed (``compute_missing``).

    Returned nodes are copies: the input nodes are not modified, and every metadata key, the
    relationships and the score are kept.

    It holds its store open: :meth:`close` it, or use it as a context manager (a dropped one
    closes its store too, see :class:`~._shared.StoreHandle`).
    """

    store_path: str = Field(description="Directory of the ragcompress store holding the caches.")
    top_n: int | None = Field(
        default=None, gt=0, description="Keep at most this many nodes, best first; None keeps all."
    )
    similarity_cutoff: float | None = Field(
        default=None, description="Drop nodes scoring below this; nodes without a score are dropped too when set."
    )
    compute_missing: bool = Field(
        default=True, description="Compute and store caches the store lacks (else raise StoreError)."
    )
    model: str | None = Field(
        default=None,
        description="Model that will read the caches; checked against the store when given. None: the store's own model.",
    )
    device: str | None = Field(
        default=None, description="Where the model runs: None or 'cpu' (the CPU), 'cuda', 'cuda:N'."
    )
    adaptor: str | None = Field(
        default=None,
        description=(
            "Folder of the adaptor the store was built with (`ragcompress index --adaptor FOLDER`), which "
            "compute_missing encodes with; needed only when it is not a packaged adaptor."
        ),
    )

    _store: Any = PrivateAttr()
    _resolver: Any = PrivateAttr()
    _handle: Any = PrivateAttr(default=None)

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        require_ragcompress()
        from ragcompress.models import usable_device
        from ragcompress.store import KVStore

        if self.device is not None:
            usable_device(self.device)  # a device this machine lacks fails here, not at the first query
        self._store = KVStore.open(self.store_path)  # StoreError when missing or incomplete
        self._handle = StoreHandle(self._store)
        try:
            if self.model is not None:  # the store's model and tokenizer, checked on the shared copy (only
                # read here): the copy missing caches are encoded with (writer_model) loads when one is first computed
                self._store.manifest.check_lm(shared_model(self.model, self._store.manifest.dtype, self.device))
        except BaseException:
            self._handle.close()
            raise
        self._resolver = CacheResolver(self._store, self.model, self.compute_missing, self.device, self.adaptor)

    @classmethod
    def class_name(cls) -> str:
        return "KVCacheNodePostprocessor"

    def __getstate__(self) -> dict[Any, Any]:
        """Pickled without its open store and resolver, which unpickling opens again (LlamaIndex's
        ``__setstate__`` runs ``__init__``); BaseComponent's would try to pickle them first."""
        state = BaseModel.__getstate__(self)
        state["__pydantic_private__"] = {
            **(state["__pydantic_private__"] or {}),
            "_store": None,
            "_resolver": None,
            "_handle": None,
        }
        return state

    def _select(self, nodes: list[NodeWithScore]) -> list[NodeWithScore]:
        if self.similarity_cutoff is not None:
            nodes = [n for n in nodes if n.score is not None and n.score >= self.similarity_cutoff]
        # stable; a node without a usable score (None, NaN) goes after the scored ones
        usable = [n for n in nodes if n.score is not None and not math.isnan(n.score)]
        scored = sorted(usable, key=lambda n: -(n.score or 0.0))
        ordered = scored + [n for n in nodes if n.score is None or math.isnan(n.score)]
        # a node given twice (merged retrievers) is kept once, at its best place, so it does not
        # take two of top_n's places and put its passage in the context twice
        ordered = first_of_each(ordered, lambda n: n.node.node_id)
        return ordered[: self.top_n] if self.top_n is not None else ordered

    def _postprocess_nodes(
        self, nodes: list[NodeWithScore], query_bundle: QueryBundle | None = None
    ) -> list[NodeWithScore]:
        nodes = scored_nodes(nodes, "KVCacheNodePostprocessor")
        chosen = [NodeWithScore(node=n.node.model_copy(deep=True), score=n.score) for n in self._select(nodes)]
        with self.callback_manager.event(CBEventType.RERANKING, payload={EventPayload.NODES: nodes}) as event:
            entries, computed = self._resolver.resolve([n.node for n in chosen])
            event.on_end(payload={EventPayload.NODES: chosen})
        dispatcher.event(
            KVCacheAttachedEvent(
                store=store_path(self.store_path), passage_ids=[e.id for e in entries], computed=computed
            )
        )
        return chosen
