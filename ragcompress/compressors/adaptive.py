"""``adaptive:<scorer>`` and ``global:<scorer>``: non-uniform budget allocation.

``adaptive`` reallocates within each layer (Feng et al., 2024, "Ada-KV: Optimizing KV Cache
Eviction by Adaptive Budget Allocation"; the DuoAttention observation that some heads attend
broadly and others locally). ``global`` pools the budget of the whole passage cache, all layers
and heads, and keeps its highest scores wherever they are: KVzip's default ("pair"-level
threshold over the stacked scores of every layer), so a layer whose attention is spread can keep
most of its tokens while a layer that attends to few keeps few.

Wraps any :class:`ScorerCompressor`: the layer's total budget stays ``kv_heads x budget`` (the
same bytes as the uniform method), but it is spent on the layer's highest scores across *all*
its heads, so a head whose attention is spread keeps more tokens and a local head fewer. Every
head is guaranteed ``floor x budget`` tokens (Ada-KV's safeguard against starving a head) and the
inner method's protected tokens. Heads really store different counts: the result is a ragged
:class:`PassageKV` (``lengths`` per head), which the codec writes without padding and the
runtime's masked attention reads. Scores must be comparable across heads, which holds for
attention-based scorers (probabilities) and key norms; ``global`` also compares layers, so a
scorer whose scale differs by layer (``comparable_across_layers = False``: key norms) has each
layer's scores standardised first. ``value_norm`` weights every score by its value's norm
relative to its head (:func:`relative_value_norm`, Value-Aware Token Pruning), opt-in: measured
in docs/compression.md §8.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from ragcompress.compressors.base import CompressionContext, Compressor
from ragcompress.compressors.scorer import ScorerCompressor, gather_kept, nan_last, top_per_head
from ragcompress.kv import PassageKV

if TYPE_CHECKING:
    from ragcompress.indexing.encoder import PassageEncoder


def standardise_per_layer(scores: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """``scores [L, H, n]`` with each layer's valid entries shifted and scaled to mean 0 and
    standard deviation 1, so one budget over the whole cache compares layers by how a token
    stands within its own layer rather than by each layer's scale (key norms grow with depth).
    Returns fp32.

    A layer whose scores are constant (standard deviation at most ``1e-6`` of their magnitude:
    rounding error, no information) scores 0 everywhere, the others' mean. Its fp32 mean was off
    by a rounding error, which divided by a deviation of the same size gave every entry ±1, 0 or
    anything, so such a layer got nothing or half the pool depending on its keys' scale. The
    statistics are computed in float64, where a constant layer's mean is exact."""
    x = scores.double()
    weight = valid.double()
    count = weight.sum((1, 2), keepdim=True).clamp_min(1.0)
    mean = (x * weight).sum((1, 2), keepdim=True) / count
    std = ((((x - mean) * weight) ** 2).sum((1, 2), keepdim=True) / count).sqrt()
    constant = std <= 1e-6 * mean.abs().clamp_min(1.0)
    out = (x - mean) / torch.where(constant, 1.0, std)
    return out.masked_fill(constant, 0.0).float()


def relative_value_norm(kv: PassageKV) -> torch.Tensor:
    """``[L, H, n]``: each row's value L2 norm over the mean norm of its layer and head's valid
    rows (0 on padding). A token's contribution to attention's output is its attention times its
    value (Guo et al. 2024, "Attention Score is not All You Need for Token Importance"); dividing
    by the head's mean keeps each head's scale, so a global pool still compares layers by the
    inner scores."""
    valid = kv.valid_mask()
    norms = kv.values.float().norm(dim=-1).masked_fill(~valid, 0.0)
    mean = norms.sum(-1, keepdim=True) / valid.sum(-1, keepdim=True).clamp_min(1)
    return norms / mean.clamp_min(1e-6)


@dataclass(frozen=True)
class AdaptiveBudget(Compressor):
    """inner: the scorer whose scores and budget are reallocated; floor: guaranteed share;
    value_norm: scores weighted by :func:`relative_value_norm` before allocation."""

    name = "adaptive"
    inner: ScorerCompressor
    floor: float = 0.2
    value_norm: bool = False
    whole_cache = False  # pool the budget per layer (False) or over the whole cache (True)

    def __post_init__(self) -> None:
        if not isinstance(self.inner, ScorerCompressor):
            raise ValueError(f"{self.name}: inner must be a scoring method, got {type(self.inner).__name__}")
        if not 0.0 <= self.floor <= 1.0:
            raise ValueError(f"{self.name}: floor must be in [0, 1], got {self.floor!r}")
        if self.value_norm and not self.inner.positive_scores:
            raise ValueError(
                f"{self.name}:{self.inner.name}: value_norm multiplies scores by value norms, which reverses the "
                f"order of negative or log scores such as {self.inner.name}'s; use it with kvzip, snapkv or "
                "expected-attention"
            )

    def config(self) -> dict[str, Any]:
        inner = self.inner.config()
        config = {**inner, "method": f"{self.name}:{inner['method']}", "floor": self.floor}
        return config | ({"value_norm": True} if self.value_norm else {})  # absent when off: older manifests match

    def fits(self, encoder: PassageEncoder, token_ids: list[int]) -> bool:
        """The inner method's probe is the one that runs (none where it keeps the passage whole)."""
        return self.inner.fits(encoder, token_ids)

    def compress(self, kv: PassageKV, context: CompressionContext) -> PassageKV:
        if self.inner.keeps_all(kv.num_tokens):
            return kv
        return self.select(kv, self.inner.score(kv, context))

    def ranked_scores(self, kv: PassageKV, scores: torch.Tensor) -> torch.Tensor:
        """The inner method's ``scores [L, H, n_max]`` as the budget ranks them: weighted by
        value norm (``value_norm``), standardised per layer where one pool compares layers whose
        scales differ, ``-inf`` on padding and where a score is NaN (:func:`nan_last`)."""
        valid = kv.valid_mask()
        scores = scores.float()
        if self.value_norm:
            scores = scores * relative_value_norm(kv)
        if self.whole_cache and not self.inner.comparable_across_layers:
            scores = standardise_per_layer(scores, valid)
        return nan_last(scores).masked_fill(~valid, float("-inf"))

    def select(self, kv: PassageKV, scores: torch.Tensor) -> PassageKV:
        """Allocate the layer budgets given the inner method's ``scores [L, H, n_max]``."""
        budget = self.inner.budget_for(kv)
        if budget >= kv.num_tokens:
            return kv
        valid = kv.valid_mask()
        scores = self.ranked_scores(kv, scores)
        protected = self.inner.protected(kv, budget)
        guaranteed = max(int(self.floor * budget), int(protected.sum(-1).max()))
        keep = top_per_head(scores.masked_fill(protected, float("inf")), valid, guaranteed)
        layers, heads, n = scores.shape
        pools = 1 if self.whole_cache else layers
        size = layers * heads * n // pools
        spare = (layers * heads * budget) // pools - keep.reshape(pools, size).sum(-1)  # [pools] left
        rest = scores.masked_fill(keep, float("-inf")).reshape(pools, size)
        order = rest.argsort(dim=-1, descending=True, stable=True)  # of equal scores, the earlier row
        take = torch.arange(size) < spare.unsqueeze(-1)  # the first `spare` of each pool
        extra = torch.zeros_like(take)
        extra.scatter_(-1, order, take)
        keep = keep | extra.reshape(layers, heads, n)
        return gather_kept(kv, keep & valid)


@dataclass(frozen=True)
class GlobalBudget(AdaptiveBudget):
    """``global:<scorer>``: one budget pool for all layers and heads (KVzip's default). The
    floor defaults to 0: a head keeps only its protected tokens unless its scores earn more."""

    name = "global"
    floor: float = 0.0
    whole_cache = True
