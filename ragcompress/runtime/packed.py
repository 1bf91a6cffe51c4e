"""Quantized passage segments packed side by side for fused attention (the packed strategy).

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

from dataclasses import dataclass, field
from typing import Any

import torch

from ragcompress.kv.quant import cast_dequantized
from ragcompress.kv.rope import RotaryTables
from ragcompress.store.codec import QuantizedBlob
from ragcompress_kernels import (
    BACKENDS,
    QuantizedSegments,
    attention_over_dense_ref,
    dequantize_rows_ref,
    dequantize_segments_ref,
    drop_padding_rows,
    packed_attention,
    resolve_backend,
    valid_rows_ref,
)


def rope_tables(
    rotary: RotaryTables, layers: int, positions: int, head_dim: int
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer fp32 ``(cos, sin)`` of shape ``[positions, head_dim]`` from the model's rotary
    embedding, laid out in its convention (:meth:`Rotary.rotation_tables`: paired RoPE's tables
    repeat each angle on adjacent channels) and, for partial rotary, widened to the whole head
    with cos 1 and sin 0 on the channels RoPE leaves (the layout the kernels read; shared between
    layers of the same :meth:`Rotary.layer_key`)."""
    cache: dict[Any, tuple[torch.Tensor, torch.Tensor]] = {}
    out = []
    for layer in range(layers):
        key = rotary.layer_key(layer)
        if key not in cache:
            cos, sin = rotary.rotation_tables(*rotary.cos_sin(torch.arange(positions), layer))
            passed = head_dim - cos.shape[-1]
            cos = torch.nn.functional.pad(cos.float(), (0, passed), value=1.0)
            sin = torch.nn.functional.pad(sin.float(), (0, passed))
            cache[key] = (cos.contiguous(), sin.contiguous())
        out.append(cache[key])
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
        rotary: RotaryTables,
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
        if first.quant.bits is None:  # unquantized stores hold no codes; this also narrows the type
            raise ValueError("packed attention reads quantized stores only (int8, int4, int2)")
        bits = first.quant.bits
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
        lengths = torch.stack([b.lengths for b in blobs], dim=-1).to(device).contiguous()  # [L, H, S]
        tensors = {name: cat(name) for name in ("k_codes", "k_scale", "k_min", "v_codes", "v_scale", "v_min")}
        positions = positions.to(torch.int32).to(device).contiguous()
        seg_start_t = torch.tensor(seg_start, dtype=torch.int32, device=device)
        layers = first.k_codes.shape[0]
        tables = rope_tables(rotary, layers, position, first.k_scale.shape[-1])
        packed = [
            QuantizedSegments(
                **{name: t[layer] for name, t in tensors.items()},
                positions=positions[layer],
                seg_start=seg_start_t,
                seg_len=lengths[layer],
                cos=tables[layer][0].to(device),
                sin=tables[layer][1].to(device),
                bits=bits,
                v_bits=first.quant.value_bits,
                group_size=first.quant.group_size,
                v_group=first.v_group,
                seg_start_host=tuple(seg_start),
                rot_dim=rotary.rotary_dim,
                paired=rotary.paired,
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
                first.value_bits,
                first.rot_dim,
                first.paired,
            )
            valid = valid_rows_ref(first.seg_start_host, s["seg_len"])
        else:  # per-layer RoPE tables (e.g. Gemma-3 local/global layers)
            keys, values, valid = (torch.stack(x) for x in zip(*map(dequantize_segments_ref, self.layers), strict=True))
        keys, values, used = drop_padding_rows(keys, values, valid)
        keys, values = cast_dequantized(keys, dtype), cast_dequantized(values, dtype)
        return [
            (keys[layer], values[layer], None if used is None or bool(used[layer].all()) else used[layer])
            for layer in range(len(self.layers))
        ]

    def attend(
        self, layer_idx: int, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float
    ) -> torch.Tensor:
        """query ``[B, Hq, q, d]``, key/value ``[B, H, T, d]`` (prefix + new) -> ``[B, q, Hq, d]``."""
        seg = self.layers[layer_idx]
        if resolve_backend(self.backend, query, seg) == "triton":  # auto: the kernel where it applies
            return packed_attention(query, key, value, seg, scale, backend="triton")
        if not self._dense:
            self._dense = self._dense_layers(query.dtype)
        return attention_over_dense_ref(query, key, value, *self._dense[layer_idx], scale, self._masks)
