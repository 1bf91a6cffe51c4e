"""Transformers caches from tensors and back: what the encoder, the runtime and the probes share."""

from __future__ import annotations

from typing import Any

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer


def cache_layers(cache: Any) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``[(keys, values)]`` per layer of a transformers cache, each ``[batch, kv_heads, seq, d]``."""
    return [(layer.keys, layer.values) for layer in cache.layers]


def build_dynamic_cache(
    config: Any, keys: list[torch.Tensor], values: list[torch.Tensor], *, all_rows: bool = False
) -> DynamicCache:
    """A ``DynamicCache`` holding the given per-layer ``[batch, kv_heads, seq, d]`` tensors.

    Plain full-attention layers adopt the tensors as they are (``DynamicLayer.update`` would
    concatenate them onto an empty tensor, one more copy of the whole cache on every request);
    the tensors are never modified in place afterwards, since every later update concatenates.
    Other layer types (sliding windows) go through their own ``update``, which keeps only the
    window's last rows; ``all_rows`` makes every layer a full one instead (the model's masks
    still apply each layer's window): what encoding a passage for the store needs, since a
    later question may sit anywhere after it.
    """
    cache = DynamicCache(config=None if all_rows else config)
    if all_rows:
        for layer_idx, (k, v) in enumerate(zip(keys, values, strict=True)):
            cache.update(k, v, layer_idx)
        return cache
    for layer_idx, (k, v) in enumerate(zip(keys, values, strict=True)):
        layer = cache.layers[layer_idx] if layer_idx < len(cache.layers) else None
        if type(layer) is DynamicLayer:
            layer.lazy_initialization(k, v)
            layer.keys, layer.values = k, v
        else:
            cache.update(k, v, layer_idx)
    return cache


class PreallocatedLayer(DynamicLayer):
    """A full-attention cache layer over a buffer with room for more tokens (gpt-fast's KVCache).

    ``update`` writes the new tokens into the next free rows in place and returns views of the
    filled rows, so prefilling the question and each decoding step copy only the new tokens;
    :class:`DynamicLayer` concatenates, copying the whole cached context on every forward.
    When the buffer is full, or code outside replaced ``keys``/``values``, it falls back to
    :class:`DynamicLayer`'s concatenation for good (selective recompute appends the question
    through ``update`` and takes it back out with ``crop`` for that reason).

    key_buffer, value_buffer: ``[batch, kv_heads, capacity, d]``; the first ``filled`` rows hold
    the cache.
    """

    def __init__(self, key_buffer: torch.Tensor, value_buffer: torch.Tensor, filled: int) -> None:
        super().__init__()
        self.lazy_initialization(key_buffer, value_buffer)
        self._buffers: tuple[torch.Tensor, torch.Tensor] | None = (key_buffer, value_buffer)
        self._filled = filled
        self.keys = key_buffer[:, :, :filled]
        self.values = value_buffer[:, :, :filled]

    def _own_buffers(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The buffers, while ``keys``/``values`` are still the views of their filled rows."""
        if self._buffers is None:
            return None
        key_buffer, value_buffer = self._buffers
        keys, values = self.keys, self.values
        ours = (
            keys is not None
            and values is not None
            and keys.data_ptr() == key_buffer.data_ptr()
            and values.data_ptr() == value_buffer.data_ptr()
            and keys.shape[-2] == self._filled == values.shape[-2]
        )
        return self._buffers if ours else None

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        buffers = self._own_buffers()
        stop = self._filled + key_states.shape[-2]
        if buffers is None or stop > buffers[0].shape[-2]:
            self._buffers = None  # from here on, a plain dynamic layer
            return super().update(key_states, value_states, *args, **kwargs)
        key_buffer, value_buffer = buffers
        key_buffer[:, :, self._filled : stop].copy_(key_states)
        value_buffer[:, :, self._filled : stop].copy_(value_states)
        self._filled = stop
        self.keys = key_buffer[:, :, :stop]
        self.values = value_buffer[:, :, :stop]
        return self.keys, self.values

    def crop(self, tokens_to_remove: int) -> None:
        super().crop(tokens_to_remove)
        if tokens_to_remove < 0:
            self._filled = max(0, self._filled + tokens_to_remove)


def build_preallocated_cache(
    config: Any, key_buffers: list[torch.Tensor], value_buffers: list[torch.Tensor], filled: int | list[int]
) -> DynamicCache:
    """A ``DynamicCache`` whose full-attention layers are :class:`PreallocatedLayer` over the given
    per-layer ``[batch, kv_heads, capacity, d]`` buffers, of which the first ``filled`` rows (one
    count, or one per layer when layers are padded separately) are the cache. Other layer types
    (sliding windows) get the filled rows through their own ``update``."""
    cache = DynamicCache(config=config)
    counts = filled if isinstance(filled, list) else [filled] * len(key_buffers)
    for layer_idx, (k, v, n) in enumerate(zip(key_buffers, value_buffers, counts, strict=True)):
        layer = cache.layers[layer_idx] if layer_idx < len(cache.layers) else None
        if type(layer) is DynamicLayer:
            cache.layers[layer_idx] = PreallocatedLayer(k, v, n)
        else:
            cache.update(k[:, :, :n], v[:, :, :n], layer_idx)
    return cache
