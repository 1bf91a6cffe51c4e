"""``streaming``: attention sinks plus the most recent tokens (StreamingLLM, Xiao et al., ICLR 2024).

The weak, content-blind baseline: every head keeps the first ``keep_first`` tokens (the sinks)
and fills the rest of its budget with the passage's last tokens. Its own rule already covers the
tokens the base class protects, so nothing else is protected.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ragcompress.compressors.base import CompressionContext
from ragcompress.compressors.scorer import ScorerCompressor
from ragcompress.kv import PassageKV


@dataclass(frozen=True)
class StreamingCompressor(ScorerCompressor):
    name = "streaming"

    def score(self, kv: PassageKV, context: CompressionContext) -> torch.Tensor:
        """``[L, H, n]``: the position itself (later = more recent = higher); sinks are protected."""
        return kv.positions.float()
