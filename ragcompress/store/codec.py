"""Serialisation of one :class:`PassageKV` to a self-contained safetensors blob and back.

Only real (kept) rows are written, flattened in (layer, head, row) order, so per-head budgets
cost exactly what they keep. Tensors in a blob:

``lengths``      ``[L, H]`` int32: kept tokens per layer and head
``positions``    ``[T]`` int16/int32: offset of each kept row (absent when nothing was evicted)
``k`` / ``v``    ``[T, d]`` for ``none`` / ``fp16``
``k_codes``      ``[T, d*bits/8]`` uint8, ``k_scale``/``k_min`` ``[Gk, d]`` fp16 (per channel, token groups)
``v_codes``      ``[T, d*bits/8]`` uint8, ``v_scale``/``v_min`` ``[T, d/g]`` fp16 (per token)

A store encoded through an adaptor with a base copy (``IndexConfig(base_copy=True)``) also holds
each passage's base-model cache, every row kept, under the same names prefixed ``base.``
(:meth:`Segment.base_copy`): what the runtime reads for the first retrieved passage.

``T = lengths.sum()``, ``Gk = sum(ceil(lengths / group_size))``. The safetensors metadata holds
``num_tokens``, ``n_max``, ``head_dim``, ``scheme`` and ``group_size``. A low-rank store
(``kv/lowrank.py``) replaces ``k*`` (and ``v*`` when values are projected) by per-layer latents,
``k_lat*`` with ``k_ranks`` in the metadata (layout in ``store/latent.py``); they are rebuilt
with the store's basis. The format never uses
pickle: loading a blob cannot execute code.

:func:`parse` is the one reader of the format: it validates a blob once and returns a
:class:`Segment`, which converts to the dense form the runtime assembles (:meth:`Segment.dense`,
a :class:`PassageKV`) or to the packed form the fused kernel reads (:meth:`Segment.packed`, a
:class:`QuantizedBlob`, nothing dequantized).
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from functools import cached_property

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from ragcompress.errors import CorruptSegmentError, SegmentManifestMismatch
from ragcompress.kv import ModelShape, PassageKV
from ragcompress.kv.lowrank import LowRankBasis
from ragcompress.kv.quant import (
    QuantConfig,
    cast_dequantized,
    dequantize_keys_per_channel,
    dequantize_values_per_token,
    non_finite_cache,
    pack,
    quantize_keys_per_channel,
    quantize_values_per_token,
    to_fp16,
    unpack,
)
from ragcompress.store.latent import decode_latents, encode_latents, parse_ranks


def _group_mask(lengths: torch.Tensor, n_groups: int, group_size: int) -> torch.Tensor:
    used = -(-lengths // group_size)  # ceil
    return torch.arange(n_groups) < used.unsqueeze(-1)


def encode(
    kv: PassageKV, quant: QuantConfig, basis: LowRankBasis | None = None, base: PassageKV | None = None
) -> bytes:
    """Serialise ``kv`` (keys un-rotated) with ``quant``; returns the blob's bytes. With a
    ``basis``, keys (and values when the basis projects them) are stored as its latents. ``base``:
    the same passage's base-model cache, stored beside it as its base copy (both keep every row,
    no basis). A cache holding inf or NaN is refused under every ``quant``
    (:func:`refuse_non_finite`), and one whose heads do not keep their rows in strictly increasing
    positions (:func:`not_increasing`) with a ``ValueError``."""
    refuse_non_finite(kv)
    if base is not None:
        refuse_non_finite(base, "the base copy's ")
    layers, heads, n_max, d = kv.keys.shape
    mask = kv.valid_mask()
    tensors: dict[str, torch.Tensor] = {"lengths": kv.lengths.to(torch.int32)}
    if not kv.is_uniform:
        if (wrong := not_increasing(kv.positions, mask)) is not None:  # what parse refuses to read
            raise ValueError(f"cannot store the cache: its {wrong}; sort each head's kept rows by position")
        pos_dtype = torch.int16 if kv.num_tokens <= torch.iinfo(torch.int16).max else torch.int32
        tensors["positions"] = kv.positions[mask].to(pos_dtype)
    latent_meta = _encode_latents(kv, quant, basis, tensors) if basis is not None else {}
    _encode_rows(kv, quant, tensors, latents=frozenset(latent_meta))
    if base is not None:
        if basis is not None or not kv.is_uniform or not base.is_uniform or base.keys.shape != kv.keys.shape:
            raise ValueError("a base copy goes with a cache of every row, unprojected, of the same shape")
        _encode_rows(base, quant, tensors, prefix=BASE_COPY)
    metadata = {
        **latent_meta,
        "num_tokens": str(kv.num_tokens),
        "n_max": str(n_max),
        "head_dim": str(d),
        "scheme": quant.scheme,
        "group_size": str(quant.group_size),
        # only when values differ: blobs of one-scheme stores stay byte for byte what they were
        **({"value_scheme": quant.value_scheme} if quant.value_scheme else {}),
    }
    return _canonical(st_save({k: v.contiguous() for k, v in tensors.items()}, metadata=metadata))


def refuse_non_finite(kv: PassageKV, whose: str = "") -> None:
    """Raise :class:`~ragcompress.errors.UnstorableCacheError` when a kept row of ``kv`` holds
    inf or NaN. The integer and fp16 schemes refused them already (with a remedy that named
    ``none``), but ``none`` wrote them as they are: the store verified, and every answer over the
    passage read NaN attention. Checked here, before any scheme or projection, so all refuse
    alike, naming the layer."""
    mask = kv.valid_mask()
    for kind, rows in (("keys", kv.keys), ("values", kv.values)):
        bad = mask & ~rows.isfinite().all(-1)  # [L, H, n_max]
        if bool(bad.any()):
            layer = int(bad.nonzero()[0, 0])
            raise non_finite_cache(rows.dtype, f" ({whose}{kind} of layer {layer})")


def _encode_rows(
    kv: PassageKV,
    quant: QuantConfig,
    tensors: dict[str, torch.Tensor],
    prefix: str = "",
    latents: frozenset = frozenset(),
) -> None:
    """Add ``kv``'s kept key and value rows, as ``quant`` stores them, to ``tensors`` under
    ``prefix`` (the kinds whose ``{kind}_ranks`` are in ``latents`` are stored as latents instead)."""
    mask, d = kv.valid_mask(), kv.keys.shape[-1]
    for kind, rows in (("k", kv.keys), ("v", kv.values)):
        if f"{kind}_ranks" in latents:
            continue
        bits = quant.of(kind).bits
        if bits is None:
            tensors[prefix + kind] = to_fp16(rows[mask]) if quant.scheme == "fp16" else rows[mask]
            continue
        if d % (8 // bits):
            raise ValueError(f"head_dim {d} cannot be packed at {bits} bits")
        if kind == "k":
            k_codes, k_scale, k_min = quantize_keys_per_channel(rows, kv.lengths, bits, quant.group_size)
            groups = _group_mask(kv.lengths, k_scale.shape[2], quant.group_size)
            tensors[prefix + "k_codes"] = pack(k_codes[mask], bits)
            tensors[prefix + "k_scale"] = k_scale[groups]
            tensors[prefix + "k_min"] = k_min[groups]
        else:
            v_codes, v_scale, v_min = quantize_values_per_token(rows[mask], bits, quant.group_size)
            tensors[prefix + "v_codes"] = pack(v_codes, bits)
            tensors[prefix + "v_scale"] = v_scale
            tensors[prefix + "v_min"] = v_min


def _encode_latents(
    kv: PassageKV, quant: QuantConfig, basis: LowRankBasis, tensors: dict[str, torch.Tensor]
) -> dict[str, str]:
    """Add the latents of the kinds ``basis`` projects to ``tensors``; returns their metadata."""
    meta: dict[str, str] = {}
    for kind, rows in (("k", kv.keys), ("v", kv.values)):
        if basis.ranks(kind) is None:
            continue
        if rows.shape[-1] != basis.means[kind].shape[-1] or rows.shape[:2] != basis.means[kind].shape[:2]:
            raise ValueError(f"cache {tuple(rows.shape)} does not fit the basis {tuple(basis.means[kind].shape)}")
        more, kind_meta = encode_latents(kind, basis.project(kind, rows), kv.lengths, quant.of(kind), kv.keys.dtype)
        tensors.update(more)
        meta.update(kind_meta)
    return meta


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


# The base copy's tensors: the cache's own names behind this prefix.
BASE_COPY = "base."

# Upper bound on a decoded cache's padded size, checked before anything is allocated.
MAX_DECODED_ELEMENTS = 1 << 28


def _metadata(blob: bytes) -> dict[str, str]:
    (header_len,) = struct.unpack("<Q", blob[:8])
    header = json.loads(blob[8 : 8 + header_len])
    meta = header.get("__metadata__", {})
    if not isinstance(meta, dict):
        raise ValueError("metadata is not an object")
    return meta


@dataclass(frozen=True)
class QuantizedBlob:
    """One segment's quantized tensors padded per head to ``n_pad`` rows (a multiple of
    ``group_size``): the layout ``ragcompress_kernels.QuantizedSegments`` is cut from.

    k_codes/v_codes ``[L, H, n_pad, d // pb]`` uint8, k_scale/k_min ``[L, H, n_pad // gs, d]``,
    v_scale/v_min ``[L, H, n_pad, d // v_group]`` fp16, offsets ``[L, H, n_pad]`` int32 (offset
    inside the passage of each kept row), lengths ``[L, H]`` int32.
    """

    k_codes: torch.Tensor
    k_scale: torch.Tensor
    k_min: torch.Tensor
    v_codes: torch.Tensor
    v_scale: torch.Tensor
    v_min: torch.Tensor
    offsets: torch.Tensor
    lengths: torch.Tensor
    num_tokens: int
    quant: QuantConfig
    v_group: int

    @property
    def kept_tokens(self) -> int:
        return int(self.lengths.sum())


@dataclass(frozen=True)
class Segment:
    """A parsed, validated blob: header values and raw tensors, nothing dequantized yet.

    lengths:   ``[L, H]`` int64 kept rows per layer and head (``<= n_max <= num_tokens``)
    positions: ``[L, H, n_max]`` int64 offset inside the passage of each row, strictly increasing
               along each head's kept rows (``0..`` when nothing was evicted; padding rows hold
               their row index)
    tensors:   the blob's tensors by name (see the module docstring)
    ranks:     per kind (``"k"``, ``"v"``) stored as low-rank latents, its rank per layer
    """

    num_tokens: int
    n_max: int
    head_dim: int
    quant: QuantConfig
    lengths: torch.Tensor
    positions: torch.Tensor
    tensors: dict[str, torch.Tensor]
    ranks: dict[str, tuple[int, ...]] = field(default_factory=dict)

    def check_basis(self, basis: LowRankBasis | None) -> None:
        """Latents are read only with the basis they were projected on (same ranks per layer)."""
        for kind, ranks in self.ranks.items():
            if basis is None:
                raise CorruptSegmentError(f"segment stores {kind} latents but no low-rank basis was given")
            if basis.ranks(kind) != ranks:
                raise CorruptSegmentError(
                    f"segment's {kind} ranks {list(ranks)} are not the basis's {list(basis.ranks(kind) or ())}"
                )

    @property
    def kept_tokens(self) -> int:
        return int(self.lengths.sum())

    @property
    def has_base_copy(self) -> bool:
        return any(name.startswith(BASE_COPY) for name in self.tensors)

    def base_copy(self) -> Segment:
        """The passage's base-model cache stored beside this one (a store indexed with
        ``base_copy``), as a segment of its own: read like any other, every row kept."""
        if not self.has_base_copy:
            raise CorruptSegmentError("segment holds no base copy, which its store's manifest records")
        copy = {name.removeprefix(BASE_COPY): t for name, t in self.tensors.items() if name.startswith(BASE_COPY)}
        return Segment(self.num_tokens, self.n_max, self.head_dim, self.quant, self.lengths, self.positions, copy)

    def mask(self) -> torch.Tensor:
        """``[L, H, n_max]`` bool, True on kept rows."""
        return torch.arange(self.n_max) < self.lengths.unsqueeze(-1)

    def dense(self, dtype: torch.dtype = torch.float32, basis: LowRankBasis | None = None) -> PassageKV:
        """Dequantized keys (un-rotated) and values as ``dtype``, padded per head to ``n_max``;
        latents (a low-rank store) are rebuilt with ``basis``, the store's."""
        self.check_basis(basis)
        lengths, mask, d, group_size = self.lengths, self.mask(), self.head_dim, self.quant.group_size
        dense = bool(mask.all())  # nothing evicted: rows are already in (layer, head, row) order
        tensors = self.tensors
        try:
            if "k" in self.ranks:
                keys = self._rebuild("k", basis, dtype)
            elif self.quant.bits is None:
                keys = _rows_to_grid(tensors["k"], mask, dtype)
            elif dense:  # the rows are the grid: each group's scale and minimum broadcast over its rows
                k_codes = _rows_to_grid(unpack(tensors["k_codes"], self.quant.bits), mask, torch.uint8)
                groups = _group_mask(lengths, -(-self.n_max // group_size), group_size)
                k_scale = _rows_to_grid(tensors["k_scale"], groups, torch.float16)
                k_min = _rows_to_grid(tensors["k_min"], groups, torch.float16)
                keys = cast_dequantized(dequantize_keys_per_channel(k_codes, k_scale, k_min, group_size), dtype)
            else:  # only the kept rows, then scattered once: padding rows are zero, as for unquantized blobs
                codes = unpack(tensors["k_codes"], self.quant.bits)
                rows = _dequantize_kept_keys(codes, tensors["k_scale"], tensors["k_min"], lengths, group_size)
                keys = _rows_to_grid(cast_dequantized(rows, dtype), mask, dtype)
            if "v" in self.ranks:
                values = self._rebuild("v", basis, dtype)
            elif self.quant.value_bits is None:
                values = _rows_to_grid(tensors["v"], mask, dtype)
            else:
                bits = self.quant.value_bits
                v = dequantize_values_per_token(unpack(tensors["v_codes"], bits), tensors["v_scale"], tensors["v_min"])
                values = _rows_to_grid(cast_dequantized(v, dtype), mask, dtype)
            if keys.shape[-1] != d or values.shape[-1] != d:
                raise ValueError(f"tensors have head_dim {keys.shape[-1]}/{values.shape[-1]}, metadata says {d}")
            return PassageKV(keys, values, self.positions, lengths, self.num_tokens)
        except (KeyError, RuntimeError, IndexError, ValueError, TypeError) as exc:
            raise CorruptSegmentError(f"segment tensors do not match their declared shape ({exc})") from exc

    def latents(self, kind: str) -> list[torch.Tensor]:
        """Per-layer latents ``[H, n_max, r_l]`` fp32 of ``kind`` (dequantized, padding rows 0)."""
        return decode_latents(kind, self.tensors, self.ranks[kind], self.lengths, self.n_max, self.quant.of(kind))

    def _rebuild(self, kind: str, basis: LowRankBasis | None, dtype: torch.dtype) -> torch.Tensor:
        assert basis is not None  # check_basis
        layers, heads = self.lengths.shape
        out = torch.empty(layers, heads, self.n_max, self.head_dim, dtype=torch.float32)
        basis.reconstruct(kind, self.latents(kind), out)
        if not bool(self.mask().all()):
            out.mul_(self.mask().unsqueeze(-1))  # padding rows are zero, as for row blobs
        return cast_dequantized(out, dtype)

    def packed(self) -> QuantizedBlob:
        """The quantized tensors padded per head to a multiple of ``group_size`` rows, for the
        fused kernel; needs a quantized store (int8/int4/int2)."""
        bits = self.quant.bits
        if bits is None or self.quant.value_bits is None:
            raise ValueError(f"packed attention needs a quantized store (int8/int4/int2), not {self.quant.scheme!r}")
        gs, d, lengths = self.quant.group_size, self.head_dim, self.lengths
        n_pad = -(-max(self.n_max, 1) // gs) * gs
        rows = torch.arange(n_pad) < lengths.unsqueeze(-1)  # [L, H, n_pad]
        groups = torch.arange(n_pad // gs) < (-(-lengths // gs)).unsqueeze(-1)
        offsets = torch.nn.functional.pad(self.positions, (0, n_pad - self.n_max))
        offsets = torch.where(rows, offsets, 0).to(torch.int32)
        v_codes, v_scale, v_min, v_group = self.padded_value_rows(n_pad)
        try:
            return QuantizedBlob(
                k_codes=self._scatter(self.tensors["k_codes"], rows, (d // (8 // bits),), torch.uint8),
                k_scale=self._scatter(self.tensors["k_scale"], groups, (d,), torch.float16),
                k_min=self._scatter(self.tensors["k_min"], groups, (d,), torch.float16),
                v_codes=v_codes,
                v_scale=v_scale,
                v_min=v_min,
                offsets=offsets,
                lengths=lengths.to(torch.int32),
                num_tokens=self.num_tokens,
                quant=self.quant,
                v_group=v_group,
            )
        except KeyError as exc:
            raise CorruptSegmentError(f"segment blob lacks tensor {exc}") from exc

    def padded_value_rows(self, n_pad: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
        """The values' quantized rows padded per head to ``n_pad`` rows, nothing dequantized:
        codes ``[L, H, n_pad, d * v_bits / 8]`` uint8, scale and minimum ``[L, H, n_pad, d /
        v_group]`` fp16, and ``v_group`` (channels per scale). :meth:`packed` lays them out so,
        and the latent kernel reads them beside key latents (a keys-only projection)."""
        v_bits, d = self.quant.value_bits, self.head_dim
        if v_bits is None:
            raise ValueError(f"packed attention needs quantized values (int8/int4/int2), not {self.quant.scheme!r}")
        v_group = min(self.quant.group_size, d)
        rows = torch.arange(n_pad) < self.lengths.unsqueeze(-1)
        try:
            return (
                self._scatter(self.tensors["v_codes"], rows, (d * v_bits // 8,), torch.uint8),
                self._scatter(self.tensors["v_scale"], rows, (d // v_group,), torch.float16),
                self._scatter(self.tensors["v_min"], rows, (d // v_group,), torch.float16),
                v_group,
            )
        except KeyError as exc:
            raise CorruptSegmentError(f"segment blob lacks tensor {exc}") from exc

    @cached_property
    def _keeps_every_row(self) -> bool:
        """Every head keeps rows ``0..n_max-1`` (nothing evicted): flat rows reshape into the grid."""
        return bool((self.lengths == self.n_max).all())

    def _scatter(
        self, flat: torch.Tensor, mask: torch.Tensor, tail: tuple[int, ...], dtype: torch.dtype
    ) -> torch.Tensor:
        """Kept rows (or row groups) ``flat`` into a zero-padded ``[*mask.shape, *tail]`` grid;
        a reshape when every head keeps rows ``0..n_max-1``."""
        if tuple(flat.shape) != (int(mask.sum()), *tail) or flat.dtype != dtype:
            raise CorruptSegmentError(f"segment tensor {tuple(flat.shape)} {flat.dtype} does not match its lengths")
        if self._keeps_every_row:
            layers, heads = self.lengths.shape
            kept = flat.shape[0] // (layers * heads)
            out = flat.reshape(layers, heads, kept, *tail)
            return torch.nn.functional.pad(out, (0, 0) * len(tail) + (0, mask.shape[-1] - kept))
        out = torch.zeros((*mask.shape, *tail), dtype=dtype)
        out[mask] = flat
        return out


def _dequantize_kept_keys(
    codes: torch.Tensor, scale: torch.Tensor, lo: torch.Tensor, lengths: torch.Tensor, group_size: int
) -> torch.Tensor:
    """Kept key rows ``codes [T, d]`` dequantized where they lie in the blob: fp32 ``[T, d]``, each
    row with its group's ``scale``/``lo`` (``[Gk, d]``: ``ceil(length / group_size)`` groups per
    layer and head, ``lengths [L, H]``, in the blob's order).

    Dequantizing on the padded ``[L, H, n_max, d]`` grid would pass over every padding row too,
    then once more to zero them: with ``global:`` eviction some layer keeps every token, so
    ``n_max`` is the passage's length while about a quarter of the grid holds kept rows. (With
    nothing evicted the grid is all kept rows, and broadcasting each group's scale over its rows
    beats looking it up per row: :meth:`Segment.dense` keeps the grid there.) The arithmetic is
    :func:`~ragcompress.kv.quant.dequantize_keys_per_channel`'s (fp32 ``code * scale + min``), so
    the rows are the same bit for bit.
    """
    counts = lengths.reshape(-1).long()
    groups = -(-counts // group_size)
    head = torch.repeat_interleave(torch.arange(counts.numel()), counts)  # [T]: each row's (layer, head)
    row = torch.arange(head.numel()) - (torch.cumsum(counts, 0) - counts)[head]  # [T]: its row in the head
    group = (torch.cumsum(groups, 0) - groups)[head] + torch.div(row, group_size, rounding_mode="floor")
    out = torch.empty(codes.shape, dtype=torch.float32).copy_(codes)
    return out.mul_(scale.float().index_select(0, group)).add_(lo.float().index_select(0, group))


def _rows_to_grid(flat: torch.Tensor, grid_mask: torch.Tensor, fill_dtype: torch.dtype) -> torch.Tensor:
    """Kept rows ``[T, ...]`` scattered into a zero-padded ``[*grid_mask.shape, ...]`` grid."""
    grid_shape = tuple(grid_mask.shape) + tuple(flat.shape[1:])
    if bool(grid_mask.all()):
        return flat.to(fill_dtype).reshape(grid_shape)
    grid = torch.zeros(grid_shape, dtype=fill_dtype)
    grid[grid_mask] = flat.to(fill_dtype)
    return grid


def parse(
    blob: bytes, shape: ModelShape | tuple[int, int, int] | None = None, expected_quant: QuantConfig | None = None
) -> Segment:
    """Read and validate a blob's header, sizes, lengths and positions (nothing dequantized).

    ``shape`` is the expected ``(layers, kv_heads, head_dim)`` and ``expected_quant`` the expected
    quantization (a store passes its manifest's: a manifest changed after the store was built
    would otherwise describe segments it did not write, and later runs would add unlike ones).
    Shapes are checked against each other, and sizes bounded, before anything is allocated; an
    inconsistent blob raises :class:`CorruptSegmentError` instead of producing a wrong cache. The
    padded grid is as wide as the longest head (what :func:`encode` writes), so what decoding
    allocates grows with the rows the blob holds: a 640-byte blob declaring ``n_max`` in the
    millions with every head keeping no row allocated gigabytes within the element bound.
    """
    try:
        meta = _metadata(blob)
        tensors = st_load(blob)
        num_tokens, n_max, d = int(meta["num_tokens"]), int(meta["n_max"]), int(meta["head_dim"])
        quant = QuantConfig(meta["scheme"], int(meta["group_size"]), meta.get("value_scheme"))
        lengths = tensors["lengths"].long()
    except Exception as exc:  # malformed header, missing key, bad value
        raise CorruptSegmentError(f"unreadable segment blob ({exc})") from exc
    if lengths.dim() != 2:
        raise CorruptSegmentError(f"segment lengths have shape {tuple(lengths.shape)}, expected [layers, heads]")
    layers, heads = lengths.shape
    expected = shape.as_tuple() if isinstance(shape, ModelShape) else shape
    if expected is not None and (layers, heads, d) != tuple(expected):
        raise SegmentManifestMismatch(
            f"segment has (layers, kv_heads, head_dim) = {(layers, heads, d)}, the store's model has {tuple(expected)}"
        )
    if expected_quant is not None and quant != expected_quant:
        raise SegmentManifestMismatch(
            f"segment was written as {quant.name}, the store's manifest says {expected_quant.name}: the manifest "
            "was changed after the store was built; restore it, or rebuild the store"
        )
    if min(num_tokens, n_max, d) < 0 or layers * heads * max(n_max, 1) * max(d, 1) > MAX_DECODED_ELEMENTS:
        raise CorruptSegmentError(f"segment declares an impossible size ({layers}x{heads}x{n_max}x{d})")
    if (lengths < 0).any() or (lengths > n_max).any():
        raise CorruptSegmentError("segment lengths are out of range")
    if n_max > num_tokens:  # a head keeps each token of the passage at most once
        raise CorruptSegmentError(f"segment keeps up to {n_max} rows per head of a passage of {num_tokens} tokens")
    # encode pads to the longest head: a wider grid holds no row, it only allocates
    if lengths.numel() and n_max != int(lengths.max()):
        raise CorruptSegmentError(f"segment pads its heads to {n_max} rows but its longest keeps {int(lengths.max())}")
    positions = torch.arange(n_max).expand(layers, heads, n_max).clone()
    if "positions" in tensors:
        flat = tensors["positions"].long()
        if flat.shape != (int(lengths.sum()),) or (flat < 0).any() or (flat >= num_tokens).any():
            raise CorruptSegmentError("segment positions are inconsistent with its lengths")
        kept = torch.arange(n_max) < lengths.unsqueeze(-1)
        positions[kept] = flat
        if (wrong := not_increasing(positions, kept)) is not None:  # encode refuses to write them
            raise CorruptSegmentError(f"segment {wrong}")
    elif n_max != num_tokens or (lengths != n_max).any():  # only a cache of every row leaves them out
        raise CorruptSegmentError("segment evicts tokens but records no positions for the rows it keeps")
    ranks = {kind: r for kind in ("k", "v") if (r := parse_ranks(meta, kind)) is not None}
    if any(len(r) != layers or min(r, default=1) <= 0 or max(r, default=0) > d for r in ranks.values()):
        raise CorruptSegmentError(f"segment latent ranks {ranks} do not fit {layers} layers of head_dim {d}")
    return Segment(num_tokens, n_max, d, quant, lengths, positions, tensors, ranks)


def not_increasing(positions: torch.Tensor, kept: torch.Tensor) -> str | None:
    """Where the positions (``[L, H, n_max]``) of kept rows (``kept [L, H, n_max]``) first fail to
    strictly increase along a head, in words, or None. A head holds each token of its passage
    at most once, in passage order (``gather_kept`` sorts them): a position that repeats rotates
    two rows to one place, one that goes backwards places rows out of order."""
    bad = (positions[..., 1:] <= positions[..., :-1]) & kept[..., 1:]  # [L, H, n_max - 1]
    if not bool(bad.any()):
        return None
    layer, head, row = (int(i) for i in bad.nonzero()[0])
    after, then = int(positions[layer, head, row]), int(positions[layer, head, row + 1])
    return (
        f"positions must increase within each head, but layer {layer}, head {head} keeps position {then} after {after}"
    )


def decode(
    blob: bytes,
    dtype: torch.dtype = torch.float32,
    shape: ModelShape | tuple[int, int, int] | None = None,
    basis: LowRankBasis | None = None,
) -> PassageKV:
    """Inverse of :func:`encode`; keys come back un-rotated, as ``dtype`` (``parse`` then ``dense``)."""
    return parse(blob, shape).dense(dtype, basis)
