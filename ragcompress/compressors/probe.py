"""Run probe tokens after a passage's cache and observe the queries and attention they produce.

Attention-based scorers (SnapKV's observation window, KVzip's reconstruction, the query
statistics of Expected Attention) need the *queries* of some tokens that follow the cached
passage. The encoder only returns keys and values, so :func:`run_probe` rebuilds the rotated
cache ``prefix + passage[:context_len]`` and feeds ``probe_ids`` through the model's decoder
(no LM head) at the positions that follow, with a forward hook on every attention module. The
hook rebuilds the layer's queries from the module's own ``q_proj`` output (kept by a hook on
``q_proj``, not computed twice; its query norm when the architecture has one, then RoPE with the
``position_embeddings`` the model passed in), so it stays correct for every architecture the
library loads without touching the attention function. Probes run in chunks of ``chunk``
tokens: the attention matrix held at once is ``[q_heads, chunk, total]``, which bounds memory
for long passages (KVzip's chunked scoring). The probe runs where the model is; the passage's
cache goes there and the result comes back to the CPU, where the scorers work.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import torch

from ragcompress.architecture import attention_window, head_states, projection_module
from ragcompress.errors import InputError
from ragcompress.kv import PassageKV
from ragcompress.kv.cache import build_dynamic_cache
from ragcompress.kv.rope import position_limit

if TYPE_CHECKING:
    from ragcompress.indexing.encoder import PassageEncoder

Reduce = Literal["mean", "max"]


@dataclass
class ProbeResult:
    """attention: ``[layers, kv_heads, score_len]`` attention received by passage tokens,
    reduced over probe queries and over the query heads of each KV group (``None`` if not asked).
    queries: per layer ``[q_heads, len(probe_ids), head_dim]`` queries *before* RoPE (if asked).
    scaling: per layer softmax scale the model uses (``module.scaling``)."""

    attention: torch.Tensor | None
    queries: list[torch.Tensor] | None
    scaling: list[float]


def rotated_context(
    encoder: PassageEncoder, kv: PassageKV, context_len: int
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer ``(keys, values)`` ``[1, kv_heads, P + context_len, d]`` on the model's device, keys
    rotated as the model caches them (prefix at ``0..P-1``, passage token ``o`` at ``P + o``)."""
    if not kv.is_uniform:
        raise ValueError("probing needs the passage's full cache (no eviction yet)")
    prefix, rotary, p = encoder.prefix_kv, encoder.rotary, encoder.prefix_len
    out = []
    for layer in range(kv.keys.shape[0]):
        pk = rotary.rotate(prefix.keys[layer], prefix.positions[layer], layer)
        ck = rotary.rotate(kv.keys[layer, :, :context_len], kv.positions[layer, :, :context_len] + p, layer)
        keys = torch.cat([pk, ck], dim=1).unsqueeze(0)
        values = torch.cat([prefix.values[layer], kv.values[layer, :, :context_len]], dim=1).unsqueeze(0)
        out.append((keys.to(encoder.device, kv.keys.dtype), values.to(encoder.device)))
    return out


def layer_queries(module: Any, projected: torch.Tensor) -> torch.Tensor:
    """Pre-RoPE queries ``[batch, q_heads, m, head_dim]`` of attention ``module`` from its
    ``q_proj`` output ``[batch, m, q_heads * head_dim]``."""
    return head_states(module, projected, "q", projected.shape[-1] // module.head_dim)


def _reduce(x: torch.Tensor, how: Reduce, dim: int) -> torch.Tensor:
    """Max, or sum (``"mean"`` divides by the count once at the end)."""
    return x.amax(dim=dim) if how == "max" else x.sum(dim=dim)


def probe_fits(encoder: PassageEncoder, context_len: int, probe_len: int) -> bool:
    """Whether ``probe_len`` probe tokens after ``prefix + passage[:context_len]`` stay within the
    model's positions (:func:`~ragcompress.kv.rope.position_limit`), as :func:`run_probe` requires:
    a caller that must not fail midway (``train``'s scorer fit) asks before it starts."""
    return encoder.prefix_len + context_len + probe_len <= position_limit(encoder.lm.model.config)


@torch.inference_mode()
def run_probe(
    encoder: PassageEncoder,
    kv: PassageKV,
    probe_ids: list[int],
    *,
    context_len: int,
    score_len: int,
    query_reduce: Reduce = "mean",
    group_reduce: Reduce = "mean",
    attention: bool = True,
    capture_queries: bool = False,
    chunk: int = 256,
) -> ProbeResult:
    """Feed ``probe_ids`` after ``prefix + passage[:context_len]`` and observe every layer.

    ``attention`` reduces, for each KV head, the softmax weights that the probe's queries put on
    the keys at passage offsets ``0..score_len-1`` (``score_len`` may exceed ``context_len``
    when the probe re-runs the passage's own tail, as SnapKV's window does); a query's weights on
    keys it cannot see (causality) count as zero. ``"mean"`` averages over the probe's queries.
    A probe that would run past the model's positions (``max_position_embeddings``; LongRoPE's
    original length, :func:`~ragcompress.kv.rope.position_limit`) is refused (``InputError``).
    """
    model = encoder.lm.model
    p, m = encoder.prefix_len, len(probe_ids)
    limit = position_limit(model.config)
    if not probe_fits(encoder, context_len, m):
        name = "max_position_embeddings"
        if limit != getattr(model.config, "max_position_embeddings", None):
            name = "original_max_position_embeddings (LongRoPE)"
        # past the positions the model was trained on the probe's attention means nothing, and
        # moving the probe back would no longer be what follows the passage: refuse, by name
        raise InputError(
            f"a passage of {kv.num_tokens} tokens cannot be scored here: the probe ({m} tokens after the "
            f"{p}-token prefix and {context_len} passage tokens) reaches position {p + context_len + m - 1}, "
            f"past the model's {name} of {limit}; split the passage or use a method that "
            "does not probe past it (snapkv, expected-attention, knorm)"
        )
    layers = rotated_context(encoder, kv, context_len)
    # every row kept in every layer (a sliding layer's cache would drop the passage's first rows);
    # the window is applied to the scores below, as the model's own masks apply it to its attention
    cache = build_dynamic_cache(model.config, [k for k, _ in layers], [v for _, v in layers], all_rows=True)
    softcap = getattr(model.config, "attn_logit_softcapping", None)
    n_layers, kv_heads = kv.keys.shape[:2]
    acc = torch.zeros((n_layers, kv_heads, score_len), device=encoder.device) if attention else None
    queries: list[list[torch.Tensor]] = [[] for _ in range(n_layers)]
    scaling = [0.0] * n_layers

    @functools.cache
    def hidden_keys(c: int, total: int, window: int | None) -> tuple[int, torch.Tensor]:
        """``(start, mask)``: ``mask`` ``[c, total - start]`` is True where a chunk query cannot
        see the key at cache index ``start + j`` (causality, and on a sliding-window layer keys
        ``window`` or more positions back); every key before ``start`` is seen by every query, so
        only the chunk's own columns are masked on a full-attention layer. Shared by layers."""
        first = total - c  # cache index of the chunk's first query
        start = 0 if window else first
        query = (first + torch.arange(c, device=encoder.device)).unsqueeze(-1)
        keys = torch.arange(start, total, device=encoder.device)
        hidden = keys > query
        return start, (hidden | (query - keys >= window) if window else hidden)

    projected: dict[int, torch.Tensor] = {}  # q_proj's output of the current chunk, per layer

    def keep_projection(layer: int, columns: slice) -> Any:
        def hook(module: Any, args: Any, output: torch.Tensor) -> None:
            projected[layer] = output[..., columns]

        return hook

    def hook(module: Any, args: Any, kwargs: dict[str, Any], output: Any) -> None:
        layer = module.layer_idx
        scaling[layer] = float(module.scaling)
        q = layer_queries(module, projected.pop(layer))  # [1, Hq, c, d]
        if capture_queries:
            queries[layer].append(q[0].float())
        if acc is None:
            return
        if encoder.rotary.rotates(layer):  # a layer without RoPE (SmolLM3's NoPE) is passed tables it ignores
            cos, sin = kwargs["position_embeddings"]
            q = encoder.rotary.apply(q, cos.unsqueeze(1), sin.unsqueeze(1))
        q = q[0].float()
        keys = cache.layers[layer].keys[0].float()  # [Hkv, T, d], this chunk already appended
        c, total = q.shape[1], keys.shape[1]
        q = q.view(kv_heads, -1, c, q.shape[-1])  # [Hkv, g, c, d]
        logits = torch.einsum("hgcd,htd->hgct", q, keys) * module.scaling
        if softcap:  # Gemma-2 caps its attention logits before the softmax
            logits = torch.tanh(logits / softcap) * softcap
        start, hidden = hidden_keys(c, total, attention_window(module))
        logits[..., start:].masked_fill_(hidden, float("-inf"))
        # softmax weights of the passage columns only: exp(logit - logsumexp over every key)
        weights = (logits[..., p : p + score_len] - logits.logsumexp(dim=-1, keepdim=True)).exp_()
        if weights.shape[-1] < score_len:  # keys of later probe chunks do not exist yet
            weights = torch.nn.functional.pad(weights, (0, score_len - weights.shape[-1]))
        reduced = _reduce(_reduce(weights, query_reduce, 2), group_reduce, 1)  # [Hkv, score_len]
        acc[layer] = torch.maximum(acc[layer], reduced) if query_reduce == "max" else acc[layer] + reduced

    handles = [layer.self_attn.register_forward_hook(hook, with_kwargs=True) for layer in model.model.layers]
    # the attention module's own query projection, kept rather than computed a second time
    for i, layer in enumerate(model.model.layers):
        module, columns = projection_module(layer.self_attn, "q_proj")
        handles.append(module.register_forward_hook(keep_projection(i, columns)))
    try:
        start = p + context_len
        for offset in range(0, m, chunk):
            ids = probe_ids[offset : offset + chunk]
            positions = torch.arange(start + offset, start + offset + len(ids), device=encoder.device).unsqueeze(0)
            inputs = torch.tensor([ids], device=encoder.device)
            model.model(input_ids=inputs, position_ids=positions, cache=cache, use_cache=True)
    finally:
        for handle in handles:
            handle.remove()
    if acc is not None:
        groups = model.config.num_attention_heads // kv_heads
        if query_reduce == "mean":
            acc /= m
        if group_reduce == "mean":
            acc /= groups
    return ProbeResult(
        acc.cpu() if acc is not None else None,
        [torch.cat(q, dim=1).cpu() for q in queries] if capture_queries else None,
        scaling,
    )
