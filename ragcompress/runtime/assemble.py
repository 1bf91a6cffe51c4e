"""Query time: stored segments placed after the prefix at new positions, as a transformers cache.

Passages are laid side by side in retrieval order. Segment ``j`` starts at position
``len(prefix) + sum(num_tokens of segments before j)``; a kept token at passage offset ``o`` is
rotated to ``start_j + o``. Evicted tokens leave gaps in positions, never shifts, so the model
sees every kept token where it stood in the full prompt. The suffix starts after the last
segment's full length.
"""

from __future__ import annotations

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

    cache:         ``DynamicCache`` with ``[1, kv_heads, length, head_dim]`` per layer
    next_position: RoPE position of the first suffix token
    kv_mask:       ``[layers, kv_heads, length]`` bool when heads keep different tokens
                   (padding rows are False), else ``None``
    """

    cache: DynamicCache
    next_position: int
    kv_mask: torch.Tensor | None

    def attention_kwargs(self) -> dict[str, Any]:
        """Keywords for the registered attention: the per-head row mask, when there is one."""
        return {} if self.kv_mask is None else {KV_MASK_KWARG: self.kv_mask}


def assemble(
    config: Any,
    rotary: Rotary,
    prefix_keys: torch.Tensor,
    prefix: PassageKV,
    segments: list[PassageKV],
    dtype: torch.dtype,
    spare_rows: int = 0,
) -> AssembledCache:
    """Write the (already rotated) prefix and the rotated segments into one cache per layer.

    prefix_keys: ``[layers, kv_heads, P, head_dim]`` prefix keys rotated to positions ``0..P-1``.
    This runs on every request, so it touches the data as few times as it can: one buffer per
    K and V; each segment's keys are rotated straight into their slice of it. The buffers keep
    ``spare_rows`` free rows (the question and the answer's tokens), into which the cache's
    :class:`~ragcompress.kv.cache.PreallocatedLayer` writes them without copying the context.
    """
    layers, heads, p, d = prefix_keys.shape
    starts, position = [], p
    for kv in segments:
        starts.append(position)
        position += kv.num_tokens
    widths = [kv.keys.shape[2] for kv in segments]  # rows stored per segment (n_max with evictions)
    total = p + sum(widths)
    device = prefix_keys.device  # the model's: segments are read on the CPU and copied over once
    keys = torch.empty((layers, heads, total + spare_rows, d), dtype=dtype, device=device)
    values = torch.empty((layers, heads, total + spare_rows, d), dtype=dtype, device=device)
    keys[:, :, :p] = prefix_keys
    values[:, :, :p] = prefix.values
    row = p
    for kv, width, start in zip(segments, widths, starts, strict=True):
        rotary.rotate_layers(kv.keys, kv.positions + start, out=keys[:, :, row : row + width])
        values[:, :, row : row + width] = kv.values
        row += width
    mask = torch.cat([prefix.valid_mask()] + [kv.valid_mask() for kv in segments], dim=2)
    cache = build_preallocated_cache(
        config,
        [keys[layer].unsqueeze(0) for layer in range(layers)],
        [values[layer].unsqueeze(0) for layer in range(layers)],
        total,
    )
    return AssembledCache(cache, position, None if bool(mask.all()) else mask.to(device))
