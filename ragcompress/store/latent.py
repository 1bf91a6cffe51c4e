"""Segment tensors of a low-rank store: per-layer latents flattened into one tensor per field.

Ranks differ between layers, so a kind's (``k`` or ``v``) latents of every layer are concatenated
into flat 1-D tensors (one safetensors header entry per field, not per layer):

``{x}_lat``        fp16 (``fp16``) / the cache's dtype (``none``): each layer's kept rows ``[T_l, r_l]``
``{x}_lat_codes``  uint8: each layer's packed codes ``[T_l, r_l * bits / 8]``
``{x}_lat_scale``  fp16: each layer's per-channel scales ``[G_l, r_l]`` over token groups
``{x}_lat_min``    fp16: the matching minimums

with ``T_l = lengths[l].sum()`` and ``G_l = sum(ceil(lengths[l] / group_size))``; the blob's
metadata holds ``{x}_ranks`` (comma-separated, one per layer). Latents of both kinds are
quantized *per channel* (KIVI's key scheme): after PCA the channels' ranges differ by orders of
magnitude (the first direction carries most of the variance), so per-token groups would spend
their levels on the first channels and round the rest to nothing.
"""

from __future__ import annotations

import torch

from ragcompress.kv.quant import (
    QuantConfig,
    dequantize_keys_per_channel,
    pack,
    quantize_keys_per_channel,
    to_fp16,
    unpack,
)


def _group_mask(lengths: torch.Tensor, n_groups: int, group_size: int) -> torch.Tensor:
    return torch.arange(n_groups) < (-(-lengths // group_size)).unsqueeze(-1)


def encode_latents(
    kind: str, latents: list[torch.Tensor], lengths: torch.Tensor, quant: QuantConfig, dtype: torch.dtype
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Per-layer latents ``[H, n_max, r_l]`` of the rows ``lengths [L, H]`` keeps -> the blob's
    tensors and metadata for ``kind``. ``dtype``: the rows' dtype when ``quant`` is ``none``."""
    n_max = latents[0].shape[1] if latents else 0
    mask = torch.arange(n_max) < lengths.unsqueeze(-1)  # [L, H, n_max]
    ranks = [int(z.shape[-1]) for z in latents]
    meta = {f"{kind}_ranks": ",".join(map(str, ranks))}
    bits = quant.bits
    if bits is None:
        rows = [z[mask[layer]] for layer, z in enumerate(latents)]
        flat = [(to_fp16(z) if quant.scheme == "fp16" else z.to(dtype)).reshape(-1) for z in rows]
        return {f"{kind}_lat": torch.cat(flat)}, meta
    codes, scales, mins = [], [], []
    for layer, z in enumerate(latents):
        if z.shape[-1] % (8 // bits):
            raise ValueError(f"rank {z.shape[-1]} cannot be packed at {bits} bits")
        c, s, m = quantize_keys_per_channel(z.unsqueeze(0), lengths[layer : layer + 1], bits, quant.group_size)
        groups = _group_mask(lengths[layer], s.shape[2], quant.group_size)
        codes.append(pack(c[0][mask[layer]], bits).reshape(-1))
        scales.append(s[0][groups].reshape(-1))
        mins.append(m[0][groups].reshape(-1))
    tensors = {
        f"{kind}_lat_codes": torch.cat(codes),
        f"{kind}_lat_scale": torch.cat(scales),
        f"{kind}_lat_min": torch.cat(mins),
    }
    return tensors, meta


def parse_ranks(meta: dict[str, str], kind: str) -> tuple[int, ...] | None:
    text = meta.get(f"{kind}_ranks")
    return None if text is None else tuple(int(r) for r in text.split(","))


def _layer_fields(
    kind: str, tensors: dict[str, torch.Tensor], ranks: tuple[int, ...], lengths: torch.Tensor, quant: QuantConfig
) -> list[tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]]:
    """Each layer's flat fields: kept rows ``[T_l, r_l]`` (unquantized) or packed codes
    ``[T_l, r_l * bits / 8]`` with scales and minimums ``[G_l, r_l]``. Raises ``ValueError`` when
    the tensors do not add up to what ``lengths`` and ``ranks`` declare."""
    if len(ranks) != lengths.shape[0]:
        raise ValueError(f"{len(ranks)} {kind} ranks for {lengths.shape[0]} layers")
    bits, gs = quant.bits, quant.group_size
    names = [f"{kind}_lat"] if bits is None else [f"{kind}_lat_codes", f"{kind}_lat_scale", f"{kind}_lat_min"]
    flats = [tensors[name] for name in names]
    at = [0] * len(flats)
    out: list[tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]] = []
    for layer, r in enumerate(ranks):
        kept = int(lengths[layer].sum())
        groups = int((-(-lengths[layer] // gs)).sum())
        shapes = [(kept, r)] if bits is None else [(kept, r * bits // 8), (groups, r), (groups, r)]
        parts = []
        for j, shape in enumerate(shapes):
            count = shape[0] * shape[1]
            if at[j] + count > flats[j].numel():
                raise ValueError(f"{kind} latents are shorter than their lengths and ranks declare")
            parts.append(flats[j][at[j] : at[j] + count].reshape(shape))
            at[j] += count
        out.append((parts[0], None, None) if bits is None else (parts[0], parts[1], parts[2]))
    if any(a != f.numel() for a, f in zip(at, flats, strict=True)):
        raise ValueError(f"{kind} latents are longer than their lengths and ranks declare")
    return out


def decode_latents(
    kind: str,
    tensors: dict[str, torch.Tensor],
    ranks: tuple[int, ...],
    lengths: torch.Tensor,
    n_max: int,
    quant: QuantConfig,
) -> list[torch.Tensor]:
    """Inverse of :func:`encode_latents`: per-layer latents ``[H, n_max, r_l]`` fp32, padding rows
    zero. Raises ``KeyError``/``ValueError``/``RuntimeError`` on tensors that do not add up."""
    mask = torch.arange(n_max) < lengths.unsqueeze(-1)
    groups = _group_mask(lengths, -(-max(n_max, 1) // quant.group_size), quant.group_size)
    fields = _layer_fields(kind, tensors, ranks, lengths, quant)  # validates the sizes
    out: list[torch.Tensor] = [torch.empty(0)] * len(ranks)
    for rank in sorted(set(ranks)):
        layers = [layer for layer, r in enumerate(ranks) if r == rank]
        decoded = _decode_layers([fields[layer] for layer in layers], mask[layers], groups[layers], rank, quant)
        for layer, latents in zip(layers, decoded.unbind(0), strict=True):
            out[layer] = latents
    return out


def _decode_layers(
    fields: list[tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]],
    mask: torch.Tensor,
    groups: torch.Tensor,
    rank: int,
    quant: QuantConfig,
) -> torch.Tensor:
    """Latents ``[L', H, n_max, rank]`` of the layers that share ``rank`` (every layer, for
    ``--rank R``), in one pass: the flat fields are laid out layer, head, row -- the order of a
    boolean index over ``[L', H, n]`` -- so the layers unpack and dequantize together instead of
    one small pass per layer (this runs on every request, for every retrieved passage)."""
    layers, heads, n_max = mask.shape
    if quant.bits is None:
        grid = torch.zeros(layers, heads, n_max, rank, dtype=torch.float32)
        grid[mask] = torch.cat([rows for rows, _, _ in fields]).float()
        return grid
    codes = torch.zeros(layers, heads, n_max, rank, dtype=torch.uint8)
    codes[mask] = unpack(torch.cat([rows for rows, _, _ in fields]), quant.bits)
    scale = torch.zeros(layers, heads, groups.shape[-1], rank, dtype=torch.float16)
    low = torch.zeros(layers, heads, groups.shape[-1], rank, dtype=torch.float16)
    scale[groups] = torch.cat([s for _, s, _ in fields if s is not None])
    low[groups] = torch.cat([m for _, _, m in fields if m is not None])
    return dequantize_keys_per_channel(codes, scale, low, quant.group_size).mul_(mask.unsqueeze(-1))


def padded_latents(
    kind: str, tensors: dict[str, torch.Tensor], ranks: tuple[int, ...], lengths: torch.Tensor, quant: QuantConfig
) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Per layer, the quantized latents padded per head to ``n_pad`` rows (a multiple of
    ``group_size``), nothing dequantized: codes ``[H, n_pad, r_l * bits / 8]`` uint8 and
    scale/min ``[H, n_pad / group_size, r_l]`` fp16, the layout the latent kernel reads."""
    bits, gs = quant.bits, quant.group_size
    if bits is None:
        raise ValueError(f"the latent kernel reads quantized latents (int8/int4/int2), not {quant.scheme!r}")
    heads = lengths.shape[1]
    n_pad = -(-max(int(lengths.max()), 1) // gs) * gs
    rows_mask = torch.arange(n_pad) < lengths.unsqueeze(-1)
    groups = _group_mask(lengths, n_pad // gs, gs)
    out = []
    for layer, (codes, scale, low) in enumerate(_layer_fields(kind, tensors, ranks, lengths, quant)):
        assert scale is not None and low is not None
        r = ranks[layer]
        codes_grid = torch.zeros(heads, n_pad, r * bits // 8, dtype=torch.uint8)
        codes_grid[rows_mask[layer]] = codes
        scale_grid = torch.zeros(heads, n_pad // gs, r, dtype=torch.float16)
        low_grid = torch.zeros(heads, n_pad // gs, r, dtype=torch.float16)
        scale_grid[groups[layer]] = scale
        low_grid[groups[layer]] = low
        out.append((codes_grid, scale_grid, low_grid))
    return out
