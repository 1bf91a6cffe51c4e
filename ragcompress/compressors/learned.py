"""``learned``: token scores from the adaptor's learned retention scorer (``ragcompress.distill``).

The scorer is part of a trained adaptor (``ragcompress train``), so this method needs a store
built with one (``--adaptor``): it reads the encoder's adaptor. Its scores are predicted KVzip
scores (``ragcompress.distill.scorer``); use it as ``global:learned`` like ``global:kvzip``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ragcompress.compressors.base import CompressionContext
from ragcompress.compressors.scorer import ScorerCompressor
from ragcompress.kv import PassageKV


@dataclass(frozen=True)
class LearnedCompressor(ScorerCompressor):
    name = "learned"
    positive_scores = False  # predicted log-scores

    def score(self, kv: PassageKV, context: CompressionContext) -> torch.Tensor:
        from ragcompress.distill.adaptor import SCORER_BIAS, SCORER_WEIGHT
        from ragcompress.distill.scorer import predict

        adaptor = getattr(context.encoder, "adaptor", None)
        if adaptor is None or not adaptor.has_scorer:
            raise ValueError(
                "method 'learned' scores tokens with an adaptor's trained scorer; index with --adaptor "
                "(an adaptor trained by `ragcompress train`)"
            )
        return predict(adaptor.tensors[SCORER_WEIGHT], adaptor.tensors[SCORER_BIAS], kv)
