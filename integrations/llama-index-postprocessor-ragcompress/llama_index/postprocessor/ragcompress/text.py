"""Text compression of retrieved nodes for LLMs that cannot take a KV cache (hosted APIs).

A thin wrapper over :mod:`ragcompress.text`: ``selfinfo`` prunes tokens or words by their
self-information under the small local LM (LLMLingua / Selective Context), ``extractive`` keeps
the sentences most similar to the query (RECOMP extractive). Unlike LLMLingua's LlamaIndex
postprocessor, which merges all nodes into one, every node is compressed on its own and returned
as a copy with its own id, metadata, relationships and score.
"""

from __future__ import annotations

import time
from typing import Any, Literal

import llama_index.core.instrumentation as instrument
from llama_index.core.bridge.pydantic import BaseModel, Field, PrivateAttr, model_validator
from llama_index.core.postprocessor.types import BaseNodePostprocessor
from llama_index.core.schema import MetadataMode, NodeWithScore, QueryBundle

from llama_index.postprocessor.ragcompress._shared import (
    require_ragcompress,
    scored_nodes,
    shared_embedder,
    shared_model,
)
from llama_index.postprocessor.ragcompress.events import TextCompressionEvent

dispatcher = instrument.get_dispatcher(__name__)

ORIGINAL_TOKENS_KEY = "ragcompress_original_tokens"
KEPT_TOKENS_KEY = "ragcompress_kept_tokens"


class TextCompressionPostprocessor(BaseNodePostprocessor):
    """Shortens each node's text to ``rate`` of its tokens, or all nodes to ``target_tokens``.

    After a call, :attr:`last_ratio` is the achieved fraction of tokens kept over all nodes
    (tokens counted with the local model's tokenizer), and each returned node records
    ``ragcompress_original_tokens`` / ``ragcompress_kept_tokens`` in its metadata (hidden from
    LLM and embedding text).
    """

    method: Literal["selfinfo", "extractive"] = Field(
        default="selfinfo",
        description="selfinfo: token/word pruning by self-information (LLMLingua family); extractive: query-similar sentences (RECOMP).",
    )
    rate: float | None = Field(
        default=None,
        description="Fraction of each node's tokens to keep, in (0, 1]. Default 0.5 when target_tokens is unset.",
    )
    target_tokens: int | None = Field(
        default=None,
        description="Total token budget shared by the nodes in proportion to their length (instead of rate).",
    )
    unit: Literal["word", "token"] = Field(
        default="word", description="selfinfo only: prune whole words or single tokens."
    )
    model: str | None = Field(
        default=None,
        description="Scoring LM (embedded name or local HF directory); None for SmolLM2-135M-Instruct. Its tokenizer counts tokens.",
    )
    device: str | None = Field(
        default=None, description="Where the scoring LM runs (selfinfo): None or 'cpu' (the CPU), 'cuda', 'cuda:N'."
    )
    embedder: str = Field(default="all-MiniLM-L6-v2", description="extractive only: sentence embedder.")

    _compressor: Any = PrivateAttr(default=None)
    _last: dict = PrivateAttr(default_factory=dict)

    @model_validator(mode="after")
    def _one_budget(self) -> TextCompressionPostprocessor:
        if self.rate is None and self.target_tokens is None:
            self.rate = 0.5
        require_ragcompress()
        from ragcompress.text import Budget

        Budget(self.rate, self.target_tokens)  # ValueError naming the field
        return self

    @classmethod
    def class_name(cls) -> str:
        return "TextCompressionPostprocessor"

    @property
    def compressor(self) -> Any:
        if self._compressor is None:
            from ragcompress.text import make_text_compressor

            lm = shared_model(self.model, device=self.device)
            if self.method == "selfinfo":
                self._compressor = make_text_compressor("selfinfo", lm=lm, unit=self.unit)
            else:
                self._compressor = make_text_compressor("extractive", lm=lm, embedder=shared_embedder(self.embedder))
        return self._compressor

    def __getstate__(self) -> dict[Any, Any]:
        """Pickled without its loaded compressor (the scoring model), which the copy loads again at
        its first call: pickling (``IngestionPipeline`` workers, a cache of the query engine) copied
        the model's weights."""
        state = BaseModel.__getstate__(self)
        state["__pydantic_private__"] = {**(state["__pydantic_private__"] or {}), "_compressor": None}
        return state

    @property
    def last_ratio(self) -> float | None:
        """Tokens kept / tokens before, over all nodes of the latest call (None before any)."""
        total = self._last.get("original_tokens")
        return self._last["kept_tokens"] / total if total else None

    @property
    def last_stats(self) -> dict[str, float]:
        return dict(self._last)

    def _postprocess_nodes(
        self, nodes: list[NodeWithScore], query_bundle: QueryBundle | None = None
    ) -> list[NodeWithScore]:
        nodes = scored_nodes(nodes, "TextCompressionPostprocessor")  # a bare node failed on its missing .node
        if self.method == "extractive" and query_bundle is None:
            raise ValueError("method='extractive' ranks sentences by the query; pass query_bundle or query_str")
        start = time.perf_counter()
        texts = [n.node.get_content(metadata_mode=MetadataMode.NONE) for n in nodes]
        query = query_bundle.query_str if query_bundle is not None else None
        results = self.compressor.compress(texts, query, rate=self.rate, target_tokens=self.target_tokens)
        out = []
        for item, result in zip(nodes, results, strict=True):
            node = item.node.model_copy(deep=True)
            node.set_content(result.text)
            node.metadata[ORIGINAL_TOKENS_KEY] = result.original_tokens
            node.metadata[KEPT_TOKENS_KEY] = result.kept_tokens
            for keys in (node.excluded_llm_metadata_keys, node.excluded_embed_metadata_keys):
                keys.extend(k for k in (ORIGINAL_TOKENS_KEY, KEPT_TOKENS_KEY) if k not in keys)
            out.append(NodeWithScore(node=node, score=item.score))
        seconds = time.perf_counter() - start
        self._last = {
            "original_tokens": sum(r.original_tokens for r in results),
            "kept_tokens": sum(r.kept_tokens for r in results),
            "seconds": seconds,
        }
        dispatcher.event(
            TextCompressionEvent(
                method=self.method,
                original_tokens=self._last["original_tokens"],
                kept_tokens=self._last["kept_tokens"],
                seconds=seconds,
            )
        )
        return out
