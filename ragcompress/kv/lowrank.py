"""Low-rank projection of pre-RoPE keys (and values) per layer and KV head (LoRC, Palu, ShadowKV).

The keys of one layer and KV head live in a subspace far smaller than ``head_dim``, sharpest
*before* RoPE (RoPE mixes channel pairs by position), which is how ragcompress stores them. A
store fitted with a :class:`LowRankBasis` keeps, for every kept row ``x``, only the latent
``z = (x - mean) @ U`` (``U``: ``[head_dim, r]`` orthonormal columns, the top principal
directions of calibration passages) and rebuilds ``x ~= z @ U.T + mean`` at load time or inside
the fused kernel (latent @ basis, then RoPE, then attention). The basis is fitted once per store
(PCA over calibration caches, deterministic for a given sample: fp64 covariance, ``eigh``, a
fixed sign per direction) and stored once in ``basis.safetensors`` (``store/basis.py``), hashed
in the manifest.

Ranks are one per layer (shared by its KV heads, so a layer's latents are a rectangle) and a
multiple of :data:`RANK_MULTIPLE` (int4/int2 codes pack along the latent dimension):

* ``rank``: the same rank everywhere;
* ``energy`` with schedule ``global``: the smallest rank per layer keeping that fraction of the
  calibration variance (averaged over the layer's heads);
* ``energy`` with schedule ``progressive`` (LoRC, Liu et al. 2024): the same average residual
  variance ``1 - energy``, spread in proportion to depth (layer ``l`` of ``L`` gets
  ``(1 - energy) * 2 (l + 1) / (L + 1)``), so shallow layers, whose errors every later layer
  amplifies, keep more.

Values are projected too unless ``values=False`` (then they are stored row by row as before).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch

from ragcompress.errors import InputError
from ragcompress.kv.passage import PassageKV
from ragcompress.kv.quant import QuantConfig, dequantize_keys_per_channel, quantize_keys_per_channel, to_fp16

RANK_MULTIPLE = 8
SCHEDULES = ("global", "progressive")
KINDS = ("k", "v")


@dataclass(frozen=True)
class RankSpec:
    """How ranks are chosen: a fixed ``rank`` or an ``energy`` fraction (with a ``schedule``)."""

    rank: int | None = None
    energy: float | None = None
    schedule: str = "global"
    values: bool = True

    def __post_init__(self) -> None:
        if (self.rank is None) == (self.energy is None):
            raise ValueError("give exactly one of rank (latent size) or energy (variance kept)")
        if self.rank is not None and (self.rank <= 0 or self.rank % RANK_MULTIPLE):
            raise ValueError(f"rank must be a positive multiple of {RANK_MULTIPLE}, got {self.rank}")
        if self.energy is not None and not 0.0 < self.energy <= 1.0:
            raise ValueError(f"rank energy must be in (0, 1], got {self.energy}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"rank schedule {self.schedule!r} is not one of: {', '.join(SCHEDULES)}")

    def as_dict(self) -> dict[str, object]:
        return {"rank": self.rank, "energy": self.energy, "schedule": self.schedule, "values": self.values}

    @classmethod
    def from_dict(cls, entry: dict[str, Any]) -> RankSpec:
        """The spec :meth:`as_dict` wrote (a manifest's ``compression.lowrank`` carries it)."""
        return cls(entry.get("rank"), entry.get("energy"), str(entry["schedule"]), bool(entry["values"]))

    def layer_targets(self, layers: int) -> list[float]:
        """The variance fraction each layer must keep (``energy`` specs only)."""
        assert self.energy is not None
        residual = 1.0 - self.energy
        if self.schedule == "global":
            return [self.energy] * layers
        return [max(0.0, 1.0 - residual * 2 * (i + 1) / (layers + 1)) for i in range(layers)]


class CalibrationMoments:
    """fp64 sums of rows and of their outer products per layer and head (valid rows only): one
    pass over a calibration sample serves every :class:`RankSpec` (:meth:`basis`)."""

    def __init__(self) -> None:
        self.count: torch.Tensor | None = None  # [L, H]
        self.sums: dict[str, torch.Tensor] = {}  # [L, H, d]
        self.outer: dict[str, torch.Tensor] = {}  # [L, H, d, d]

    def add(self, kv: PassageKV) -> None:
        mask = kv.valid_mask().unsqueeze(-1).double()
        counts = kv.lengths.double()
        self.count = counts if self.count is None else self.count + counts
        for kind, x in (("k", kv.keys), ("v", kv.values)):
            rows = x.double() * mask
            s, o = rows.sum(2), torch.einsum("lhnd,lhne->lhde", rows, rows)
            self.sums[kind] = self.sums[kind] + s if kind in self.sums else s
            self.outer[kind] = self.outer[kind] + o if kind in self.outer else o

    def pca(self, kind: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Mean ``[L, H, d]``, directions ``[L, H, d, d]`` (columns, most variance first, sign
        fixed so each column's largest entry is positive) and variances ``[L, H, d]``."""
        if self.count is None or bool((self.count < 2).any()):
            raise ValueError("calibration needs at least two rows on every layer and head")
        n = self.count.unsqueeze(-1)
        mean = self.sums[kind] / n
        cov = self.outer[kind] / n.unsqueeze(-1) - mean.unsqueeze(-1) * mean.unsqueeze(-2)
        variances, vectors = torch.linalg.eigh(cov)  # ascending
        variances, vectors = variances.flip(-1).clamp_min(0.0), vectors.flip(-1)
        peak = vectors.gather(-2, vectors.abs().argmax(-2, keepdim=True))  # [L, H, 1, d]
        vectors = vectors * torch.where(peak < 0, -1.0, 1.0)
        return mean, vectors, variances

    def basis(self, spec: RankSpec) -> LowRankBasis:
        """The bases ``spec`` asks for. Deterministic for a given sample: moments accumulate in
        fp64 in the given order, ``eigh`` is deterministic on a CPU, and each direction's sign is
        fixed. Bases are rounded to fp16 before use so indexing projects with exactly the basis
        the store keeps."""
        bases: dict[str, tuple[torch.Tensor, ...]] = {}
        means: dict[str, torch.Tensor] = {}
        energy: dict[str, tuple[float, ...]] = {}
        for kind in KINDS if spec.values else ("k",):
            mean, vectors, variances = self.pca(kind)
            ranks = _ranks(variances, spec)
            total = variances.sum(-1).clamp_min(1e-30)
            bases[kind] = tuple(vectors[layer, :, :, :r].to(torch.float16).float() for layer, r in enumerate(ranks))
            means[kind] = mean.float()
            energy[kind] = tuple(
                float((variances[layer, :, :r].sum(-1) / total[layer]).mean()) for layer, r in enumerate(ranks)
            )
        return LowRankBasis(bases, means, energy)


def _ranks(variances: torch.Tensor, spec: RankSpec) -> list[int]:
    """One rank per layer from variances ``[L, H, d]`` (most first)."""
    layers, _, d = variances.shape
    if spec.rank is not None:
        if spec.rank > d:  # it was clamped to d silently: no fewer numbers, and a basis on top
            raise InputError(
                f"rank {spec.rank} is above the model's head_dim ({d}): latents that size store no fewer numbers "
                f"than the rows themselves; give a rank below {d} (rank {d} is full rank, for tests), or no rank"
            )
        return [spec.rank] * layers
    kept = variances.cumsum(-1) / variances.sum(-1, keepdim=True).clamp_min(1e-30)  # [L, H, d]
    kept = kept.mean(1)  # the layer's heads share one rank
    ranks = []
    for layer, target in enumerate(spec.layer_targets(layers)):
        rank = d
        for r in range(RANK_MULTIPLE, d + 1, RANK_MULTIPLE):
            if float(kept[layer, r - 1]) >= target - 1e-12:
                rank = r
                break
        ranks.append(rank)
    return ranks


@dataclass(frozen=True)
class LowRankBasis:
    """Per-layer bases of one store. ``bases[kind][l]``: ``[H, d, r_l]`` fp32 (fp16-exact values,
    as stored), ``means[kind]``: ``[L, H, d]`` fp32; ``kind`` is ``"k"`` and, when values are
    projected, ``"v"``. ``energy[kind]``: ``[L]`` calibration variance kept at the chosen ranks."""

    bases: dict[str, tuple[torch.Tensor, ...]]
    means: dict[str, torch.Tensor]
    energy: dict[str, tuple[float, ...]]

    def ranks(self, kind: str) -> tuple[int, ...] | None:
        if kind not in self.bases:
            return None
        return tuple(int(b.shape[-1]) for b in self.bases[kind])

    def project(self, kind: str, x: torch.Tensor) -> list[torch.Tensor]:
        """Rows ``[L, H, n, d]`` -> per-layer latents ``[H, n, r_l]`` fp32."""
        means = self.means[kind]
        return [(x[layer].float() - means[layer].unsqueeze(1)) @ b for layer, b in enumerate(self.bases[kind])]

    def reconstruct(self, kind: str, latents: list[torch.Tensor], out: torch.Tensor) -> torch.Tensor:
        """Per-layer latents ``[H, n, r_l]`` -> rows written into ``out`` ``[L, H, n, d]``."""
        means = self.means[kind]
        for layer, (z, b) in enumerate(zip(latents, self.bases[kind], strict=True)):
            torch.baddbmm(means[layer].unsqueeze(1), z.float(), b.transpose(1, 2), out=out[layer])
        return out

    def round_trip(self, kind: str, rows: torch.Tensor, lengths: torch.Tensor, quant: QuantConfig) -> torch.Tensor:
        """Rows ``[L, H, n, d]`` (``lengths [L, H]`` real ones) as a store of this basis and
        ``quant`` gives them back: projected, the latents quantized per channel as the codec
        quantizes them (``store/latent.py``), rebuilt. The gradient is the projection's, straight
        through the rounding: how training sees the store's projection (``ragcompress train
        --kv-rank``)."""
        quant = quant.of(kind)
        out = []
        for layer, (basis, mean) in enumerate(zip(self.bases[kind], self.means[kind], strict=True)):
            z = (rows[layer].float() - mean.unsqueeze(1)) @ basis  # [H, n, r]
            if quant.bits is not None:
                codes, scale, low = quantize_keys_per_channel(
                    z.detach().unsqueeze(0), lengths[layer : layer + 1], quant.bits, quant.group_size
                )
                rounded = dequantize_keys_per_channel(codes, scale, low, quant.group_size)[0]
                z = rounded + (z - z.detach())
            elif quant.scheme == "fp16":
                z = to_fp16(z.detach()).float() + (z - z.detach())
            else:  # none: the store keeps latents in the rows' dtype (store/latent.py)
                z = z.detach().to(rows.dtype).float() + (z - z.detach())
            out.append(torch.baddbmm(mean.unsqueeze(1), z, basis.transpose(1, 2)))
        return torch.stack(out).to(rows.dtype)

    def describe(self) -> dict[str, object]:
        """What a manifest records besides the hash: ranks and kept variance per kind."""
        out: dict[str, object] = {}
        for kind in self.bases:
            out[f"ranks_{kind}"] = list(self.ranks(kind) or ())
            out[f"energy_{kind}"] = [round(e, 6) for e in self.energy[kind]]
        return out


def fit_basis(caches: Iterable[PassageKV], spec: RankSpec) -> LowRankBasis:
    """PCA bases of ``caches`` (keys un-rotated, every kept row) with ranks chosen by ``spec``
    (:meth:`CalibrationMoments.basis`)."""
    moments = CalibrationMoments()
    for kv in caches:
        moments.add(kv)
    return moments.basis(spec)
