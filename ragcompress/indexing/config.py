"""What a store is built with: :class:`IndexConfig` (the user's choice) and the :class:`Manifest`
it becomes, and back again (the compressor and quantization a store's manifest records)."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, fields
from typing import Any

from ragcompress.compressors import Compressor, make_compressor
from ragcompress.errors import InputError
from ragcompress.kv import ModelShape
from ragcompress.kv.lowrank import RankSpec
from ragcompress.kv.quant import QuantConfig
from ragcompress.models import LoadedModel
from ragcompress.prompt import PromptTemplate
from ragcompress.retrieval import DEFAULT_EMBEDDER, embedder_name
from ragcompress.store import Manifest

# Keys of a manifest's ``compression`` object that are not compressor parameters.
_STORE_KEYS = ("method", "quant", "value_quant", "group_size", "lowrank")


# the settings (and their options) that only a low-rank store reads: set away from their
# defaults without a rank, they are refused rather than ignored
LOW_RANK_ONLY = (
    ("calibration", "--calibration"),
    ("calibration_passages", "--calibration-passages"),
    ("rank_schedule", "--rank-schedule"),
    ("rank_values", "--no-rank-values"),
)
_KINDS = {"str": (str,), "int": (int,), "float": (int, float), "bool": (bool,)}


def _check_field_types(config: Any) -> None:
    """Each field of ``config`` of its annotated kind (``ratio="0.5"`` from a parsed settings
    file failed later in a comparison with a bare ``TypeError``). Annotations are read as text
    (``float | None``); a bool is no int or float here, though Python counts it as one."""
    for spec in fields(config):
        value = getattr(config, spec.name)
        names = [name.strip() for name in str(spec.type).split("|")]
        if value is None and "None" in names:
            continue
        kinds = tuple(kind for name in names for kind in _KINDS.get(name, ()))
        if kinds and (not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds)):
            raise TypeError(f"{spec.name} must be {' or '.join(names)}, got {type(value).__name__} {value!r}")


@dataclass(frozen=True)
class IndexConfig:
    """Every setting of a store (all recorded in its manifest).

    method:     compression method (``ragcompress.compressors``), e.g. ``global:kvzip``
    ratio:      fraction of tokens kept, in (0, 1]; or ``budget``: tokens kept per head
    keep_first: leading / trailing tokens of every passage always kept (None: the method's default)
    floor:      ``adaptive:`` / ``global:`` only: the share of the per-head budget every head of every
                layer is guaranteed before the pooled rest goes by score (None: the method's default)
    value_norm: ``adaptive:`` / ``global:`` only: weight each score by its value's norm relative to
                its head before allocating (off by default; docs/compression.md §8)
    quant:      ``none`` | ``fp16`` | ``int8`` | ``int4`` | ``int2`` (KIVI), ``group_size`` its groups;
                ``value_quant``: the values' own integer width (None: ``quant``, as the keys)
    embedder:   sentence-transformers model of the store's FAISS index
    rank / rank_energy: low-rank latents (``ragcompress.kv.lowrank``): a fixed rank per layer, or
                the variance fraction each layer keeps (``rank_schedule``: ``global`` or
                ``progressive`` by depth); ``rank_values`` projects values too; the basis is
                fitted on ``calibration`` (a JSONL file; None: the input) , its first
                ``calibration_passages`` passages
    context_neighbors: encode each passage after its n most similar passages of the indexing
                input (:mod:`ragcompress.indexing.neighbours`); 0 encodes every passage alone
    adaptor:    learned passage adaptor (``ragcompress.distill``): ``default`` (the one packaged
                for the model), ``matching`` (the one packaged for the model and trained for this
                store's method/ratio/quant; the base model, with a warning, when none is), a
                packaged adaptor's name or a folder; None encodes with the base model
    base_copy:  with an adaptor, also store each passage's base-model cache (twice the bytes,
                twice the encoding); the first retrieved passage, which directly follows the
                prefix where the base model's cache is what full prefill computes, is read from
                it (docs/distill.md). Every row kept: no eviction, projection or neighbours
    """

    method: str = "none"
    ratio: float | None = None
    quant: str = "none"
    group_size: int = 32
    value_quant: str | None = None
    budget: int | None = None
    keep_first: int | None = None
    keep_last: int | None = None
    floor: float | None = None
    value_norm: bool = False
    embedder: str = DEFAULT_EMBEDDER
    rank: int | None = None
    rank_energy: float | None = None
    rank_schedule: str = "global"
    rank_values: bool = True
    calibration: str | None = None
    calibration_passages: int = 64
    context_neighbors: int = 0
    adaptor: str | None = None
    base_copy: bool = False

    def __post_init__(self) -> None:
        _check_field_types(self)
        self.quant_config()  # validates quant and group_size
        if self.ratio is not None and not 0.0 < self.ratio <= 1.0:
            raise ValueError(f"ratio must be in (0, 1], got {self.ratio}")
        if self.ratio is not None and self.budget is not None:
            raise ValueError("give either ratio (fraction kept) or budget (tokens kept), not both")
        if not 0 <= self.context_neighbors <= 16:
            raise ValueError(f"context_neighbors must be in [0, 16], got {self.context_neighbors}")
        if not isinstance(self.embedder, str) or not self.embedder.strip():  # "  " failed only when it loaded
            raise ValueError("embedder must name a sentence-transformers model")
        object.__setattr__(self, "embedder", embedder_name(self.embedder))
        self.compressor()  # validates method and its parameters, listing the allowed values
        spec = self.rank_spec()  # validates rank, rank_energy and rank_schedule
        if self.calibration_passages < 1:
            raise ValueError(f"calibration_passages must be positive, got {self.calibration_passages}")
        if spec is None:  # the low-rank options were once ignored without a word
            defaults = {f.name: f.default for f in fields(self)}
            unused = [f"{name} ({flag})" for name, flag in LOW_RANK_ONLY if getattr(self, name) != defaults[name]]
            if unused:
                raise ValueError(
                    f"{', '.join(unused)} {'apply' if len(unused) > 1 else 'applies'} only to a low-rank store: give "
                    "rank or rank_energy "
                    "(--rank, --rank-energy) too, or leave them out"
                )
        if self.base_copy:
            self._check_base_copy()

    def _check_base_copy(self) -> None:
        """A base copy is the exact cache of a passage read first: it needs an adaptor to differ
        from, and a store that keeps it exact (every row, unprojected, encoded alone)."""
        if self.adaptor is None:
            raise ValueError(
                "base_copy (--base-copy) keeps the base model's cache beside an adaptor's: give an adaptor"
            )
        if self.method != "none" or self.budget is not None or (self.ratio is not None and self.ratio < 1.0):
            raise ValueError("base_copy (--base-copy) needs a store that keeps every row: method none, ratio 1")
        if self.rank_spec() is not None or self.context_neighbors:
            raise ValueError("base_copy (--base-copy) needs unprojected passages encoded alone: no rank, no neighbours")

    def rank_spec(self) -> RankSpec | None:
        """The low-rank setting, or None for a store of full rows."""
        if self.rank is None and self.rank_energy is None:
            return None
        return RankSpec(self.rank, self.rank_energy, self.rank_schedule, self.rank_values)

    def compressor(self) -> Compressor:
        params: dict[str, Any] = {} if self.ratio is None else {"ratio": self.ratio}
        for name in ("budget", "keep_first", "keep_last", "floor"):
            if getattr(self, name) is not None:
                params[name] = getattr(self, name)
        if self.value_norm:
            params["value_norm"] = True
        return make_compressor(self.method, **params)

    def quant_config(self) -> QuantConfig:
        return QuantConfig(self.quant, self.group_size, self.value_quant)


# the settings beside the compressor's that differing_settings compares (paths and names, such as an
# adaptor's, are compared by presence: a preset's "matching" and a store's resolved folder are one adaptor)
COMPARED_SETTINGS = (
    "quant",
    "value_quant",
    "group_size",
    "context_neighbors",
    "rank",
    "rank_energy",
    "rank_schedule",
    "rank_values",
    "base_copy",
)


def differing_settings(ours: IndexConfig, theirs: IndexConfig) -> dict[str, tuple[Any, Any]]:
    """``{setting: (ours, theirs)}`` where two configs build different stores: the compressor's
    settings as it resolves them (an unset ``keep_first`` is the method's own default), the
    :data:`COMPARED_SETTINGS` and whether an adaptor encodes the passages."""
    mine, other = ours.compressor().config(), theirs.compressor().config()
    mine.update((key, getattr(ours, key)) for key in COMPARED_SETTINGS)
    other.update((key, getattr(theirs, key)) for key in COMPARED_SETTINGS)
    mine["adaptor"], other["adaptor"] = ours.adaptor is not None, theirs.adaptor is not None
    keys = sorted(
        set(mine) | set(other), key=lambda key: (_HEADLINE.index(key) if key in _HEADLINE else len(_HEADLINE), key)
    )
    return {key: (mine.get(key), other.get(key)) for key in keys if mine.get(key) != other.get(key)}


# what differing_settings lists first: the settings a store is known by (a message shows the first few)
_HEADLINE = ("method", "ratio", "budget", "quant", "value_quant", "rank", "rank_energy", "adaptor", "base_copy")


def config_from_manifest(manifest: Manifest, adaptor: str | None = None) -> IndexConfig:
    """The settings a store was built with, so that passages are added to it without repeating
    them (``ragcompress index`` into an existing store with no setting given, or only
    ``--adaptor``).

    Every setting a manifest records maps back to one :class:`IndexConfig` field; an adaptor is
    recorded by hash only, so it is found among the packaged ones or must be given (``adaptor``:
    its folder or name, checked against the recorded hash when the run starts). The result is
    checked to rebuild the manifest's compression exactly, so nothing is guessed."""
    from ragcompress.distill.packaged import packaged_adaptor_dir
    from ragcompress.errors import InputError

    compression = manifest.compression
    params = {k: v for k, v in compression.items() if k not in _STORE_KEYS}
    lowrank = compression.get("lowrank") or {}
    recorded = manifest.adaptor_hash
    if recorded is not None and adaptor is None:
        found = packaged_adaptor_dir(recorded)
        if found is None:
            raise InputError(
                f"the store was built with adaptor {recorded[:16]}, which is not packaged; "
                "pass its folder with --adaptor (alone, the store's other settings are kept), adaptor= in Python's index()"
            )
        adaptor = str(found)
    config = IndexConfig(
        method=str(compression["method"]),
        quant=str(compression["quant"]),
        group_size=int(compression["group_size"]),
        value_quant=compression.get("value_quant"),
        embedder=manifest.embedder,
        rank=lowrank.get("rank"),
        rank_energy=lowrank.get("energy"),
        rank_schedule=str(lowrank.get("schedule", "global")),
        rank_values=bool(lowrank.get("values", True)),
        context_neighbors=int(manifest.encoding.get("context_neighbors", 0)),
        adaptor=adaptor,
        base_copy=bool(manifest.encoding.get("base_copy", False)),
        **{k: params[k] for k in ("ratio", "budget", "keep_first", "keep_last", "floor") if params.get(k) is not None}
        | ({"value_norm": True} if params.get("value_norm") else {})
        | ({"ratio": None} if params.get("budget") is not None else {}),  # a budget replaces the ratio
    )
    if config.compressor().config() != {"method": compression["method"], **params}:
        raise InputError(
            f"the store's compression {params} cannot be rebuilt from index settings; pass them explicitly"
        )
    return config


def compressor_from_manifest(manifest: Manifest) -> Compressor:
    """The compressor a store was built with, rebuilt from its manifest's ``compression``."""
    compression = manifest.compression
    params = {k: v for k, v in compression.items() if k not in _STORE_KEYS}
    return make_compressor(compression["method"], **params)


def store_quant(quant: QuantConfig) -> dict[str, Any]:
    """A manifest's quantization keys; ``value_quant`` only when values take their own width, so
    the manifests of one-width stores are what they were."""
    out: dict[str, Any] = {"quant": quant.scheme, "group_size": quant.group_size}
    if quant.value_scheme is not None:
        out["value_quant"] = quant.value_scheme
    return out


def check_groups_fit(quant: QuantConfig, head_dim: int, ref: str) -> None:
    """Refuse, before anything is encoded, a value quantization whose groups do not tile the
    model's head_dim (values are grouped along it; keys along tokens, which any length pads)."""
    if quant.scheme == "none":
        return
    group = min(quant.group_size, head_dim)
    if head_dim % group:
        fits = head_dim & -head_dim  # the largest power of two dividing it
        raise InputError(
            f"{ref} has head_dim {head_dim}, which quantization groups of {group} do not divide; "
            f"pass --group-size {fits} (IndexConfig(group_size={fits}))"
        )


def build_manifest(
    lm: LoadedModel, template: PromptTemplate, config: IndexConfig, adaptor_hash: str | None = None
) -> Manifest:
    """The manifest of a store built from ``lm`` with ``config`` (``created`` is now);
    ``adaptor_hash``: the loaded ``config.adaptor``'s hash, recorded under ``encoding``, as is the
    model's dtype when it is not float32 (caches encoded in bfloat16 are not float32's)."""
    compressor = config.compressor()
    shape = ModelShape.from_config(lm.config)
    check_groups_fit(config.quant_config(), shape.head_dim, lm.ref)
    encoding: dict[str, Any] = {"context_neighbors": config.context_neighbors} if config.context_neighbors else {}
    if adaptor_hash is not None:
        encoding["adaptor"] = adaptor_hash
    if config.base_copy and adaptor_hash is not None:  # without an adaptor the store's cache is the base one
        encoding["base_copy"] = True
    if lm.dtype_name != "float32":  # absent for float32: older manifests match
        encoding["dtype"] = lm.dtype_name
    return Manifest(
        model_ref=lm.ref,
        model_fingerprint=lm.fingerprint,
        tokenizer_hash=lm.tokenizer_hash,
        template=template.as_dict(),
        compression={**compressor.config(), **store_quant(config.quant_config())},
        embedder=config.embedder,
        encoding=encoding,
        model_shape=shape.as_dict(),
        created=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    )
