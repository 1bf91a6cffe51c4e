"""The one write path: passages in, :class:`~ragcompress.store.PassageRecord` objects out.

``index()`` (JSONL and folders) and the LlamaIndex ``KVCacheTransform`` (nodes) both turn
passages into stored caches. They share this class, so both apply the same length limit, encode
batches the same way and compress, quantize and embed with exactly the store's settings. Adding
a step (a new compressor input, a new record field) is then a change in one place.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Container, Iterable
from dataclasses import replace
from functools import cached_property

import numpy as np

from ragcompress.compressors import CompressionContext, Compressor
from ragcompress.compressors.base import check_fits
from ragcompress.compressors.learned import check_scorer
from ragcompress.distill.adaptor import Adaptor
from ragcompress.distill.packaged import (
    GENERAL,
    MATCHING,
    TrainedStore,
    check_store_adaptor,
    matching_adaptor,
    packaged_adaptor,
    packaged_for_store,
    resolve_adaptor,
    trained_store,
)
from ragcompress.errors import InputError, RagCompressWarning, StoreMismatchError, UnstorableCacheError
from ragcompress.indexing.config import IndexConfig, build_manifest, compressor_from_manifest
from ragcompress.indexing.encoder import PassageEncoder
from ragcompress.indexing.inputs import PassageInput
from ragcompress.indexing.neighbours import NeighbourPool
from ragcompress.kv import PassageKV
from ragcompress.kv.lowrank import LowRankBasis, RankSpec
from ragcompress.kv.quant import QuantConfig
from ragcompress.kv.rope import position_limit
from ragcompress.models import LoadedModel
from ragcompress.prompt import PromptTemplate
from ragcompress.retrieval import Embedder, TextEmbedder
from ragcompress.store import KVStore, Manifest, PassageRecord, codec
from ragcompress.store.basis import manifest_entry

# Positions left free after the longest passage: room for the question suffix and a short answer.
POSITION_HEADROOM = 64
# What to do about a passage whose compression probes past the model's positions (check_fits).
PROBE_REMEDY = (
    "split it into shorter passages or index with a --method that does not probe past it (snapkv, "
    "expected-attention, knorm)"
)


def store_of(config: IndexConfig) -> TrainedStore:
    """``config``'s compression as :func:`trained_store` describes an adaptor's (ratio None: a
    ``--budget`` store, tokens per head, never the fraction an adaptor is trained for)."""
    if config.budget is not None:
        ratio = None
    elif config.ratio is not None:
        ratio = float(config.ratio)
    else:  # the method's own default (global:kvzip keeps 0.5 when --ratio is not given)
        ratio = float(config.compressor().config().get("ratio", 1.0))
    spec = config.rank_spec()
    return TrainedStore(
        config.method, ratio, config.quant_config().name, spec.as_dict() if spec else None, config.value_norm
    )


def as_indexed_for(config: IndexConfig, model_ref: str, fingerprint: str | None) -> IndexConfig:
    """``config`` as indexing applies it to the model ``model_ref``: ``--adaptor matching`` with
    no adaptor packaged for that model and store encodes with the base model (:func:`matching_adaptor`),
    so such a store records no adaptor and no base copy; what a preset's store holds is compared
    with this, not with the preset as written."""
    if config.adaptor == MATCHING and packaged_for_store(model_ref, store_of(config), fingerprint) is None:
        return replace(config, adaptor=None, base_copy=False)
    return config


def warn_if_trained_for_another_store(adaptor: Adaptor, config: IndexConfig) -> None:
    """An adaptor trained for one compression (``train --method/--ratio/--quant``) is a
    specialist: uncompressed, SmolLM2's sits twice as far from full prefill as the general
    adaptor (docs/distill.md). Allowed, but said."""
    trained = trained_store(adaptor.meta)
    used = store_of(config)
    if trained.quant is None or trained in (GENERAL, used):
        return  # a general adaptor (trained uncompressed), or the store it was trained for
    warnings.warn(
        f"adaptor {adaptor.hash[:16]} was trained for a store of {describe_store(trained)}, this store is "
        f"{describe_store(used, config.budget)}; under another compression it can be further from full prefill than "
        "the general adaptor (--adaptor default; docs/distill.md)",
        RagCompressWarning,
        stacklevel=3,
    )


def describe_store(store: TrainedStore, budget: int | None = None) -> str:
    """``store`` in a warning: method, kept fraction (or budget), widths, rank, weighting."""
    kept = f"budget {budget}" if store.ratio is None else f"{store.ratio:g}"
    rank = f" rank {store.lowrank}" if store.lowrank else ""
    weighted = " value-weighted" if store.value_norm else ""
    return f"{store.method} {kept} {store.quant}{rank}{weighted}"


class Indexer:
    """Encodes, compresses, quantizes and embeds passages for one store.

    Build it with :meth:`from_config` (a new store) or :meth:`for_store` (adding to an existing
    one, with the settings its manifest records). The prefix cache is computed on first use, so a
    store's manifest can be checked before the model runs.
    """

    def __init__(
        self,
        lm: LoadedModel,
        template: PromptTemplate,
        compressor: Compressor,
        quant: QuantConfig,
        embedder: TextEmbedder,
        manifest: Manifest,
        adaptor: Adaptor | None = None,
    ) -> None:
        self.lm = lm
        self.adaptor = adaptor
        self.template = template
        self.compressor = compressor
        self.quant = quant
        self.embedder = embedder
        self._manifest = manifest
        self.context_neighbors = int(manifest.encoding.get("context_neighbors", 0))
        self.base_copy = bool(manifest.encoding.get("base_copy", False))

    @classmethod
    def from_config(cls, lm: LoadedModel, config: IndexConfig, embedder: TextEmbedder | None = None) -> Indexer:
        """An indexer for a store built from ``lm`` with ``config`` (template from the tokenizer).

        ``embedder`` (a loaded one to share) must be the model ``config.embedder`` names.
        """
        if embedder is None:
            embedder = Embedder(config.embedder)
        elif embedder.name != config.embedder:
            raise ValueError(
                f"embedder {embedder.name!r} is not the one the config names ({config.embedder!r}); "
                f"pass IndexConfig(embedder={embedder.name!r}) or leave the embedder out"
            )
        template = PromptTemplate.from_tokenizer(lm.tokenizer)
        if config.adaptor == MATCHING:
            adaptor = matching_adaptor(lm.ref, store_of(config), lm.fingerprint)
        else:
            adaptor = resolve_adaptor(config.adaptor, lm.ref, lm.fingerprint) if config.adaptor else None
        if adaptor is not None:
            adaptor.check_model(lm.fingerprint, lm.ref)
            warn_if_trained_for_another_store(adaptor, config)
        compressor = config.compressor()
        check_scorer(compressor, adaptor, config.adaptor)  # before a store is created for it
        manifest = build_manifest(lm, template, config, adaptor.hash if adaptor else None)
        return cls(lm, template, compressor, config.quant_config(), embedder, manifest, adaptor)

    @classmethod
    def for_store(
        cls, manifest: Manifest, lm: LoadedModel, embedder: TextEmbedder | None = None, adaptor: Adaptor | None = None
    ) -> Indexer:
        """An indexer that adds to the store ``manifest`` describes, with the settings it records.

        ``lm`` must be the store's model and tokenizer, ``embedder`` (if given) the store's
        embedder, ``adaptor`` the adaptor the store was built with (if any): a store never mixes
        caches or vectors of two models or two adaptors (``StoreMismatchError``).
        """
        manifest.check_lm(lm)
        if lm.dtype_name != (manifest.dtype or "float32"):
            raise StoreMismatchError(
                f"store's passages were encoded with the model in {manifest.dtype or 'float32'}, and {lm.ref} is "
                f"loaded in {lm.dtype_name}: its caches would not match theirs; load it in "
                f"{manifest.dtype or 'float32'} (--dtype) to add passages"
            )
        recorded = manifest.adaptor_hash
        if adaptor is None:  # a packaged adaptor is found by its hash
            adaptor = packaged_adaptor(recorded)
        check_store_adaptor(recorded, adaptor.hash if adaptor else None)
        if embedder is None:
            embedder = Embedder(manifest.embedder)
        else:
            manifest.check_embedder(embedder.name)
        template = PromptTemplate.from_dict(manifest.template)
        compressor = compressor_from_manifest(manifest)
        check_scorer(compressor, adaptor)  # a store created for it before this was checked holds nothing
        return cls(lm, template, compressor, manifest.quant, embedder, manifest, adaptor)

    basis: LowRankBasis | None = None  # a low-rank store's basis (:meth:`with_basis`)

    def with_basis(self, basis: LowRankBasis, spec: RankSpec, calibration: str) -> Indexer:
        """This indexer writing latents of ``basis`` (fitted with ``spec`` on ``calibration``),
        its manifest recording the basis's hash and ranks (``compression.lowrank``)."""
        other = copy.copy(self)
        lowrank = manifest_entry(basis, spec.as_dict(), calibration)
        other._manifest = replace(self._manifest, compression={**self._manifest.compression, "lowrank": lowrank})
        other.basis = basis
        return other

    def with_store_basis(self, store: KVStore) -> Indexer:
        """This indexer writing latents of ``store``'s basis, as its manifest describes them
        (an indexer joining a store someone else created, e.g. a Ray actor); unchanged for a
        store of full rows."""
        lowrank = store.manifest.compression.get("lowrank")
        if store.basis is None or not isinstance(lowrank, dict):
            return self
        return self.with_basis(store.basis, RankSpec.from_dict(lowrank), str(lowrank["calibration"]))

    @property
    def manifest(self) -> Manifest:
        """The store's manifest (for :meth:`from_config`, the one a new store gets)."""
        return self._manifest

    @cached_property
    def encoder(self) -> PassageEncoder:
        """Computes the prefix cache when first used."""
        return PassageEncoder(self.lm, self.template, self.adaptor)

    @cached_property
    def calibration_encoder(self) -> PassageEncoder:
        """The encoder a low-rank basis is fitted with: the base model's, adaptor or not. A
        student trained for a low-rank store (``train --kv-rank``) projects on a basis fitted on
        base-model caches while its adaptor moves; fitting the store's basis the same way keeps
        what the runtime serves what the student was trained to read."""
        return self.encoder.without_adaptor()

    @property
    def prefix_kv(self) -> PassageKV:
        return self.encoder.prefix_kv

    @property
    def max_tokens(self) -> int:
        """The longest passage (in tokens) that still fits the model's positions after the prefix
        (:func:`~ragcompress.kv.rope.position_limit`: LongRoPE's original length)."""
        positions = position_limit(self.lm.config)
        return positions - self.encoder.prefix_len - POSITION_HEADROOM

    def check_lengths(self, passages: Iterable[PassageInput], stored: bool = True) -> None:
        """Raise ``InputError`` naming the first passage longer than :attr:`max_tokens`, or one
        the compressor cannot score within the model's positions (:func:`check_fits`: KVzip's
        probe reaches about twice the passage; ``stored`` False: passages only encoded, a
        low-rank basis's own calibration sample): before a run starts writing (tokenizing costs
        a fraction of a percent of encoding), so such a passage does not stop a run midway and
        leave an existing store marked unfinished, refused by every reader until the input is fixed."""
        for passage in passages:
            try:
                self._check_length(passage, self.encoder.tokens.passage(passage.text), stored)
            except InputError as exc:
                raise InputError(f"{exc} (nothing was written)") from None

    def _check_length(self, passage: PassageInput, token_ids: list[int], stored: bool = True) -> None:
        if len(token_ids) > self.max_tokens:
            raise InputError(
                f"passage {passage.id!r} has {len(token_ids)} tokens, more than {self.lm.ref} "
                f"can attend to ({self.max_tokens}); split it"
            )
        if stored:
            check_fits(self.compressor, self.encoder, passage.id, token_ids, PROBE_REMEDY)

    def neighbour_pool(self, passages: list[PassageInput]) -> NeighbourPool:
        """The pool neighbour-conditioned encoding draws from (embeds every passage once)."""
        token_ids = [self.encoder.tokens.passage(p.text) for p in passages]
        return NeighbourPool([p.id for p in passages], token_ids, self.embedder.embed([p.text for p in passages]))

    def records(
        self, passages: list[PassageInput], skip: Container[str] = (), pool: NeighbourPool | None = None
    ) -> list[PassageRecord]:
        """Records of ``passages`` whose id is not in ``skip``, in input order.

        Every passage is tokenized, checked, encoded and embedded in one batch, the skipped ones
        too: a cache's bits (and an embedding's last bits: the embedder pads a batch to its
        longest text) can depend on the batch it was computed in, so computing the whole
        input-order batch means a passage's cache and vector never depend on what a killed run
        had finished or which passages of its batch ``--replace`` re-encodes, and a resumed or
        replaced store is byte-identical to an uninterrupted fresh build.

        pool: where a store with ``context_neighbors`` draws each passage's encoding neighbours
        from (:meth:`neighbour_pool` of the whole input); by default these ``passages`` themselves.
        A context that would carry prefix + context + passage past :attr:`max_tokens` keeps only
        its last tokens (those nearest the passage): positions beyond the model's are meaningless.
        """
        if all(p.id in skip for p in passages):
            return []
        if self.basis is None and "lowrank" in self._manifest.compression:
            raise StoreMismatchError("a low-rank store's passages need its basis: use indexer.with_basis(store.basis)")
        token_ids = [self.encoder.tokens.passage(p.text) for p in passages]
        for passage, ids in zip(passages, token_ids, strict=True):
            self._check_length(passage, ids)
        todo = [i for i, p in enumerate(passages) if p.id not in skip]
        if self.context_neighbors:
            pool = pool or self.neighbour_pool(passages)
            rows = [pool.row_of(p.id) for p in passages]
            missing = [i for i, row in enumerate(rows) if row < 0]
            all_vectors = np.zeros((len(passages), pool.vectors.shape[1]), dtype=np.float32)
            for i, row in enumerate(rows):
                if row >= 0:
                    all_vectors[i] = pool.vectors[row]
            if missing:
                all_vectors[missing] = self.embedder.embed([passages[i].text for i in missing])
            contexts = pool.contexts([p.id for p in passages], all_vectors, self.context_neighbors)
            # the neighbours' tokens nearest the passage, as many as fit the model's positions
            contexts = [
                ctx[max(0, len(ctx) - (self.max_tokens - len(ids))) :]
                for ctx, ids in zip(contexts, token_ids, strict=True)
            ]
            caches = self.encoder.encode(token_ids, contexts)
            vectors = all_vectors[todo]
        else:
            caches = self.encoder.encode(token_ids)
            vectors = np.asarray(self.embedder.embed([p.text for p in passages]))[todo]
        # a base copy: the same batch through the base model (config._check_base_copy: every row kept)
        base = self.encoder.without_adaptor().encode(token_ids) if self.base_copy else None
        records = []
        for i, vector in zip(todo, vectors, strict=True):
            passage = passages[i]
            kept = self.compressor.compress(caches[i], CompressionContext(self.encoder, token_ids[i]))
            records.append(passage_record(passage, kept, self.quant, vector, self.basis, base[i] if base else None))
        return records


def passage_record(
    passage: PassageInput,
    kept: PassageKV,
    quant: QuantConfig,
    embedding: np.ndarray,
    basis: LowRankBasis | None = None,
    base: PassageKV | None = None,
) -> PassageRecord:
    """The record of ``passage`` whose (already compressed) cache is ``kept``, serialised with
    ``quant`` (as latents of ``basis`` when given; ``base``: its base copy, ``codec.encode``):
    what :meth:`Indexer.records` produces, for callers that compress caches themselves. A cache
    the codec refuses (inf or NaN, a value beyond fp16's range for fp16 or an integer scheme) is
    an :class:`~ragcompress.errors.UnstorableCacheError` naming the passage: the CLI's one line."""
    try:
        blob = codec.encode(kept, quant, basis, base)
    except UnstorableCacheError as exc:
        raise UnstorableCacheError(f"passage {passage.id!r}: {exc}, or leave the passage out of the input") from None
    return PassageRecord(
        id=passage.id,
        title=passage.title,
        text=passage.text,
        meta=passage.meta,
        text_sha=passage.text_sha,
        blob=blob,
        num_tokens=kept.num_tokens,
        kept=kept.kept_tokens,
        embedding=embedding,
    )
