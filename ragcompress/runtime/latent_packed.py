"""A low-rank store's segments laid side by side for the latent kernel (the packed strategy).

The counterpart of ``packed.py`` for stores whose keys (and values, with ``--rank-values``) are
low-rank latents (``kv/lowrank.py``): per layer, every segment's quantized latents -- and, in a
keys-only projection, its values' quantized rows, at their own width if they have one -- are
padded per head to a multiple of ``group_size`` rows and concatenated (:class:`LatentSegments`),
the store's basis transposed to ``[H, r, d]``; the attention function registered as ``"ragcompress"`` calls
:meth:`LatentPackedSegments.attend` exactly as it calls ``PackedSegments.attend``. On CUDA the
Triton kernel rebuilds keys (latent @ basis, then RoPE) and values inside attention; on CPU the
PyTorch reference rebuilds every layer once per request and runs SDPA.

Segment ``j`` starts at RoPE position ``prefix_len + sum(num_tokens of segments before j)``,
as in ``assemble.py``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ragcompress.kv.lowrank import LowRankBasis
from ragcompress.kv.quant import cast_dequantized
from ragcompress.kv.rope import RotaryTables
from ragcompress.runtime.packed import rope_tables
from ragcompress.store.codec import Segment
from ragcompress.store.latent import padded_latents
from ragcompress_kernels import attention_over_dense_ref, drop_padding_rows, resolve_backend
from ragcompress_kernels.latent_attention import (
    LatentSegments,
    latent_attention,
    rebuild_latent_segments_ref,
)


@dataclass
class LatentPackedSegments:
    """Every layer's :class:`LatentSegments` for one request, and the backend to run them."""

    layers: list[LatentSegments]
    next_position: int
    backend: str = "auto"
    _dense: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]] = field(default_factory=dict, repr=False)
    _masks: dict = field(default_factory=dict, repr=False)

    @classmethod
    def from_segments(
        cls,
        segments: list[Segment],
        basis: LowRankBasis,
        start: int,
        rotary: RotaryTables,
        device: torch.device | str = "cpu",
        backend: str = "auto",
    ) -> LatentPackedSegments:
        """Lay ``segments`` (parsed blobs of a store whose keys are latents of ``basis``, values
        latents too or quantized rows) side by side after a prefix of ``start`` tokens."""
        if not segments:
            raise ValueError("no segments to pack")
        for segment in segments:
            segment.check_basis(basis)
            if "k" not in segment.ranks or set(segment.ranks) != set(segments[0].ranks):
                raise ValueError("the latent kernel reads segments whose keys are latents, values alike in every one")
        quant = segments[0].quant
        if quant.bits is None or quant.value_bits is None or any(s.quant != quant for s in segments):
            raise ValueError("the latent kernel reads one integer quantization (int8/int4/int2) for every segment")
        value_latents = "v" in segments[0].ranks
        kinds = "kv" if value_latents else "k"
        fields = {
            kind: [padded_latents(kind, s.tensors, s.ranks[kind], s.lengths, quant.of(kind)) for s in segments]
            for kind in kinds
        }
        starts, position = [], start
        for segment in segments:
            starts.append(position)
            position += segment.num_tokens
        n_pads = [f[0][0].shape[1] for f in fields["k"]]
        v_group = None
        if not value_latents:  # values as quantized rows, padded as the key latents are: [L, H, n_pad, ...]
            rows = [s.padded_value_rows(n_pad) for s, n_pad in zip(segments, n_pads, strict=True)]
            v_group = rows[0][3]
            fields["v"] = [list(zip(*(t.unbind(0) for t in r[:3]), strict=True)) for r in rows]
        seg_start = [0]
        for n_pad in n_pads:
            seg_start.append(seg_start[-1] + n_pad)
        positions = []
        for segment, n_pad, first in zip(segments, n_pads, starts, strict=True):
            pad = torch.nn.functional.pad(segment.positions, (0, n_pad - segment.n_max))
            kept = torch.arange(n_pad) < segment.lengths.unsqueeze(-1)
            positions.append(torch.where(kept, pad + first, 0))
        all_positions = torch.cat(positions, dim=2).to(torch.int32).to(device)  # [L, H, N]
        lengths = torch.stack([s.lengths for s in segments], dim=-1).to(torch.int32).to(device)  # [L, H, S]
        seg_start_t = torch.tensor(seg_start, dtype=torch.int32, device=device)
        num_layers = segments[0].lengths.shape[0]
        tables = rope_tables(rotary, num_layers, position, basis.bases["k"][0].shape[1])

        def cat(kind: str, layer: int, j: int) -> torch.Tensor:
            return torch.cat([f[layer][j] for f in fields[kind]], dim=1).to(device).contiguous()

        layers = [
            LatentSegments(
                k_codes=cat("k", layer, 0),
                k_scale=cat("k", layer, 1),
                k_min=cat("k", layer, 2),
                v_codes=cat("v", layer, 0),
                v_scale=cat("v", layer, 1),
                v_min=cat("v", layer, 2),
                k_basis=basis.bases["k"][layer].transpose(1, 2).contiguous().to(device),
                k_mean=basis.means["k"][layer].contiguous().to(device),
                v_basis=basis.bases["v"][layer].transpose(1, 2).contiguous().to(device) if value_latents else None,
                v_mean=basis.means["v"][layer].contiguous().to(device) if value_latents else None,
                positions=all_positions[layer].contiguous(),
                seg_start=seg_start_t,
                seg_len=lengths[layer].contiguous(),
                cos=tables[layer][0].to(device),
                sin=tables[layer][1].to(device),
                bits=quant.bits,
                v_bits=quant.value_bits,
                group_size=quant.group_size,
                seg_start_host=tuple(seg_start),
                v_group=v_group,
                rot_dim=rotary.rotary_dim,
                paired=rotary.paired,
            )
            for layer in range(num_layers)
        ]
        return cls(layers, position, backend)

    def attend(
        self, layer_idx: int, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float
    ) -> torch.Tensor:
        """query ``[B, Hq, q, d]``, key/value ``[B, H, T, d]`` (prefix + new) -> ``[B, q, Hq, d]``."""
        seg = self.layers[layer_idx]
        if resolve_backend(self.backend, query, seg) == "triton":  # auto: the kernel where it applies
            return latent_attention(query, key, value, seg, scale, backend="triton")
        if layer_idx not in self._dense:  # rebuilt once per request and layer, padding rows dropped
            keys, values, valid = drop_padding_rows(*rebuild_latent_segments_ref(seg))
            self._dense[layer_idx] = (cast_dequantized(keys, query.dtype), cast_dequantized(values, query.dtype), valid)
        return attention_over_dense_ref(query, key, value, *self._dense[layer_idx], scale, self._masks)
