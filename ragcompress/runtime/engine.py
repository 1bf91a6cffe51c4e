"""Answering questions from a store: retrieve, load caches, prefill the question only, decode.

:meth:`Engine.answer_cached` is the product; :meth:`Engine.answer_full` is the baseline it is
measured against: a plain prefill of the same token ids (prefix + passages + suffix) with no
reuse at all, decoded by the same greedy loop.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from transformers import DynamicCache

from ragcompress.errors import InputError, StoreError
from ragcompress.models import LoadedModel, load_model
from ragcompress.prompt import PromptTemplate, PromptTokens
from ragcompress.retrieval import Embedder
from ragcompress.rope import Rotary
from ragcompress.runtime.assemble import assemble
from ragcompress.runtime.attention import KV_MASK_KWARG
from ragcompress.runtime.generate import Generation, greedy_decode, stop_token_ids
from ragcompress.runtime.recompute import RecomputeConfig, repair
from ragcompress.store import KVStore
from ragcompress.store.catalogue import Entry


@dataclass(frozen=True)
class Answer:
    """One answer and how it was produced; ``ttft_s`` counts from the request's start
    (for the cached path: reading and verifying segments, dequantizing, re-rotating, prefill)."""

    answer: str
    passage_ids: list[str]
    ttft_s: float
    total_s: float
    token_ids: list[int] = field(repr=False)

    def to_json(self) -> dict[str, Any]:
        return {"answer": self.answer, "passage_ids": self.passage_ids, "ttft_s": self.ttft_s, "total_s": self.total_s}


class Engine:
    """A store, the model it was built with, and the embedder; see :meth:`open`."""

    recompute: RecomputeConfig | float | None = None  # default of answer_cached(recompute=)

    def __init__(self, store: KVStore, lm: LoadedModel, embedder: Embedder, max_new_tokens: int = 32) -> None:
        store.manifest.check_model(lm.fingerprint, lm.ref)
        if lm.tokenizer_hash != store.manifest.tokenizer_hash:
            raise StoreError(f"store {store.path} was built with another tokenizer than {lm.ref}'s")
        self.store = store
        self.lm = lm
        self.embedder = embedder
        self.max_new_tokens = max_new_tokens
        self.tokens = PromptTokens(PromptTemplate.from_dict(store.manifest.template), lm.tokenizer)
        self.rotary = Rotary(lm.model)
        self.dtype = lm.model.dtype
        self.stop_ids = stop_token_ids(lm.tokenizer, lm.model)
        self.prefix = store.prefix_kv(self.dtype)
        self.prefix_ids = self.tokens.prefix()
        if len(self.prefix_ids) != self.prefix.num_tokens:
            raise StoreError(
                f"store {store.path}: prefix cache has {self.prefix.num_tokens} tokens, "
                f"the template gives {len(self.prefix_ids)}; rebuild the store"
            )
        self.prefix_keys = self.rotary.rotate_layers(self.prefix.keys, self.prefix.positions).to(lm.model.device)
        # the prefix values live where the model does, once, not copied over on every request
        self.prefix = replace(self.prefix, values=self.prefix.values.to(lm.model.device))
        self.max_positions = int(getattr(lm.config, "max_position_embeddings", 1 << 30))
        self._warm_up()

    def _warm_up(self) -> None:
        """One short forward so the first timed request does not pay one-time initialisation
        (thread pools, allocator growth, lazy kernels) that later requests never see."""
        with torch.inference_mode():
            self.lm.model(input_ids=torch.tensor([self.prefix_ids[:8]]), logits_to_keep=1)

    @classmethod
    def open(cls, store_path: str | Path, *, model: str | None = None, max_new_tokens: int = 32) -> Engine:
        """Open a store and load the model recorded in its manifest (or ``model``, if it matches)."""
        store = KVStore.open(store_path)
        lm = load_model(model or store.manifest.model_ref)
        return cls(store, lm, Embedder(store.manifest.embedder), max_new_tokens)

    def close(self) -> None:
        self.store.close()

    @contextmanager
    def first_token_only(self) -> Iterator[None]:
        """Answers stop after one token inside this block: what TTFT benchmarks time (decoding
        further adds nothing to time-to-first-token); the previous limit is restored after."""
        saved, self.max_new_tokens = self.max_new_tokens, 1
        try:
            yield
        finally:
            self.max_new_tokens = saved

    def retrieve(self, question: str, top_k: int) -> list[Entry]:
        if top_k < 1:
            raise InputError(f"--top-k must be at least 1, got {top_k}")
        if len(self.store) == 0:
            raise StoreError(f"store {self.store.path} holds no passages; index some first")
        vector = self.embedder.embed([question])[0]
        return [entry for entry, _ in self.store.search(vector, top_k)]

    def _suffix(self, question: str, entries: list[Entry]) -> list[int]:
        if not question.strip():
            raise InputError("the question is empty")
        suffix = self.tokens.suffix(question)
        total = self.prefix.num_tokens + sum(e.num_tokens for e in entries) + len(suffix) + self.max_new_tokens
        if total > self.max_positions:
            raise InputError(
                f"prompt needs {total} positions (prefix, {len(entries)} passages, question, "
                f"{self.max_new_tokens} new tokens) but {self.lm.ref} handles {self.max_positions}; "
                "shorten the question or lower --top-k"
            )
        return suffix

    def _answer(self, generation: Generation, entries: list[Entry]) -> Answer:
        text = self.lm.tokenizer.decode(generation.token_ids, skip_special_tokens=True).strip()
        return Answer(text, [e.id for e in entries], generation.ttft_s, generation.total_s, generation.token_ids)

    def answer_cached(
        self, question: str, entries: list[Entry], recompute: RecomputeConfig | float | None = None
    ) -> Answer:
        """Answer from stored caches: only the question's tokens are prefilled.

        ``recompute`` (a ratio or a :class:`RecomputeConfig`; default :attr:`recompute`) repairs
        the cross-passage attention first (CacheBlend/APE, :mod:`ragcompress.runtime.recompute`).
        """
        if self.lm.model.device.type == "cuda":  # fused Triton attention over quantized segments
            from ragcompress.runtime.packed import answer_packed, packed_applies

            if packed_applies(self, self.recompute if recompute is None else recompute):
                return answer_packed(self, question, entries)
        suffix = self._suffix(question, entries)
        t0 = time.perf_counter()
        segments = [self.store.load_kv(entry, self.dtype) for entry in entries]
        built = assemble(self.lm.config, self.rotary, self.prefix_keys, self.prefix, segments, self.dtype)
        generation = repair(
            self, built, segments, entries, self.recompute if recompute is None else recompute, suffix, t0
        )  # with a recompute, the question rides in its pass
        if generation is None:
            extra = {} if built.kv_mask is None else {KV_MASK_KWARG: built.kv_mask}
            generation = greedy_decode(
                self.lm.model, suffix, built.cache, built.next_position, self.max_new_tokens, self.stop_ids, t0, **extra
            )
        return self._answer(generation, entries)

    def full_prompt_ids(self, question: str, entries: list[Entry]) -> list[int]:
        ids = list(self.prefix_ids)
        for entry in entries:
            ids += self.tokens.passage(entry.text)
        return ids + self._suffix(question, entries)

    def answer_full(self, question: str, entries: list[Entry]) -> Answer:
        """Baseline: plain prefill of the whole prompt (same token ids), no cache reuse."""
        ids = self.full_prompt_ids(question, entries)
        t0 = time.perf_counter()
        cache = DynamicCache(config=self.lm.config)
        generation = greedy_decode(self.lm.model, ids, cache, 0, self.max_new_tokens, self.stop_ids, t0)
        return self._answer(generation, entries)

    def ask(self, question: str, top_k: int = 3) -> Answer:
        return self.answer_cached(question, self.retrieve(question, top_k))
