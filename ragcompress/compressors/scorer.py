"""Score-then-keep compressors: most methods only say how important each cached token is.

:class:`ScorerCompressor` is the base of every eviction method (the shape of kvpress's
``ScorerPress``): a subclass implements :meth:`ScorerCompressor.score`, returning one importance
value per cached token, layer and KV head, and the base keeps the ``budget`` highest-scoring
tokens of every head, sorted by position, with their original positions recorded.

Budget: ``budget`` tokens per head when given, else ``max(1, floor(n * ratio))`` of the exact product (``ratio`` is the
fraction *kept*). The first ``keep_first`` and last ``keep_last`` tokens of the passage are
always kept (they count against the budget):

* the first tokens of an independently encoded passage are its local attention sinks: every
  later token of the passage puts a large share of its attention on them (StreamingLLM,
  Xiao et al. 2024; APE, Yang et al. 2025 observe the same for parallel-encoded passages), so
  removing them shifts the whole passage's attention distribution at query time;
* the last tokens are the passage's closing ``"\\n\\n"`` separator and the end of its last
  sentence; the next passage or the question is attached right after them, and dropping the
  boundary merges two passages' texts from the model's point of view.

A method that defines its own rule for these tokens (``streaming`` keeps ``keep_first`` sinks
and then only recent tokens) says so in its docstring. Under a whole-cache budget
(``global:``) the protection costs more than it saves: every passage is encoded after the
shared prefix, whose first token is the sink they all use, and ``keep_first=0/1, keep_last=0``
measured better at 0.25 kept and the same at 0.5 (docs/compression.md, Results §2, 100 dev
questions); the defaults stay 4/4 (the rule for changing them under ``global:`` was not met).
"""

from __future__ import annotations

from abc import abstractmethod
from dataclasses import dataclass
from typing import ClassVar

import torch

from ragcompress.compressors.base import CompressionContext, Compressor
from ragcompress.kv import PassageKV


def keep_budget(n: int, ratio: float, budget: int | None) -> int:
    """Tokens kept per head for a passage of ``n`` tokens."""
    if budget is not None:
        return min(n, budget)
    return min(n, max(1, int(n * ratio + 1e-9)))  # 0.29 * 100 is 28.999... in floating point: 29


def protected_mask(kv: PassageKV, keep_first: int, keep_last: int, budget: int) -> torch.Tensor:
    """``[layers, kv_heads, n_max]`` bool: rows whose *position* is among the first ``keep_first``
    or last ``keep_last`` of the passage, trimmed so that at most ``budget`` are protected
    (first tokens win: sinks matter more than the boundary)."""
    first = min(keep_first, budget)
    last = min(keep_last, budget - first)
    n = kv.num_tokens
    pos = kv.positions
    return kv.valid_mask() & ((pos < first) | (pos >= n - last))


def gather_kept(kv: PassageKV, keep: torch.Tensor) -> PassageKV:
    """The rows of ``kv`` where ``keep [layers, kv_heads, n_max]`` is True, sorted by position.

    Heads may keep different counts: tensors are padded to the longest head (padding rows are
    zero, position 0) and ``lengths`` holds each head's count.
    """
    keep = keep & kv.valid_mask()
    lengths = keep.sum(-1)
    n_keep = int(lengths.max()) if keep.numel() else 0
    # kept rows first, each group in ascending position order (stable sort on a composite key)
    big = kv.num_tokens + 1
    key = torch.where(keep, kv.positions, kv.positions + big)
    order = key.argsort(dim=-1, stable=True)[..., :n_keep]
    rows = torch.arange(n_keep) < lengths.unsqueeze(-1)
    idx = order.unsqueeze(-1).expand(-1, -1, -1, kv.keys.shape[-1])
    keys = kv.keys.gather(2, idx) * rows.unsqueeze(-1)
    values = kv.values.gather(2, idx) * rows.unsqueeze(-1)
    positions = kv.positions.gather(2, order) * rows
    return PassageKV(keys.contiguous(), values.contiguous(), positions.contiguous(), lengths, kv.num_tokens)


def nan_last(scores: torch.Tensor) -> torch.Tensor:
    """``scores`` as fp32 with NaN replaced by ``-inf``: what every ranking of scores sorts
    (:func:`top_per_head`, the ``adaptive:``/``global:`` pools, the recompute's token selection).

    A descending sort puts NaN first, above ``+inf``, which marks the protected tokens: a NaN
    score (the norm of an inf key standardised with its layer makes the whole layer NaN) outranked
    the sinks and the passage boundary, and a layer of them took a ``global:`` pool. A NaN says
    nothing about its token, so it ranks last, beside padding, rather than being refused: an
    overflowed cache is refused where it is stored (the codec refuses inf or NaN in a kept row,
    for every quantization), and a score that is NaN over a finite cache should cost its tokens
    their place, not the passage."""
    scores = scores.float()
    return scores.masked_fill(scores.isnan(), float("-inf"))


def top_per_head(scores: torch.Tensor, valid: torch.Tensor, budget: int) -> torch.Tensor:
    """``[L, H, n]`` bool mask of each head's ``budget`` highest ``scores`` among ``valid`` rows;
    of equal scores the earlier token wins (``topk`` breaks ties by its algorithm: of 300 equal
    scores it returned tokens 197-201), so a store does not depend on how ties fall. NaN ranks
    last (:func:`nan_last`)."""
    masked = nan_last(scores).masked_fill(~valid, float("-inf"))
    k = min(budget, masked.shape[-1])
    idx = masked.sort(dim=-1, descending=True, stable=True).indices[..., :k]
    keep = torch.zeros_like(valid)
    keep.scatter_(-1, idx, True)
    return keep & valid


@dataclass(frozen=True)
class ScorerCompressor(Compressor):
    """Keep the ``budget`` best-scoring tokens of every layer and KV head (uniform per head).

    ratio:      fraction of the passage's tokens kept per head, in ``(0, 1]``
    budget:     tokens kept per head; when set it replaces ``ratio``
    keep_first: leading tokens always kept (local attention sinks)
    keep_last:  trailing tokens always kept (passage boundary)
    """

    ratio: float = 0.5
    budget: int | None = None
    keep_first: int = 4
    keep_last: int = 4
    # Whether one layer's scores can be ranked against another's (attention probabilities can;
    # key norms cannot: their scale differs by layer). ``global:`` standardises each layer's
    # scores first when they cannot (adaptive.py).
    comparable_across_layers: ClassVar[bool] = True
    # Scores are non-negative attention masses (weighting them by value norms keeps their order
    # meaningful); False for scorers whose scores are negative or logarithmic.
    positive_scores: ClassVar[bool] = True

    def __post_init__(self) -> None:
        if not isinstance(self.ratio, (int, float)) or not 0.0 < self.ratio <= 1.0:
            raise ValueError(f"{self.name}: ratio must be in (0, 1] (fraction of tokens kept), got {self.ratio!r}")
        if self.budget is not None and (not isinstance(self.budget, int) or self.budget < 1):
            raise ValueError(f"{self.name}: budget must be a positive number of tokens, got {self.budget!r}")
        for field in ("keep_first", "keep_last"):
            value = getattr(self, field)
            if not isinstance(value, int) or value < 0:
                raise ValueError(f"{self.name}: {field} must be a non-negative int, got {value!r}")

    @abstractmethod
    def score(self, kv: PassageKV, context: CompressionContext) -> torch.Tensor:
        """Importance of every cached token: ``[layers, kv_heads, n_max]`` (higher = keep).

        ``kv`` is the passage's full cache as the encoder made it (keys un-rotated).
        """

    def budget_for(self, kv: PassageKV) -> int:
        return keep_budget(kv.num_tokens, self.ratio, self.budget)

    def keeps_all(self, n: int) -> bool:
        """Whether a passage of ``n`` tokens is kept whole (ratio 1, or a budget of ``n`` or
        more): :meth:`compress` then returns its cache unscored, so no scoring pass runs."""
        return keep_budget(n, self.ratio, self.budget) >= n

    def protected(self, kv: PassageKV, budget: int) -> torch.Tensor:
        """Rows kept regardless of score; see the module docstring."""
        return protected_mask(kv, self.keep_first, self.keep_last, budget)

    def compress(self, kv: PassageKV, context: CompressionContext) -> PassageKV:
        if self.keeps_all(kv.num_tokens):
            return kv
        return self.select(kv, self.score(kv, context))

    def select(self, kv: PassageKV, scores: torch.Tensor) -> PassageKV:
        """Keep this compressor's budget given precomputed ``scores [L, H, n_max]`` (lets one
        scoring pass serve several budgets)."""
        budget = self.budget_for(kv)
        if budget >= kv.num_tokens:
            return kv
        scores = scores.float().masked_fill(self.protected(kv, budget), float("inf"))
        return gather_kept(kv, top_per_head(scores, kv.valid_mask(), budget))
