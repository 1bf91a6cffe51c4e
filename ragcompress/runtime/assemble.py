"""Query time: stored segments placed after the prefix at new positions, as a transformers cache.

Passages are laid side by side in retrieval order. Segment ``j`` starts at position
``len(prefix) + sum(num_tokens of segments before j)``; a kept token at passage offset ``o`` is
rotated to ``start_j + o``. Evicted tokens leave gaps in positions, never shifts, so the model
sees every kept token where it stood in the full prompt. The suffix starts after the last
segment's full length.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import DynamicCache

from ragcompress.encoder import build_dynamic_cache
from ragcompress.kv import PassageKV
from ragcompress.rope import Rotary


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


def rotate_segment(rotary: Rotary, kv: PassageKV, start: int, dtype: torch.dtype) -> torch.Tensor:
    """Keys of ``kv`` rotated to ``start + positions``: ``[layers, kv_heads, n_max, head_dim]``."""
    return rotary.rotate_layers(kv.keys, kv.positions + start).to(dtype)


def assemble(config, rotary: Rotary, prefix_keys: torch.Tensor, prefix: PassageKV,
             segments: list[PassageKV], dtype: torch.dtype) -> AssembledCache:
    """Concatenate the (already rotated) prefix and the rotated segments per layer.

    prefix_keys: ``[layers, kv_heads, P, head_dim]`` prefix keys rotated to positions ``0..P-1``.
    """
    keys = [prefix_keys.to(dtype)]
    values = [prefix.values.to(dtype)]
    masks = [prefix.valid_mask()]
    position = prefix.num_tokens
    for kv in segments:
        keys.append(rotate_segment(rotary, kv, position, dtype))
        values.append(kv.values.to(dtype))
        masks.append(kv.valid_mask())
        position += kv.num_tokens
    all_keys = torch.cat(keys, dim=2)  # [L, H, total, d]
    all_values = torch.cat(values, dim=2)
    mask = torch.cat(masks, dim=2)
    layers = all_keys.shape[0]
    cache = build_dynamic_cache(
        config,
        [all_keys[layer].unsqueeze(0) for layer in range(layers)],
        [all_values[layer].unsqueeze(0) for layer in range(layers)],
    )
    return AssembledCache(cache, position, None if bool(mask.all()) else mask)
