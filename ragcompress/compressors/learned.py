"""``learned``: token scores from the adaptor's learned retention scorer (``ragcompress.distill``).

The scorer is part of a trained adaptor (``ragcompress train``), so this method needs a store
built with one (``--adaptor``): it reads the encoder's adaptor. Its scores are predicted KVzip
scores (``ragcompress.distill.scorer``); use it as ``global:learned`` like ``global:kvzip``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from ragcompress.compressors.base import CompressionContext, Compressor
from ragcompress.compressors.scorer import ScorerCompressor
from ragcompress.errors import InputError
from ragcompress.kv import PassageKV

if TYPE_CHECKING:
    from ragcompress.distill.adaptor import Adaptor


@dataclass(frozen=True)
class LearnedCompressor(ScorerCompressor):
    name = "learned"
    positive_scores = False  # predicted log-scores

    def score(self, kv: PassageKV, context: CompressionContext) -> torch.Tensor:
        from ragcompress.distill.adaptor import SCORER_BIAS, SCORER_WEIGHT
        from ragcompress.distill.scorer import predict

        adaptor = getattr(context.encoder, "adaptor", None)
        check_scorer(self, adaptor)
        assert adaptor is not None
        return predict(adaptor.tensors[SCORER_WEIGHT], adaptor.tensors[SCORER_BIAS], kv)


def check_scorer(compressor: Compressor, adaptor: Adaptor | None, name: str | None = None) -> None:
    """Refuse ``compressor`` when it scores by ``learned`` (alone or wrapped, ``global:learned``)
    and ``adaptor`` (``name``: as the user gave it) carries no trained scorer. Indexing checks
    here before the store is created: the first passage failed, leaving an empty store behind
    that later runs were refused by."""
    if not isinstance(getattr(compressor, "inner", compressor), LearnedCompressor) or (adaptor and adaptor.has_scorer):
        return
    method = compressor.config()["method"]
    if adaptor is None:
        raise InputError(
            f"method {method!r} scores tokens with an adaptor's trained retention scorer, and no adaptor is used; "
            "index with --adaptor (one trained by `ragcompress train` with its scorer), or use global:kvzip"
        )
    raise InputError(
        f"method {method!r} scores tokens with an adaptor's trained retention scorer, and adaptor "
        f"{name or adaptor.hash[:16]} has none (trained with --scorer-passages 0, or for a store another scorer "
        "evicts); use global:kvzip, or an adaptor trained with --scorer-passages N"
    )
