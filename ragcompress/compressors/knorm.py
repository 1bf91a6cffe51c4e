"""``knorm``: keep the keys with the *lowest* L2 norm (Devoto et al., EMNLP 2024, "A Simple and
Effective L2 Norm-Based Strategy for KV Cache Compression").

Low-norm keys draw high attention (their direction aligns with the queries' dominant
direction), as kvpress's ``KnormPress`` uses. Keys are stored un-rotated; RoPE is a rotation
(times the model's constant attention scaling), so the norm ranking is the same either way.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ragcompress.compressors.base import CompressionContext
from ragcompress.compressors.scorer import ScorerCompressor
from ragcompress.kv import PassageKV


@dataclass(frozen=True)
class KnormCompressor(ScorerCompressor):
    name = "knorm"
    comparable_across_layers = False  # key norms differ in scale from layer to layer
    positive_scores = False  # minus the key norm

    def score(self, kv: PassageKV, context: CompressionContext) -> torch.Tensor:
        """``[L, H, n]``: minus the key norm."""
        return -kv.keys.float().norm(dim=-1)
