"""Serialisation of one :class:`PassageKV` to a self-contained safetensors blob and back.

Only real (kept) rows are written, flattened in (layer, head, row) order, so per-head budgets
cost exactly what they keep. Tensors in a blob:

``lengths``      ``[L, H]`` int32: kept tokens per layer and head
``positions``    ``[T]`` int16/int32: offset of each kept row (absent when nothing was evicted)
``k`` / ``v``    ``[T, d]`` for ``none`` / ``fp16``
``k_codes``      ``[T, d*bits/8]`` uint8, ``k_scale``/``k_min`` ``[Gk, d]`` fp16 (per channel, token groups)
``v_codes``      ``[T, d*bits/8]`` uint8, ``v_scale``/``v_min`` ``[T, d/g]`` fp16 (per token)

``T = lengths.sum()``, ``Gk = sum(ceil(lengths / group_size))``. The safetensors metadata holds
``num_tokens``, ``n_max``, ``head_dim``, ``scheme`` and ``group_size``. The format never uses
pickle: loading a blob cannot execute code.
"""

from __future__ import annotations

import json
import struct

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from ragcompress.errors import CorruptSegmentError
from ragcompress.kv import PassageKV
from ragcompress.quant import (
    QuantConfig,
    dequantize_keys_per_channel,
    dequantize_values_per_token,
    pack,
    quantize_keys_per_channel,
    quantize_values_per_token,
    unpack,
)


def _group_mask(lengths: torch.Tensor, n_groups: int, group_size: int) -> torch.Tensor:
    used = -(-lengths // group_size)  # ceil
    return torch.arange(n_groups) < used.unsqueeze(-1)


def encode(kv: PassageKV, quant: QuantConfig) -> bytes:
    """Serialise ``kv`` (keys un-rotated) with ``quant``; returns the blob's bytes."""
    layers, heads, n_max, d = kv.keys.shape
    mask = kv.valid_mask()
    tensors: dict[str, torch.Tensor] = {"lengths": kv.lengths.to(torch.int32)}
    if not kv.is_uniform:
        pos_dtype = torch.int16 if kv.num_tokens <= torch.iinfo(torch.int16).max else torch.int32
        tensors["positions"] = kv.positions[mask].to(pos_dtype)
    bits = quant.bits
    if bits is None:
        dtype = torch.float16 if quant.scheme == "fp16" else kv.keys.dtype
        tensors["k"] = kv.keys[mask].to(dtype)
        tensors["v"] = kv.values[mask].to(dtype)
    else:
        if d % (8 // bits):
            raise ValueError(f"head_dim {d} cannot be packed at {bits} bits")
        k_codes, k_scale, k_min = quantize_keys_per_channel(kv.keys, kv.lengths, bits, quant.group_size)
        groups = _group_mask(kv.lengths, k_scale.shape[2], quant.group_size)
        v_codes, v_scale, v_min = quantize_values_per_token(kv.values[mask], bits, quant.group_size)
        tensors["k_codes"] = pack(k_codes[mask], bits)
        tensors["k_scale"] = k_scale[groups]
        tensors["k_min"] = k_min[groups]
        tensors["v_codes"] = pack(v_codes, bits)
        tensors["v_scale"] = v_scale
        tensors["v_min"] = v_min
    metadata = {
        "num_tokens": str(kv.num_tokens),
        "n_max": str(n_max),
        "head_dim": str(d),
        "scheme": quant.scheme,
        "group_size": str(quant.group_size),
    }
    return _canonical(st_save({k: v.contiguous() for k, v in tensors.items()}, metadata=metadata))


def _canonical(blob: bytes) -> bytes:
    """Rewrite a safetensors header with sorted keys, so equal caches give equal bytes.

    ``safetensors`` serialises metadata from a hash map whose order changes between calls;
    sha256-addressed blobs and crash-resume byte comparisons need one canonical encoding.
    The header stays 8-byte aligned (padded with spaces, as safetensors itself does).
    """
    (header_len,) = struct.unpack("<Q", blob[:8])
    header = json.loads(blob[8 : 8 + header_len])
    text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + blob[8 + header_len :]


# Upper bound on a decoded cache's padded size, checked before anything is allocated.
MAX_DECODED_ELEMENTS = 1 << 28


def _metadata(blob: bytes) -> dict[str, str]:
    (header_len,) = struct.unpack("<Q", blob[:8])
    header = json.loads(blob[8 : 8 + header_len])
    meta = header.get("__metadata__", {})
    if not isinstance(meta, dict):
        raise ValueError("metadata is not an object")
    return meta


def decode(blob: bytes, dtype: torch.dtype = torch.float32, shape: tuple[int, int, int] | None = None) -> PassageKV:
    """Inverse of :func:`encode`; keys come back un-rotated, as ``dtype``.

    ``shape`` is the expected ``(layers, kv_heads, head_dim)`` (a store passes its manifest's).
    Shapes are checked against each other, and sizes bounded, before anything is allocated; an
    inconsistent blob raises :class:`CorruptSegmentError` instead of producing a wrong cache.
    """
    try:
        meta = _metadata(blob)
        tensors = st_load(blob)
        num_tokens, n_max, d = int(meta["num_tokens"]), int(meta["n_max"]), int(meta["head_dim"])
        scheme, group_size = meta["scheme"], int(meta["group_size"])
        quant = QuantConfig(scheme, group_size)
        lengths = tensors["lengths"].long()
    except Exception as exc:  # malformed header, missing key, bad value
        raise CorruptSegmentError(f"unreadable segment blob ({exc})") from exc
    if lengths.dim() != 2:
        raise CorruptSegmentError(f"segment lengths have shape {tuple(lengths.shape)}, expected [layers, heads]")
    layers, heads = lengths.shape
    if shape is not None and (layers, heads, d) != tuple(shape):
        raise CorruptSegmentError(
            f"segment has (layers, kv_heads, head_dim) = {(layers, heads, d)}, the store's model has {tuple(shape)}"
        )
    if min(num_tokens, n_max, d) < 0 or layers * heads * max(n_max, 1) * max(d, 1) > MAX_DECODED_ELEMENTS:
        raise CorruptSegmentError(f"segment declares an impossible size ({layers}x{heads}x{n_max}x{d})")
    if (lengths < 0).any() or (lengths > n_max).any() or n_max > num_tokens:
        raise CorruptSegmentError("segment lengths are out of range")
    mask = torch.arange(n_max) < lengths.unsqueeze(-1)
    total = int(lengths.sum())
    positions = torch.arange(n_max).expand(layers, heads, n_max).clone()
    if "positions" in tensors:
        flat = tensors["positions"].long()
        if flat.shape != (total,) or (flat < 0).any() or (flat >= num_tokens).any():
            raise CorruptSegmentError("segment positions are inconsistent with its lengths")
        positions[mask] = flat
    dense = bool(mask.all())  # nothing evicted: rows are already in (layer, head, row) order

    def rows_to_grid(flat: torch.Tensor, grid_mask: torch.Tensor, fill_dtype: torch.dtype) -> torch.Tensor:
        grid_shape = tuple(grid_mask.shape) + tuple(flat.shape[1:])
        if bool(grid_mask.all()):
            return flat.to(fill_dtype).reshape(grid_shape)
        grid = torch.zeros(grid_shape, dtype=fill_dtype)
        grid[grid_mask] = flat.to(fill_dtype)
        return grid

    try:
        if quant.bits is None:
            keys = rows_to_grid(tensors["k"], mask, dtype)
            values = rows_to_grid(tensors["v"], mask, dtype)
        else:
            bits = quant.bits
            k_codes = rows_to_grid(unpack(tensors["k_codes"], bits), mask, torch.uint8)
            n_groups = -(-n_max // group_size)
            groups = _group_mask(lengths, n_groups, group_size)
            k_scale = rows_to_grid(tensors["k_scale"], groups, torch.float16)
            k_min = rows_to_grid(tensors["k_min"], groups, torch.float16)
            keys = dequantize_keys_per_channel(k_codes, k_scale, k_min, group_size).to(dtype)
            v = dequantize_values_per_token(unpack(tensors["v_codes"], bits), tensors["v_scale"], tensors["v_min"])
            values = rows_to_grid(v, mask, dtype)
            if not dense:
                keys = keys * mask.unsqueeze(-1)  # padding rows are zero, as for unquantized blobs
        if keys.shape[-1] != d or values.shape[-1] != d:
            raise ValueError(f"tensors have head_dim {keys.shape[-1]}/{values.shape[-1]}, metadata says {d}")
        return PassageKV(keys, values, positions, lengths, num_tokens)
    except (KeyError, RuntimeError, IndexError, ValueError, TypeError) as exc:
        raise CorruptSegmentError(f"segment tensors do not match their declared shape ({exc})") from exc
