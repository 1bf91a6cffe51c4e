"""What a store is built with: :class:`IndexConfig` (the user's choice) and the :class:`Manifest`
it becomes, and back again (the compressor and quantization a store's manifest records)."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any

from ragcompress.compressors import Compressor, make_compressor
from ragcompress.kv import ModelShape
from ragcompress.kv.lowrank import RankSpec
from ragcompress.kv.quant import QuantConfig
from ragcompress.models import LoadedModel
from ragcompress.prompt import PromptTemplate
from ragcompress.retrieval import DEFAULT_EMBEDDER
from ragcompress.store import Manifest

# Keys of a manifest's ``compression`` object that are not compressor parameters.
_STORE_KEYS = ("method", "quant", "group_size", "lowrank")


@dataclass(frozen=True)
class IndexConfig:
    """Every setting of a store (all recorded in its manifest).

    method:     compression method (``ragcompress.compressors``), e.g. ``global:kvzip``
    ratio:      fraction of tokens kept, in (0, 1]; or ``budget``: tokens kept per head
    keep_first: leading / trailing tokens of every passage always kept (None: the method's default)
    quant:      ``none`` | ``fp16`` | ``int8`` | ``int4`` | ``int2`` (KIVI), ``group_size`` its groups
    embedder:   sentence-transformers model of the store's FAISS index
    rank / rank_energy: low-rank latents (``ragcompress.kv.lowrank``): a fixed rank per layer, or
                the variance fraction each layer keeps (``rank_schedule``: ``global`` or
                ``progressive`` by depth); ``rank_values`` projects values too; the basis is
                fitted on ``calibration`` (a JSONL file; None: the input) , its first
                ``calibration_passages`` passages
    context_neighbors: encode each passage after its n most similar passages of the indexing
                input (:mod:`ragcompress.indexing.neighbours`); 0 encodes every passage alone
    adaptor:    learned passage adaptor (``ragcompress.distill``): ``default`` (the one packaged
                for the model), a packaged model name or a folder; None encodes with the base model
    """

    method: str = "none"
    ratio: float | None = None
    quant: str = "none"
    group_size: int = 32
    budget: int | None = None
    keep_first: int | None = None
    keep_last: int | None = None
    embedder: str = DEFAULT_EMBEDDER
    rank: int | None = None
    rank_energy: float | None = None
    rank_schedule: str = "global"
    rank_values: bool = True
    calibration: str | None = None
    calibration_passages: int = 64
    context_neighbors: int = 0
    adaptor: str | None = None

    def __post_init__(self) -> None:
        self.quant_config()  # validates quant and group_size
        if self.ratio is not None and not 0.0 < self.ratio <= 1.0:
            raise ValueError(f"ratio must be in (0, 1], got {self.ratio}")
        if self.ratio is not None and self.budget is not None:
            raise ValueError("give either ratio (fraction kept) or budget (tokens kept), not both")
        if not 0 <= self.context_neighbors <= 16:
            raise ValueError(f"context_neighbors must be in [0, 16], got {self.context_neighbors}")
        if not self.embedder:
            raise ValueError("embedder must name a sentence-transformers model")
        self.compressor()  # validates method and its parameters, listing the allowed values
        self.rank_spec()  # validates rank, rank_energy and rank_schedule
        if self.calibration_passages < 1:
            raise ValueError(f"calibration_passages must be positive, got {self.calibration_passages}")

    def rank_spec(self) -> RankSpec | None:
        """The low-rank setting, or None for a store of full rows."""
        if self.rank is None and self.rank_energy is None:
            return None
        return RankSpec(self.rank, self.rank_energy, self.rank_schedule, self.rank_values)

    def compressor(self) -> Compressor:
        params: dict[str, Any] = {} if self.ratio is None else {"ratio": self.ratio}
        for name in ("budget", "keep_first", "keep_last"):
            if getattr(self, name) is not None:
                params[name] = getattr(self, name)
        return make_compressor(self.method, **params)

    def quant_config(self) -> QuantConfig:
        return QuantConfig(self.quant, self.group_size)


def compressor_from_manifest(manifest: Manifest) -> Compressor:
    """The compressor a store was built with, rebuilt from its manifest's ``compression``."""
    compression = manifest.compression
    params = {k: v for k, v in compression.items() if k not in _STORE_KEYS}
    return make_compressor(compression["method"], **params)


def build_manifest(
    lm: LoadedModel, template: PromptTemplate, config: IndexConfig, adaptor_hash: str | None = None
) -> Manifest:
    """The manifest of a store built from ``lm`` with ``config`` (``created`` is now);
    ``adaptor_hash``: the loaded ``config.adaptor``'s hash, recorded under ``encoding``."""
    compressor = config.compressor()
    encoding: dict[str, Any] = {"context_neighbors": config.context_neighbors} if config.context_neighbors else {}
    if adaptor_hash is not None:
        encoding["adaptor"] = adaptor_hash
    return Manifest(
        model_ref=lm.ref,
        model_fingerprint=lm.fingerprint,
        tokenizer_hash=lm.tokenizer_hash,
        template=template.as_dict(),
        compression={**compressor.config(), "quant": config.quant, "group_size": config.group_size},
        embedder=config.embedder,
        encoding=encoding,
        model_shape=ModelShape.from_config(lm.config).as_dict(),
        created=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    )
