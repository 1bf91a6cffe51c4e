"""Rotary position embedding of keys at arbitrary positions, using the model's own RoPE module.

ragcompress stores keys *before* RoPE (un-rotated): indexing computes the model's usual
post-RoPE cache and un-rotates it once; query time rotates each stored key to the position it
takes in the new prompt. Storing un-rotated keys makes a segment independent of where it will be
placed, quantizes better (RoPE mixes channel pairs and spreads key outliers, KVQuant §3.2), and
lets a fused kernel apply RoPE on the fly. Using the model's ``rotary_emb`` keeps RoPE variants
whose tables depend only on the position right (Llama-3 scaling, YaRN's attention scaling,
Gemma-3's per-layer-type bases). Variants whose tables depend on how far the whole call reaches
do not fit pieces encoded and rotated apart; :func:`position_limit` keeps every piece within the
range where they do not change (LongRoPE's short factors).

Partial rotary (StableLM, Phi-2, Phi-4-mini) turns only a head's first ``rot`` channels, pairing
channel ``i`` with ``i + rot/2`` (``rotate_half`` over those channels), and leaves the rest as
projected: the module's tables are ``rot`` wide, and every rotation here follows their width
(:func:`apply_rope`). Paired RoPE (Cohere, Helium, GLM) turns adjacent channels ``2i, 2i+1``
together instead; which of the two a model uses is not in its config, so the load finds it by
trying both (``ragcompress.architecture``) and marks the rotary module (:data:`PAIRED_MARK`).
"""

from __future__ import annotations

import inspect
from typing import Any, Protocol

import torch


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rotate_pairs(x: torch.Tensor) -> torch.Tensor:
    """``rotate_half`` of paired RoPE: ``(x0, x1, x2, x3, ...) -> (-x1, x0, -x3, x2, ...)``."""
    return torch.stack((-x[..., 1::2], x[..., 0::2]), dim=-1).flatten(-2)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, paired: bool = False) -> torch.Tensor:
    """``x`` rotated by tables ``cos``/``sin`` as the model applies them: ``x * cos +
    rotate_half(x) * sin`` (``rotate_pairs`` and tables repeating per channel pair when
    ``paired``) over the tables' width, which is all of ``x``'s last dimension or, for partial
    rotary, its first channels (the rest pass through). Differentiable, out of place; ``sin``
    negated (and the scaling divided out) inverts it."""
    rot, turn = cos.shape[-1], rotate_pairs if paired else rotate_half
    if rot == x.shape[-1]:
        return x * cos + turn(x) * sin
    turned = x[..., :rot]
    return torch.cat((turned * cos + turn(turned) * sin, x[..., rot:]), dim=-1)


# attribute the load sets on a model's rotary module when the model pairs adjacent channels
PAIRED_MARK = "ragcompress_paired_rope"


def pair_tables(cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A rotary module's tables in paired RoPE's layout (each frequency on two adjacent
    channels): as they are when already so (Cohere's), else built from their first half, as
    Helium's and GLM's attention does with tables laid out in halves."""
    half = cos.shape[-1] // 2
    if torch.equal(cos[..., 0::2], cos[..., 1::2]) and torch.equal(sin[..., 0::2], sin[..., 1::2]):
        return cos, sin
    return cos[..., :half].repeat_interleave(2, dim=-1), sin[..., :half].repeat_interleave(2, dim=-1)


def position_limit(config: Any) -> int:
    """The positions a prompt assembled from cached pieces may use: the config's
    ``max_position_embeddings``, capped for LongRoPE at ``original_max_position_embeddings``.

    LongRoPE (Phi-3-mini-128k, Phi-3.5, Phi-4-mini) rotates a call with its short factors while
    the call's last position is below ``original_max_position_embeddings`` and with its long
    factors beyond, for every position of the call. A full prefill of a long prompt therefore
    rotates all of it with the long factors, while a passage is encoded alone (short factors
    throughout its layers) and the prefix and each passage are re-rotated separately, each with
    the factors its own reach picks: the cache would match no prompt the model computes. Below
    the original length every call uses the short factors, so the pieces are what a full prefill
    computes; a longer prompt is refused by the callers' length checks. (Dynamic NTK rescales
    only past ``max_position_embeddings``, so the plain limit keeps it fixed.)
    """
    limit = int(getattr(config, "max_position_embeddings", None) or 1 << 30)
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    # one dict, or one per layer type (Gemma-3's ``{"sliding_attention": {...}, ...}``)
    groups = [g for g in params.values() if isinstance(g, dict)] if isinstance(params, dict) else []
    for group in groups or [params]:
        if isinstance(group, dict) and (group.get("rope_type") or group.get("type")) == "longrope":
            original = group.get("original_max_position_embeddings")
            original = original or getattr(config, "original_max_position_embeddings", None)
            if original:
                limit = min(limit, int(original))
    return limit


class RotaryTables(Protocol):
    """What the packed runtime reads of a :class:`Rotary` (:func:`~ragcompress.runtime.packed.rope_tables`
    and the kernels' ``rot_dim``, ``paired``): a model's ``Rotary``, or
    :class:`~ragcompress.testing.PlainRotary`, which computes the tables without a model."""

    rotary_dim: int
    paired: bool

    def layer_key(self, layer_idx: int) -> Any: ...

    def cos_sin(self, positions: torch.Tensor, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]: ...

    def rotation_tables(self, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...


class Rotary:
    """Rotates keys ``[..., n, head_dim]`` to positions ``[..., n]`` for one decoder layer."""

    def __init__(self, model: Any, paired: bool | None = None) -> None:
        self._emb = model.model.rotary_emb
        # adjacent channels turn together (Cohere, Helium, GLM): as the load found (PAIRED_MARK),
        # or as asked (the load's probe tries both)
        self.paired = bool(getattr(self._emb, PAIRED_MARK, False)) if paired is None else paired
        self._layer_types = getattr(model.config, "layer_types", None)
        self._takes_layer_type = "layer_type" in inspect.signature(self._emb.forward).parameters
        # layers without RoPE (NoPE: SmolLM3's every fourth, Llama-4's) say so as ``use_rope``;
        # their keys are cached as projected, so "rotating" them is the identity
        self._rotates = [bool(getattr(layer.self_attn, "use_rope", True)) for layer in model.model.layers]
        # YaRN's attention scaling, folded into cos/sin; Gemma-3 keeps one per layer type (its
        # sliding layers have their own base and no rope_scaling, its global layers take it)
        self._scaling = [self._attention_scaling(i) for i in range(model.config.num_hidden_layers)]
        # one RoPE for every layer (all but Gemma-3's local/global mix and NoPE layers): decided once,
        # read by rotate_layers on every request
        self.shared_by_all_layers = len({self.layer_key(i) for i in range(len(self._rotates))}) == 1
        try:
            self._device = next(self._emb.buffers()).device
        except StopIteration:
            self._device = torch.device("cpu")
        # channels of a head that RoPE turns: head_dim, or fewer for partial rotary (the tables' width)
        self.rotary_dim = int(self.cos_sin(torch.zeros(1, dtype=torch.long), 0)[0].shape[-1])

    def layer_key(self, layer_idx: int) -> Any:
        """Layers with the same key share one RoPE (cos/sin tables): Gemma-3's layer types,
        and whether the layer rotates at all."""
        kind = self._layer_types[layer_idx] if self._takes_layer_type and self._layer_types is not None else None
        return kind, self._rotates[layer_idx]

    def rotates(self, layer_idx: int) -> bool:
        """Whether the layer applies RoPE at all (False for a NoPE layer, ``use_rope = 0``)."""
        return self._rotates[layer_idx]

    def _attention_scaling(self, layer_idx: int) -> float:
        if not self._rotates[layer_idx]:
            return 1.0
        if self._takes_layer_type and self._layer_types is not None:
            value = getattr(self._emb, f"{self._layer_types[layer_idx]}_attention_scaling", None)
        else:
            value = getattr(self._emb, "attention_scaling", None)
        return float(value or 1.0)

    def cos_sin(self, positions: torch.Tensor, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        """fp32 ``cos, sin`` of shape ``positions.shape + (rot,)``, attention scaling included; ``rot`` is
        :attr:`rotary_dim` (``head_dim`` unless the model rotates part of each head)."""
        flat = positions.reshape(1, -1).to(device=self._device, dtype=torch.long)
        probe = torch.empty(0, dtype=torch.float32, device=self._device)
        if self._takes_layer_type and self._layer_types is not None:
            cos, sin = self._emb(probe, flat, self._layer_types[layer_idx])
        else:
            cos, sin = self._emb(probe, flat)
        shape = tuple(positions.shape) + (cos.shape[-1],)
        if not self._rotates[layer_idx]:
            return torch.ones(shape, device=cos.device), torch.zeros(shape, device=sin.device)
        return cos.reshape(shape), sin.reshape(shape)

    def rotation_tables(self, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Tables as the rotary module gives them (:meth:`cos_sin`, or the ``position_embeddings``
        a layer receives) laid out as :func:`apply_rope` reads them for this model."""
        return pair_tables(cos, sin) if self.paired else (cos, sin)

    def apply(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """:func:`apply_rope` with the rotary module's own tables, in this model's convention."""
        return apply_rope(x, *self.rotation_tables(cos, sin), paired=self.paired)

    def table_cos_sin(self, positions: torch.Tensor, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`cos_sin` through a table of the span ``min..max`` of ``positions``.

        A segment's positions repeat across layers and heads (and, with nothing evicted, are the
        same row everywhere), so evaluating the RoPE module once per distinct position and
        broadcasting or gathering is far cheaper than once per element. Rows are gathered with
        ``index_select`` on the flattened positions: the same values as indexing ``cos[index]``,
        about six times faster on the CPU for the ``[layers, heads, n]`` positions of a segment.
        """
        low, high = int(positions.min()), int(positions.max())
        cos, sin = self.rotation_tables(*self.cos_sin(torch.arange(low, high + 1), layer_idx))  # [span, d]
        first = positions.reshape(-1, positions.shape[-1])[0]
        if bool((positions == first).all()):  # every layer/head keeps the same rows: broadcast
            positions = first
        index = (positions - low).long().to(cos.device).reshape(-1)  # indexes the table, where the RoPE module is
        shape = (*positions.shape, cos.shape[-1])
        return cos.index_select(0, index).view(shape), sin.index_select(0, index).view(shape)

    def rotate(self, keys: torch.Tensor, positions: torch.Tensor, layer_idx: int) -> torch.Tensor:
        """Apply RoPE: un-rotated keys -> keys as the model caches them at ``positions``."""
        out = torch.empty(keys.shape, dtype=torch.float32, device=keys.device)
        return self.rotate_into(out, keys, positions, layer_idx).to(keys.dtype)

    def rotate_into(
        self, out: torch.Tensor, keys: torch.Tensor, positions: torch.Tensor, layer_idx: int
    ) -> torch.Tensor:
        """:meth:`rotate` written into fp32 ``out`` (same shape; may be a view of a larger buffer)."""
        if positions.numel() == 0:
            return out
        return self._apply_rotation(out, keys, *self.table_cos_sin(positions, layer_idx))

    def rotate_layers(
        self, keys: torch.Tensor, positions: torch.Tensor, out: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Rotate every layer at once: keys ``[layers, heads, n, d]``, positions ``[layers, heads, n]``.

        Models whose layers share one RoPE (:attr:`shared_by_all_layers`) need a single
        cos/sin lookup for the whole segment instead of one per layer. ``out`` (same shape as
        ``keys``) receives the result when given; otherwise it is allocated in ``keys.dtype``.
        """
        if out is None:
            out = torch.empty(keys.shape, dtype=keys.dtype, device=keys.device)
        if not self.shared_by_all_layers:
            for i in range(keys.shape[0]):
                self._rotate_to(out[i], keys[i], positions[i], i)
        else:
            self._rotate_to(out, keys, positions, 0)
        return out

    def rotate_each_layer(self, keys: torch.Tensor, positions: torch.Tensor, outs: list[torch.Tensor]) -> None:
        """Rotate layer ``i``'s first ``outs[i].shape[-2]`` rows into ``outs[i]``: keys
        ``[layers, heads, n, d]`` and positions ``[layers, heads, n]`` of one segment whose layers
        keep different numbers of rows (per-layer padding, ``runtime.assemble``). One cos/sin
        table serves every layer that shares a RoPE; ``outs`` may be views of larger buffers.
        """
        tables: dict[Any, tuple[torch.Tensor, torch.Tensor]] = {}
        for i, out in enumerate(outs):
            rows = out.shape[-2]
            if rows == 0:
                continue
            kind = self.layer_key(i)
            if kind not in tables:
                tables[kind] = self.table_cos_sin(positions, i)
            cos, sin = tables[kind]
            if cos.dim() > 2:  # per layer and head; else one row of positions broadcast everywhere
                cos, sin = cos[i], sin[i]
            self._write_rotation(out, keys[i, :, :rows], cos[..., :rows, :], sin[..., :rows, :])

    def _rotate_to(self, out: torch.Tensor, keys: torch.Tensor, positions: torch.Tensor, layer_idx: int) -> None:
        if positions.numel():
            self._write_rotation(out, keys, *self.table_cos_sin(positions, layer_idx))

    def rotate_with_grad(self, keys: torch.Tensor, positions: torch.Tensor, layer_idx: int) -> torch.Tensor:
        """:meth:`rotate` as plain differentiable tensor arithmetic (training reads gradients
        through it; :meth:`rotate` writes in place)."""
        cos, sin = self.table_cos_sin(positions, layer_idx)
        cos, sin = cos.to(keys.device, keys.dtype), sin.to(keys.device, keys.dtype)
        return apply_rope(keys, cos, sin, self.paired)

    def unrotate(self, keys: torch.Tensor, positions: torch.Tensor, layer_idx: int) -> torch.Tensor:
        """Invert :meth:`rotate` (``cos``/``sin`` carry the scaling ``s``, so divide by ``s**2``)."""
        cos, sin = self.rotation_tables(*self.cos_sin(positions, layer_idx))
        scale = self._scaling[layer_idx]  # only the turned channels carry it
        out = apply_rope(keys.float(), cos / scale**2, -sin / scale**2, self.paired)
        return out.to(keys.dtype)

    def _write_rotation(self, out: torch.Tensor, keys: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
        """:meth:`_apply_rotation` into ``out`` of any dtype: in place when fp32, else rotated in
        fp32 and rounded once."""
        if out.dtype == torch.float32:
            self._apply_rotation(out, keys, cos, sin)
        else:
            fp32 = torch.empty(out.shape, dtype=torch.float32, device=out.device)
            out.copy_(self._apply_rotation(fp32, keys, cos, sin))

    def _apply_rotation(
        self, out: torch.Tensor, keys: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> torch.Tensor:
        """:func:`apply_rope` into fp32 ``out``: in halves without temporaries
        (:func:`_rotate_halves_into`, the common case, on every request), paired RoPE out of place."""
        if not self.paired:
            return _rotate_halves_into(out, keys, cos, sin)
        return out.copy_(apply_rope(keys.to(out.device, torch.float32), cos.to(out.device), sin.to(out.device), True))


def _rotate_halves_into(out: torch.Tensor, keys: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """:func:`apply_rope` (halves) into fp32 ``out``, one half at a time: the keys are read twice
    and written once, with no temporaries (memory-bound, on every request)."""
    cos, sin = cos.to(out.device), sin.to(out.device)  # computed where ``out`` lives
    rot = cos.shape[-1]
    if rot < keys.shape[-1]:  # partial rotary: the channels past the tables pass through
        out[..., rot:].copy_(keys[..., rot:])
    half = rot // 2
    x1 = keys[..., :half].to(out.device, torch.float32)
    x2 = keys[..., half:rot].to(out.device, torch.float32)
    low, high = out[..., :half], out[..., half:rot]
    torch.mul(x1, cos[..., :half], out=low)
    low.addcmul_(x2, sin[..., :half], value=-1.0)
    torch.mul(x2, cos[..., half:], out=high)
    high.addcmul_(x1, sin[..., half:])
    return out
