"""``snapkv``: attention from the passage's own last window of queries (Li et al., NeurIPS 2024,
"SnapKV: LLM Knows What You are Looking for Before Generation").

Offline there is no question, so the observation window is the passage's own tail: the last
``window`` tokens are re-run after the cache of the tokens before them (:func:`run_probe`) and
each token's score is the attention those queries give it, averaged over the window and over
the query heads sharing the KV head, then smoothed with a 1-D average pool of ``kernel`` tokens
(SnapKV clusters neighbouring tokens so kept spans stay readable).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ragcompress.compressors.base import CompressionContext
from ragcompress.compressors.probe import run_probe
from ragcompress.compressors.scorer import ScorerCompressor
from ragcompress.kv import PassageKV


def pool_scores(scores: torch.Tensor, kernel: int) -> torch.Tensor:
    """Average pool ``[L, H, n]`` along tokens with an odd ``kernel`` (same length out)."""
    if kernel <= 1:
        return scores
    layers, heads, n = scores.shape
    flat = scores.reshape(layers * heads, 1, n)
    return F.avg_pool1d(flat, kernel, stride=1, padding=kernel // 2, count_include_pad=False).reshape(layers, heads, n)


@dataclass(frozen=True)
class SnapKVCompressor(ScorerCompressor):
    """window: tokens of the observation window; kernel: odd pooling width (1 = none)."""

    name = "snapkv"
    window: int = 32
    kernel: int = 5

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.window, int) or self.window < 1:
            raise ValueError(f"snapkv: window must be a positive int, got {self.window!r}")
        if not isinstance(self.kernel, int) or self.kernel < 1 or self.kernel % 2 == 0:
            raise ValueError(f"snapkv: kernel must be a positive odd int, got {self.kernel!r}")

    def score(self, kv: PassageKV, context: CompressionContext) -> torch.Tensor:
        n = kv.num_tokens
        window = min(self.window, n)
        probe = run_probe(
            context.encoder,
            kv,
            context.token_ids[n - window :],
            context_len=n - window,
            score_len=n,
            query_reduce="mean",
            group_reduce="mean",
        )
        assert probe.attention is not None  # asked for with score_len
        return pool_scores(probe.attention, self.kernel)
