"""Fused attention of query tokens over packed, quantized passage caches (Triton + PyTorch ref).

One pass per layer computes ``softmax(q K^T * scale) V`` where the keys/values are

1. **quantized segments** (passages loaded from the store): KIVI codes (Liu et al., 2024, "KIVI")
   with keys quantized per channel over groups of ``group_size`` rows and values per token over
   groups of ``v_group`` channels, stored *un-rotated*; the kernel dequantizes them and applies
   RoPE at each kept token's assigned position (``cos``/``sin`` tables from the model's own
   rotary embedding, in its convention: channel ``i`` turning with ``i + rot/2`` or with its
   neighbour, over all of a head or its first ``rot`` channels), so the dequantized cache is never
   materialised in memory;
2. **fp keys/values** (the uncompressed prefix followed by the freshly computed tokens, as the
   transformers cache holds them, already rotated), with bottom-right causal masking for the
   query block.

Softmax is online (Dao et al., 2022, "FlashAttention"); q heads sharing a KV head (GQA) are
packed into one tile so each K/V tile is loaded once per group; for decode the work is split over
segments (split-K, "Flash-Decoding", Dao et al., 2023) and a second kernel reduces the partial
results. :func:`packed_attention_ref` is the PyTorch reference (fp32) and the CPU path.

The layout the kernel reads is :class:`QuantizedSegments`; ``docs/kernels.md`` states how it is
derived from the store's blobs (``ragcompress/store/codec.py``).
"""

from __future__ import annotations

import bisect
import itertools
import math
from dataclasses import dataclass
from functools import cache, cached_property, lru_cache

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # the PyTorch path needs no Triton
    triton = None

HAS_TRITON = triton is not None
BACKENDS = ("auto", "triton", "torch")


class SegmentsLayout:
    """What the packed and the latent segment layouts share: the derived sizes and the check of
    each tensor's shape, dtype and device against what the kernels will read (a mixin of the two
    frozen dataclasses; no fields of its own)."""

    k_codes: torch.Tensor
    positions: torch.Tensor
    seg_len: torch.Tensor
    cos: torch.Tensor
    sin: torch.Tensor
    bits: int
    v_bits: int | None
    seg_start_host: tuple[int, ...]
    rot_dim: int | None
    paired: bool

    @property
    def value_bits(self) -> int:
        return self.bits if self.v_bits is None else self.v_bits

    @property
    def num_heads(self) -> int:
        return self.k_codes.shape[0]

    @property
    def head_dim(self) -> int:
        return self.cos.shape[-1]

    @property
    def num_segments(self) -> int:
        return len(self.seg_start_host) - 1

    @property
    def rotary_dim(self) -> int:
        """Channels of a head that RoPE turns: all, or the first ``rot_dim`` (partial rotary)."""
        return self.head_dim if self.rot_dim is None else self.rot_dim

    @cached_property
    def rope_tables_pair_up(self) -> bool:
        """Whether ``cos``/``sin`` give each channel its RoPE partner's angle (``cat(freqs, freqs)``
        as transformers builds rotate_half tables, or each value twice for paired RoPE) and
        channels RoPE leaves ``cos`` 1: the Triton kernels' two-dot RoPE relies on it; the PyTorch
        reference takes any tables. Computed once per layout (a device sync on CUDA)."""
        partner = rope_partners(self.head_dim, self.rotary_dim, self.paired).to(self.cos.device)
        rot = self.rotary_dim
        passed = self.cos[:, rot:]
        return (
            torch.equal(self.cos[:, :rot], self.cos[:, partner[:rot]])
            and torch.equal(self.sin[:, :rot], self.sin[:, partner[:rot]])
            and bool((passed == 1).all())
        )

    def check_rope(self) -> None:
        """Raise unless ``rot_dim`` is an even count of channels within head_dim."""
        rot = self.rotary_dim
        if rot <= 0 or rot % 2 or rot > self.head_dim:
            raise ValueError(f"rot_dim must be even and within head_dim {self.head_dim}, got {rot}")

    def check_rows(self) -> None:
        """Raise unless every head's kept rows fit its segment and every position has a RoPE
        table row: the kernels trust both (a larger ``seg_len`` reads the next segment's rows, a
        position outside the tables reads outside them). Checked on CPU tensors only: on CUDA it
        would cost a device sync per layer and request, and the runtime's builders
        (``from_blobs``, ``from_segments``) derive both from the blobs, which the store checks."""
        positions, seg_len = self.positions, self.seg_len
        if seg_len.device.type != "cpu":
            return
        sizes = torch.tensor(self.seg_start_host[1:]) - torch.tensor(self.seg_start_host[:-1])
        if seg_len.numel() and (bool((seg_len < 0).any()) or bool((seg_len > sizes.to(seg_len.dtype)).any())):
            raise ValueError("seg_len must be within [0, each segment's rows] for every head")
        if positions.numel() and (int(positions.min()) < 0 or int(positions.max()) >= self.cos.shape[0]):
            raise ValueError(f"positions must be within the RoPE tables' [0, {self.cos.shape[0]}) rows")

    def check_tensors(self, expected: dict[str, tuple[tuple[int, ...], torch.dtype]], contiguous: bool) -> None:
        """Raise naming the first tensor whose shape, dtype or device (or layout) is not ``expected``."""
        for name, (shape, dtype) in expected.items():
            tensor = getattr(self, name)
            if tuple(tensor.shape) != shape or tensor.dtype != dtype:
                raise ValueError(f"{name}: expected {shape} {dtype}, got {tuple(tensor.shape)} {tensor.dtype}")
            if tensor.device != self.k_codes.device:
                raise ValueError(f"{name} is on {tensor.device}, k_codes on {self.k_codes.device}")
            if contiguous and not tensor.is_contiguous():
                raise ValueError(f"{name} must be contiguous")


@dataclass(frozen=True)
class QuantizedSegments(SegmentsLayout):
    """Quantized passage segments of one layer, laid out for :func:`packed_attention`.

    Segments sit one after another along the row axis; segment ``s`` owns rows
    ``seg_start[s] : seg_start[s+1]`` (a multiple of ``group_size`` rows, so key group ``g`` of the
    layer is rows ``g*group_size …``), of which head ``h`` keeps the first ``seg_len[h, s]``.
    ``H`` = kv heads, ``N`` = total rows, ``S`` = segments, ``d`` = head_dim, ``pb = 8 // bits``
    (keys) and ``vpb = 8 // value_bits`` (values; ``v_bits``, default ``bits``).

    k_codes:   ``[H, N, d // pb]`` uint8, ``pb`` codes per byte, lowest bits first
    k_scale:   ``[H, N // group_size, d]`` fp16 (per channel, per group of rows); ``k_min`` alike
    v_codes:   ``[H, N, d // vpb]`` uint8
    v_scale:   ``[H, N, d // v_group]`` fp16 (per row, per group of channels); ``v_min`` alike
    positions: ``[H, N]`` int32 RoPE position of each row in the prompt (padding rows: any valid
               position, e.g. their segment's start; ``seg_len`` masks them)
    seg_start: ``[S + 1]`` int32 row offsets, ``seg_start[-1] == N``; ``seg_start_host`` the same
    seg_len:   ``[H, S]`` int32 kept rows per head and segment
    cos, sin:  ``[P, d]`` fp32 rotary tables (``P`` > every position), attention scaling included;
               channels RoPE leaves (``>= rot_dim``) hold cos 1, sin 0
    rot_dim:   channels RoPE turns (``None``: all of ``d``; fewer for partial rotary)
    paired:    RoPE turns channels ``2i, 2i+1`` together (Cohere, GLM) instead of ``i, i + rot/2``
    """

    k_codes: torch.Tensor
    k_scale: torch.Tensor
    k_min: torch.Tensor
    v_codes: torch.Tensor
    v_scale: torch.Tensor
    v_min: torch.Tensor
    positions: torch.Tensor
    seg_start: torch.Tensor
    seg_len: torch.Tensor
    cos: torch.Tensor
    sin: torch.Tensor
    bits: int
    group_size: int
    v_group: int
    seg_start_host: tuple[int, ...]
    v_bits: int | None = None  # values' bits when they differ from the keys'
    rot_dim: int | None = None
    paired: bool = False

    def __post_init__(self) -> None:
        heads, rows, packed = self.k_codes.shape
        d = self.cos.shape[-1]
        if self.bits not in (2, 4, 8) or self.value_bits not in (2, 4, 8):
            raise ValueError(f"bits must be 2, 4 or 8, got {self.bits} (keys) / {self.value_bits} (values)")
        pb = 8 // self.bits
        segs = len(self.seg_start_host) - 1
        expected = {
            "k_codes": ((heads, rows, d // pb), torch.uint8),
            "v_codes": ((heads, rows, d * self.value_bits // 8), torch.uint8),
            "k_scale": ((heads, rows // self.group_size, d), torch.float16),
            "k_min": ((heads, rows // self.group_size, d), torch.float16),
            "v_scale": ((heads, rows, d // self.v_group), torch.float16),
            "v_min": ((heads, rows, d // self.v_group), torch.float16),
            "positions": ((heads, rows), torch.int32),
            "seg_start": ((segs + 1,), torch.int32),
            "seg_len": ((heads, segs), torch.int32),
            "sin": ((self.cos.shape[0], d), torch.float32),
            "cos": ((self.cos.shape[0], d), torch.float32),
        }
        self.check_tensors(expected, contiguous=True)  # the kernel indexes them as contiguous
        self.check_rope()
        self.check_rows()
        if rows % self.group_size or any(s % self.group_size for s in self.seg_start_host):
            raise ValueError(f"segment rows must be multiples of group_size {self.group_size}")
        if self.seg_start_host[-1] != rows or d % self.v_group or d % 2:
            raise ValueError("seg_start must end at N and head_dim must be even and a multiple of v_group")


# --------------------------------------------------------------------------- PyTorch reference


def _unpack_ref(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """``[..., d // pb]`` uint8 -> ``[..., d]`` fp32 codes (lowest bits first)."""
    if bits == 8:
        return packed.float()
    pb = 8 // bits
    shifts = torch.arange(0, 8, bits, device=packed.device, dtype=torch.uint8)
    codes = (packed.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
    return codes.reshape(*packed.shape[:-1], packed.shape[-1] * pb).float()


def dequantize_rows_ref(
    k_codes: torch.Tensor,
    k_scale: torch.Tensor,
    k_min: torch.Tensor,
    v_codes: torch.Tensor,
    v_scale: torch.Tensor,
    v_min: torch.Tensor,
    positions: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    bits: int,
    group_size: int,
    v_group: int,
    v_bits: int | None = None,
    rot_dim: int | None = None,
    paired: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dequantize and rotate rows with any leading dims ``[...]`` (``[H]``, or ``[L, H]`` to do
    every layer in one pass): codes ``[..., N, d // pb]``, k_scale/k_min ``[..., N / gs, d]``,
    v_scale/v_min ``[..., N, d / v_group]``, positions ``[..., N]``, cos/sin ``[P, d]``.
    ``v_bits``: the values' bits when they differ from the keys' ``bits``; ``rot_dim`` and
    ``paired``: the RoPE convention (:func:`rope_ref`).
    Returns fp32 keys (RoPE applied) and values ``[..., N, d]``."""
    *lead, rows, _ = k_codes.shape
    d = k_scale.shape[-1]
    keys = _unpack_ref(k_codes, bits).view(*lead, rows // group_size, group_size, d)
    keys = torch.addcmul(k_min.float().unsqueeze(-2), keys, k_scale.float().unsqueeze(-2)).view(*lead, rows, d)
    values = dequantize_values_ref(v_codes, v_scale, v_min, bits if v_bits is None else v_bits, v_group)
    return rope_ref(keys, positions, cos, sin, rot_dim, paired), values


def rope_partners(head_dim: int, rot_dim: int, paired: bool) -> torch.Tensor:
    """``[head_dim]`` long: the channel each channel turns with under RoPE (``i + rot/2`` modulo
    ``rot``, or its neighbour when ``paired``); channels ``>= rot_dim`` are their own."""
    cols = torch.arange(head_dim)
    turned = cols ^ 1 if paired else (cols + rot_dim // 2) % rot_dim
    return torch.where(cols < rot_dim, turned, cols)


def rotate_ref(x: torch.Tensor, rot_dim: int, paired: bool) -> torch.Tensor:
    """RoPE's ``rotate_half`` of ``x [..., d]`` in either convention over the first ``rot_dim``
    channels (``(-x[i + rot/2], x[i])``, or ``(-x[2i+1], x[2i])`` when ``paired``); channels RoPE
    leaves are 0, so ``x cos + rotate_ref(x) sin`` keeps them where their cos is 1."""
    turned = x[..., :rot_dim]
    if paired:
        turned = torch.stack((-turned[..., 1::2], turned[..., 0::2]), dim=-1).flatten(-2)
    else:
        half = rot_dim // 2
        turned = torch.cat((-turned[..., half:], turned[..., :half]), dim=-1)
    return torch.nn.functional.pad(turned, (0, x.shape[-1] - rot_dim))


def rope_ref(
    keys: torch.Tensor,
    positions: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    rot_dim: int | None = None,
    paired: bool = False,
) -> torch.Tensor:
    """``keys [..., N, d]`` rotated to ``positions [..., N]`` by tables ``cos``/``sin [P, d]``
    (channels ``>= rot_dim`` at cos 1, sin 0) in the model's convention."""
    d = keys.shape[-1]
    rot = d if rot_dim is None else rot_dim
    pos = positions.long()
    half = d // 2
    cos_h, sin_h = cos[:, :half], sin[:, :half]
    if rot == d and not paired and torch.equal(cos[:, half:], cos_h) and torch.equal(sin[:, half:], sin_h):
        # the usual ``cat(freqs, freqs)`` tables: gather half of them, rotate the two halves
        c, s = cos_h[pos], sin_h[pos]
        x1, x2 = keys[..., :half], keys[..., half:]
        return torch.cat((x1 * c - x2 * s, torch.addcmul(x2 * c, x1, s)), dim=-1)
    return torch.addcmul(keys * cos[pos], rotate_ref(keys, rot, paired), sin[pos])


def dequantize_values_ref(
    v_codes: torch.Tensor, v_scale: torch.Tensor, v_min: torch.Tensor, v_bits: int, v_group: int
) -> torch.Tensor:
    """Values of any leading dims: codes ``[..., N, d * v_bits / 8]``, scale/min ``[..., N, d / v_group]``
    (per row, per group of ``v_group`` channels) -> ``[..., N, d]`` fp32."""
    *lead, rows, groups = v_scale.shape
    values = _unpack_ref(v_codes, v_bits).view(*lead, rows, groups, v_group)
    dequantized = torch.addcmul(v_min.float().unsqueeze(-1), values, v_scale.float().unsqueeze(-1))
    return dequantized.view(*lead, rows, groups * v_group)  # not -1: a layout may hold no rows


def valid_rows_ref(seg_start: tuple[int, ...], seg_len: torch.Tensor) -> torch.Tensor:
    """``[..., N]`` bool: row ``r`` of segment ``s`` is kept when ``r - seg_start[s] < seg_len[..., s]``."""
    device = seg_len.device
    segs = len(seg_start) - 1
    sizes = torch.tensor([seg_start[i + 1] - seg_start[i] for i in range(segs)], dtype=torch.long, device=device)
    owner = torch.repeat_interleave(torch.arange(segs, device=device), sizes)  # [N]
    starts = torch.tensor(seg_start[:-1], dtype=torch.long, device=device)
    offset = torch.arange(seg_start[-1], device=device) - starts[owner]
    return offset < seg_len.long()[..., owner]


def dequantize_segments_ref(seg: QuantizedSegments) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Dequantize and rotate every row: keys ``[H, N, d]`` (RoPE applied), values ``[H, N, d]``
    fp32, and ``valid [H, N]`` bool (False on padding rows)."""
    keys, values = dequantize_rows_ref(
        seg.k_codes,
        seg.k_scale,
        seg.k_min,
        seg.v_codes,
        seg.v_scale,
        seg.v_min,
        seg.positions,
        seg.cos,
        seg.sin,
        seg.bits,
        seg.group_size,
        seg.v_group,
        seg.value_bits,
        seg.rot_dim,
        seg.paired,
    )
    return keys, values, valid_rows_ref(seg.seg_start_host, seg.seg_len)


def drop_padding_rows(
    keys: torch.Tensor, values: torch.Tensor, valid: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``keys/values [..., N, d]``, ``valid [..., N]``: remove rows no head uses; ``valid``
    becomes ``None`` when every remaining row is valid everywhere (no eviction: no mask needed)."""
    used = valid.reshape(-1, valid.shape[-1]).any(dim=0)
    if not bool(used.all()):
        keys, values, valid = keys[..., used, :], values[..., used, :], valid[..., used]
    return keys, values, None if bool(valid.all()) else valid


def attention_over_dense_ref(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    seg_keys: torch.Tensor,
    seg_values: torch.Tensor,
    seg_valid: torch.Tensor | None,
    scale: float,
    masks: dict | None = None,
) -> torch.Tensor:
    """SDPA of ``query [B, Hq, q, d]`` over dequantized segment rows (``seg_* [H, N, ·]``,
    ``seg_valid [H, N]`` or ``None`` = all valid) and the fp ``key/value [B, H, T, d]``
    (bottom-right causal). Returns ``[B, q, Hq, d]`` in query's dtype. ``masks`` memoizes the
    head-independent causal mask across calls (layers) of one step."""
    batch, q_heads, q_len, d = query.shape
    kv_heads, total = key.shape[1], key.shape[2]
    dtype = query.dtype
    keys = torch.cat((seg_keys.to(dtype).unsqueeze(0).expand(batch, -1, -1, -1), key), dim=2)
    values = torch.cat((seg_values.to(dtype).unsqueeze(0).expand(batch, -1, -1, -1), value), dim=2)
    rows = seg_keys.shape[1]
    group = q_heads // kv_heads
    mask = None
    if seg_valid is not None:
        mask = torch.empty((kv_heads, q_len, rows + total), dtype=torch.bool, device=query.device)
        mask[:, :, :rows] = seg_valid.unsqueeze(1)
        mask[:, :, rows:] = torch.ones(q_len, total, dtype=torch.bool, device=query.device).tril(total - q_len)
        mask = mask.unsqueeze(1).expand(-1, group, -1, -1).reshape(1, q_heads, q_len, rows + total)
    elif q_len > 1:
        shape = (q_len, rows + total)
        mask = None if masks is None else masks.get(shape)
        if mask is None:
            mask = torch.ones(shape, dtype=torch.bool, device=query.device).tril(rows + total - q_len)
            if masks is not None:
                masks[shape] = mask
    out = torch.nn.functional.scaled_dot_product_attention(
        query, keys, values, attn_mask=mask, scale=scale, enable_gqa=group > 1
    )
    return out.transpose(1, 2)


def packed_attention_ref(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, seg: QuantizedSegments, scale: float | None = None
) -> torch.Tensor:
    """fp32 reference of :func:`packed_attention`: ``[B, q, Hq, d]`` in query's dtype."""
    scale = query.shape[-1] ** -0.5 if scale is None else scale
    seg_keys, seg_values, valid = dequantize_segments_ref(seg)
    out = attention_over_dense_ref(query.float(), key.float(), value.float(), seg_keys, seg_values, valid, scale)
    return out.to(query.dtype)


# --------------------------------------------------------------------------- Triton kernels

if HAS_TRITON:

    @triton.jit
    def load_query_tile(Q, b, qh, qi, m_valid, stride_qb, stride_qh, stride_qm, HEAD_DIM: tl.constexpr):  # fmt: skip
        """The tile's queries ``[BLOCK_M, HEAD_DIM]``: tile row ``i`` is q head ``qh[i]``, query token
        ``qi[i]`` (GQA packs a KV head's q heads into one tile); rows outside ``m_valid`` are 0."""
        cols = tl.arange(0, HEAD_DIM)
        return tl.load(
            Q + b * stride_qb + qh[:, None] * stride_qh + qi[:, None] * stride_qm + cols[None, :],
            mask=m_valid[:, None],
            other=0.0,
        )

    @triton.jit
    def load_rotated_query_tile(Q, b, qh, qi, m_valid, stride_qb, stride_qh, stride_qm, HEAD_DIM: tl.constexpr,
                                ROT_DIM: tl.constexpr, PAIRED: tl.constexpr):  # fmt: skip
        """``q' = -rotate(q)`` of the tile's queries in the model's RoPE convention (``[q2, -q1]``
        for rotate_half over ``ROT_DIM`` channels; ``(q1, -q0, q3, -q2, ...)`` when ``PAIRED``; 0
        on channels RoPE leaves). A rotated key is ``k cos + rotate(k) sin``, and since a channel
        and its partner share their angle, ``q . rotate(k) sin`` equals ``q' . (k sin)``: scores are
        ``q . (k cos) + q' . (k sin)``, so the kernels dequantize or rebuild each key channel once."""
        cols = tl.arange(0, HEAD_DIM)
        if PAIRED:
            partner = cols ^ 1
            keeps_sign = cols % 2 == 0
        else:
            partner = (cols + ROT_DIM // 2) % ROT_DIM
            keeps_sign = cols < ROT_DIM // 2
        turned = cols < ROT_DIM
        partner = tl.where(turned, partner, cols)
        q_rot = tl.load(
            Q + b * stride_qb + qh[:, None] * stride_qh + qi[:, None] * stride_qm + partner[None, :],
            mask=m_valid[:, None] & turned[None, :],
            other=0.0,
        )
        return tl.where(keeps_sign[None, :], q_rot, -q_rot)

    @triton.jit
    def rope_table_columns(HEAD_DIM: tl.constexpr, ROT_DIM: tl.constexpr, PAIRED: tl.constexpr):
        """The table column each channel reads: rotate_half tables over whole heads repeat over
        the halves, so only the first half is read (half the table traffic per key row; the
        duplicate addresses coalesce); other layouts read their own column."""
        cols = tl.arange(0, HEAD_DIM)
        if ROT_DIM == HEAD_DIM and not PAIRED:
            cols = cols % (HEAD_DIM // 2)
        return cols

    @triton.jit
    def softmax_step(q, k, v, allowed, m_i, l_i, acc, qk_scale, DOT_PRECISION: tl.constexpr):  # fmt: skip
        """One key tile of online softmax (FlashAttention): the scores of ``q`` against ``k``
        (base 2: ``qk_scale`` carries log2 e) where ``allowed``, folded into the running row max
        ``m_i``, normaliser ``l_i`` and output ``acc``; returns the three updated."""
        qk = tl.dot(q, tl.trans(k.to(q.dtype)), input_precision=DOT_PRECISION) * qk_scale
        return softmax_scores_step(qk, v, allowed, m_i, l_i, acc, q.dtype, DOT_PRECISION)

    @triton.jit
    def softmax_scores_step(qk, v, allowed, m_i, l_i, acc, dtype: tl.constexpr, DOT_PRECISION: tl.constexpr):  # fmt: skip
        """:func:`softmax_step` from the tile's scores ``qk`` (base 2, scaled), for kernels that
        compute them otherwise (both kernels' two RoPE dots); ``v`` is read as ``dtype``."""
        qk = tl.where(allowed, qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        p = tl.math.exp2(qk - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(dtype), v.to(dtype), input_precision=DOT_PRECISION)
        return m_new, l_i, acc

    @triton.jit
    def attend_fp_rows(q, K, V, b, kvh, qi, m_i, l_i, acc, qk_scale, Q_LEN, T_FP,
                       stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
                       HEAD_DIM: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_N: tl.constexpr):  # fmt: skip
        """Fold the fp rows (the uncompressed prefix, then the new tokens, already rotated) into
        the running softmax, bottom-right causal: query token ``i`` sees rows ``<= T_FP - Q_LEN + i``."""
        cols = tl.arange(0, HEAD_DIM)
        last = T_FP - Q_LEN + qi
        for off in range(0, T_FP, BLOCK_N):
            rows = off + tl.arange(0, BLOCK_N)
            r_valid = rows < T_FP
            k = tl.load(
                K + b * stride_kb + kvh * stride_kh + rows[:, None] * stride_kn + cols[None, :],
                mask=r_valid[:, None],
                other=0.0,
            )
            v = tl.load(
                V + b * stride_vb + kvh * stride_vh + rows[:, None] * stride_vn + cols[None, :],
                mask=r_valid[:, None],
                other=0.0,
            )
            allowed = r_valid[None, :] & (rows[None, :] <= last[:, None])
            m_i, l_i, acc = softmax_step(q, k, v, allowed, m_i, l_i, acc, qk_scale, DOT_PRECISION)
        return m_i, l_i, acc

    @triton.jit
    def store_output_tile(OUT, acc, l_i, b, qh, qi, m_valid, stride_ob, stride_oh, stride_om,
                          HEAD_DIM: tl.constexpr):  # fmt: skip
        """Normalise the tile's output and write it in transformers' ``[B, q, Hq, d]`` layout."""
        cols = tl.arange(0, HEAD_DIM)
        tl.store(
            OUT + b * stride_ob + qh[:, None] * stride_oh + qi[:, None] * stride_om + cols[None, :],
            (acc / l_i[:, None]).to(OUT.dtype.element_ty),
            mask=m_valid[:, None],
        )

    @triton.jit
    def split_row_range(SPLIT_SEG, pid_s):
        """Split ``pid_s``'s packed rows ``[row_lo, row_hi)`` and the segments ``[seg_lo, seg_hi)``
        they lie in (:func:`plan_splits`)."""
        base = SPLIT_SEG + pid_s * 4
        return tl.load(base), tl.load(base + 1), tl.load(base + 2), tl.load(base + 3)

    @triton.jit
    def segment_rows(SEG_START, SEG_LEN, seg, kvh, NUM_SEGS, row_lo, row_hi):
        """Segment ``seg``'s first packed row and this head's kept rows of it, as offsets
        ``[lo, hi)`` from that row, cut to the split's row range."""
        start = tl.load(SEG_START + seg)
        lo = tl.maximum(row_lo - start, 0)
        hi = tl.minimum(row_hi - start, tl.load(SEG_LEN + kvh * NUM_SEGS + seg))
        return start, lo, hi

    @triton.jit
    def finish_split(q, K, V, OUT, M_PART, L_PART, ACC_PART, m_i, l_i, acc, pid_s, b, kvh, qh, qi, m_valid,
                     qk_scale, Q_LEN, T_FP, BATCH, H_Q, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh,
                     stride_vn, stride_ob, stride_oh, stride_om, HEAD_DIM: tl.constexpr,
                     DOT_PRECISION: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT: tl.constexpr):  # fmt: skip
        """After a split's segment rows: the last split also folds in the fp rows
        (:func:`attend_fp_rows`); then its running ``(m, l, acc)`` goes into the partials
        ``_split_reduce`` combines, or, unsplit, the normalised output tile is written."""
        if pid_s == tl.num_programs(2) - 1:
            m_i, l_i, acc = attend_fp_rows(
                q, K, V, b, kvh, qi, m_i, l_i, acc, qk_scale, Q_LEN, T_FP,
                stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
                HEAD_DIM, DOT_PRECISION, BLOCK_N,
            )  # fmt: skip
        if SPLIT:
            cols = tl.arange(0, HEAD_DIM)
            part = (pid_s * BATCH + b) * H_Q * Q_LEN + qh * Q_LEN + qi  # [BLOCK_M] row of the partials
            tl.store(M_PART + part, m_i, mask=m_valid)
            tl.store(L_PART + part, l_i, mask=m_valid)
            tl.store(ACC_PART + part[:, None] * HEAD_DIM + cols[None, :], acc, mask=m_valid[:, None])
        else:
            store_output_tile(OUT, acc, l_i, b, qh, qi, m_valid, stride_ob, stride_oh, stride_om, HEAD_DIM)

    @triton.jit
    def load_value_rows(codes_head, scale_head, min_head, rows, r_valid, HEAD_DIM: tl.constexpr,
                        V_BITS: tl.constexpr, V_GROUP: tl.constexpr):  # fmt: skip
        """Dequantized values ``[BLOCK_N, HEAD_DIM]`` fp32 of ``rows`` of one head: codes ``[N,
        HEAD_DIM * V_BITS / 8]``, scale/min ``[N, HEAD_DIM / V_GROUP]`` (per row, per group of
        ``V_GROUP`` channels; KIVI's per-token values). Rows outside ``r_valid`` are 0."""
        V_PB: tl.constexpr = 8 // V_BITS
        V_GROUPS: tl.constexpr = HEAD_DIM // V_GROUP
        cols = tl.arange(0, HEAD_DIM)
        rmask = r_valid[:, None]
        byte = tl.load(codes_head + rows[:, None] * (HEAD_DIM // V_PB) + (cols // V_PB)[None, :], mask=rmask, other=0)
        code = ((byte.to(tl.int32) >> ((cols % V_PB) * V_BITS)[None, :]) & ((1 << V_BITS) - 1)).to(tl.float32)
        grp = rows[:, None] * V_GROUPS + (cols // V_GROUP)[None, :]
        v_s = tl.load(scale_head + grp, mask=rmask, other=0.0).to(tl.float32)
        v_m = tl.load(min_head + grp, mask=rmask, other=0.0).to(tl.float32)
        return code * v_s + v_m

    @triton.jit
    def _packed_attn_fwd(
        Q,
        K,
        V,
        KC,
        KS,
        KM,
        VC,
        VS,
        VM,
        POS,
        COS,
        SIN,
        SEG_START,
        SEG_LEN,
        SPLIT_SEG,
        OUT,
        M_PART,
        L_PART,
        ACC_PART,
        qk_scale,
        Q_LEN,
        T_FP,
        N_ROWS,
        NUM_SEGS,
        H_KV,
        H_Q,
        BATCH,
        stride_qb,
        stride_qh,
        stride_qm,
        stride_kb,
        stride_kh,
        stride_kn,
        stride_vb,
        stride_vh,
        stride_vn,
        stride_ob,
        stride_oh,
        stride_om,
        GROUP: tl.constexpr,
        HEAD_DIM: tl.constexpr,
        ROT_DIM: tl.constexpr,
        PAIRED: tl.constexpr,
        BITS: tl.constexpr,
        V_BITS: tl.constexpr,
        GROUP_SIZE: tl.constexpr,
        V_GROUP: tl.constexpr,
        SPLIT: tl.constexpr,
        DOT_PRECISION: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
    ):
        """Grid ``(cdiv(GROUP * Q_LEN, BLOCK_M), BATCH * H_KV, n_splits)``; tile rows are
        ``(q head in group, query token)`` pairs. Split ``s`` covers packed rows
        ``SPLIT_SEG[s, 0] : SPLIT_SEG[s, 1]``, which lie in segments ``SPLIT_SEG[s, 2] :
        SPLIT_SEG[s, 3]`` (:func:`plan_splits`); the last split also covers the fp rows."""
        pid_m = tl.program_id(0)
        pid_bh = tl.program_id(1)
        pid_s = tl.program_id(2)
        b = pid_bh // H_KV
        kvh = pid_bh % H_KV
        PB: tl.constexpr = 8 // BITS
        CODE_MASK: tl.constexpr = (1 << BITS) - 1
        V_PB: tl.constexpr = 8 // V_BITS

        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        m_valid = offs_m < GROUP * Q_LEN
        qh = kvh * GROUP + offs_m // Q_LEN
        qi = offs_m % Q_LEN
        cols = tl.arange(0, HEAD_DIM)
        q = load_query_tile(Q, b, qh, qi, m_valid, stride_qb, stride_qh, stride_qm, HEAD_DIM)
        # RoPE without rotating the keys' partner channels: two dots over k cos and k sin, and each key
        # channel is dequantized once (load_rotated_query_tile; resolve_backend refuses tables whose
        # partner channels do not share their angle)
        q_rot = load_rotated_query_tile(Q, b, qh, qi, m_valid, stride_qb, stride_qh, stride_qm, HEAD_DIM, ROT_DIM, PAIRED)  # fmt: skip
        rope_cols = rope_table_columns(HEAD_DIM, ROT_DIM, PAIRED)
        k_byte, k_shift = cols // PB, (cols % PB) * BITS
        ROW_BYTES: tl.constexpr = HEAD_DIM // PB
        V_ROW_BYTES: tl.constexpr = HEAD_DIM // V_PB
        V_GROUPS: tl.constexpr = HEAD_DIM // V_GROUP
        kc_head = KC + kvh * N_ROWS * ROW_BYTES
        vc_head = VC + kvh * N_ROWS * V_ROW_BYTES
        ks_head = KS + kvh * (N_ROWS // GROUP_SIZE) * HEAD_DIM
        km_head = KM + kvh * (N_ROWS // GROUP_SIZE) * HEAD_DIM
        vs_head = VS + kvh * N_ROWS * V_GROUPS
        vm_head = VM + kvh * N_ROWS * V_GROUPS

        m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)

        row_lo, row_hi, seg_lo, seg_hi = split_row_range(SPLIT_SEG, pid_s)
        for seg in range(seg_lo, seg_hi):
            start, lo, hi = segment_rows(SEG_START, SEG_LEN, seg, kvh, NUM_SEGS, row_lo, row_hi)
            for off in range(lo, hi, BLOCK_N):
                r = off + tl.arange(0, BLOCK_N)
                r_valid = r < hi
                rows = start + r
                rmask = r_valid[:, None]
                grp = (rows // GROUP_SIZE)[:, None] * HEAD_DIM
                # keys: dequantize, then the two RoPE halves of the scores (above)
                kc = tl.load(kc_head + rows[:, None] * ROW_BYTES + k_byte[None, :], mask=rmask, other=0)
                kc = ((kc.to(tl.int32) >> k_shift[None, :]) & CODE_MASK).to(tl.float32)
                k_s = tl.load(ks_head + grp + cols[None, :], mask=rmask, other=0.0).to(tl.float32)
                k_m = tl.load(km_head + grp + cols[None, :], mask=rmask, other=0.0).to(tl.float32)
                k = kc * k_s + k_m
                pos = tl.load(POS + kvh * N_ROWS + rows, mask=r_valid, other=0)
                cos = tl.load(COS + pos[:, None] * HEAD_DIM + rope_cols[None, :], mask=rmask, other=0.0)
                sin = tl.load(SIN + pos[:, None] * HEAD_DIM + rope_cols[None, :], mask=rmask, other=0.0)
                qk = tl.dot(q, tl.trans((k * cos).to(q.dtype)), input_precision=DOT_PRECISION)
                qk = tl.dot(q_rot, tl.trans((k * sin).to(q.dtype)), acc=qk, input_precision=DOT_PRECISION)
                # values: per-token groups of V_GROUP channels
                v = load_value_rows(vc_head, vs_head, vm_head, rows, r_valid, HEAD_DIM, V_BITS, V_GROUP)
                m_i, l_i, acc = softmax_scores_step(
                    qk * qk_scale, v, r_valid[None, :], m_i, l_i, acc, q.dtype, DOT_PRECISION
                )

        finish_split(
            q, K, V, OUT, M_PART, L_PART, ACC_PART, m_i, l_i, acc, pid_s, b, kvh, qh, qi, m_valid,
            qk_scale, Q_LEN, T_FP, BATCH, H_Q, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh,
            stride_vn, stride_ob, stride_oh, stride_om, HEAD_DIM, DOT_PRECISION, BLOCK_N, SPLIT,
        )  # fmt: skip

    @triton.jit
    def _split_reduce(
        M_PART,
        L_PART,
        ACC_PART,
        OUT,
        N_SPLITS,
        ROWS,
        H_Q,
        Q_LEN,
        stride_ob,
        stride_oh,
        stride_om,
        HEAD_DIM: tl.constexpr,
        BLOCK_S: tl.constexpr,
    ):
        """Grid ``(BATCH * H_Q * Q_LEN,)``: combine the per-split ``(m, l, acc)`` of one query row."""
        row = tl.program_id(0)
        s = tl.arange(0, BLOCK_S)
        s_valid = s < N_SPLITS
        cols = tl.arange(0, HEAD_DIM)
        m = tl.load(M_PART + s * ROWS + row, mask=s_valid, other=float("-inf"))
        l_s = tl.load(L_PART + s * ROWS + row, mask=s_valid, other=0.0)
        m_max = tl.max(m, 0)
        w = tl.where(s_valid, tl.math.exp2(m - m_max), 0.0)
        acc = tl.load(ACC_PART + (s * ROWS + row)[:, None] * HEAD_DIM + cols[None, :], mask=s_valid[:, None], other=0.0)
        out = tl.sum(acc * w[:, None], 0) / tl.sum(l_s * w, 0)
        b = row // (H_Q * Q_LEN)
        h = (row // Q_LEN) % H_Q
        i = row % Q_LEN
        tl.store(OUT + b * stride_ob + h * stride_oh + i * stride_om + cols, out.to(OUT.dtype.element_ty))

    def _hopper_configs() -> list:
        """Hopper-class search space: key-tile sizes, warps and pipeline stages."""
        return [
            triton.Config({"BLOCK_N": bn}, num_warps=w, num_stages=s)
            for bn in (32, 64, 128)
            for w in (4, 8)
            for s in (2, 3, 4)
        ]

    _packed_attn_fwd_tuned = triton.autotune(
        configs=_hopper_configs(), key=["GROUP", "HEAD_DIM", "BITS", "V_BITS", "BLOCK_M", "SPLIT", "DOT_PRECISION"]
    )(_packed_attn_fwd)


def _interpreted() -> bool:
    """True when Triton was imported with ``TRITON_INTERPRET=1`` (kernels run on CPU tensors)."""
    if not HAS_TRITON:
        return False
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(_packed_attn_fwd, InterpretedFunction)


def triton_supports_head_dim(head_dim: int) -> bool:
    """Whether the Triton kernels build for ``head_dim``: a power of two of at least 16 (a tile's
    channels are one ``tl.arange``, which spans powers of two, and ``tl.dot`` needs 16 or more).
    Other head dims (80 or 100: hidden sizes 2560 or 3200 over 32 heads) take the PyTorch path."""
    return head_dim >= 16 and head_dim & (head_dim - 1) == 0


def triton_runs_on(device: torch.device) -> bool:
    """Whether ``packed_attention(backend="triton")`` can run on tensors of ``device``: a CUDA
    device with triton installed, or any device under the interpreter."""
    return HAS_TRITON and (device.type == "cuda" or _interpreted())


SPLIT_ALIGN = 64  # split boundaries fall on multiples of this many packed rows (whole BLOCK_N <= 64 tiles)
MIN_SPLIT_ROWS = 128  # the automatic plan's smallest split: fewer rows cost more in partials than they save


def plan_splits(seg_start: tuple[int, ...], fp_rows: int, target: int) -> list[tuple[int, int, int, int]]:
    """Cut the packed rows into at most ``target`` contiguous ranges of similar size (the last
    also takes the ``fp_rows``), on multiples of :data:`SPLIT_ALIGN` rows and inside segments
    where that balances them: one program's walk is its range, not a whole passage. Returns
    ``(row_lo, row_hi, seg_lo, seg_hi)`` per split: rows ``[row_lo, row_hi)``, which lie in
    segments ``[seg_lo, seg_hi)``."""
    segs = len(seg_start) - 1
    rows = seg_start[-1]
    per_split = math.ceil((rows + fp_rows) / max(1, target))
    per_split = max(SPLIT_ALIGN, math.ceil(per_split / SPLIT_ALIGN) * SPLIT_ALIGN)
    bounds = [*range(0, rows, per_split), rows] if rows else [0, 0]
    return [
        (lo, hi, max(0, bisect.bisect_right(seg_start, lo) - 1), bisect.bisect_left(seg_start, hi, hi=segs))
        for lo, hi in itertools.pairwise(bounds)
    ]


def check_attention_inputs(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, seg: SegmentsLayout) -> None:
    """Shapes, dtypes, devices and strides every attention entry point needs (``seg``: the packed or
    the latent layout), each wrong one named."""
    if query.dim() != 4 or key.dim() != 4 or value.shape != key.shape:
        raise ValueError(
            f"query [B, Hq, q, d] and key/value [B, H, T, d] expected, got "
            f"{tuple(query.shape)}, {tuple(key.shape)}, {tuple(value.shape)}"
        )
    batch, q_heads, q_len, d = query.shape
    if key.shape[0] != batch or key.shape[3] != d or d != seg.head_dim:
        raise ValueError(
            f"batch/head_dim mismatch: query {tuple(query.shape)}, key {tuple(key.shape)}, "
            f"segments head_dim {seg.head_dim}"
        )
    if key.shape[1] != seg.num_heads or q_heads % seg.num_heads:
        raise ValueError(f"{q_heads} query heads over {key.shape[1]} kv heads, segments have {seg.num_heads}")
    if key.shape[2] < q_len:
        raise ValueError(f"key holds {key.shape[2]} rows, fewer than the {q_len} query tokens")
    if key.dtype != query.dtype or value.dtype != query.dtype:
        raise ValueError(f"dtypes differ: query {query.dtype}, key {key.dtype}, value {value.dtype}")
    for name, t in (("query", query), ("key", key), ("value", value)):
        if t.device != seg.k_codes.device:
            raise ValueError(f"{name} is on {t.device}, segments on {seg.k_codes.device}")
        if t.stride(-1) != 1:
            raise ValueError(f"{name} must be contiguous in head_dim (stride {t.stride(-1)})")


def resolve_backend(backend: str, query: torch.Tensor, seg: SegmentsLayout) -> str:
    """``"torch"`` or ``"triton"`` for ``backend`` (``"auto"``: Triton on CUDA for a head_dim it
    supports and rotary tables it can read, else torch), or a clear error when Triton was asked
    for where it cannot run. ``seg``'s tables are compared (:attr:`SegmentsLayout.rope_tables_pair_up`,
    a device sync the first time) only where Triton would otherwise run."""
    if backend not in BACKENDS:
        raise ValueError(f"backend {backend!r} is not one of: {', '.join(BACKENDS)}")
    on_cuda = query.device.type == "cuda"
    head_dim = query.shape[-1]
    if backend == "auto":
        fits = HAS_TRITON and on_cuda and triton_supports_head_dim(head_dim)
        return "triton" if fits and seg.rope_tables_pair_up else "torch"
    if backend == "triton":
        if not seg.rope_tables_pair_up:
            raise ValueError(
                "the Triton kernel needs cos/sin tables that give each RoPE channel its partner's angle (as the "
                "model's rotary module builds them) and cos 1 where RoPE leaves a channel; use backend='torch'"
            )
        if not triton_supports_head_dim(head_dim):
            raise ValueError(
                f"the Triton kernels need head_dim a power of two >= 16, got {head_dim}; use backend='torch'"
            )
        if not HAS_TRITON:
            raise RuntimeError("backend='triton' needs the triton package: pip install 'ragcompress-kv[triton]'")
        if not on_cuda and not _interpreted():
            raise RuntimeError(
                "the Triton kernel runs on CPU tensors only when TRITON_INTERPRET=1 was set "
                "before triton was first imported"
            )
        if not on_cuda and query.dtype == torch.bfloat16:
            raise ValueError(INTERPRETER_BF16)
    return backend


# Triton's interpreter (3.x) computes tl.dot on bfloat16 operands wrongly (a bare 16x16 product is
# off by ~1e10; float16 and float32 are exact): the kernel's numbers would be garbage, returned
# without a warning. A compiled kernel on a GPU is not affected.
INTERPRETER_BF16_FLAW = "Triton's interpreter (TRITON_INTERPRET=1) multiplies bfloat16 matrices wrongly"
INTERPRETER_BF16 = (
    f"{INTERPRETER_BF16_FLAW}, so the kernel cannot run bfloat16 queries on the CPU; "
    "use backend='torch' (packed-torch), or float16/float32 weights"
)


def packed_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    seg: QuantizedSegments,
    scale: float | None = None,
    *,
    backend: str = "auto",
    num_splits: int | None = None,
) -> torch.Tensor:
    """Attention of ``query`` over the quantized segments ``seg`` and the fp ``key``/``value``.

    query:     ``[B, Hq, q, d]`` rotated queries (fp16/bf16/fp32), ``Hq`` a multiple of ``H``
    key/value: ``[B, H, T, d]`` fp rows (prefix + new tokens, rotated); the last ``q`` rows are
               the query tokens themselves, so query ``i`` sees fp rows ``<= T - q + i``
    seg:       :class:`QuantizedSegments` (shared by the batch), fully visible to every query
    returns    ``[B, q, Hq, d]`` in query's dtype (transformers' attention-output layout)

    ``backend``: ``"triton"`` (GPU, or CPU under ``TRITON_INTERPRET=1``), ``"torch"``
    (:func:`packed_attention_ref`), ``"auto"`` (Triton on CUDA, else torch). ``num_splits``
    overrides the split-K plan (default: splits only for ``q <= 16``, about two waves of programs).
    """
    backend = resolve_backend(backend, query, seg)
    check_attention_inputs(query, key, value, seg)
    scale = query.shape[-1] ** -0.5 if scale is None else float(scale)
    if backend == "torch":
        return packed_attention_ref(query, key, value, seg, scale)
    return _launch(query, key, value, seg, scale, num_splits, interpret=query.device.type != "cuda")


@cache
def _multiprocessors(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


@lru_cache(maxsize=256)
def _split_tensor(splits: tuple[tuple[int, int, int, int], ...], device: torch.device) -> torch.Tensor:
    """The plan's ``[n_splits, 4]`` ranges as a device tensor, built once per plan (no
    host-to-device copy per call)."""
    return torch.tensor(splits, dtype=torch.int32, device=device)


@dataclass(frozen=True)
class SplitLaunch:
    """One launch's split-K: the plan's row ranges on the device, the output and, when split,
    the fp32 partials each split writes (``m``, ``l``, ``acc``) for :func:`reduce_splits`."""

    splits: torch.Tensor  # [n_splits, 4] int32 (plan_splits)
    n_splits: int
    out: torch.Tensor
    m_part: torch.Tensor
    l_part: torch.Tensor
    acc_part: torch.Tensor

    @property
    def split(self) -> bool:
        return self.n_splits > 1


def prepare_splits(
    query: torch.Tensor, seg: SegmentsLayout, t_fp: int, m_blocks: int, num_splits: int | None, interpret: bool
) -> SplitLaunch:
    """The split-K plan of one launch (``num_splits`` None: about two waves of programs for
    ``q_len <= 16``, none for prefill) and the buffers it writes."""
    batch, q_heads, q_len, d = query.shape
    kv_heads = seg.num_heads
    if num_splits is None:
        num_splits = 1
        if q_len <= 16:
            sms = 16 if interpret else _multiprocessors(query.device)
            waves = max(1, (2 * sms) // (batch * kv_heads * m_blocks))
            num_splits = min(waves, math.ceil((seg.seg_start_host[-1] + t_fp) / MIN_SPLIT_ROWS))
    splits = plan_splits(seg.seg_start_host, t_fp, num_splits)
    n_splits = len(splits)
    out = torch.empty((batch, q_len, q_heads, d), dtype=query.dtype, device=query.device)
    if n_splits > 1:
        m_part = torch.empty((n_splits, batch, q_heads, q_len), dtype=torch.float32, device=query.device)
        l_part = torch.empty_like(m_part)
        acc_part = torch.empty((n_splits, batch, q_heads, q_len, d), dtype=torch.float32, device=query.device)
    else:
        m_part = l_part = acc_part = out  # unused
    return SplitLaunch(_split_tensor(tuple(splits), query.device), n_splits, out, m_part, l_part, acc_part)


def reduce_splits(launch: SplitLaunch) -> torch.Tensor:
    """Combine the splits' partials into the output (nothing to do unsplit); returns it."""
    if launch.split:
        out = launch.out
        batch, q_len, q_heads, d = out.shape
        rows = batch * q_heads * q_len
        _split_reduce[(rows,)](
            launch.m_part,
            launch.l_part,
            launch.acc_part,
            out,
            launch.n_splits,
            rows,
            q_heads,
            q_len,
            out.stride(0),
            out.stride(2),
            out.stride(1),
            HEAD_DIM=d,
            BLOCK_S=max(2, triton.next_power_of_2(launch.n_splits)),
        )
    return launch.out


def _launch(
    query, key, value, seg: QuantizedSegments, scale: float, num_splits: int | None, interpret: bool
) -> torch.Tensor:
    batch, q_heads, q_len, d = query.shape
    kv_heads, t_fp = key.shape[1], key.shape[2]
    group = q_heads // kv_heads
    block_m = max(16, min(64, triton.next_power_of_2(group * q_len)))
    m_blocks = triton.cdiv(group * q_len, block_m)
    launch = prepare_splits(query, seg, t_fp, m_blocks, num_splits, interpret)
    out = launch.out
    args = (
        query,
        key,
        value,
        seg.k_codes,
        seg.k_scale,
        seg.k_min,
        seg.v_codes,
        seg.v_scale,
        seg.v_min,
        seg.positions,
        seg.cos,
        seg.sin,
        seg.seg_start,
        seg.seg_len,
        launch.splits,
        out,
        launch.m_part,
        launch.l_part,
        launch.acc_part,
        scale * 1.4426950408889634,
        q_len,
        t_fp,
        seg.k_codes.shape[1],
        seg.num_segments,
        kv_heads,
        q_heads,
        batch,
        *query.stride()[:3],
        *key.stride()[:3],
        *value.stride()[:3],
        out.stride(0),
        out.stride(2),
        out.stride(1),
    )
    consts = dict(
        GROUP=group,
        HEAD_DIM=d,
        ROT_DIM=seg.rotary_dim,
        PAIRED=seg.paired,
        BITS=seg.bits,
        V_BITS=seg.value_bits,
        GROUP_SIZE=seg.group_size,
        V_GROUP=seg.v_group,
        SPLIT=launch.split,
        DOT_PRECISION="ieee" if query.dtype == torch.float32 else "tf32",
        BLOCK_M=block_m,
    )
    grid = (m_blocks, batch * kv_heads, launch.n_splits)
    if interpret:  # the interpreter runs every autotune config: use one (64 keeps tests multi-tile)
        _packed_attn_fwd[grid](*args, **consts, BLOCK_N=64)
    else:
        _packed_attn_fwd_tuned[grid](*args, **consts)
    return reduce_splits(launch)
