"""What a store is built with: :class:`IndexConfig` (the user's choice) and the :class:`Manifest`
it becomes, and back again (the compressor and quantization a store's manifest records)."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any

from ragcompress.compressors import Compressor, make_compressor
from ragcompress.kv import ModelShape
from ragcompress.kv.quant import QuantConfig
from ragcompress.models import LoadedModel
from ragcompress.prompt import PromptTemplate
from ragcompress.retrieval import DEFAULT_EMBEDDER
from ragcompress.store import Manifest

# Keys of a manifest's ``compression`` object that are not compressor parameters.
_STORE_KEYS = ("method", "quant", "group_size")


@dataclass(frozen=True)
class IndexConfig:
    """Every setting of a store (all recorded in its manifest).

    method:     compression method (``ragcompress.compressors``), e.g. ``global:kvzip``
    ratio:      fraction of tokens kept, in (0, 1]; or ``budget``: tokens kept per head
    keep_first: leading / trailing tokens of every passage always kept (None: the method's default)
    quant:      ``none`` | ``fp16`` | ``int8`` | ``int4`` | ``int2`` (KIVI), ``group_size`` its groups
    embedder:   sentence-transformers model of the store's FAISS index
    """

    method: str = "none"
    ratio: float | None = None
    quant: str = "none"
    group_size: int = 32
    budget: int | None = None
    keep_first: int | None = None
    keep_last: int | None = None
    embedder: str = DEFAULT_EMBEDDER

    def __post_init__(self) -> None:
        self.quant_config()  # validates quant and group_size
        if self.ratio is not None and not 0.0 < self.ratio <= 1.0:
            raise ValueError(f"ratio must be in (0, 1], got {self.ratio}")
        if self.ratio is not None and self.budget is not None:
            raise ValueError("give either ratio (fraction kept) or budget (tokens kept), not both")
        if not self.embedder:
            raise ValueError("embedder must name a sentence-transformers model")
        self.compressor()  # validates method and its parameters, listing the allowed values

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


def build_manifest(lm: LoadedModel, template: PromptTemplate, config: IndexConfig) -> Manifest:
    """The manifest of a store built from ``lm`` with ``config`` (``created`` is now)."""
    compressor = config.compressor()
    return Manifest(
        model_ref=lm.ref,
        model_fingerprint=lm.fingerprint,
        tokenizer_hash=lm.tokenizer_hash,
        template=template.as_dict(),
        compression={**compressor.config(), "quant": config.quant, "group_size": config.group_size},
        embedder=config.embedder,
        model_shape=ModelShape.from_config(lm.config).as_dict(),
        created=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    )
