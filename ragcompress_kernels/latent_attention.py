"""Fused attention over low-rank passage latents: latent @ basis, then RoPE, then attention.

A low-rank store (``ragcompress/kv/lowrank.py``, Palu / ShadowKV style) keeps, per layer and KV
head, the latents ``z = (x - mean) @ U`` of un-rotated keys and of values, quantized per channel
over groups of ``group_size`` rows (``ragcompress/store/latent.py``). This kernel rebuilds each
tile of keys as ``z_k @ U_k^T + mean_k``, applies RoPE at each row's position inside the scores
(two dots, ``q . (k cos) + q' . (k sin)``: ``load_rotated_query_tile``), rebuilds values
as ``z_v @ U_v^T + mean_v`` (or, in a store that projects keys only, dequantizes the values'
quantized rows, which may have their own bit width: ``smallest``'s int2 values beside int4 key
latents) and runs the online softmax (FlashAttention) over the segments and
then over the fp rows (prefix + new tokens, bottom-right causal), q heads of one KV head packed
into one tile (GQA). The full-size keys and values are never written to memory.
:func:`latent_attention_ref` is the fp32 PyTorch reference (and the CPU path).

The online-softmax step, the loop over the fp rows, the query load and the output store are the
packed kernel's own (``quantized_attention.py``), and so is split-K (row ranges of the packed rows,
partials combined by ``_split_reduce``; since 2026-12-04, before which one program walked every
segment of its KV head): the two kernels differ only in how a tile of passage keys and values is
rebuilt.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .quantized_attention import (
    SegmentsLayout,
    _unpack_ref,
    attention_over_dense_ref,
    check_attention_inputs,
    dequantize_values_ref,
    prepare_splits,
    reduce_splits,
    resolve_backend,
    rope_ref,
    valid_rows_ref,
)

try:
    import triton
    import triton.language as tl
except ImportError:  # the PyTorch path needs no Triton
    triton = None

HAS_TRITON = triton is not None


@dataclass(frozen=True)
class LatentSegments(SegmentsLayout):
    """Latent passage segments of one layer, laid out for :func:`latent_attention`.

    Rows as in ``QuantizedSegments``: segment ``s`` owns rows ``seg_start[s] : seg_start[s+1]``
    (a multiple of ``group_size``), of which head ``h`` keeps the first ``seg_len[h, s]``.
    ``H`` kv heads, ``N`` rows, ``S`` segments, ``d`` head_dim, ``r`` a kind's rank, ``pb = 8 // bits``.

    k_codes:  ``[H, N, rk // pb]`` uint8 key latent codes, lowest bits first
    k_scale:  ``[H, N // group_size, rk]`` fp16 per channel and row group; ``k_min`` alike
    v_codes, v_scale, v_min: the value latents, the same layout with ``rv`` (and ``vpb = 8 //
              value_bits``); or, when ``v_basis`` is None (keys-only projection), the values'
              quantized rows as ``QuantizedSegments`` holds them: ``[H, N, d // vpb]`` codes,
              ``[H, N, d // v_group]`` fp16 scale and minimum per row and group of channels
    k_basis:  ``[H, rk, d]`` fp32 (``U_k`` transposed); ``k_mean`` ``[H, d]`` fp32; ``v_*`` alike
    v_bits:   the values' bits when they differ from the keys' ``bits``
    positions ``[H, N]`` int32, seg_start ``[S + 1]`` int32 (``seg_start_host`` the same),
    seg_len ``[H, S]`` int32, cos/sin ``[P, d]`` fp32 rotary tables (attention scaling included;
    cos 1, sin 0 on channels RoPE leaves), ``rot_dim`` / ``paired`` the RoPE convention as in
    ``QuantizedSegments``
    """

    k_codes: torch.Tensor
    k_scale: torch.Tensor
    k_min: torch.Tensor
    v_codes: torch.Tensor
    v_scale: torch.Tensor
    v_min: torch.Tensor
    k_basis: torch.Tensor
    k_mean: torch.Tensor
    v_basis: torch.Tensor | None
    v_mean: torch.Tensor | None
    positions: torch.Tensor
    seg_start: torch.Tensor
    seg_len: torch.Tensor
    cos: torch.Tensor
    sin: torch.Tensor
    bits: int
    group_size: int
    seg_start_host: tuple[int, ...]
    v_bits: int | None = None
    v_group: int | None = None  # values stored as rows: channels per scale
    rot_dim: int | None = None
    paired: bool = False

    def __post_init__(self) -> None:
        heads, rows, _ = self.k_codes.shape
        d = self.cos.shape[-1]
        if self.bits not in (2, 4, 8) or self.value_bits not in (2, 4, 8):
            raise ValueError(f"bits must be 2, 4 or 8, got {self.bits} (keys) / {self.value_bits} (values)")
        pb, vpb = 8 // self.bits, 8 // self.value_bits
        rk = self.k_basis.shape[1]
        segs = len(self.seg_start_host) - 1
        groups = rows // self.group_size
        if self.v_basis is not None and self.v_mean is not None:
            rv = self.v_basis.shape[1]
            values: dict[str, tuple[tuple[int, ...], torch.dtype]] = {
                "v_codes": ((heads, rows, rv // vpb), torch.uint8),
                "v_scale": ((heads, groups, rv), torch.float16),
                "v_min": ((heads, groups, rv), torch.float16),
                "v_basis": ((heads, rv, d), torch.float32),
                "v_mean": ((heads, d), torch.float32),
            }
            if rv % vpb:
                raise ValueError(f"value rank {rv} must be a multiple of {vpb} at {self.value_bits} bits")
        elif self.v_basis is None and self.v_mean is None and self.v_group and d % self.v_group == 0:
            values = {
                "v_codes": ((heads, rows, d // vpb), torch.uint8),
                "v_scale": ((heads, rows, d // self.v_group), torch.float16),
                "v_min": ((heads, rows, d // self.v_group), torch.float16),
            }
        else:
            raise ValueError(
                "values need a basis and a mean (latents), or neither and a v_group dividing head_dim (rows)"
            )
        expected = {
            "k_codes": ((heads, rows, rk // pb), torch.uint8),
            "k_scale": ((heads, groups, rk), torch.float16),
            "k_min": ((heads, groups, rk), torch.float16),
            "k_basis": ((heads, rk, d), torch.float32),
            "k_mean": ((heads, d), torch.float32),
            **values,
            "positions": ((heads, rows), torch.int32),
            "seg_start": ((segs + 1,), torch.int32),
            "seg_len": ((heads, segs), torch.int32),
            "cos": ((self.cos.shape[0], d), torch.float32),
            "sin": ((self.cos.shape[0], d), torch.float32),
        }
        self.check_tensors(expected, contiguous=True)
        self.check_rope()
        self.check_rows()
        if rk % pb:
            raise ValueError(f"key rank {rk} must be a multiple of {pb} at {self.bits} bits")
        if rows % self.group_size or any(s % self.group_size for s in self.seg_start_host):
            raise ValueError(f"segment rows must be multiples of group_size {self.group_size}")
        if self.seg_start_host[-1] != rows or d % 2:
            raise ValueError("seg_start must end at N and head_dim must be even")


# --------------------------------------------------------------------------- PyTorch reference


def _dequantize_latents_ref(codes: torch.Tensor, scale: torch.Tensor, low: torch.Tensor, bits: int, gs: int):
    """codes ``[H, N, r // pb]``, scale/min ``[H, N // gs, r]`` -> latents ``[H, N, r]`` fp32."""
    heads, rows, _ = codes.shape
    r = scale.shape[-1]
    z = _unpack_ref(codes, bits).view(heads, rows // gs, gs, r)
    return torch.addcmul(low.float().unsqueeze(-2), z, scale.float().unsqueeze(-2)).view(heads, rows, r)


def rebuild_latent_segments_ref(seg: LatentSegments) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Keys ``[H, N, d]`` (rebuilt, RoPE applied), values ``[H, N, d]`` fp32 and ``valid [H, N]``."""
    zk = _dequantize_latents_ref(seg.k_codes, seg.k_scale, seg.k_min, seg.bits, seg.group_size)
    keys = torch.baddbmm(seg.k_mean.unsqueeze(1), zk, seg.k_basis)
    if seg.v_basis is not None and seg.v_mean is not None:
        zv = _dequantize_latents_ref(seg.v_codes, seg.v_scale, seg.v_min, seg.value_bits, seg.group_size)
        values = torch.baddbmm(seg.v_mean.unsqueeze(1), zv, seg.v_basis)
    else:
        assert seg.v_group is not None  # __post_init__
        values = dequantize_values_ref(seg.v_codes, seg.v_scale, seg.v_min, seg.value_bits, seg.v_group)
    keys = rope_ref(keys, seg.positions, seg.cos, seg.sin, seg.rot_dim, seg.paired)
    return keys, values, valid_rows_ref(seg.seg_start_host, seg.seg_len)


def latent_attention_ref(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, seg: LatentSegments, scale: float | None = None
) -> torch.Tensor:
    """fp32 reference of :func:`latent_attention`: ``[B, q, Hq, d]`` in query's dtype."""
    scale = query.shape[-1] ** -0.5 if scale is None else scale
    keys, values, valid = rebuild_latent_segments_ref(seg)
    out = attention_over_dense_ref(query.float(), key.float(), value.float(), keys, values, valid, scale)
    return out.to(query.dtype)


# --------------------------------------------------------------------------- Triton kernel

if HAS_TRITON:
    from .quantized_attention import (  # Triton functions shared with the packed kernel
        finish_split,
        load_query_tile,
        load_rotated_query_tile,
        load_value_rows,
        rope_table_columns,
        segment_rows,
        softmax_scores_step,
        split_row_range,
    )

    @triton.jit
    def _load_latents(codes_head, scale_head, min_head, rows, rmask, R: tl.constexpr, R_PAD: tl.constexpr,
                      BITS: tl.constexpr, GROUP_SIZE: tl.constexpr):  # fmt: skip
        """Dequantized latents ``[BLOCK_N, R_PAD]`` fp32 of ``rows`` (channels >= R are 0)."""
        PB: tl.constexpr = 8 // BITS
        ch = tl.arange(0, R_PAD)
        ch_ok = ch < R
        m = rmask[:, None] & ch_ok[None, :]
        byte = tl.load(codes_head + rows[:, None] * (R // PB) + (ch // PB)[None, :], mask=m, other=0)
        code = ((byte.to(tl.int32) >> ((ch % PB) * BITS)[None, :]) & ((1 << BITS) - 1)).to(tl.float32)
        grp = (rows // GROUP_SIZE)[:, None] * R + ch[None, :]
        s = tl.load(scale_head + grp, mask=m, other=0.0).to(tl.float32)
        lo = tl.load(min_head + grp, mask=m, other=0.0).to(tl.float32)
        return tl.where(m, code * s + lo, 0.0)

    @triton.jit
    def _latent_attn_fwd(
        Q, K, V, KC, KS, KM, VC, VS, VM, KB, KMEAN, VB, VMEAN, POS, COS, SIN, SEG_START, SEG_LEN, SPLIT_SEG,
        OUT, M_PART, L_PART, ACC_PART, qk_scale, Q_LEN, T_FP, N_ROWS, NUM_SEGS, H_KV, H_Q, BATCH,
        stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
        stride_ob, stride_oh, stride_om,
        GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, ROT_DIM: tl.constexpr, PAIRED: tl.constexpr,
        BITS: tl.constexpr, GROUP_SIZE: tl.constexpr,
        V_LATENT: tl.constexpr, V_BITS: tl.constexpr, V_GROUP: tl.constexpr,
        RK: tl.constexpr, RV: tl.constexpr, RK_PAD: tl.constexpr, RV_PAD: tl.constexpr, SPLIT: tl.constexpr,
        DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    ):  # fmt: skip
        """Grid ``(cdiv(GROUP * Q_LEN, BLOCK_M), BATCH * H_KV, n_splits)``; tile rows are ``(q head
        in group, query token)`` pairs and splits are row ranges, as in ``_packed_attn_fwd``.
        ``V_LATENT``: values are latents of rank ``RV`` (else quantized rows, ``V_GROUP`` channels
        per scale, ``RV`` unused)."""
        pid_m = tl.program_id(0)
        pid_bh = tl.program_id(1)
        pid_s = tl.program_id(2)
        b = pid_bh // H_KV
        kvh = pid_bh % H_KV

        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        m_valid = offs_m < GROUP * Q_LEN
        qh = kvh * GROUP + offs_m // Q_LEN
        qi = offs_m % Q_LEN
        cols = tl.arange(0, HEAD_DIM)
        q = load_query_tile(Q, b, qh, qi, m_valid, stride_qb, stride_qh, stride_qm, HEAD_DIM)
        # RoPE as two dots over k cos and k sin (load_rotated_query_tile says why): each key is
        # rebuilt once, without its RoPE partner channels
        q_rot = load_rotated_query_tile(Q, b, qh, qi, m_valid, stride_qb, stride_qh, stride_qm, HEAD_DIM, ROT_DIM, PAIRED)  # fmt: skip
        rope_cols = rope_table_columns(HEAD_DIM, ROT_DIM, PAIRED)

        # this head's key basis (U^T, rows >= rank are 0) and mean, once per program
        rk = tl.arange(0, RK_PAD)
        kb_head = KB + kvh * RK * HEAD_DIM
        basis_k = tl.load(kb_head + rk[:, None] * HEAD_DIM + cols[None, :], mask=(rk < RK)[:, None], other=0.0)
        mean_k = tl.load(KMEAN + kvh * HEAD_DIM + cols)

        groups = N_ROWS // GROUP_SIZE
        kc_head = KC + kvh * N_ROWS * (RK // (8 // BITS))
        ks_head = KS + kvh * groups * RK
        km_head = KM + kvh * groups * RK
        if V_LATENT:
            rv = tl.arange(0, RV_PAD)
            basis_v = tl.load(
                VB + kvh * RV * HEAD_DIM + rv[:, None] * HEAD_DIM + cols[None, :], mask=(rv < RV)[:, None], other=0.0
            )
            mean_v = tl.load(VMEAN + kvh * HEAD_DIM + cols)
            vc_head = VC + kvh * N_ROWS * (RV // (8 // V_BITS))
            vs_head = VS + kvh * groups * RV
            vm_head = VM + kvh * groups * RV
        else:
            vc_head = VC + kvh * N_ROWS * (HEAD_DIM // (8 // V_BITS))
            vs_head = VS + kvh * N_ROWS * (HEAD_DIM // V_GROUP)
            vm_head = VM + kvh * N_ROWS * (HEAD_DIM // V_GROUP)

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
                zk = _load_latents(kc_head, ks_head, km_head, rows, r_valid, RK, RK_PAD, BITS, GROUP_SIZE)
                # latent @ basis, then the two RoPE halves of the scores
                k = tl.dot(zk, basis_k, input_precision=DOT_PRECISION) + mean_k[None, :]
                pos = tl.load(POS + kvh * N_ROWS + rows, mask=r_valid, other=0)
                cos = tl.load(COS + pos[:, None] * HEAD_DIM + rope_cols[None, :], mask=r_valid[:, None], other=0.0)
                sin = tl.load(SIN + pos[:, None] * HEAD_DIM + rope_cols[None, :], mask=r_valid[:, None], other=0.0)
                qk = tl.dot(q, tl.trans((k * cos).to(q.dtype)), input_precision=DOT_PRECISION)
                qk = tl.dot(q_rot, tl.trans((k * sin).to(q.dtype)), acc=qk, input_precision=DOT_PRECISION)
                if V_LATENT:
                    zv = _load_latents(vc_head, vs_head, vm_head, rows, r_valid, RV, RV_PAD, V_BITS, GROUP_SIZE)
                    v = tl.dot(zv, basis_v, input_precision=DOT_PRECISION) + mean_v[None, :]
                else:
                    v = load_value_rows(vc_head, vs_head, vm_head, rows, r_valid, HEAD_DIM, V_BITS, V_GROUP)
                m_i, l_i, acc = softmax_scores_step(
                    qk * qk_scale, v, r_valid[None, :], m_i, l_i, acc, q.dtype, DOT_PRECISION
                )

        finish_split(
            q, K, V, OUT, M_PART, L_PART, ACC_PART, m_i, l_i, acc, pid_s, b, kvh, qh, qi, m_valid,
            qk_scale, Q_LEN, T_FP, BATCH, H_Q, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh,
            stride_vn, stride_ob, stride_oh, stride_om, HEAD_DIM, DOT_PRECISION, BLOCK_N, SPLIT,
        )  # fmt: skip

    def _latent_configs() -> list:
        """A smaller search space than the packed kernel's: each program also holds its head's
        bases (``RK_PAD x HEAD_DIM`` fp32 for the keys, and the values'; until 2026-12-04 the keys'
        twice, for the rotate_half partners), so 128-row tiles are left out, and the GPU check
        compiles 8 configs per key, not 18. Chosen without a GPU; the GPU check's log records which
        one wins."""
        return [
            triton.Config({"BLOCK_N": bn}, num_warps=w, num_stages=s) for bn in (32, 64) for w in (4, 8) for s in (2, 3)
        ]

    _latent_attn_fwd_tuned = triton.autotune(
        configs=_latent_configs(),
        key=[
            "GROUP",
            "HEAD_DIM",
            "BITS",
            "V_BITS",
            "V_LATENT",
            "RK_PAD",
            "RV_PAD",
            "BLOCK_M",
            "SPLIT",
            "DOT_PRECISION",
        ],
    )(_latent_attn_fwd)


def latent_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    seg: LatentSegments,
    scale: float | None = None,
    *,
    backend: str = "auto",
    block_n: int | None = None,
    num_splits: int | None = None,
) -> torch.Tensor:
    """Attention of ``query`` over the latent segments ``seg`` and the fp ``key``/``value``.

    query:     ``[B, Hq, q, d]`` rotated queries (fp16/bf16/fp32), ``Hq`` a multiple of ``H``
    key/value: ``[B, H, T, d]`` fp rows (prefix + new tokens, rotated), the last ``q`` the queries'
    returns    ``[B, q, Hq, d]`` in query's dtype

    ``backend``: ``"triton"`` (CUDA, or CPU under ``TRITON_INTERPRET=1``), ``"torch"``
    (:func:`latent_attention_ref`), ``"auto"`` (Triton on CUDA, else torch). ``block_n``: rows per
    key tile; ``None`` autotunes it (with warps and stages) on CUDA and takes 32 under the
    interpreter, which would run every configuration. ``num_splits`` overrides the split-K plan
    (:func:`~ragcompress_kernels.quantized_attention.prepare_splits`: the packed kernel's).
    """
    backend = resolve_backend(backend, query, seg)
    check_attention_inputs(query, key, value, seg)
    if block_n is not None and (block_n < 16 or block_n & (block_n - 1)):
        raise ValueError(f"block_n must be a power of two >= 16 (tl.dot's smallest tile), got {block_n}")
    batch, q_heads, q_len, d = query.shape
    scale = d**-0.5 if scale is None else float(scale)
    if backend == "torch":
        return latent_attention_ref(query, key, value, seg, scale)
    kv_heads, t_fp = key.shape[1], key.shape[2]
    group = q_heads // kv_heads
    block_m = max(16, min(64, triton.next_power_of_2(group * q_len)))
    rk = seg.k_basis.shape[1]
    rv = 0 if seg.v_basis is None else seg.v_basis.shape[1]
    # keys-only projection: the value basis and mean are never read (V_LATENT=False); any pointer will do
    v_basis = seg.v_codes if seg.v_basis is None else seg.v_basis
    v_mean = seg.v_codes if seg.v_mean is None else seg.v_mean
    m_blocks = triton.cdiv(group * q_len, block_m)
    launch = prepare_splits(query, seg, t_fp, m_blocks, num_splits, interpret=query.device.type != "cuda")
    grid = (m_blocks, batch * kv_heads, launch.n_splits)
    tuned = block_n is None and query.device.type == "cuda"
    kernel = _latent_attn_fwd_tuned if tuned else _latent_attn_fwd
    tile = {} if tuned else {"BLOCK_N": 32 if block_n is None else block_n}
    kernel[grid](
        query, key, value, seg.k_codes, seg.k_scale, seg.k_min, seg.v_codes, seg.v_scale, seg.v_min,
        seg.k_basis, seg.k_mean, v_basis, v_mean, seg.positions, seg.cos, seg.sin, seg.seg_start,
        seg.seg_len, launch.splits, launch.out, launch.m_part, launch.l_part, launch.acc_part,
        scale * 1.4426950408889634, q_len, t_fp, seg.k_codes.shape[1], seg.num_segments, kv_heads, q_heads, batch,
        *query.stride()[:3], *key.stride()[:3], *value.stride()[:3],
        launch.out.stride(0), launch.out.stride(2), launch.out.stride(1),
        GROUP=group, HEAD_DIM=d, ROT_DIM=seg.rotary_dim, PAIRED=seg.paired, BITS=seg.bits, GROUP_SIZE=seg.group_size,
        V_LATENT=seg.v_basis is not None, V_BITS=seg.value_bits, V_GROUP=seg.v_group or d, RK=rk, RV=rv,
        RK_PAD=max(16, triton.next_power_of_2(rk)), RV_PAD=max(16, triton.next_power_of_2(rv)),
        SPLIT=launch.split, DOT_PRECISION="ieee" if query.dtype == torch.float32 else "tf32", BLOCK_M=block_m,
        **tile,
    )  # fmt: skip
    return reduce_splits(launch)
