"""``expected-attention``: the attention future queries are expected to pay each token
(Devoto et al., 2025, "Expected Attention: KV Cache Compression by Estimating Attention from
Future Queries Distribution"; kvpress ``ExpectedAttentionPress``).

Queries are modelled as Gaussian, ``q ~ N(mu, Sigma)``, estimated from the pre-RoPE queries of
the passage's last ``window`` tokens (re-run by :func:`run_probe`). Future queries sit
``n .. n + future`` positions after the passage start, so RoPE is averaged over those positions:
``R = mean_p R(p)`` (``diag(mean cos) + diag(mean sin) . rotate_half``), ``mu' = R mu``,
``Sigma' = R Sigma R^T``. For a key ``k`` (rotated at its passage offset; RoPE is relative, so
only offsets matter) ``E[exp(s q.k)] = exp(s mu'.k + s^2 k^T Sigma' k / 2)``; a softmax over the
passage's keys of that logit gives the expected attention, averaged over the query heads of the
KV group and weighted by ``(a + eps) * ||v||`` because a token's effect on the output scales with
its value's norm.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ragcompress.compressors.base import CompressionContext
from ragcompress.compressors.probe import run_probe
from ragcompress.compressors.scorer import ScorerCompressor
from ragcompress.kv import PassageKV
from ragcompress.kv.rope import Rotary


def mean_rotation(rotary: Rotary, positions: torch.Tensor, layer: int, head_dim: int) -> torch.Tensor:
    """``[head_dim, head_dim]`` matrix of layer ``layer``'s RoPE rotation averaged over
    ``positions`` (RoPE is linear in its tables, so it is the rotation by the mean tables; partial
    rotary keeps the channels past them as they are)."""
    cos, sin = rotary.cos_sin(positions, layer)  # where the model's RoPE module is
    eye = torch.eye(head_dim, device=cos.device)
    return rotary.apply(eye, cos.mean(0), sin.mean(0)).T.cpu()  # row j rotates basis vector e_j


@dataclass(frozen=True)
class ExpectedAttentionCompressor(ScorerCompressor):
    """window: tokens whose queries give the statistics; future: future positions averaged;
    covariance: include the ``Sigma`` term; vnorm: weight by value norm with ``epsilon``."""

    name = "expected-attention"
    window: int = 64
    future: int = 512
    covariance: bool = True
    vnorm: bool = True
    epsilon: float = 0.02

    @property
    def comparable_across_layers(self) -> bool:  # type: ignore[override]
        """Weighted by raw value norms (``vnorm``), scores grow with depth as the norms do, so a
        ``global:`` pool must standardise them per layer; the plain expected attention is a
        probability, comparable as it is."""
        return not self.vnorm

    def __post_init__(self) -> None:
        super().__post_init__()
        for field in ("window", "future"):
            value = getattr(self, field)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"expected-attention: {field} must be a positive int, got {value!r}")

    def score(self, kv: PassageKV, context: CompressionContext) -> torch.Tensor:
        encoder, n = context.encoder, kv.num_tokens
        window = min(self.window, n)
        probe = run_probe(
            encoder,
            kv,
            context.token_ids[n - window :],
            context_len=n - window,
            score_len=n,
            attention=False,
            capture_queries=True,
        )
        layers, kv_heads = kv.keys.shape[:2]
        future = torch.arange(n, n + self.future)
        scores = torch.empty((layers, kv_heads, n))
        assert probe.queries is not None  # asked for by this probe
        for layer in range(layers):
            q = probe.queries[layer]  # [Hq, w, d] pre-RoPE
            mu = q.mean(1)
            centred = q - mu.unsqueeze(1)
            rot = mean_rotation(encoder.rotary, future, layer, q.shape[-1])
            mu = mu @ rot.T  # [Hq, d]
            keys = encoder.rotary.rotate(kv.keys[layer], kv.positions[layer], layer).float()  # [Hkv, n, d]
            keys = keys.repeat_interleave(q.shape[0] // kv_heads, dim=0)  # [Hq, n, d]
            s = probe.scaling[layer]
            logits = torch.einsum("hd,hnd->hn", mu, keys) * s
            if self.covariance and window > 1:
                cov = centred.transpose(1, 2) @ centred / (window - 1)  # [Hq, d, d]
                cov = rot @ cov @ rot.T
                logits = logits + 0.5 * s * s * torch.einsum("hnd,hde,hne->hn", keys, cov, keys)
            attn = logits.softmax(-1).view(kv_heads, -1, n).mean(1)
            if self.vnorm:
                attn = (attn + self.epsilon) * kv.values[layer].float().norm(dim=-1)
            scores[layer] = attn
        return scores
