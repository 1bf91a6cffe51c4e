"""KIVI-style asymmetric integer quantization of KV caches (Liu et al., 2024, "KIVI").

Keys are quantized *per channel* (each channel gets its own scale over a group of ``group_size``
consecutive tokens) because key outliers live in fixed channels; values are quantized *per token*
(groups of ``group_size`` channels), because value errors mix across channels in the attention
output. Scales and minimums are fp16: a group above 65504 is measured from fp16's largest value,
but one whose minimum is below -65504 or whose step exceeds 65504 (or that holds inf or nan) is
refused rather than stored as inf (:class:`~ragcompress.errors.UnstorableCacheError`). Decoding
to fp16 clamps to ±65504 (:func:`cast_dequantized`). ``int4`` packs two codes per byte, ``int2`` four.

Values may take another integer width than keys (``value_scheme``): keys decide *which* rows
attention reads, and an error there moves every weight, while a value error is averaged over the
rows read. On the evaluation model at ~24x fewer bytes than fp16, int4 keys with int2 values
(21 % of tokens kept) sit a quarter closer to full prefill (KL) than int2 for both (25 % kept)
at the same bytes (docs/compression.md).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ragcompress.errors import UnstorableCacheError

SCHEMES = ("none", "fp16", "int8", "int4", "int2")
FP16_MAX = torch.finfo(torch.float16).max  # 65504: scales, minimums and the fp16 scheme's rows
_BITS = {"int8": 8, "int4": 4, "int2": 2}


@dataclass(frozen=True)
class QuantConfig:
    """How passage caches are stored.

    ``none`` keeps the dtype the model computed in (bit-exact), ``fp16`` rounds to half precision,
    ``intN`` quantizes with groups of ``group_size`` tokens (keys) or channels (values).
    """

    scheme: str = "none"
    group_size: int = 32
    value_scheme: str | None = None  # values' own integer scheme (None: ``scheme``, as keys)

    def __post_init__(self) -> None:
        if self.scheme not in SCHEMES:
            raise ValueError(f"quant scheme {self.scheme!r} is not one of: {', '.join(SCHEMES)}")
        if self.group_size < 1 or self.group_size & (self.group_size - 1) or self.group_size > 1 << 16:
            raise ValueError(f"group_size must be a power of two in [1, 65536], got {self.group_size}")
        if self.value_scheme is not None:
            if self.value_scheme == self.scheme:  # one spelling per config: equal configs compare equal
                object.__setattr__(self, "value_scheme", None)
            elif self.scheme not in _BITS or self.value_scheme not in _BITS:
                raise ValueError(
                    f"values take their own width only between integer schemes ({', '.join(_BITS)}), "
                    f"not {self.value_scheme!r} beside keys {self.scheme!r}"
                )

    @property
    def bits(self) -> int | None:
        """The keys' bits (and the values' unless ``value_scheme`` says otherwise)."""
        return _BITS.get(self.scheme)

    @property
    def value_bits(self) -> int | None:
        return _BITS.get(self.value_scheme or self.scheme)

    def of(self, kind: str) -> QuantConfig:
        """The one-scheme config of ``kind`` (``"k"`` or ``"v"``): what its rows are coded with."""
        if kind not in ("k", "v"):
            raise ValueError(f"kind must be 'k' or 'v', got {kind!r}")
        if kind == "v" and self.value_scheme is not None:
            return QuantConfig(self.value_scheme, self.group_size)
        return QuantConfig(self.scheme, self.group_size)

    @property
    def name(self) -> str:
        """``int4``, or ``int4/int2`` when values take another width (keys first)."""
        return self.scheme if self.value_scheme is None else f"{self.scheme}/{self.value_scheme}"

    @classmethod
    def from_name(cls, name: str, group_size: int = 32) -> QuantConfig:
        """Inverse of :attr:`name`."""
        scheme, _, value_scheme = name.partition("/")
        return cls(scheme, group_size, value_scheme or None)


def quantize_last_dim(x: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Min-max quantize groups along the last dim: ``x [..., g] -> codes [..., g] uint8, scale, min [...]``."""
    dtype = x.dtype
    x = x.float()
    lo = x.amin(dim=-1)
    hi = x.amax(dim=-1)
    levels = (1 << bits) - 1
    # The min and scale are stored in fp16, so the codes are measured from the *stored* min
    # (rounded down, never above a value) with a scale rounded up to cover the whole range: a
    # group far from zero (a channel with a large offset: fp16's step there can exceed the
    # quantization step) then keeps every value within half a step instead of clamping.
    lo16 = _to_fp16(lo, rounding="down")
    scale = _to_fp16(((hi - lo16) / levels).clamp_min(1e-8), rounding="up")
    bad = ~(lo16.isfinite() & scale.isfinite())  # below -65504, a step above 65504, or inf/nan
    if bool(bad.any()):
        if not bool(x.isfinite().all()):
            raise non_finite_cache(dtype)
        raise UnstorableCacheError(
            f"cannot quantize to int{bits}: a group spans [{lo[bad].min():.6g}, {hi[bad].max():.6g}], a value "
            f"out of fp16 range (±{FP16_MAX:g}), and int{bits} keeps each group's minimum and step "
            "in fp16; store this cache unquantized (quant 'none' keeps the model's dtype, e.g. fp32)"
        )
    codes = torch.round((x - lo16.unsqueeze(-1)) / scale.unsqueeze(-1)).clamp_(0, levels)
    return codes.to(torch.uint8), scale.to(torch.float16), lo16.to(torch.float16)


def _to_fp16(x: torch.Tensor, rounding: str) -> torch.Tensor:
    """``x`` (fp32) as the nearest fp16 value at or below it (``down``) or at or above it (``up``),
    returned as fp32."""
    near = x.to(torch.float16)
    if rounding == "down":
        moved = torch.nextafter(near, torch.tensor(float("-inf"), dtype=torch.float16))
        return torch.where(near.float() > x, moved, near).float()
    moved = torch.nextafter(near, torch.tensor(float("inf"), dtype=torch.float16))
    return torch.where(near.float() < x, moved, near).float()


def to_fp16(x: torch.Tensor) -> torch.Tensor:
    """``x`` rounded to fp16 (the ``fp16`` scheme), refusing a value that would become inf."""
    half = x.half()
    if not bool(half.isfinite().all()):
        if not bool(x.isfinite().all()):
            raise non_finite_cache(x.dtype)
        raise UnstorableCacheError(
            f"cannot store in fp16: a value of magnitude {x.float().abs().max():.6g} is out of fp16 range "
            f"(±{FP16_MAX:g}); store this cache unquantized (quant 'none' keeps the model's dtype, e.g. fp32)"
        )
    return half


# A dtype whose range holds what overflowed in another (float32's is bfloat16's, with more precision).
_WIDER = {torch.float16: "bfloat16 or float32", torch.bfloat16: "float32"}


def non_finite_cache(dtype: torch.dtype, where: str = "") -> UnstorableCacheError:
    """The error for a cache of ``dtype`` holding inf or NaN (``where``: e.g. " (keys of layer
    1)"). The model overflowed computing it, so no scheme can keep it, ``none`` included (it
    stored the NaN as it is and every answer over the passage read it): the remedy is the model
    in a dtype of wider range (callers that know the passage add leaving it out)."""
    name = str(dtype).removeprefix("torch.")
    wider = _WIDER.get(dtype)
    remedy = f"encode with the model in {wider} (--dtype, --overwrite for an existing store)"
    return UnstorableCacheError(
        f"the cache holds inf or NaN{where}: the model overflowed computing it in {name}; "
        + (remedy if wider else "check the model's weights")
    )


def cast_dequantized(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Dequantized rows ``x`` (fp32, a buffer the caller owns: clamped in place) as ``dtype``.

    For fp16 they are clamped to ±65504 first: a group reaching fp16's largest value is measured
    from its fp16 minimum with a step rounded up, so ``min + code * step`` can pass 65504 by up to
    a step (65535 at int8), which the cast made inf and the attention NaN. Every value within
    fp16's range casts exactly as before; other dtypes hold every dequantized value (their range
    is fp32's) and are cast unchanged."""
    if dtype == torch.float16:
        x = x.clamp_(-FP16_MAX, FP16_MAX)
    return x.to(dtype)


def dequantize(codes: torch.Tensor, scale: torch.Tensor, lo: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`quantize_last_dim` with scale and min broadcast over the last dim.

    Written as one fp32 buffer updated in place (convert, then ``mul_``, ``add_``): this runs on
    every request over every stored row, and each temporary of the plain expression costs a
    fresh allocation (page faults) and a pass over memory."""
    out = torch.empty(codes.shape, dtype=torch.float32, device=codes.device).copy_(codes)
    return out.mul_(scale.float().unsqueeze(-1)).add_(lo.float().unsqueeze(-1))


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack ``8 // bits`` codes per byte along the last dim (little end first)."""
    if bits == 8:
        return codes
    per_byte = 8 // bits
    grouped = codes.reshape(*codes.shape[:-1], codes.shape[-1] // per_byte, per_byte).to(torch.int32)
    shifts = torch.arange(per_byte, dtype=torch.int32) * bits
    return (grouped << shifts).sum(dim=-1).to(torch.uint8)


def unpack(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of :func:`pack`: ``[..., n * bits / 8] -> [..., n]`` uint8 codes."""
    if bits == 8:
        return packed
    per_byte = 8 // bits
    shifts = torch.arange(per_byte, dtype=torch.int32) * bits
    codes = (packed.to(torch.int32).unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
    return codes.reshape(*packed.shape[:-1], packed.shape[-1] * per_byte).to(torch.uint8)


def quantize_keys_per_channel(
    keys: torch.Tensor, lengths: torch.Tensor, bits: int, group_size: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-channel key quantization over token groups.

    keys: ``[L, H, n, d]`` with ``lengths [L, H]`` real rows per head. Rows past a head's length
    (and the padding to a whole group) repeat its last real row, so they never widen a group's
    range. Returns codes ``[L, H, n, d]`` and scale/min ``[L, H, n_groups, d]``.
    """
    layers, heads, n, d = keys.shape
    n_groups = -(-n // group_size)
    rows = torch.arange(n_groups * group_size)
    last = (lengths - 1).clamp_min(0).unsqueeze(-1)  # [L, H, 1]
    index = torch.minimum(rows.expand(layers, heads, -1), last)  # [L, H, n_pad]
    padded = torch.gather(keys, 2, index.unsqueeze(-1).expand(-1, -1, -1, d))
    grouped = padded.reshape(layers, heads, n_groups, group_size, d).transpose(-1, -2)
    codes, scale, lo = quantize_last_dim(grouped, bits)  # codes [L, H, G, d, gs]
    codes = codes.transpose(-1, -2).reshape(layers, heads, n_groups * group_size, d)[:, :, :n]
    return codes, scale, lo


def dequantize_keys_per_channel(
    codes: torch.Tensor, scale: torch.Tensor, lo: torch.Tensor, group_size: int
) -> torch.Tensor:
    """codes ``[..., n, d]``, scale/min ``[..., n_groups, d]`` -> keys ``[..., n, d]`` fp32."""
    n, d = codes.shape[-2:]
    n_groups = scale.shape[-2]
    padded = (
        torch.nn.functional.pad(codes, (0, 0, 0, n_groups * group_size - n)) if n_groups * group_size != n else codes
    )
    grouped = padded.reshape(*codes.shape[:-2], n_groups, group_size, d)  # broadcast, no gather
    out = torch.empty(grouped.shape, dtype=torch.float32, device=codes.device).copy_(grouped)
    out.mul_(scale.float().unsqueeze(-2)).add_(lo.float().unsqueeze(-2))  # in place: see dequantize
    return out.reshape(*codes.shape[:-2], n_groups * group_size, d)[..., :n, :]


def quantize_values_per_token(
    values: torch.Tensor, bits: int, group_size: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """values ``[..., d]`` -> codes ``[..., d]``, scale/min ``[..., d // group]``."""
    d = values.shape[-1]
    group = min(group_size, d)
    if d % group:
        raise ValueError(f"head_dim {d} is not a multiple of the value group size {group}")
    grouped = values.reshape(*values.shape[:-1], d // group, group)
    codes, scale, lo = quantize_last_dim(grouped, bits)
    return codes.reshape(values.shape), scale, lo


def dequantize_values_per_token(codes: torch.Tensor, scale: torch.Tensor, lo: torch.Tensor) -> torch.Tensor:
    d = codes.shape[-1]
    groups = scale.shape[-1]
    grouped = codes.reshape(*codes.shape[:-1], groups, d // groups)
    return dequantize(grouped, scale, lo).reshape(codes.shape)


def quantize_dequantize(kind: str, rows: torch.Tensor, lengths: torch.Tensor, quant: QuantConfig) -> torch.Tensor:
    """The keys (``kind="k"``, un-rotated) or values (``"v"``) ``[L, H, n, d]`` a store of
    ``quant`` gives back for these (``lengths [L, H]`` real rows per head), with the identity's
    gradient (straight-through): how training sees the quantization the store will apply. The
    same functions as the store codec, so on real rows the result equals a stored and decoded
    cache. One kind at a time, as ``LowRankBasis.round_trip``, so a projected kind is not also
    quantized for nothing."""
    quant = quant.of(kind)
    bits = quant.bits
    if bits is None:
        if quant.scheme != "fp16":
            return rows
        out = to_fp16(rows.detach()).to(rows.dtype)
    elif kind == "k":
        codes, scale, low = quantize_keys_per_channel(rows.detach(), lengths, bits, quant.group_size)
        out = cast_dequantized(dequantize_keys_per_channel(codes, scale, low, quant.group_size), rows.dtype)
    else:
        out = dequantize_values_per_token(*quantize_values_per_token(rows.detach(), bits, quant.group_size))
        out = cast_dequantized(out, rows.dtype)
    # q + (x - x) is q exactly (x + (q - x) can round off q by an ulp), with x's gradient
    return out + (rows - rows.detach())
