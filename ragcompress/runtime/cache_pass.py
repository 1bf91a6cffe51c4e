"""Carry some tokens through some layers of the model over an assembled passage cache.

The selective recompute (:mod:`ragcompress.runtime.recompute`) runs a few passage tokens, and
the question, through the decoder layers while every other token keeps its stored KV. The
model's own layers do the work; what this module adds is the bookkeeping around them: where
every passage token sits in the assembled cache (:class:`CacheLayout`, per layer and KV head
when eviction made the rows ragged), the causal mask by *position* that follows from it, and
a stand-in for the transformers cache (:class:`RowWriteCache`) that writes the fresh KV of the
carried tokens over their stored rows instead of appending them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from ragcompress.kv import PassageKV
from ragcompress.kv.cache import PreallocatedLayer
from ragcompress.kv.rope import Rotary
from ragcompress.runtime.assemble import per_layer_rows, segment_rows


class CacheLayout:
    """Where every passage token sits in the assembled cache.

    row_pos:  per layer ``[kv_heads, T_layer]`` absolute RoPE position of each cache row
    valid:    per layer ``[kv_heads, T_layer]`` True on real rows
    token_pos: ``[N]`` absolute position of every passage token (all passages concatenated)
    uniform:  every segment keeps every token on every head (row of token ``i`` is ``P + i``)

    Rows follow :func:`~ragcompress.runtime.assemble.segment_rows` (each layer padded to its own
    longest head), so the layers of one cache may differ in length.
    """

    def __init__(self, prefix: PassageKV, segments: list[PassageKV]) -> None:
        layers, heads = prefix.lengths.shape
        self.prefix_rows = prefix.keys.shape[2]
        self.uniform = prefix.is_uniform and all(seg.is_uniform for seg in segments)
        self.starts = segment_rows(prefix, segments)  # [S+1, layers]
        row_pos, valid, token_pos, self.segment_starts = [prefix.positions], [prefix.valid_mask()], [], []
        position = prefix.num_tokens
        for seg in segments:
            row_pos.append(seg.positions + position)
            valid.append(seg.valid_mask())
            token_pos.append(torch.arange(position, position + seg.num_tokens))
            self.segment_starts.append(sum(t.numel() for t in token_pos[:-1]))
            position += seg.num_tokens
        self.row_pos = per_layer_rows(prefix, row_pos, self.starts)
        self.valid = per_layer_rows(prefix, valid, self.starts)
        self.token_pos = torch.cat(token_pos) if token_pos else torch.zeros(0, dtype=torch.long)
        self.shape = (layers, heads)
        self._segments = segments

    def rows(self, tokens: torch.Tensor) -> torch.Tensor:
        """Cache rows of passage tokens ``[S]``: ``[S]`` if uniform, else ``[layers, kv_heads, S]``
        with ``-1`` where a head evicted the token."""
        if self.uniform:
            return self.prefix_rows + tokens
        layers, heads = self.shape
        inverse = []
        for j, seg in enumerate(self._segments):
            inv = torch.full((layers, heads, seg.num_tokens), -1, dtype=torch.long)
            rows = torch.arange(seg.keys.shape[2]).expand(layers, heads, -1) + self.starts[j][:, None, None]
            keep = seg.valid_mask()
            inv[keep.nonzero(as_tuple=True)[:2] + (seg.positions[keep],)] = rows[keep]
            inverse.append(inv)
        return torch.cat(inverse, dim=2)[:, :, tokens]

    def token_rows(
        self, stored: torch.Tensor, rows: torch.Tensor, layer_idx: int
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The rows of one layer's cache tensor ``stored [kv_heads, T, d]`` that hold passage tokens,
        given their :meth:`rows`: ``[kv_heads, S, d]`` in float32, and ``[kv_heads, S]`` True where
        the head kept the token (``None`` when uniform: every head keeps every token; an evicted
        token's row is a stand-in there, to be masked)."""
        if self.uniform:
            return stored[:, rows.to(stored.device)].float(), None
        head_rows = rows[layer_idx].to(stored.device)  # [kv_heads, S], -1 where a head evicted the token
        index = head_rows.clamp(min=0).unsqueeze(-1).expand(-1, -1, stored.shape[-1])
        return torch.gather(stored.float(), 1, index), head_rows >= 0

    def masks(
        self, tokens: torch.Tensor, q_heads: int, new_pos: torch.Tensor, device: torch.device
    ) -> list[torch.Tensor]:
        """Per layer bool ``[1, q_heads or 1, S + Q, T_layer + Q]`` on ``device``: real rows (and
        new tokens) at positions <= the query's. Queries are the passage ``tokens [S]`` then ``Q``
        new tokens at ``new_pos [Q]`` (the question, appended after the cache)."""
        qpos = torch.cat([self.token_pos[tokens], new_pos])
        layers, heads = self.shape
        if self.uniform:
            row_pos = torch.cat([self.row_pos[0][0], new_pos])
            mask = (row_pos[None, :] <= qpos[:, None]).unsqueeze(0)  # [1, S+Q, T+Q]
            return [mask.unsqueeze(0).to(device)] * layers
        groups = q_heads // heads
        new_valid = torch.ones(heads, new_pos.numel(), dtype=torch.bool)
        out = []
        for layer in range(layers):
            row_pos = torch.cat([self.row_pos[layer], new_pos.expand(heads, -1)], dim=1)
            valid = torch.cat([self.valid[layer], new_valid], dim=1)
            allowed = valid[:, None, :] & (row_pos[:, None, :] <= qpos[None, :, None])
            out.append(allowed.repeat_interleave(groups, dim=0).unsqueeze(0).to(device))
        return out


class RowWriteCache:
    """Stands in for the transformers cache while selected tokens pass through the layers.

    ``update`` (called by every attention module after computing its keys and values) writes the
    fresh KV of the first ``S`` queries ``[1, kv_heads, S, d]`` into the selected tokens' rows of
    the assembled cache, in place, appends those of the ``Q`` new tokens after it, and returns
    the whole layer ``[1, kv_heads, T + Q, d]`` to attend over. A
    :class:`~ragcompress.kv.cache.PreallocatedLayer` takes the new tokens through its own
    ``update`` (into its spare rows, in place); other layers get them concatenated. ``rows``
    (:meth:`CacheLayout.rows`) are moved to the cache's device: they index it.
    """

    def __init__(self, cache: Any, rows: torch.Tensor, uniform: bool, new_tokens: int) -> None:
        self.layers = cache.layers
        self.rows = rows.to(cache.layers[0].keys.device)
        self.uniform = uniform
        self.new_tokens = new_tokens

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        layer = self.layers[layer_idx]
        if self.new_tokens:
            split = key_states.shape[2] - self.new_tokens
            new_keys = key_states[:, :, split:].to(layer.keys.dtype)
            new_values = value_states[:, :, split:].to(layer.values.dtype)
            if isinstance(layer, PreallocatedLayer):
                # into its spare rows, in place: a concatenation would leave it without its buffer,
                # and every later decoding step would copy the whole context again
                layer.update(new_keys, new_values)
            else:
                layer.keys = torch.cat([layer.keys, new_keys], dim=2)
                layer.values = torch.cat([layer.values, new_values], dim=2)
            key_states, value_states = key_states[:, :, :split], value_states[:, :, :split]
        keys, values = layer.keys, layer.values
        if self.uniform:
            keys[0, :, self.rows] = key_states[0].to(keys.dtype)
            values[0, :, self.rows] = value_states[0].to(values.dtype)
        else:
            rows = self.rows[layer_idx]  # [kv_heads, S]
            head, slot = (rows >= 0).nonzero(as_tuple=True)
            keys[0, head, rows[head, slot]] = key_states[0, head, slot].to(keys.dtype)
            values[0, head, rows[head, slot]] = value_states[0, head, slot].to(values.dtype)
        return keys, values


def drop_appended(cache: Any, count: int, layers: int | None = None) -> None:
    """Take the last ``count`` rows (new tokens :class:`RowWriteCache` appended) back out of the
    first ``layers`` layers of ``cache`` (all by default), leaving it as it was before them. A
    :class:`~ragcompress.kv.cache.PreallocatedLayer` counts its filled rows back, so it keeps
    writing later tokens into its buffer in place."""
    for layer in cache.layers[:layers]:
        if isinstance(layer, PreallocatedLayer):
            layer.crop(-count)
        else:
            layer.keys, layer.values = layer.keys[:, :, :-count], layer.values[:, :, :-count]


def run_layers(
    model: Any,
    rotary: Rotary,
    layout: CacheLayout,
    cache: Any,
    tokens: torch.Tensor,
    hidden: torch.Tensor,
    start: int,
    stop: int,
    new_pos: torch.Tensor | None = None,
    observe: Callable[[int, torch.Tensor], None] | None = None,
) -> torch.Tensor:
    """Carry ``hidden [1, S (+ Q), D]`` of passage ``tokens [S]`` (then of ``Q`` new tokens at
    ``new_pos``, appended to the cache) through layers ``start … stop-1``; ``observe(index,
    hidden)`` (optional) sees each layer's input before the layer runs."""
    layers = model.model.layers
    config = model.config
    new_pos = torch.zeros(0, dtype=torch.long) if new_pos is None else new_pos
    positions = torch.cat([layout.token_pos[tokens], new_pos]).unsqueeze(0)  # [1, S+Q]
    masks = layout.masks(tokens, config.num_attention_heads, new_pos, hidden.device)
    blend_cache = RowWriteCache(cache, layout.rows(tokens), layout.uniform, new_pos.numel())
    rope: dict[Any, tuple[torch.Tensor, torch.Tensor]] = {}
    for index in range(start, stop):
        kind = rotary.layer_key(index)
        if kind not in rope:
            cos, sin = rotary.cos_sin(positions, index)
            rope[kind] = (cos.to(hidden.dtype), sin.to(hidden.dtype))
        if observe is not None:
            observe(index, hidden)
        out = layers[index](
            hidden,
            attention_mask=masks[index],
            position_ids=positions.to(hidden.device),
            cache=blend_cache,
            use_cache=True,
            position_embeddings=rope[kind],
        )
        hidden = out[0] if isinstance(out, tuple) else out
    return hidden
