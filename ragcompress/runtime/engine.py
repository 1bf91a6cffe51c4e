"""Answering questions from a store: retrieve, prepare the stored caches, prefill the question only.

:meth:`Engine.answer_cached` is the product; :meth:`Engine.answer_full` is the baseline it is
measured against: a plain prefill of the same token ids (prefix + passages + suffix) with no
reuse at all. Both go through the same two steps, which every other caller (streaming, eval,
bench, LlamaIndex, benchmarks) uses too: a prepared request (``runtime.prepare``: the stored
caches assembled, or the whole prompt for full prefill) and the token generator
(:class:`~ragcompress.runtime.generate.TokenStream`).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ragcompress.errors import InputError, PromptTooLongError, StoreError
from ragcompress.kv.rope import position_limit
from ragcompress.models import LoadedModel, load_model
from ragcompress.retrieval import Embedder, TextEmbedder
from ragcompress.runtime.generate import (
    Prepared,
    TokenStream,
    first_token_margin,
    stop_token_ids,
    text_deltas,
)
from ragcompress.runtime.options import AnswerOptions
from ragcompress.runtime.prepare import (
    DenseStrategy,
    QueryContext,
    choose_strategy,
    fallback_prefill,
    full_prefill,
    prefix_cached_prefill,
)
from ragcompress.store import KVStore
from ragcompress.store.catalogue import Entry
from ragcompress.store.files import refuse_unfinished


def checked_question(question: object) -> str:
    """The question, refused (naming what is wrong) unless it is text with something in it."""
    if not isinstance(question, str):
        raise InputError(f"the question must be a string, got {type(question).__name__}")
    if not question.strip():
        raise InputError("the question is empty; ask a question with some text in it")
    try:
        question.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InputError(f"the question is not valid text ({exc.reason} at character {exc.start})") from None
    return question


def checked_options(options: object, default: AnswerOptions) -> AnswerOptions:
    """``options`` (``default`` when None), refused unless it is an :class:`AnswerOptions`."""
    if options is None:
        return default
    if not isinstance(options, AnswerOptions):
        raise TypeError(
            f"options must be an AnswerOptions (ragcompress.AnswerOptions(...) or preset(name).answer), "
            f"got {type(options).__name__}"
        )
    return options


@dataclass(frozen=True)
class Answer:
    """One answer and how it was produced; ``ttft_s`` counts from the request's start to the
    first token's logits (for the cached path: reading and verifying segments, dequantizing,
    re-rotating, prefill), its prompt tokenized before the clock on every path (``TokenStream``).
    ``backend`` names the path that ran: ``full``, ``dense``, ``packed-torch`` or ``packed-triton``,
    or ``fallback`` (a near tie from the caches answered by full prefill: ``fallback_margin``)."""

    answer: str
    passage_ids: list[str]
    ttft_s: float
    total_s: float
    token_ids: list[int] = field(repr=False)
    backend: str = "dense"

    def to_json(self) -> dict[str, Any]:
        """The ``ask --json`` object (DESIGN §3, extended with the attention path that ran)."""
        return {
            "answer": self.answer,
            "passage_ids": self.passage_ids,
            "ttft_s": self.ttft_s,
            "total_s": self.total_s,
            "backend": self.backend,
        }


class Engine:
    """A store, the model it was built with, the embedder and default :class:`AnswerOptions`.

    Open with :meth:`open` (loads the model, warms it up). Nothing is changed after that: each
    call may pass its own options.

    The answering methods (``retrieve``, ``search``, ``prepare``, ``stream_*``, ``answer_*``) may
    run on several threads at once: each request keeps its own state, the model runs plain
    forwards, and the store serialises its catalogue (a thread pool, or LlamaIndex's async calls,
    answer in parallel on one Engine). A request that reads the store after :meth:`close` fails
    with a :class:`StoreError` saying it was closed. ``ragcompress serve`` runs every request on
    one generation thread to batch requests and answer them in order, not for safety.
    """

    def __init__(
        self, store: KVStore, lm: LoadedModel, embedder: TextEmbedder, options: AnswerOptions = AnswerOptions()
    ) -> None:
        refuse_unfinished(store.path)
        options = checked_options(options, AnswerOptions())
        self.context = QueryContext.create(store, lm)
        store.manifest.check_embedder(embedder.name)
        self.embedder = embedder
        self.options = options
        self.stop_ids = stop_token_ids(lm.tokenizer, lm.model)
        self.max_positions = position_limit(lm.config)  # LongRoPE: its original length

    @classmethod
    def open(
        cls,
        store_path: str | Path,
        *,
        model: str | None = None,
        options: AnswerOptions = AnswerOptions(),
        dtype: str | None = None,
        device: str | None = None,
    ) -> Engine:
        """Open a store, load the model recorded in its manifest (or ``model``, if it matches)
        in ``dtype`` (default: the dtype the store was indexed in, float32 unless recorded) on
        ``device`` (default CPU; answering follows the model's device) and warm it up."""
        if not isinstance(store_path, (str, Path)):
            raise TypeError(f"store_path must be a path (str or pathlib.Path), got {type(store_path).__name__}")
        checked_options(options, AnswerOptions())
        store = KVStore.open(store_path)
        try:
            refuse_unfinished(store.path)  # before the model loads (seconds)
            lm = load_model(model or store.manifest.model_ref, dtype=dtype or store.manifest.dtype, device=device)
            engine = cls(store, lm, Embedder(store.manifest.embedder), options)
        except BaseException:
            store.close()
            raise
        engine.warm_up()
        return engine

    def warm_up(self) -> None:
        """One short forward, so the first timed request does not pay one-time initialisation
        (thread pools, allocator growth, lazy kernels) that later requests never see."""
        with torch.inference_mode():
            self.lm.model(input_ids=torch.tensor([self.prefix_ids[:8]], device=self.lm.model.device), logits_to_keep=1)

    def warm_up_retrieval(self) -> None:
        """Load the embedder and the store's index now (they load on the first question): a
        server whose store names an embedder it cannot load fails when it starts instead of
        reporting ready and failing every request, and its first request does not pay for them."""
        self.embedder.embed(["warm-up"])
        if len(self.store):
            self.store.index()

    def close(self) -> None:
        self.store.close()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # What the context holds, by name (tests and benchmarks read these).
    @property
    def store(self) -> KVStore:
        return self.context.store

    @property
    def lm(self) -> LoadedModel:
        return self.context.lm

    @property
    def tokens(self) -> Any:
        return self.context.tokens

    @property
    def rotary(self) -> Any:
        return self.context.rotary

    @property
    def prefix(self) -> Any:
        return self.context.prefix

    @property
    def prefix_keys(self) -> torch.Tensor:
        return self.context.prefix_keys

    @property
    def prefix_ids(self) -> list[int]:
        return self.context.prefix_ids

    @property
    def dtype(self) -> torch.dtype:
        return self.context.dtype

    # -- the query path ---------------------------------------------------------------------------

    def retrieve(self, question: str, top_k: int) -> list[Entry]:
        """The ``top_k`` passages nearest ``question`` (fewer when the store holds fewer)."""
        return [entry for entry, _ in self.search(question, top_k)]

    def search(self, question: str, top_k: int) -> list[tuple[Entry, float]]:
        """:meth:`retrieve` with each passage's similarity to ``question`` (what ``serve``'s
        retrieve endpoint returns)."""
        question = checked_question(question)
        if isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)):
            raise InputError(f"top_k must be an integer, got {type(top_k).__name__}")
        top_k = int(top_k)
        if top_k < 1:
            raise InputError(f"top_k (--top-k) must be at least 1, got {top_k}")
        if len(self.store) == 0:
            raise StoreError(f"store {self.store.path} holds no passages; index some first")
        vector = self.embedder.embed([question])[0]
        return self.store.search(vector, top_k)

    def suffix_ids(self, question: str, entries: list[Entry], options: AnswerOptions | None = None) -> list[int]:
        """The question's tokens, after checking that the whole prompt fits the model (every path
        reads its prompt through here: the question, the entries and the options are checked)."""
        question = checked_question(question)
        if not isinstance(entries, list) or not entries or not all(isinstance(e, Entry) for e in entries):
            raise InputError(
                "entries must be a non-empty list of the store's entries (what retrieve(question, top_k) returns)"
            )
        new_tokens = checked_options(options, self.options).max_new_tokens
        suffix = self.tokens.suffix(question)
        total = self.prefix.num_tokens + sum(e.num_tokens for e in entries) + len(suffix) + new_tokens
        if total > self.max_positions:
            raise PromptTooLongError(total, len(entries), new_tokens, self.max_positions)
        return suffix

    def full_prompt_ids(self, question: str, entries: list[Entry], options: AnswerOptions | None = None) -> list[int]:
        """``prefix + passage_1 + … + passage_k + suffix``: the token ids the caches stand for."""
        suffix = self.suffix_ids(question, entries, options)  # checks the inputs first
        return self.joined_prompt([self.tokens.passage(entry.text) for entry in entries], suffix)

    def joined_prompt(self, passage_ids: list[list[int]], suffix: list[int]) -> list[int]:
        """The full prompt's ids from already tokenized passages and question suffix."""
        return self.prefix_ids + [token for ids in passage_ids for token in ids] + suffix

    def prepare(self, question: str, entries: list[Entry], options: AnswerOptions | None = None) -> Prepared:
        """The stored caches of ``entries`` in front of the question, by the strategy that
        ``options.backend`` names (``runtime.prepare``)."""
        return self.stream_cached(question, entries, options).prepare()

    def calibrated(self, options: AnswerOptions) -> AnswerOptions:
        """``options`` with the store's calibrated attention temperature (``ragcompress
        calibrate``) applied, when it has one, ``options.calibrate`` is set and the recompute
        config leaves the temperature at 1."""
        temperature = float(self.store.manifest.attention.get("temperature", 1.0))
        if not options.calibrate or temperature == 1.0 or options.recompute.temperature != 1.0:
            return options
        return options.replace(recompute=replace(options.recompute, temperature=temperature))

    def stream_cached(self, question: str, entries: list[Entry], options: AnswerOptions | None = None) -> TokenStream:
        """The answer's tokens from the stored caches, as they are decoded (timed from the
        first iteration, which loads and assembles the caches; the question, and the passages a
        selective recompute or the near-tie fallback reads, are tokenized before, as
        :meth:`stream_full`'s prompt is)."""
        options = self.calibrated(checked_options(options, self.options))
        suffix = self.suffix_ids(question, entries, options)
        strategy = choose_strategy(self.context, options)
        if options.fallback_margin and isinstance(strategy, DenseStrategy):
            strategy = replace(strategy, keep_first=True)  # the fallback reuses the first passage's cache
        reads_passages = options.recompute.recomputes or options.fallback_margin > 0.0
        passage_ids = [self.tokens.passage(e.text) for e in entries] if reads_passages else []
        full_ids = self.joined_prompt(passage_ids, suffix) if options.fallback_margin else []

        def prepare() -> Prepared:
            prepared = strategy.prepare(self.context, entries, suffix, options.max_new_tokens, passage_ids)
            if options.fallback_margin:
                prepared = self._unless_near_tie(prepared, entries, full_ids, options)
            return prepared

        prompt_tokens = self.prefix.num_tokens + sum(e.num_tokens for e in entries) + len(suffix)
        return TokenStream(self.lm.model, prepare, options.max_new_tokens, self.stop_ids, prompt_tokens)

    def _unless_near_tie(
        self, prepared: Prepared, entries: list[Entry], full_ids: list[int], options: AnswerOptions
    ) -> Prepared:
        """``prepared`` with its question prefilled, or, when its first token leads by less than
        ``options.fallback_margin``, a full prefill of ``full_ids`` in its place, after the prefix
        and whatever of the first passage is exact (``runtime.prepare.fallback_prefill``; backend
        ``fallback``; the cached request is dropped)."""
        first = prepared.first_passage
        prepared = replace(prepared, first_passage=None).prefilled(self.lm.model)
        assert prepared.first_logits is not None
        if first_token_margin(prepared.first_logits) >= options.fallback_margin:
            return prepared
        return fallback_prefill(self.context, entries[0], full_ids, options.max_new_tokens, first)

    def stream_full(self, question: str, entries: list[Entry], options: AnswerOptions | None = None) -> TokenStream:
        """The baseline's tokens: a plain prefill of the same token ids, no cache reuse."""
        options = checked_options(options, self.options)
        ids = self.full_prompt_ids(question, entries, options)
        return TokenStream(
            self.lm.model,
            lambda: full_prefill(self.context, ids, options.max_new_tokens),
            options.max_new_tokens,
            self.stop_ids,
        )

    def stream_prefix_cached(
        self, question: str, entries: list[Entry], options: AnswerOptions | None = None
    ) -> TokenStream:
        """The fair baseline: the shared prefix's cache reused (as a serving engine with automatic
        prefix caching would), passages and question prefilled."""
        options = checked_options(options, self.options)
        ids = self.full_prompt_ids(question, entries, options)
        return TokenStream(
            self.lm.model,
            lambda: prefix_cached_prefill(self.context, ids, options.max_new_tokens),
            options.max_new_tokens,
            self.stop_ids,
        )

    def answer_prefix_cached(self, question: str, entries: list[Entry], options: AnswerOptions | None = None) -> Answer:
        """Baseline (b): full prefill after the reused prefix cache, same token ids."""
        return self.collect(self.stream_prefix_cached(question, entries, options), entries)

    def answer_prepared(self, prepared: Prepared, entries: list[Entry], options: AnswerOptions | None = None) -> Answer:
        """Decode an already prepared request: its TTFT is the question's prefill alone (the
        floor under :meth:`answer_cached`, whose TTFT adds loading and assembling the cache)."""
        options = options or self.options
        stream = TokenStream(self.lm.model, lambda: prepared, options.max_new_tokens, self.stop_ids)
        return self.collect(stream, entries)

    def answer_cached(self, question: str, entries: list[Entry], options: AnswerOptions | None = None) -> Answer:
        """Answer from stored caches: only the question's tokens are prefilled."""
        return self.collect(self.stream_cached(question, entries, options), entries)

    def answer_full(self, question: str, entries: list[Entry], options: AnswerOptions | None = None) -> Answer:
        """Baseline: plain prefill of the whole prompt (same token ids), no cache reuse."""
        return self.collect(self.stream_full(question, entries, options), entries)

    def text_pieces(self, tokens: Iterable[int]) -> Iterator[str]:
        """The text of a token stream piece by piece, as it is decoded (spaces and multi-byte
        characters intact: what a streaming client prints; :meth:`decode` is for whole answers)."""
        return text_deltas(self.lm.tokenizer, tokens)

    def decode(self, token_ids: list[int]) -> str:
        """The answer text of generated ``token_ids`` (stripped: for a whole answer, not a piece)."""
        return self.lm.tokenizer.decode(token_ids, skip_special_tokens=True).strip()

    def collect(self, stream: TokenStream, entries: list[Entry]) -> Answer:
        """The answer ``stream`` (one of this engine's, over ``entries``) decodes, run to its end:
        what the ``answer_*`` methods return, for a caller that sets the stream's ``stop`` first."""
        generation = stream.run()
        return Answer(
            self.decode(generation.token_ids),
            [e.id for e in entries],
            generation.ttft_s,
            generation.total_s,
            generation.token_ids,
            stream.backend or "dense",
        )
