"""Attention over caches whose heads keep different tokens (per-head eviction).

Registered with transformers' ``AttentionInterface`` as ``"ragcompress"`` by
:func:`register_attention` (called by ``load_model``) and used by every model ragcompress loads.
Without the ``ragcompress_kv_mask`` keyword it *is* transformers' SDPA path, bit for bit; with
it, the padding rows of each layer's cache are masked per KV head. The mask is per layer
(``module.layer_idx``) because a per-head budget differs between layers and each layer's cache
is padded only to its own longest head (so layers differ in length), which a single 4-D
``attention_mask`` shared by all layers cannot express. With ``ragcompress_packed``
(a ``runtime.packed.PackedSegments``) it attends over quantized segments kept beside the cache
(fused Triton kernel on CUDA, PyTorch reference on CPU).
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

ATTENTION_NAME = "ragcompress"
KV_MASK_KWARG = "ragcompress_kv_mask"
PACKED_KWARG = "ragcompress_packed"
# a set each layer's attention call adds its index to: the architecture check's way of seeing that
# a model's layers hand keyword arguments on to attention, which the two above ride on
REACHED_KWARG = "ragcompress_reached"


def sliding_window(config: Any) -> int | None:
    """The window of the model's sliding-window layers (rows further back are out of their
    reach), or None when every layer attends to the whole sequence (Qwen2 with
    ``use_sliding_window`` off, Llama, Gemma 1)."""
    window = getattr(config, "sliding_window", None)
    if not window or getattr(config, "use_sliding_window", None) is False:
        return None
    types = getattr(config, "layer_types", None)
    if types and "sliding_attention" not in types:
        return None
    return int(window)


def per_head_window_problem(window: int) -> str:
    """Why a store that keeps a different number of rows per head cannot be read past a sliding
    window: the layer keeps its last ``window - 1`` rows, which the per-head row masks do not
    follow. The runtime refuses such a request (``runtime.prepare``), and training refuses to
    train for such a store up front (``distill.distiller.check_student_eviction``)."""
    return (
        f"this store keeps a different number of rows per head, which the model's sliding window "
        f"({window} tokens) cannot be applied to once the cache outgrows it"
    )


def logit_softcap(config: Any) -> float | None:
    """Gemma-2's cap on attention logits (``tanh(s / cap) * cap``), None for other models."""
    return getattr(config, "attn_logit_softcapping", None) or None


def allowed_keys(kv_mask: torch.Tensor, q_heads: int, q_len: int, total: int) -> torch.Tensor:
    """Boolean ``[1, q_heads, q_len, total]``: per-head cache rows, then causal new tokens.

    kv_mask: ``[kv_heads, past]`` True on real rows of this layer's assembled cache.
    """
    kv_heads, past = kv_mask.shape
    new = total - past
    allowed = torch.empty((q_heads, q_len, total), dtype=torch.bool, device=kv_mask.device)
    allowed[:, :, :past] = kv_mask.repeat_interleave(q_heads // kv_heads, dim=0).unsqueeze(1)
    allowed[:, :, past:] = torch.ones(q_len, new, dtype=torch.bool, device=kv_mask.device).tril(new - q_len)
    return allowed.unsqueeze(0)


def ragged_attention(
    module: Any,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """query ``[B, Hq, q, d]``, key/value ``[B, Hkv, total, d]``; see the module docstring."""
    reached = kwargs.pop(REACHED_KWARG, None)
    if reached is not None:
        reached.add(module.layer_idx)
    packed = kwargs.pop(PACKED_KWARG, None)
    if packed is not None:  # quantized segments beside a cache of prefix + new tokens (runtime/packed.py)
        if kwargs.get("softcap") is not None:  # choose_strategy refuses these models
            raise NotImplementedError("packed attention does not apply logit softcapping")
        # A sliding window is out of reach here: PackedStrategy refuses a request longer than it.
        scale = kwargs.get("scaling") or module.scaling
        return packed.attend(module.layer_idx, query, key, value, scale), None
    kv_mask = kwargs.pop(KV_MASK_KWARG, None)
    attend = softcapped_attention if kwargs.get("softcap") is not None else masked_sdpa
    if kv_mask is None:
        return attend(module, query, key, value, attention_mask, **kwargs)
    layer_mask = kv_mask[module.layer_idx]
    allowed = allowed_keys(layer_mask, query.shape[1], query.shape[2], key.shape[2])
    if attention_mask is not None and attention_mask.dtype == torch.bool:
        allowed = allowed & _align(attention_mask, layer_mask.shape[-1], key.shape[2] - layer_mask.shape[-1])
    kwargs["is_causal"] = False
    return attend(module, query, key, value, allowed, **kwargs)


def masked_sdpa(
    module: Any,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers' SDPA path, except that on the CPU a masked call of a model with grouped KV
    heads reads them through SDPA's ``enable_gqa`` instead of copying them per query head.

    transformers turns ``enable_gqa`` on only when there is no mask (CUDA's fused kernels do not
    take both), so every *masked* prefill -- a cached question after its passages, a recompute
    pass, per-head rows -- ran ``repeat_kv`` and copied every layer's keys and values (4 % of a
    cached question's TTFT on SmolLM2), while full prefill, unmasked, did not. On the CPU the
    grouped call gives the same bits (``tests/test_attention.py``); CUDA keeps transformers' choice."""
    groups = getattr(module, "num_key_value_groups", 1)
    plain = (
        attention_mask is None
        or groups <= 1
        or query.shape[2] == 1  # a decode step: transformers folds the groups into the query, no copy
        or query.device.type != "cpu"
        or kwargs.get("dropout", 0.0)
        or kwargs.get("position_bias") is not None
        or key.shape[-1] != value.shape[-1]
    )
    if plain:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    output = torch.nn.functional.scaled_dot_product_attention(
        query, key, value, attn_mask=attention_mask, scale=kwargs.get("scaling"), enable_gqa=True
    )
    return output.transpose(1, 2).contiguous(), None


def softcapped_attention(
    module: Any,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    *,
    softcap: float,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """Attention with Gemma-2's capped logits (``tanh(s / cap) * cap`` before the softmax), which
    SDPA cannot apply: the scores are computed here, as Gemma-2's own eager path does. The mask
    is boolean (True: may attend) or additive; without one the new tokens attend causally.
    Returns ``[B, q, Hq, d]`` like ``sdpa_attention_forward``."""
    groups = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    scores = torch.matmul(query, key.transpose(-1, -2)) * (scaling if scaling is not None else module.scaling)
    scores = torch.tanh(scores / softcap) * softcap
    total, q_len = key.shape[-2], query.shape[-2]
    if attention_mask is None:
        attention_mask = torch.ones(q_len, total, dtype=torch.bool, device=query.device).tril(total - q_len)
    if attention_mask.dtype == torch.bool:
        # the least finite score, not -inf: a row with no allowed key (a right-padded position a
        # window past a short passage's end) is then finite, as SDPA's is, where -inf made it NaN
        # and the NaN reached the real rows of later layers; a row with an allowed key is unchanged
        scores = scores.masked_fill(~attention_mask, torch.finfo(scores.dtype).min)
    else:
        scores = scores + attention_mask[..., :total]
    weights = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    return torch.matmul(weights, value).transpose(1, 2).contiguous(), None


def _align(attention_mask: torch.Tensor, past: int, new: int) -> torch.Tensor:
    """transformers' boolean mask ``[..., q, P0 + new]`` laid over a layer with ``past`` cached
    rows. transformers sizes it by layer 0's cache (``P0`` rows); with per-layer padding
    (``runtime.assemble``) other layers hold more or fewer, so its cached columns are cut or
    extended (by their last column) to ``past``, and its last ``new`` columns (the new tokens)
    stay aligned with the layer's last ``new`` rows."""
    cached = attention_mask.shape[-1] - new
    if cached == past:
        return attention_mask
    head = attention_mask[..., : min(cached, past)]
    if past > cached:
        head = torch.cat([head, attention_mask[..., cached - 1 : cached].expand(*head.shape[:-1], past - cached)], -1)
    return torch.cat([head, attention_mask[..., cached:]], dim=-1)


def register_attention() -> str:
    """Register :func:`ragged_attention` (and SDPA's mask builder) with transformers under
    :data:`ATTENTION_NAME`; returns that name, for ``attn_implementation=``. Idempotent:
    :func:`ragcompress.models.load_model` calls it before every load."""
    AttentionInterface.register(ATTENTION_NAME, ragged_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(ATTENTION_NAME, sdpa_mask)
    return ATTENTION_NAME
