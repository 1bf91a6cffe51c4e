"""Transformers caches from tensors and back: what the encoder, the runtime and the probes share."""

from __future__ import annotations

from typing import Any

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer


def cache_layers(cache: Any) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``[(keys, values)]`` per layer of a transformers cache, each ``[batch, kv_heads, seq, d]``."""
    return [(layer.keys, layer.values) for layer in cache.layers]


def build_dynamic_cache(config: Any, keys: list[torch.Tensor], values: list[torch.Tensor]) -> DynamicCache:
    """A ``DynamicCache`` holding the given per-layer ``[batch, kv_heads, seq, d]`` tensors.

    Plain full-attention layers adopt the tensors as they are (``DynamicLayer.update`` would
    concatenate them onto an empty tensor, one more copy of the whole cache on every request);
    the tensors are never modified in place afterwards, since every later update concatenates.
    Other layer types (sliding windows) go through their own ``update``.
    """
    cache = DynamicCache(config=config)
    for layer_idx, (k, v) in enumerate(zip(keys, values, strict=True)):
        layer = cache.layers[layer_idx] if layer_idx < len(cache.layers) else None
        if type(layer) is DynamicLayer:
            layer.lazy_initialization(k, v)
            layer.keys, layer.values = k, v
        else:
            cache.update(k, v, layer_idx)
    return cache
