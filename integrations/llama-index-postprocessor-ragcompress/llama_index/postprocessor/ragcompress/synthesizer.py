"""A response synthesizer that answers from the stored caches of the retrieved nodes.

Instead of formatting the nodes' text into a prompt, it loads each node's compressed cache from
the store, places the caches after the shared prefix at consecutive positions, prefills only the
question and decodes with the store's own model
(:meth:`ragcompress.runtime.engine.Engine.answer_cached`). Nodes without a stored cache get one
computed and stored on the fly (``compute_missing``), so it works behind any retriever.
"""

from __future__ import annotations

from collections.abc import Generator, Sequence
from typing import Any

import llama_index.core.instrumentation as instrument
from llama_index.core.base.response.schema import (
    RESPONSE_TYPE,
    AsyncStreamingResponse,
    Response,
    StreamingResponse,
)
from llama_index.core.callbacks import CallbackManager
from llama_index.core.callbacks.schema import CBEventType, EventPayload
from llama_index.core.instrumentation.events.synthesis import SynthesizeEndEvent, SynthesizeStartEvent
from llama_index.core.llms import LLM
from llama_index.core.prompts.mixin import PromptDictType
from llama_index.core.response_synthesizers.base import BaseSynthesizer, QueryTextType
from llama_index.core.schema import NodeWithScore, QueryBundle, TextNode

from llama_index.postprocessor.ragcompress._shared import (
    ClosesStore,
    StoreHandle,
    first_of_each,
    in_thread,
    iterate_in_thread,
    reopen,
    require_ragcompress,
    scored_nodes,
    shared_embedder,
    shared_model,
    store_path,
    text_sha,
    until_cancelled,
)
from llama_index.postprocessor.ragcompress.cache import CacheResolver
from llama_index.postprocessor.ragcompress.events import KVCacheAnswerEvent, KVCacheAttachedEvent
from llama_index.postprocessor.ragcompress.llm import LocalLLM

dispatcher = instrument.get_dispatcher(__name__)


class KVCacheSynthesizer(ClosesStore, BaseSynthesizer):
    """Answers from stored KV caches with the store's local model.

    Args:
        store_path: directory of a ragcompress store (built by ``KVCacheTransform`` or
            ``ragcompress index``); a missing store is a ``StoreError`` here.
        model: model to answer with; None loads the one recorded in the store's manifest.
            Another model than the store was built with is a ``StoreMismatchError``.
        max_new_tokens: greedy decoding budget.
        streaming: return a ``StreamingResponse`` whose text arrives token by token.
        compute_missing: compute and store caches for nodes the store does not hold yet.
        recompute: fraction of passage tokens whose cache is recomputed at query time to repair
            cross-passage attention (CacheBlend/APE, ``ragcompress.runtime.recompute``), at every
            top-k, or ``(passages, fraction)`` points of a schedule by top-k (``[(3, 0.05), (5, 0.1)]``),
            with the preset's token selection; None keeps the preset's (plain reuse without one).
        fallback_margin: answer by full prefill (the shared prefix's cache reused, and the first
            passage's where it is exact) a question whose
            first token from the caches leads the runner-up by less than this probability
            (``AnswerOptions.fallback_margin``); None keeps the preset's (0, never, without one).
        preset: a named, measured answer setting (``ragcompress.presets``: ``fast``, ``small``,
            ``faithful``); ``max_new_tokens``, ``recompute`` and ``fallback_margin`` given explicitly
            override it.
        device: where the model runs (``cpu`` by default, ``cuda``, ``cuda:N``): answering and
            the caches ``compute_missing`` adds both run there.
        adaptor: folder of the adaptor the store was built with (``index --adaptor FOLDER``),
            which ``compute_missing`` encodes with; needed only when it is not a packaged one
            (a store records the adaptor's hash, and a packaged one is found by it).
        llm: the LLM ``BaseSynthesizer`` keeps for prompt sizing; defaults to a
            :class:`LocalLLM` on the same weights (never a hosted model).

    It holds its store open: :meth:`close` it, or use it as a context manager (a dropped one
    closes its store too, see :class:`~._shared.StoreHandle`).

    Responses carry ``metadata["ragcompress"] = {"ttft_s", "total_s", "passage_ids", "computed", "backend"}``
    (a streaming response's timings once its stream is consumed).
    """

    def __init__(
        self,
        store_path: str,
        *,
        model: str | None = None,
        max_new_tokens: int = 32,
        streaming: bool = False,
        compute_missing: bool = True,
        recompute: float | Sequence[tuple[int, float]] | None = None,
        fallback_margin: float | None = None,
        preset: str | None = None,
        device: str | None = None,
        adaptor: str | None = None,
        llm: LLM | None = None,
        callback_manager: CallbackManager | None = None,
    ) -> None:
        require_ragcompress()
        from ragcompress.presets import answer_options
        from ragcompress.runtime.engine import Engine
        from ragcompress.store import KVStore

        # as ``--recompute``: the fraction replaced, the preset's selection kept
        options = answer_options(preset).overridden(
            max_new_tokens=max_new_tokens, recompute=recompute, fallback_margin=fallback_margin
        )

        store = KVStore.open(store_path)  # StoreError when missing or incomplete
        self._handle = StoreHandle(store)
        try:
            lm = shared_model(model or store.manifest.model_ref, store.manifest.dtype, device)
            self._engine = Engine(store, lm, shared_embedder(store.manifest.embedder), options)
            self._engine.warm_up()
        except BaseException:
            self._handle.close()
            raise
        self.store_path = store_path
        self.model = model
        self.max_new_tokens = max_new_tokens
        self.compute_missing = compute_missing
        self.recompute = recompute
        self.fallback_margin = fallback_margin
        self.preset = preset
        self.device = device
        self.adaptor = adaptor
        self._given = {"llm": llm, "callback_manager": callback_manager}  # what pickling keeps besides to_dict
        # encodes on a copy of the model of its own, loaded when a cache is first computed
        self._resolver = CacheResolver(store, lm.ref, compute_missing, device, adaptor)
        super().__init__(
            llm=llm or LocalLLM(model=lm.ref, max_new_tokens=max_new_tokens, dtype=store.manifest.dtype, device=device),
            callback_manager=callback_manager,
            streaming=streaming,
        )

    @classmethod
    def class_name(cls) -> str:
        return "KVCacheSynthesizer"

    def to_dict(self) -> dict[str, Any]:
        """Configuration only (no model, no store handle); ``from_dict`` reopens the store."""
        return {
            "class_name": self.class_name(),
            "store_path": self.store_path,
            "model": self.model,
            "max_new_tokens": self.max_new_tokens,
            "streaming": self._streaming,
            "compute_missing": self.compute_missing,
            "recompute": self.recompute,
            "fallback_margin": self.fallback_margin,
            "preset": self.preset,
            "device": self.device,
            "adaptor": self.adaptor,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any], **kwargs: Any) -> KVCacheSynthesizer:
        data = {k: v for k, v in {**data, **kwargs}.items() if k != "class_name"}
        return cls(data.pop("store_path"), **data)

    def __reduce__(self) -> tuple[Any, ...]:
        """Pickled as its configuration and the LLM and callback manager it was given, and opened
        again from them (``from_dict``) when unpickled: its open store cannot be pickled."""
        return (reopen, (type(self), self.to_dict(), self._given))

    @property
    def engine(self) -> Any:
        """The ragcompress ``Engine`` (store, model, embedder) this synthesizer answers with."""
        return self._engine

    def _get_prompts(self) -> PromptDictType:
        return {}

    def _update_prompts(self, prompts: PromptDictType) -> None:
        """The prompt is the store's (its prefix cache is part of it): nothing to update."""

    # -- answering -----------------------------------------------------------------------------

    def _entries(self, nodes: Sequence[NodeWithScore]) -> tuple[list[Any], list[str]]:
        """The caches to place for ``nodes``, each passage once, where it first appears: a node
        handed in twice (two retrievers merged, a node and its stored alias) would otherwise put
        two copies of its passage in the context, which no full prefill of the retrieved set
        shows the model; ``source_nodes`` still lists what was given."""
        entries, computed = self._resolver.resolve([n.node for n in nodes])
        entries = first_of_each(entries, lambda entry: entry.id)
        dispatcher.event(
            KVCacheAttachedEvent(store=self._resolver.path, passage_ids=[e.id for e in entries], computed=computed)
        )
        return entries, computed

    def _stream(self, question: str, entries: list[Any], info: dict[str, Any]) -> Generator[str, None, None]:
        """Text deltas of the same tokens :meth:`Engine.answer_cached` decodes (one query path)."""

        stream = self._engine.stream_cached(question, entries)
        yield from self._engine.text_pieces(stream)
        info.update(ttft_s=stream.ttft_s, total_s=stream.total_s, backend=stream.backend)
        dispatcher.event(
            KVCacheAnswerEvent(store=self._resolver.path, passage_ids=info["passage_ids"], ttft_s=stream.ttft_s)
        )

    def _respond(
        self, query: QueryBundle, nodes: list[NodeWithScore], additional: Sequence[NodeWithScore]
    ) -> RESPONSE_TYPE:
        from ragcompress.runtime.engine import checked_question

        checked_question(query.query_str)  # before any missing cache is computed and stored
        entries, computed = self._entries(nodes)
        if self._streaming:  # a prompt too long fails here, not when the stream is first read
            self._engine.suffix_ids(query.query_str, entries)
        source_nodes = list(nodes) + list(additional)
        metadata = self._get_metadata_for_response([n.node for n in source_nodes]) or {}
        info: dict[str, Any] = {"passage_ids": [e.id for e in entries], "computed": computed}
        metadata["ragcompress"] = info
        if self._streaming:
            return StreamingResponse(
                self._stream(query.query_str, entries, info), source_nodes=source_nodes, metadata=metadata
            )
        with until_cancelled(self._engine.stream_cached(query.query_str, entries)) as stream:
            answer = self._engine.collect(stream, entries)  # Engine.answer_cached's, stoppable
        info.update(ttft_s=answer.ttft_s, total_s=answer.total_s, backend=answer.backend)
        dispatcher.event(
            KVCacheAnswerEvent(store=self._resolver.path, passage_ids=answer.passage_ids, ttft_s=answer.ttft_s)
        )
        return Response(answer.answer, source_nodes=source_nodes, metadata=metadata)

    @dispatcher.span
    def synthesize(
        self,
        query: QueryTextType,
        nodes: list[NodeWithScore],
        additional_source_nodes: Sequence[NodeWithScore] | None = None,
        **response_kwargs: Any,
    ) -> RESPONSE_TYPE:
        nodes = scored_nodes(nodes, "KVCacheSynthesizer.synthesize")
        dispatcher.event(SynthesizeStartEvent(query=query))
        if isinstance(query, str):
            query = QueryBundle(query_str=query)
        if not nodes:
            response: RESPONSE_TYPE = (
                StreamingResponse(response_gen=self._empty_response_generator())
                if self._streaming
                else Response(self._empty_response)
            )
        else:
            with self._callback_manager.event(
                CBEventType.SYNTHESIZE, payload={EventPayload.QUERY_STR: query.query_str}
            ) as event:
                response = self._respond(query, list(nodes), additional_source_nodes or [])
                event.on_end(payload={EventPayload.RESPONSE: response})
        dispatcher.event(SynthesizeEndEvent(query=query, response=response))
        return response

    @dispatcher.span
    async def asynthesize(
        self,
        query: QueryTextType,
        nodes: list[NodeWithScore],
        additional_source_nodes: Sequence[NodeWithScore] | None = None,
        **response_kwargs: Any,
    ) -> RESPONSE_TYPE:
        response = await in_thread(self.synthesize, query, nodes, additional_source_nodes)
        if isinstance(response, StreamingResponse):
            deltas = iterate_in_thread(iter(response.response_gen))  # decoding off the event loop
            return AsyncStreamingResponse(deltas, source_nodes=response.source_nodes, metadata=response.metadata)
        return response

    def _chunk_nodes(self, text_chunks: Sequence[str]) -> list[NodeWithScore]:
        # Bare text chunks get content-addressed ids so each is cached once.
        return [NodeWithScore(node=TextNode(id_=f"chunk-{text_sha(t)[:16]}", text=t)) for t in text_chunks]

    def get_response(self, query_str: str, text_chunks: Sequence[str], **response_kwargs: Any) -> Any:
        """Answer from the caches of bare text chunks (cached in the store under content ids)."""
        if isinstance(text_chunks, str) or not all(isinstance(chunk, str) for chunk in text_chunks):
            raise TypeError(
                f"get_response takes a list of text chunks (strings), got {type(text_chunks).__name__}"
                + (": pass [text] for one chunk" if isinstance(text_chunks, str) else "")
            )
        response = self._respond(QueryBundle(query_str), self._chunk_nodes(text_chunks), [])
        if isinstance(response, StreamingResponse):
            return response.response_gen
        assert isinstance(response, Response)  # _respond builds no other kind
        return response.response

    async def aget_response(self, query_str: str, text_chunks: Sequence[str], **response_kwargs: Any) -> Any:
        return await in_thread(self.get_response, query_str, text_chunks)

    def __repr__(self) -> str:
        return f"KVCacheSynthesizer(store_path={store_path(self.store_path)!r}, model={self._engine.lm.ref!r})"
