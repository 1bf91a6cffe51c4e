"""Query time: stored segments placed after the prefix at new positions, as a transformers cache.

Passages are laid side by side in retrieval order. Segment ``j`` starts at position
``len(prefix) + sum(num_tokens of segments before j)``; a kept token at passage offset ``o`` is
rotated to ``start_j + o``. Evicted tokens leave gaps in positions, never shifts, so the model
sees every kept token where it stood in the full prompt. The suffix starts after the last
segment's full length.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from transformers import DynamicCache

from ragcompress.kv import PassageKV
from ragcompress.kv.cache import build_preallocated_cache
from ragcompress.kv.rope import Rotary
from ragcompress.runtime.attention import KV_MASK_KWARG


@dataclass
class AssembledCache:
    """A ready cache and where the prompt continues.

    cache:         ``DynamicCache`` with ``[1, kv_heads, context_rows[layer], head_dim]`` per layer
    next_position: RoPE position of the first suffix token
    kv_mask:       per layer ``[kv_heads, context_rows[layer]]`` bool (padding rows False) when
                   heads keep different tokens or layers keep different amounts, else ``None``
    segment_rows:  ``[segments + 1, layers]`` (:func:`segment_rows`): where each segment begins
                   in each layer's cache; the last row is each layer's context length
    """

    cache: DynamicCache
    next_position: int
    kv_mask: list[torch.Tensor] | None
    segment_rows: torch.Tensor

    @property
    def context_rows(self) -> torch.Tensor:
        """``[layers]`` rows of prefix and passages in each layer's cache (before the suffix)."""
        return self.segment_rows[-1]

    def attention_kwargs(self) -> dict[str, Any]:
        """Keywords for the registered attention: the per-head row mask, when there is one."""
        return {} if self.kv_mask is None else {KV_MASK_KWARG: self.kv_mask}


def segment_rows(prefix: PassageKV, segments: list[PassageKV]) -> torch.Tensor:
    """``[len(segments) + 1, layers]`` int64: the cache row where segment ``j`` begins in each
    layer (row ``j``), and each layer's context length (last row).

    Segments are laid side by side after the prefix; in each layer a segment takes as many rows
    as its longest head keeps *in that layer* (:meth:`PassageKV.layer_rows`). A ``global:``
    eviction keeps far more in some layers than in others, so padding every layer to the
    passage's longest layer would attend over rows that are all padding. The one place
    assembly and selective recompute learn where a passage's rows are.
    """
    layers, prefix_rows = prefix.keys.shape[0], prefix.keys.shape[2]
    starts = torch.full((len(segments) + 1, layers), prefix_rows, dtype=torch.long)
    if segments:
        starts[1:] += torch.stack([kv.layer_rows() for kv in segments]).cumsum(dim=0)
    return starts


def per_layer_rows(prefix: PassageKV, parts: list[torch.Tensor], rows: torch.Tensor) -> list[torch.Tensor]:
    """Per layer, ``parts`` (the prefix's then each segment's ``[layers, kv_heads, n_max, ...]``
    tensor, e.g. valid masks or positions) cut to the rows :func:`segment_rows` gives the
    segment in that layer and laid side by side: ``[kv_heads, context_rows[layer], ...]``."""
    widths = [[prefix.keys.shape[2]] * rows.shape[1]] + (rows[1:] - rows[:-1]).tolist()
    return [
        torch.cat([t[i, :, : w[i]] for t, w in zip(parts, widths, strict=True)], dim=1) for i in range(rows.shape[1])
    ]


def assemble(
    config: Any,
    rotary: Rotary,
    prefix_keys: torch.Tensor,
    prefix: PassageKV,
    segments: list[PassageKV],
    dtype: torch.dtype,
    spare_rows: int = 0,
    load: Callable[[int], PassageKV] | None = None,
) -> AssembledCache:
    """Write the (already rotated) prefix and the rotated segments into one cache per layer.

    prefix_keys: ``[layers, kv_heads, P, head_dim]`` prefix keys rotated to positions ``0..P-1``.
    load:        ``load(j)``: segment ``j``'s cache, called once per segment in order; then
                 ``segments`` need only their positions and lengths (their keys and values may be
                 shape-only, e.g. on the ``meta`` device). Each loaded segment is dropped once
                 written, before the next is loaded, so that a caller dequantizing in ``load``
                 holds one dense segment at a time beside the cache, not all of them. ``None``:
                 ``segments`` hold their data.

    This runs on every request, so it touches the data as few times as it can: each segment's
    keys are rotated straight into their rows of the cache's buffers, every layer at once when
    the layers are alike (one buffer per K and V, the usual case) and the segment's rows line up,
    else layer by layer into one buffer per layer sized to that layer's rows. The buffers keep
    ``spare_rows`` free rows past each layer's context (the question and the answer's tokens),
    into which the cache's :class:`~ragcompress.kv.cache.PreallocatedLayer` writes them without
    copying the context.
    """
    layers, heads, p, d = prefix_keys.shape
    starts, position = [], p
    for kv in segments:
        starts.append(position)
        position += kv.num_tokens
    rows = segment_rows(prefix, segments)
    context = rows[-1]
    device = prefix_keys.device  # the model's: segments are read on the CPU and copied over once
    alike = bool((context == context[0]).all())
    if alike:  # one buffer for all layers: a segment whose rows line up is written in one call
        shape = (layers, heads, int(context[0]) + spare_rows, d)
        keys = torch.empty(shape, dtype=dtype, device=device)
        values = torch.empty(shape, dtype=dtype, device=device)
        keys[:, :, :p] = prefix_keys
        values[:, :, :p] = prefix.values
        # views by index, not unbind(): the cache writes into them in place, possibly under grad mode
        key_layers, value_layers = [keys[i] for i in range(layers)], [values[i] for i in range(layers)]
    else:  # one per layer, each as long as that layer's context (the memory per-layer padding saves)
        key_layers = [torch.empty((heads, int(n) + spare_rows, d), dtype=dtype, device=device) for n in context]
        value_layers = [torch.empty_like(k) for k in key_layers]
        for i in range(layers):
            key_layers[i][:, :p] = prefix_keys[i]
            value_layers[i][:, :p] = prefix.values[i]
    for j, start in enumerate(starts):
        kv = segments[j] if load is None else load(j)
        first, stop = rows[j], rows[j + 1]
        if alike and bool((first == first[0]).all() and (stop == stop[0]).all()):
            a, b = int(first[0]), int(stop[0])
            rotary.rotate_layers(kv.keys[:, :, : b - a], kv.positions[:, :, : b - a] + start, out=keys[:, :, a:b])
            values[:, :, a:b] = kv.values[:, :, : b - a]
        else:
            spans = [(int(a), int(b)) for a, b in zip(first, stop, strict=True)]
            outs = [k[:, a:b] for k, (a, b) in zip(key_layers, spans, strict=True)]
            rotary.rotate_each_layer(kv.keys, kv.positions + start, outs)
            for i, (v, (a, b)) in enumerate(zip(value_layers, spans, strict=True)):
                v[:, a:b] = kv.values[i, :, : b - a]
        del kv  # before the next segment is loaded (``load``)
    cache = build_preallocated_cache(
        config, [k.unsqueeze(0) for k in key_layers], [v.unsqueeze(0) for v in value_layers], context.tolist()
    )
    return AssembledCache(cache, position, _row_masks(prefix, segments, rows, device), rows)


def _row_masks(
    prefix: PassageKV, segments: list[PassageKV], rows: torch.Tensor, device: torch.device
) -> list[torch.Tensor] | None:
    """Per layer ``[kv_heads, context_rows]`` True on real rows; ``None`` when every layer has the
    same length and no padding (then transformers' own causal mask is exact)."""
    if prefix.is_uniform and all(kv.is_uniform for kv in segments):
        return None
    masks = per_layer_rows(prefix, [prefix.valid_mask()] + [kv.valid_mask() for kv in segments], rows)
    context = rows[-1]
    if bool((context == context[0]).all()) and all(bool(m.all()) for m in masks):
        return None
    return [m.to(device) for m in masks]
