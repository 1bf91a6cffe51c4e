"""Preparation: retrieved entries and the question's tokens -> a :class:`Prepared` request.

Two strategies put the stored caches in front of the question, behind one small protocol
(:class:`Strategy`):

* :class:`DenseStrategy`: every segment is dequantized, re-rotated and written into one
  transformers cache after the prefix (``assemble.py``), one segment at a time; the optional
  repair (selective recompute, APE temperature, ``recompute.py``) edits that cache and may
  prefill the question in its own pass. Caches never stored (the benchmarks compress them in
  memory) take the same path from their prefix (:class:`PrefixContext`,
  :meth:`DenseStrategy.prepare_segments`).
* :class:`PackedStrategy`: segments stay quantized and packed (``packed.py``); the cache holds
  only the prefix, and the registered attention reads the segments through the fused Triton
  kernel (``triton``) or its PyTorch reference (``torch``).

:func:`choose_strategy` maps :attr:`AnswerOptions.backend` to one of them, refusing
combinations that cannot run instead of silently running another path.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Protocol

import torch
from transformers import DynamicCache

from ragcompress.errors import InputError, StoreError
from ragcompress.kv import PassageKV
from ragcompress.kv.cache import build_preallocated_cache
from ragcompress.kv.rope import Rotary
from ragcompress.kv.shape import ModelShape
from ragcompress.models import LoadedModel
from ragcompress.prompt import PromptTemplate, PromptTokens
from ragcompress.runtime.assemble import assemble
from ragcompress.runtime.attention import PACKED_KWARG, logit_softcap, per_head_window_problem, sliding_window
from ragcompress.runtime.generate import Prepared
from ragcompress.runtime.latent_packed import LatentPackedSegments
from ragcompress.runtime.options import AnswerOptions
from ragcompress.runtime.packed import PackedSegments
from ragcompress.runtime.recompute import RecomputeConfig, repair
from ragcompress.store import KVStore
from ragcompress.store.catalogue import Entry
from ragcompress.store.codec import Segment
from ragcompress_kernels import triton_runs_on, triton_supports_head_dim


@dataclass(frozen=True)
class PrefixContext:
    """What every question after one shared prefix shares, placed once: the store-free part of a
    :class:`QueryContext`, which is all the dense strategy's cache needs
    (:meth:`DenseStrategy.prepare_segments`). Caches that are not read from a store (the
    benchmarks compress them in memory) are answered through it, down the library's own path.

    prefix:      the shared prefix cache (keys un-rotated; values on the model's device)
    prefix_keys: ``[layers, kv_heads, P, head_dim]`` prefix keys rotated to ``0..P-1``, on the
                 model's device
    """

    lm: LoadedModel
    tokens: PromptTokens
    rotary: Rotary
    prefix: PassageKV
    prefix_keys: torch.Tensor
    prefix_ids: list[int]

    @classmethod
    def from_prefix(cls, lm: LoadedModel, tokens: PromptTokens, prefix: PassageKV) -> PrefixContext:
        """Place ``prefix``, the cache of ``tokens.prefix()`` (keys un-rotated, on any device),
        on ``lm``'s device with its keys rotated, once."""
        rotary = Rotary(lm.model)
        device = lm.model.device
        prefix_keys = rotary.rotate_layers(prefix.keys, prefix.positions).to(device)
        prefix = replace(prefix, values=prefix.values.to(device))
        return PrefixContext(lm, tokens, rotary, prefix, prefix_keys, tokens.prefix())

    @property
    def dtype(self) -> torch.dtype:
        return self.lm.model.dtype

    def prefix_cache(self, spare_rows: int) -> DynamicCache:
        """A cache holding a copy of the rotated prefix and room for ``spare_rows`` more tokens."""
        return self.empty_cache(self.prefix_keys, self.prefix.values, spare_rows)

    def empty_cache(self, keys: torch.Tensor, values: torch.Tensor, spare_rows: int) -> DynamicCache:
        """A preallocated cache holding ``keys``/``values`` ``[layers, kv_heads, n, d]`` (may be
        empty) and room for ``spare_rows`` more tokens written in place."""
        return preallocated_cache(self.lm, keys, values, spare_rows)


@dataclass(frozen=True)
class QueryContext(PrefixContext):
    """What every question over one store shares, computed once when an engine opens: the store
    and its prefix, placed (:class:`PrefixContext`)."""

    store: KVStore

    @classmethod
    def create(cls, store: KVStore, lm: LoadedModel) -> QueryContext:
        """Check that ``lm`` is the store's model, then place the prefix once."""
        store.manifest.check_lm(lm)
        tokens = PromptTokens(PromptTemplate.from_dict(store.manifest.template), lm.tokenizer)
        placed = PrefixContext.from_prefix(lm, tokens, store.prefix_kv(lm.model.dtype))
        if len(placed.prefix_ids) != placed.prefix.num_tokens:
            raise StoreError(
                f"store {store.path}: prefix cache has {placed.prefix.num_tokens} tokens, "
                f"the template gives {len(placed.prefix_ids)}; rebuild the store"
            )
        return cls(**vars(placed), store=store)


def preallocated_cache(lm: LoadedModel, keys: torch.Tensor, values: torch.Tensor, spare_rows: int) -> DynamicCache:
    """A cache of ``lm``'s dtype and device holding ``keys``/``values`` ``[layers, kv_heads, n, d]``
    (``n`` may be 0) and room for ``spare_rows`` more tokens written in place."""
    layers, heads, filled, d = keys.shape
    shape = (layers, heads, filled + spare_rows, d)
    key_buffer = torch.empty(shape, dtype=lm.model.dtype, device=lm.model.device)
    value_buffer = torch.empty(shape, dtype=lm.model.dtype, device=lm.model.device)
    key_buffer[:, :, :filled] = keys
    value_buffer[:, :, :filled] = values
    return build_preallocated_cache(
        lm.config,
        [key_buffer[layer].unsqueeze(0) for layer in range(layers)],
        [value_buffer[layer].unsqueeze(0) for layer in range(layers)],
        filled,
    )


class Strategy(Protocol):
    """Turns retrieved entries and the question's suffix into a :class:`Prepared` request.

    ``passage_ids``: the entries' token ids where the request reads them (a selective recompute;
    the near-tie fallback, which this protocol does not see), else empty; tokenized by the caller
    before the request's clock starts, as the full prefill's prompt is."""

    def prepare(
        self,
        context: QueryContext,
        entries: list[Entry],
        suffix: list[int],
        max_new_tokens: int,
        passage_ids: list[list[int]],
    ) -> Prepared: ...


@dataclass(frozen=True)
class DenseStrategy:
    """Dequantize, re-rotate and assemble one transformers cache; then the optional repair.

    Every retrieved blob is parsed first (still quantized, as stored), the cache is allocated
    from their lengths, and then each passage is dequantized, written and dropped in turn: the
    request's peak memory is about the cache plus one dense passage (and the quantized blobs),
    not the cache plus every passage dequantized (2-3x the cache when they were all loaded
    first). The repair needs only where each passage's rows are (:func:`_layout`), not its data.

    ``keep_first``: hand the first passage's cache on in :attr:`Prepared.first_passage`, for the
    near-tie fallback (:func:`fallback_prefill`) to reuse instead of reading its blob again; off
    otherwise, so that a decode does not hold a copy of a passage its cache already holds."""

    recompute: RecomputeConfig = RecomputeConfig()
    keep_first: bool = False

    def prepare(
        self,
        context: QueryContext,
        entries: list[Entry],
        suffix: list[int],
        max_new_tokens: int,
        passage_ids: list[list[int]],
    ) -> Prepared:
        # the first passage directly follows the prefix: a store's base copy of it, if it has one
        parsed = {i: context.store.read_segment(entry, first=i == 0) for i, entry in enumerate(entries)}

        def load(i: int) -> PassageKV:  # its quantized tensors go once it is dequantized
            return context.store.dequantize(entries[i], parsed.pop(i), context.dtype)

        layouts = [_layout(segment) for segment in parsed.values()]
        exact = context.store.manifest.passages_exact
        return self.prepare_segments(context, layouts, suffix, max_new_tokens, passage_ids, load, first_exact=exact)

    def prepare_segments(
        self,
        context: PrefixContext,
        segments: list[PassageKV],
        suffix: list[int],
        max_new_tokens: int,
        passage_ids: list[list[int]],
        load: Callable[[int], PassageKV] | None = None,
        *,
        first_exact: bool = False,
    ) -> Prepared:
        """:meth:`prepare` from the passages' caches rather than a store's entries: ``segments``
        (keys un-rotated, as :meth:`KVStore.load_kv` returns them), or, with ``load``, their
        layouts, each loaded by ``load(j)`` as it is written (:func:`assemble`). What a caller
        whose caches were never stored (a benchmark compressing them in memory) answers through,
        with every check and repair of the stored path. ``first_exact``: a uniform first segment
        is what full prefill computes for its passage (:attr:`Manifest.passages_exact`), so the
        selective recompute leaves it alone."""
        kept: list[PassageKV] = []

        def read(i: int) -> PassageKV:
            kv = segments[i] if load is None else load(i)
            if i == 0 and self.keep_first:
                kept.append(kv)
            return kv

        spare = len(suffix) + max_new_tokens
        built = assemble(
            context.lm.config,
            context.rotary,
            context.prefix_keys,
            context.prefix,
            segments,
            context.dtype,
            spare,
            read,
        )
        window = sliding_window(context.lm.config)
        if self.recompute.recomputes and window is not None and built.next_position + len(suffix) >= window:
            raise InputError(
                f"selective recompute does not apply the model's sliding window ({window} tokens), and this "
                f"prompt spans {built.next_position + len(suffix)}; answer without --recompute, or retrieve "
                "fewer passages"
            )
        if window is not None and built.kv_mask is not None:
            rows = max(mask.shape[-1] for mask in built.kv_mask) + spare
            if rows >= window:  # its layers keep the last window - 1 rows, which the per-head row masks do not follow
                raise InputError(
                    f"{per_head_window_problem(window)}: this request needs "
                    f"{rows} rows; retrieve fewer passages, generate fewer tokens, or use a store of whole "
                    "passages (--method none) for this model"
                )
        first_logits = repair(
            context.lm.model,
            context.rotary,
            built,
            context.prefix,
            segments,
            passage_ids,
            self.recompute,
            first_exact=first_exact,
            suffix=suffix,
        )
        first = kept[0] if kept else None
        return Prepared(
            built.cache, suffix, built.next_position, built.attention_kwargs(), first_logits, "dense", first
        )


def _layout(segment: Segment) -> PassageKV:
    """Where ``segment``'s rows go, without its data: the positions and lengths that
    :meth:`Segment.dense` returns with it, keys and values shape-only on the ``meta`` device
    (reading them raises). What :func:`assemble` sizes the cache from and the recompute's
    :class:`~ragcompress.runtime.cache_pass.CacheLayout` reads, before (and instead of) the
    dequantized passage."""
    layers, heads = segment.lengths.shape
    shape = torch.empty((layers, heads, segment.n_max, segment.head_dim), device="meta")
    return PassageKV(shape, shape, segment.positions, segment.lengths, segment.num_tokens)


@dataclass(frozen=True)
class PackedStrategy:
    """Keep the segments quantized and packed; attention reads them through ``kernel``
    (``triton``: the fused kernel, CUDA only; ``torch``: its PyTorch reference)."""

    kernel: str = "torch"

    def prepare(
        self,
        context: QueryContext,
        entries: list[Entry],
        suffix: list[int],
        max_new_tokens: int,
        passage_ids: list[list[int]],  # no recompute on this path (choose_strategy): unused
    ) -> Prepared:
        device = context.lm.model.device
        start = context.prefix.num_tokens
        packed: PackedSegments | LatentPackedSegments
        if context.store.basis is not None:  # low-rank latents: rebuilt inside attention
            segments = [context.store.read_segment(entry, first=i == 0) for i, entry in enumerate(entries)]
            packed = LatentPackedSegments.from_segments(
                segments, context.store.basis, start, context.rotary, device, self.kernel
            )
        else:
            blobs = [context.store.load_packed(entry, first=i == 0) for i, entry in enumerate(entries)]
            packed = PackedSegments.from_blobs(blobs, start, context.rotary, device, self.kernel)
        window = sliding_window(context.lm.config)
        if window is not None and packed.next_position + len(suffix) + max_new_tokens > window:
            raise InputError(
                f"the prompt and answer span up to {packed.next_position + len(suffix) + max_new_tokens} tokens, "
                f"beyond the model's sliding window of {window}, which the packed backends do not apply; "
                "use backend dense"
            )
        cache = context.prefix_cache(len(suffix) + max_new_tokens)
        return Prepared(cache, suffix, packed.next_position, {PACKED_KWARG: packed}, None, f"packed-{self.kernel}")


def full_prefill(context: QueryContext, prompt_ids: list[int], max_new_tokens: int) -> Prepared:
    """The baseline: an empty cache and the whole prompt to prefill, no reuse at all (the cache
    preallocated like the cached path's, so decoding costs the same on both sides)."""
    return plain_prefill(context.lm, prompt_ids, max_new_tokens)


def plain_prefill(lm: LoadedModel, prompt_ids: list[int], max_new_tokens: int) -> Prepared:
    """:func:`full_prefill` without a store: what a plain LLM call runs (the LlamaIndex baseline
    LLM, the benchmarks' text-only prompts), decoded on the same preallocated cache."""
    shape = ModelShape.from_config(lm.config)
    empty = torch.empty((shape.layers, shape.kv_heads, 0, shape.head_dim), dtype=lm.model.dtype)
    cache = preallocated_cache(lm, empty, empty, len(prompt_ids) + max_new_tokens)
    return Prepared(cache, prompt_ids, 0, {}, None, "full")


def prefix_cached_prefill(
    context: QueryContext,
    prompt_ids: list[int],
    max_new_tokens: int,
    first: PassageKV | None = None,
    backend: str = "full-prefix-cached",
) -> Prepared:
    """The fair peer of a serving engine with automatic prefix caching: the shared prefix's cache
    is reused, everything after it (passages and question) is prefilled. ``first``: the first
    passage's cache, exact after the prefix, reused too (:func:`fallback_prefill`); then only
    what follows it is prefilled."""
    prefix = context.prefix.num_tokens
    if prompt_ids[:prefix] != context.prefix_ids:
        raise ValueError("the prompt does not start with the store's prefix")
    if first is None:
        cache = context.prefix_cache(len(prompt_ids) - prefix + max_new_tokens)
        return Prepared(cache, prompt_ids[prefix:], prefix, {}, None, backend)
    rest = prompt_ids[prefix + first.num_tokens :]
    built = assemble(
        context.lm.config,
        context.rotary,
        context.prefix_keys,
        context.prefix,
        [first],
        context.dtype,
        len(rest) + max_new_tokens,
    )
    return Prepared(built.cache, rest, built.next_position, built.attention_kwargs(), None, backend)


def fallback_prefill(
    context: QueryContext, first: Entry, prompt_ids: list[int], max_new_tokens: int, read: PassageKV | None = None
) -> Prepared:
    """The full prefill that answers a question whose first token from the stored caches was a
    near tie (``AnswerOptions.fallback_margin``, ``Engine.stream_cached``), reusing what is
    already exact: the shared prefix, and the first retrieved passage when the store's passages
    are exact after the prefix (:attr:`Manifest.passages_exact`: its stored cache, or base copy,
    is what full prefill computes for it, up to 8-bit rounding) and it kept every row. Only the
    other passages and the question are prefilled then: at top-3 about a third less than
    :func:`prefix_cached_prefill`, which it is otherwise. ``read``: ``first``'s cache as the
    cached request already read it (``load_kv(first, context.dtype, first=True)``), so that its
    blob is read from disk once per query."""
    segment = None
    if context.store.manifest.passages_exact:
        segment = read if read is not None else context.store.load_kv(first, context.dtype, first=True)
    exact = segment if segment is not None and segment.is_uniform else None
    return prefix_cached_prefill(context, prompt_ids, max_new_tokens, exact, backend="fallback")


def choose_strategy(context: QueryContext, options: AnswerOptions) -> DenseStrategy | PackedStrategy:
    """The strategy ``options.backend`` names; ``auto`` is the dense path everywhere.

    Why not the fused kernel on CUDA: its first GPU timing (H200, ``docs/results/gpu_check_h200.json``,
    docs/kernels.md "Measured on an H200") put one attention call over int4/int8 segments at
    0.10-0.31 ms in decode, 5-25x slower than SDPA over the fp16 cache the dense path assembles
    once per request (0.012-0.023 ms), and int4 prefill behind even dequantize-then-SDPA from 2k
    tokens. ``packed-triton`` stays an explicit choice (it keeps the caches quantized in GPU
    memory); ``auto`` should pick it again only when a timing says it is faster."""
    quantized = context.store.quant.bits is not None
    softcap = logit_softcap(context.lm.config)
    head_dim = context.prefix_keys.shape[-1]
    backend = "dense" if options.backend == "auto" else options.backend
    if backend == "dense":
        return DenseStrategy(options.recompute)
    if not quantized:
        raise InputError(f"backend {backend} needs a quantized store (int8/int4/int2); use backend dense")
    if softcap is not None:
        raise InputError(
            f"backend {backend} does not apply the model's attention logit softcap ({softcap}); use backend dense"
        )
    if options.recompute.recomputes:
        raise InputError(f"selective recompute edits an assembled cache; use backend dense, not {backend}")
    if options.recompute.temperature != 1.0:
        raise InputError(
            f"the attention temperature {options.recompute.temperature} (the store's `ragcompress calibrate` "
            f"result, or the request's) scales an assembled cache; use backend dense, not {backend}, or answer "
            "without it (--no-calibrate; AnswerOptions(calibrate=False))"
        )
    if backend == "packed-triton" and not triton_supports_head_dim(head_dim):
        raise InputError(
            f"backend packed-triton needs head_dim a power of two >= 16, the model's is {head_dim}; "
            "use backend packed-torch or dense"
        )
    if backend == "packed-triton" and not triton_runs_on(context.lm.model.device):
        raise InputError("backend packed-triton needs triton and the model on a CUDA device (or TRITON_INTERPRET=1)")
    if (
        backend == "packed-triton"
        and context.lm.model.device.type != "cuda"
        and context.lm.model.dtype == torch.bfloat16
    ):
        from ragcompress_kernels.quantized_attention import INTERPRETER_BF16_FLAW

        raise InputError(  # resolve_backend's refusal, in the runtime's words, before anything runs
            f"{INTERPRETER_BF16_FLAW}, so packed-triton cannot answer with bfloat16 weights on the CPU; "
            "use backend packed-torch or dense, or float32 weights"
        )
    return PackedStrategy(backend.removeprefix("packed-"))
