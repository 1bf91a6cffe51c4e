"""The learned token-retention scorer: one linear probe per layer and KV head over a cached
token's un-rotated key and value, fitted to KVzip's scores (Fast KVzip's idea: small learned
gates instead of KVzip's reconstruction pass).

KVzip scores a token by the largest attention it receives while the model reconstructs the
passage, which costs one more forward pass over the passage at indexing time. The probe predicts
``log`` of that score from what the encoder already produced, so indexing costs one plain
forward plus a ``[n, 2 * head_dim]`` dot product per layer and head (measured in
``benchmarks/distill_eval.py``). It is fitted in closed form (ridge regression per layer and
head) on the training articles' caches -- the caches the adaptor itself encodes -- against KVzip's
scores of those same caches. ``log`` keeps scores of different heads on one scale, so
``global:learned`` can compare them across the whole cache as ``global:kvzip`` does.
"""

from __future__ import annotations

import torch

from ragcompress.kv import PassageKV

EPS = 1e-6  # floor under KVzip scores before the log


def features(kv: PassageKV) -> torch.Tensor:
    """``[layers, kv_heads, n_max, 2 * head_dim]``: each cached token's key and value, fp32."""
    return torch.cat([kv.keys.float(), kv.values.float()], dim=-1)


def predict(weight: torch.Tensor, bias: torch.Tensor, kv: PassageKV) -> torch.Tensor:
    """Predicted ``log`` KVzip score of every cached token ``[layers, kv_heads, n_max]``."""
    return torch.einsum("lhnd,lhd->lhn", features(kv), weight.float()) + bias.float().unsqueeze(-1)


def fit(samples: list[tuple[PassageKV, torch.Tensor]], l2: float = 1.0) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Ridge regression of ``log(kvzip + EPS)`` on :func:`features`, one per layer and head.

    samples: ``(full cache, KVzip scores [layers, kv_heads, n])`` per passage. Returns the
    weight ``[layers, kv_heads, 2d]``, bias ``[layers, kv_heads]`` and the fit's R^2 (pooled).
    """
    x = torch.cat([features(kv) for kv, _ in samples], dim=2)  # [L, H, N, 2d]
    y = torch.cat([(s.float() + EPS).log() for _, s in samples], dim=2)  # [L, H, N]
    mean_x, mean_y = x.mean(2, keepdim=True), y.mean(2, keepdim=True)
    xc, yc = x - mean_x, y - mean_y
    gram = xc.transpose(-1, -2) @ xc + l2 * torch.eye(x.shape[-1])
    weight = torch.linalg.solve(gram, (xc.transpose(-1, -2) @ yc.unsqueeze(-1))).squeeze(-1)  # [L, H, 2d]
    bias = mean_y.squeeze(-1) - (mean_x.squeeze(2) * weight).sum(-1)
    residual = y - (torch.einsum("lhnd,lhd->lhn", x, weight) + bias.unsqueeze(-1))
    r2 = 1.0 - float(residual.pow(2).sum() / yc.pow(2).sum().clamp_min(1e-12))
    return weight, bias, r2
