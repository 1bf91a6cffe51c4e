"""Quantized passage blobs packed for fused attention, and answering through them.

Instead of dequantizing every segment and building a full-size cache (``assemble.py``), the
blobs' codes and scales are laid side by side per layer (:class:`QuantizedSegments`, the layout
``ragcompress_kernels`` reads); the transformers cache then holds only the fp prefix and the new
tokens, and the attention function registered as ``"ragcompress"`` receives the packed segments
through the ``ragcompress_packed`` keyword. On CUDA the fused Triton kernel attends over them
without materialising the dequantized cache; on CPU the PyTorch reference dequantizes and rotates
each layer once per request (memoized) and runs SDPA, the same math as the assembled path.

Segment ``j`` starts at RoPE position ``prefix_len + sum(num_tokens of segments before j)``,
exactly as in ``assemble.py``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch
from safetensors.torch import load as st_load

from ragcompress.encoder import build_dynamic_cache
from ragcompress.errors import CorruptSegmentError
from ragcompress.quant import QuantConfig
from ragcompress.rope import Rotary
from ragcompress.runtime.attention import PACKED_KWARG
from ragcompress.store.codec import _metadata
from ragcompress.store.shards import read_blob
from ragcompress_kernels import (
    BACKENDS,
    HAS_TRITON,
    QuantizedSegments,
    attention_over_dense_ref,
    dequantize_rows_ref,
    dequantize_segments_ref,
    drop_padding_rows,
    packed_attention,
    valid_rows_ref,
)


@dataclass(frozen=True)
class QuantizedBlob:
    """One blob's tensors padded per head to ``n_pad`` rows (a multiple of ``group_size``).

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


def read_quantized(blob: bytes) -> QuantizedBlob:
    """Parse a store blob (``ragcompress/store/codec.py``) without dequantizing it."""
    try:
        meta = _metadata(blob)
        tensors = st_load(blob)
        quant = QuantConfig(meta["scheme"], int(meta["group_size"]))
        num_tokens, n_max, d = int(meta["num_tokens"]), int(meta["n_max"]), int(meta["head_dim"])
        lengths = tensors["lengths"].long()
    except Exception as exc:
        raise CorruptSegmentError(f"unreadable segment blob ({exc})") from exc
    bits = quant.bits
    if bits is None:
        raise ValueError(f"packed attention needs a quantized store (int8/int4/int2), not {quant.scheme!r}")
    if lengths.dim() != 2 or (lengths < 0).any() or (lengths > n_max).any() or n_max > num_tokens:
        raise CorruptSegmentError("segment lengths are out of range")
    layers, heads = lengths.shape
    gs = quant.group_size
    n_pad = -(-max(n_max, 1) // gs) * gs
    v_group = min(gs, d)
    rows = torch.arange(n_pad) < lengths.unsqueeze(-1)  # [L, H, n_pad]
    groups = torch.arange(n_pad // gs) < (-(-lengths // gs)).unsqueeze(-1)
    pb = 8 // bits

    uniform = bool((lengths == n_max).all())  # every head keeps rows 0..n_max-1: a reshape, no scatter

    def scatter(flat: torch.Tensor, mask: torch.Tensor, tail: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        if tuple(flat.shape) != (int(mask.sum()), *tail) or flat.dtype != dtype:
            raise CorruptSegmentError(f"segment tensor {tuple(flat.shape)} {flat.dtype} does not match its lengths")
        if uniform:
            kept = flat.shape[0] // (layers * heads)
            out = flat.reshape(layers, heads, kept, *tail)
            return torch.nn.functional.pad(out, (0, 0) * len(tail) + (0, mask.shape[-1] - kept))
        out = torch.zeros((*mask.shape, *tail), dtype=dtype)
        out[mask] = flat
        return out

    try:
        offsets = torch.arange(n_pad).expand(layers, heads, n_pad).clone()
        if "positions" in tensors:
            offsets = scatter(tensors["positions"].long(), rows, (), torch.long)
            if (offsets[rows] >= num_tokens).any() or (offsets < 0).any():
                raise CorruptSegmentError("segment positions are out of range")
        offsets = torch.where(rows, offsets, 0).to(torch.int32)
        return QuantizedBlob(
            k_codes=scatter(tensors["k_codes"], rows, (d // pb,), torch.uint8),
            k_scale=scatter(tensors["k_scale"], groups, (d,), torch.float16),
            k_min=scatter(tensors["k_min"], groups, (d,), torch.float16),
            v_codes=scatter(tensors["v_codes"], rows, (d // pb,), torch.uint8),
            v_scale=scatter(tensors["v_scale"], rows, (d // v_group,), torch.float16),
            v_min=scatter(tensors["v_min"], rows, (d // v_group,), torch.float16),
            offsets=offsets,
            lengths=lengths.to(torch.int32),
            num_tokens=num_tokens,
            quant=quant,
            v_group=v_group,
        )
    except KeyError as exc:
        raise CorruptSegmentError(f"segment blob lacks tensor {exc}") from exc


def rope_tables(rotary: Rotary, layers: int, positions: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer fp32 ``(cos, sin)`` of shape ``[positions, head_dim]`` from the model's rotary
    embedding (shared between layers of the same ``layer_type``)."""
    types = getattr(rotary, "_layer_types", None) or [None] * layers
    cache: dict[Any, tuple[torch.Tensor, torch.Tensor]] = {}
    out = []
    for layer in range(layers):
        if types[layer] not in cache:
            cos, sin = rotary.cos_sin(torch.arange(positions), layer)
            cache[types[layer]] = (cos.float().contiguous(), sin.float().contiguous())
        out.append(cache[types[layer]])
    return out


@dataclass
class PackedSegments:
    """Every layer's :class:`QuantizedSegments` for one request, and the backend to run them.

    ``attend`` is called by the registered attention function for each layer and step; on the
    torch backend each layer's dequantized, rotated rows are computed once and kept (``_dense``).
    """

    layers: list[QuantizedSegments]
    next_position: int
    backend: str = "auto"
    stacked: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)  # [L, ...] behind the views
    _dense: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]] = field(default_factory=list, repr=False)
    _masks: dict = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ValueError(f"backend {self.backend!r} is not one of: {', '.join(BACKENDS)}")

    @classmethod
    def from_blobs(
        cls,
        blobs: list[QuantizedBlob],
        start: int,
        rotary: Rotary,
        device: torch.device | str = "cpu",
        backend: str = "auto",
    ) -> PackedSegments:
        """Lay ``blobs`` side by side after a prefix of ``start`` tokens."""
        if not blobs:
            raise ValueError("no segments to pack")
        first = blobs[0]
        for blob in blobs:
            if blob.quant != first.quant or blob.k_codes.shape[:2] != first.k_codes.shape[:2]:
                raise ValueError("segments were stored with different quantization or model shapes")
        starts, position = [], start
        for blob in blobs:
            starts.append(position)
            position += blob.num_tokens
        seg_start = [0]
        for blob in blobs:
            seg_start.append(seg_start[-1] + blob.k_codes.shape[2])

        def cat(name: str) -> torch.Tensor:
            return torch.cat([getattr(b, name) for b in blobs], dim=2).to(device).contiguous()

        positions = torch.cat([b.offsets + s for b, s in zip(blobs, starts, strict=True)], dim=2)
        positions = torch.where(positions >= 0, positions, 0)
        lengths = torch.stack([b.lengths for b in blobs], dim=-1).to(device).contiguous()  # [L, H, S]
        tensors = {name: cat(name) for name in ("k_codes", "k_scale", "k_min", "v_codes", "v_scale", "v_min")}
        positions = positions.to(torch.int32).to(device).contiguous()
        seg_start_t = torch.tensor(seg_start, dtype=torch.int32, device=device)
        layers = first.k_codes.shape[0]
        tables = rope_tables(rotary, layers, position)
        packed = [
            QuantizedSegments(
                **{name: t[layer] for name, t in tensors.items()},
                positions=positions[layer],
                seg_start=seg_start_t,
                seg_len=lengths[layer],
                cos=tables[layer][0].to(device),
                sin=tables[layer][1].to(device),
                bits=first.quant.bits,
                group_size=first.quant.group_size,
                v_group=first.v_group,
                seg_start_host=tuple(seg_start),
            )
            for layer in range(layers)
        ]
        stacked = {**tensors, "positions": positions, "seg_len": lengths}
        return cls(packed, position, backend, stacked)

    def _dense_layers(self, dtype: torch.dtype) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]:
        """Torch path: every layer dequantized and rotated in one pass per request (as few
        tensor ops as the assembled path), rows no head keeps dropped; a layer gets a row mask
        only where its heads keep different rows."""
        first = self.layers[0]
        if self.stacked and all(seg.cos is first.cos and seg.sin is first.sin for seg in self.layers):
            s = self.stacked
            keys, values = dequantize_rows_ref(
                s["k_codes"],
                s["k_scale"],
                s["k_min"],
                s["v_codes"],
                s["v_scale"],
                s["v_min"],
                s["positions"],
                first.cos,
                first.sin,
                first.bits,
                first.group_size,
                first.v_group,
            )
            valid = valid_rows_ref(first.seg_start_host, s["seg_len"])
        else:  # per-layer RoPE tables (e.g. Gemma-3 local/global layers)
            keys, values, valid = (torch.stack(x) for x in zip(*map(dequantize_segments_ref, self.layers), strict=True))
        keys, values, valid = drop_padding_rows(keys, values, valid)
        keys, values = keys.to(dtype), values.to(dtype)
        return [
            (keys[layer], values[layer], None if valid is None or bool(valid[layer].all()) else valid[layer])
            for layer in range(len(self.layers))
        ]

    def attend(
        self, layer_idx: int, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float
    ) -> torch.Tensor:
        """query ``[B, Hq, q, d]``, key/value ``[B, H, T, d]`` (prefix + new) -> ``[B, q, Hq, d]``."""
        seg = self.layers[layer_idx]
        backend = self.backend
        if backend == "auto":
            backend = "triton" if HAS_TRITON and query.device.type == "cuda" else "torch"
        if backend == "triton":
            return packed_attention(query, key, value, seg, scale, backend="triton")
        if not self._dense:
            self._dense = self._dense_layers(query.dtype)
        return attention_over_dense_ref(query, key, value, *self._dense[layer_idx], scale, self._masks)


def packed_applies(engine: Any, recompute: Any = None) -> bool:
    """Whether ``Engine.answer_cached`` should run through the fused kernel: model on CUDA,
    Triton installed, a quantized store, and no selective recompute (which edits assembled rows)."""
    from ragcompress.runtime.recompute import RecomputeConfig

    return (
        engine.lm.model.device.type == "cuda"
        and HAS_TRITON
        and engine.store.quant.bits is not None
        and not RecomputeConfig.coerce(recompute).active
    )


def answer_packed(engine: Any, question: str, entries: list, backend: str = "auto") -> Any:
    """``Engine.answer_cached`` through packed segments: same prompt, positions and decoding."""
    from ragcompress.runtime.generate import greedy_decode

    suffix = engine._suffix(question, entries)
    t0 = time.perf_counter()
    store = engine.store
    blobs = []
    for entry in entries:
        blob = read_quantized(read_blob(store.path, entry.shard, entry.offset, entry.length, entry.checksum, entry.id))
        if blob.num_tokens != entry.num_tokens or int(blob.lengths.sum()) != entry.kept:
            raise CorruptSegmentError(f"passage {entry.id!r}: blob does not match its catalogue row")
        blobs.append(blob)
    device = engine.lm.model.device
    packed = PackedSegments.from_blobs(blobs, engine.prefix.num_tokens, engine.rotary, device, backend)
    layers = engine.prefix_keys.shape[0]
    cache = build_dynamic_cache(
        engine.lm.config,
        [engine.prefix_keys[layer].unsqueeze(0).to(device, engine.dtype) for layer in range(layers)],
        [engine.prefix.values[layer].unsqueeze(0).to(device, engine.dtype) for layer in range(layers)],
    )
    generation = greedy_decode(
        engine.lm.model,
        suffix,
        cache,
        packed.next_position,
        engine.max_new_tokens,
        engine.stop_ids,
        t0,
        **{PACKED_KWARG: packed},
    )
    return engine._answer(generation, entries)
