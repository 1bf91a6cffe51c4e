"""Which passage tokens the selective recompute carries through the layers.

Two signals, both read at the check layer after every candidate token has been refreshed
through the layers below it (:func:`ragcompress.runtime.cache_pass.run_layers`):

* :func:`value_deviation` (CacheBlend, Yao et al. 2024): how far the fresh values moved from
  the stored ones; the tokens whose KV the missing cross-passage attention changed most;
* :func:`question_relevance` (ProphetKV-style): how much of the question's attention at that
  layer lands on each token.

:func:`question_reading` is the third, read without a check pass: the question's attention over
every layer, while it runs once over the cache as stored (``selection="question-deep"``).

:func:`ranking` combines them as :class:`~ragcompress.runtime.recompute.RecomputeConfig`'s
``selection`` asks, and :func:`select_tokens` takes the budget's best, deterministically.
"""

from __future__ import annotations

from typing import Any

import torch

from ragcompress.architecture import attention_input_norm, head_states, project
from ragcompress.compressors.scorer import nan_last
from ragcompress.kv.rope import Rotary
from ragcompress.runtime import cache_pass
from ragcompress.runtime.cache_pass import CacheLayout

SELECTIONS = ("deviation", "question", "mixed", "question-deep")


def value_deviation(
    model: Any, layout: CacheLayout, cache: Any, tokens: torch.Tensor, hidden: torch.Tensor, layer_idx: int
) -> torch.Tensor:
    """``[S]`` squared distance between the fresh and the stored values at ``layer_idx``,
    averaged over the KV heads that keep the token."""
    layer = model.model.layers[layer_idx]
    attn = layer.self_attn
    fresh = project(attn, "v_proj", attention_input_norm(layer)(hidden))  # [1, S, kv_heads * d]
    heads = layout.shape[1]
    fresh = fresh.view(hidden.shape[1], heads, -1).transpose(0, 1).float()  # [H, S, d]
    stored, kept = layout.token_rows(cache.layers[layer_idx].values[0], layout.rows(tokens), layer_idx)
    if kept is None:
        return (fresh - stored).pow(2).sum(-1).mean(0)
    diff = (fresh - stored).pow(2).sum(-1) * kept
    return diff.sum(0) / kept.sum(0).clamp(min=1)


def question_relevance(
    model: Any,
    rotary: Rotary,
    layout: CacheLayout,
    tokens: torch.Tensor,
    hidden: torch.Tensor,
    question: torch.Tensor,
    new_pos: torch.Tensor,
    layer_idx: int,
) -> torch.Tensor:
    """``[S]`` attention the question's tokens pay to passage ``tokens`` at ``layer_idx``.

    hidden ``[1, S, D]`` and question ``[1, Q, D]`` are the inputs of that layer. Queries and keys
    are the layer's own projections (with its q/k norms where the architecture has them), rotated
    to their positions; the softmax runs over the passage tokens, per query head and question
    token, and the weights are averaged over both: how much of the question's reading at this
    depth lands on each token.
    """
    layer = model.model.layers[layer_idx]
    attn = layer.self_attn
    kv_heads = layout.shape[1]
    q_heads = model.config.num_attention_heads
    norm = attention_input_norm(layer)
    q = head_states(attn, project(attn, "q_proj", norm(question)), "q", q_heads)[0]
    k = head_states(attn, project(attn, "k_proj", norm(hidden)), "k", kv_heads)[0]
    q = rotary.rotate(q.float(), new_pos.expand(q_heads, -1), layer_idx)
    k = rotary.rotate(k.float(), layout.token_pos[tokens].expand(kv_heads, -1), layer_idx)
    k = k.repeat_interleave(q_heads // kv_heads, dim=0)
    scaling = float(getattr(attn, "scaling", k.shape[-1] ** -0.5))
    weights = torch.softmax((q @ k.transpose(1, 2)) * scaling, dim=-1)  # [Hq, Q, S]
    return weights.mean(dim=(0, 1))


def question_reading(
    model: Any,
    rotary: Rotary,
    layout: CacheLayout,
    cache: Any,
    tokens: torch.Tensor,
    question: torch.Tensor,
    new_pos: torch.Tensor,
) -> torch.Tensor:
    """``[S]`` attention the question pays passage ``tokens`` over *every* layer, read while the
    question (embedded, ``[1, Q, D]``) runs once over the assembled cache as stored: plain reuse's
    own prefill of the question (ProphetKV's selection). No check pass runs: the tokens the
    question reads where it finds its answer are the ones recomputed.

    At each layer the question's queries (rotated to ``new_pos``) meet the cache's keys of the
    tokens; the softmax runs over the tokens (rows a head evicted excluded), and the weights are
    averaged over query heads, question tokens and layers. The question's rows are taken back out
    of the cache afterwards, so it is left as it was.
    """
    layers = model.model.layers
    kv_heads = layout.shape[1]
    q_heads = model.config.num_attention_heads
    groups = q_heads // kv_heads
    rows = layout.rows(tokens)
    total = torch.zeros(tokens.numel(), device=question.device)

    def observe(index: int, hidden: torch.Tensor) -> None:
        layer = layers[index]
        attn = layer.self_attn
        q = head_states(attn, project(attn, "q_proj", attention_input_norm(layer)(hidden)), "q", q_heads)[0]
        q = rotary.rotate(q.float(), new_pos.expand(q_heads, -1), index)
        # the cache's keys are rotated to their rows' positions already
        k, kept = layout.token_rows(cache.layers[index].keys[0], rows, index)
        k = k.repeat_interleave(groups, dim=0)
        scaling = float(getattr(attn, "scaling", k.shape[-1] ** -0.5))
        logits = (q @ k.transpose(1, 2)) * scaling  # [Hq, Q, S]
        if kept is not None:
            logits = logits.masked_fill(~kept.repeat_interleave(groups, dim=0)[:, None, :], float("-inf"))
        total.add_(torch.softmax(logits, dim=-1).nan_to_num(0.0).mean(dim=(0, 1)))

    cache_pass.run_layers(model, rotary, layout, cache, tokens[:0], question, 0, len(layers), new_pos, observe=observe)
    cache_pass.drop_appended(cache, question.shape[1])
    return total / len(layers)


def ranking(selection: str, deviation: torch.Tensor, relevance: torch.Tensor | None) -> torch.Tensor:
    """The score tokens are selected by (largest first)."""
    if selection == "deviation" or relevance is None:
        return deviation
    if selection == "question":
        return relevance
    return deviation / deviation.max().clamp(min=1e-12) + relevance / relevance.max().clamp(min=1e-12)


def select_tokens(deviation: torch.Tensor, candidates: torch.Tensor, sinks: torch.Tensor, budget: int) -> torch.Tensor:
    """Sinks plus the ``budget - len(sinks)`` candidates of largest ``deviation`` (``[len(candidates)]``).

    Ties are broken by position (stable sort), so the selection is deterministic; a NaN
    deviation ranks last (:func:`~ragcompress.compressors.scorer.nan_last`). Only the candidates
    that are not sinks are ranked, so none is taken twice. Returns sorted passage-token indices.
    """
    is_sink = torch.isin(candidates, sinks)
    rest = max(0, min(budget, candidates.numel()) - int(is_sink.sum()))
    others = candidates[~is_sink]
    order = torch.sort(nan_last(deviation[~is_sink]), descending=True, stable=True).indices[:rest]
    picked = torch.cat([candidates[is_sink], others[order]])
    return torch.sort(picked).values
