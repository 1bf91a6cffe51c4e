"""Selective recompute of cached passage tokens at query time (CacheBlend, EPIC).

Passages cached one by one never attended to each other: the KV of a token in passage 2 was
computed as if passage 1 did not exist. :func:`blend` repairs the assembled cache in place by
recomputing the KV of a few passage tokens with full attention over everything before them:

1. *Check* (CacheBlend, Yao et al. 2024, §4.2): every candidate passage token is run through
   layers ``0 … check_layer-1`` with full attention, and its values at ``check_layer`` are
   compared with the stored ones. The ``ratio × passage tokens`` tokens whose values deviate
   most are selected (stable order, so the choice is deterministic), plus the first
   ``sink_tokens`` of every passage (per-passage attention sinks, EPIC, Hu et al. 2024).
2. *Recompute*: only the selected tokens' hidden states are carried through the remaining
   layers. At each layer they attend over the assembled cache, where unselected tokens keep
   their stored KV and selected tokens hold the KV just computed (CacheBlend's approximation),
   under a causal mask by *position*; their fresh KV overwrite their rows of the cache.

Layer 0's KV depend only on the token and its position, so they equal the stored ones (up to
quantization); the deviation first shows at layer 1, the default check layer. The first passage
directly follows the shared prefix, so where the store holds its base-model cache in full (no
eviction; unquantized or rounded to 8 bits, ``Manifest.passages_exact``) it already is full
prefill's, up to that rounding, and only later passages are candidates: neither checked nor
recomputed.

``ratio=0`` with no sinks leaves the cache untouched (plain reuse, bit for bit); ``ratio=1``
recomputes every candidate through every layer, which is a full prefill of the passages (with
eviction: of the kept rows; on an int8 store the first passage keeps its rounded rows). The
recompute works on whatever the store holds: quantized values are replaced by fresh
full-precision ones, and with per-head eviction a selected token's fresh KV go only to the heads
that kept it (masks are then built per layer and head).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ragcompress.architecture import attention_input_norm, head_states, output_logits, project
from ragcompress.kv import PassageKV
from ragcompress.kv.rope import Rotary
from ragcompress.runtime.assemble import AssembledCache, per_layer_rows, segment_rows
from ragcompress.runtime.calibration import scale_context_keys

SELECTIONS = ("deviation", "question", "mixed")


@dataclass(frozen=True)
class RecomputeConfig:
    """How much of the cached passages to recompute at query time.

    ratio:       fraction of the prompt's passage tokens recomputed through every layer, in [0, 1]
    sink_tokens: first tokens of every passage always recomputed (EPIC's per-passage sinks)
    check_layer: layer whose value deviation ranks tokens (layers below it are refreshed for all
                 candidates); 1 is CacheBlend's choice
    temperature: APE attention temperature on the passage keys, applied after the recompute
                 (:mod:`ragcompress.runtime.calibration`); 1 leaves the logits unchanged
    selection:   how tokens are ranked: ``deviation`` (CacheBlend: values that moved most at the
                 check layer), ``question`` (ProphetKV-style: the question's attention to them at
                 the check layer) or ``mixed`` (the sum of both, each scaled to its maximum)
    """

    ratio: float = 0.0
    sink_tokens: int = 0
    check_layer: int = 1
    temperature: float = 1.0
    selection: str = "deviation"

    def __post_init__(self) -> None:
        if not 0.0 <= self.ratio <= 1.0:
            raise ValueError(f"recompute ratio must be in [0, 1], got {self.ratio}")
        if self.sink_tokens < 0:
            raise ValueError(f"sink_tokens must be >= 0, got {self.sink_tokens}")
        if self.check_layer < 1:
            raise ValueError(f"check_layer must be >= 1, got {self.check_layer}")
        if self.temperature <= 0.0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if self.selection not in SELECTIONS:
            raise ValueError(f"selection must be one of {', '.join(SELECTIONS)}, got {self.selection!r}")

    @classmethod
    def coerce(cls, value: RecomputeConfig | float | None) -> RecomputeConfig:
        """Accept a config, a bare ratio, or ``None`` (no recompute)."""
        if value is None:
            return cls()
        if isinstance(value, RecomputeConfig):
            return value
        return cls(ratio=float(value))

    @property
    def recomputes(self) -> bool:
        return self.ratio > 0.0 or self.sink_tokens > 0

    @property
    def active(self) -> bool:
        return self.recomputes or self.temperature != 1.0


@dataclass(frozen=True)
class BlendReport:
    """What :func:`blend` did: the selected tokens as indices into the concatenated passage
    tokens (sorted), how many tokens were candidates, and the next-token logits when the
    question was prefilled in the same pass."""

    selected: torch.Tensor
    candidates: int
    passage_tokens: int
    logits: torch.Tensor | None = None  # [vocab] after the question, when it rode along


class _Layout:
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


class _BlendCache:
    """Stands in for the transformers cache while selected tokens pass through the layers.

    ``update`` (called by every attention module after computing its keys and values) writes the
    fresh KV of the first ``S`` queries ``[1, kv_heads, S, d]`` into the selected tokens' rows of
    the assembled cache, in place, appends those of the ``Q`` new tokens after it, and returns
    the whole layer ``[1, kv_heads, T + Q, d]`` to attend over. ``rows`` (:meth:`_Layout.rows`)
    are moved to the cache's device: they index it.
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
            layer.keys = torch.cat([layer.keys, key_states[:, :, split:].to(layer.keys.dtype)], dim=2)
            layer.values = torch.cat([layer.values, value_states[:, :, split:].to(layer.values.dtype)], dim=2)
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


def _run_layers(
    model: Any,
    rotary: Rotary,
    layout: _Layout,
    cache: Any,
    tokens: torch.Tensor,
    hidden: torch.Tensor,
    start: int,
    stop: int,
    new_pos: torch.Tensor | None = None,
) -> torch.Tensor:
    """Carry ``hidden [1, S (+ Q), D]`` of passage ``tokens [S]`` (then of ``Q`` new tokens at
    ``new_pos``, appended to the cache) through layers ``start … stop-1``."""
    layers = model.model.layers
    config = model.config
    new_pos = torch.zeros(0, dtype=torch.long) if new_pos is None else new_pos
    positions = torch.cat([layout.token_pos[tokens], new_pos]).unsqueeze(0)  # [1, S+Q]
    masks = layout.masks(tokens, config.num_attention_heads, new_pos, hidden.device)
    blend_cache = _BlendCache(cache, layout.rows(tokens), layout.uniform, new_pos.numel())
    rope: dict[Any, tuple[torch.Tensor, torch.Tensor]] = {}
    for index in range(start, stop):
        kind = rotary.layer_key(index)
        if kind not in rope:
            cos, sin = rotary.cos_sin(positions, index)
            rope[kind] = (cos.to(hidden.dtype), sin.to(hidden.dtype))
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


def _deviation(
    model: Any, layout: _Layout, cache: Any, tokens: torch.Tensor, hidden: torch.Tensor, layer_idx: int
) -> torch.Tensor:
    """``[S]`` squared distance between the fresh and the stored values at ``layer_idx``,
    averaged over the KV heads that keep the token."""
    layer = model.model.layers[layer_idx]
    attn = layer.self_attn
    fresh = project(attn, "v_proj", attention_input_norm(layer)(hidden))  # [1, S, kv_heads * d]
    heads = layout.shape[1]
    fresh = fresh.view(hidden.shape[1], heads, -1).transpose(0, 1).float()  # [H, S, d]
    stored_all = cache.layers[layer_idx].values[0]  # [H, T, d]
    rows = layout.rows(tokens).to(stored_all.device)
    if layout.uniform:
        stored = stored_all[:, rows].float()
        return (fresh - stored).pow(2).sum(-1).mean(0)
    rows = rows[layer_idx]  # [H, S]
    kept = rows >= 0
    stored = torch.gather(stored_all.float(), 1, rows.clamp(min=0).unsqueeze(-1).expand(-1, -1, fresh.shape[-1]))
    diff = (fresh - stored).pow(2).sum(-1) * kept
    return diff.sum(0) / kept.sum(0).clamp(min=1)


def _question_relevance(
    model: Any,
    rotary: Rotary,
    layout: _Layout,
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


def _ranking(config: RecomputeConfig, deviation: torch.Tensor, relevance: torch.Tensor | None) -> torch.Tensor:
    """The score tokens are selected by (largest first)."""
    if config.selection == "deviation" or relevance is None:
        return deviation
    if config.selection == "question":
        return relevance
    return deviation / deviation.max().clamp(min=1e-12) + relevance / relevance.max().clamp(min=1e-12)


def select_tokens(deviation: torch.Tensor, candidates: torch.Tensor, sinks: torch.Tensor, budget: int) -> torch.Tensor:
    """Sinks plus the ``budget - len(sinks)`` candidates of largest ``deviation`` (``[len(candidates)]``).

    Ties are broken by position (stable sort), so the selection is deterministic. Returns sorted
    passage-token indices.
    """
    is_sink = torch.isin(candidates, sinks)
    rest = max(0, min(budget, candidates.numel()) - int(is_sink.sum()))
    scores = deviation.float().masked_fill(is_sink, float("-inf"))
    order = torch.sort(scores, descending=True, stable=True).indices[:rest]
    picked = torch.cat([candidates[is_sink], candidates[order]])
    return torch.sort(picked).values


@torch.inference_mode()
def blend(
    model: Any,
    rotary: Rotary,
    built: AssembledCache,
    prefix: PassageKV,
    segments: list[PassageKV],
    token_ids: list[list[int]],
    config: RecomputeConfig,
    *,
    first_exact: bool = False,
    suffix: list[int] | None = None,
    score_question: list[int] | None = None,
) -> BlendReport:
    """Recompute selected passage tokens of ``built`` in place (see the module docstring).

    token_ids:   the token ids of every segment's passage (``len == seg.num_tokens``)
    first_exact: the store's passages are exact after the prefix up to 8-bit rounding
                 (``Manifest.passages_exact``: no projection, neighbours or adaptor, or the
                 adaptor's base copy read); then a uniform first segment is already what full
                 prefill computes and its tokens are not candidates
    suffix:      the question's tokens; when given (and something is recomputed) they ride along
                 in the recompute pass (CacheBlend's fused prefill: the weights are read once,
                 not twice), their KV are appended to the cache at ``built.next_position…`` and
                 the report carries the logits of the last one
    score_question: the question's tokens when they only rank tokens (question-aware selection
                 without ``suffix``); their rows are removed from the cache again
    """
    for seg, seg_ids in zip(segments, token_ids, strict=True):
        if len(seg_ids) != seg.num_tokens:
            raise ValueError(f"a segment has {seg.num_tokens} tokens but its text gives {len(seg_ids)}")
    layout = _Layout(prefix, segments)
    total = layout.token_pos.numel()
    empty = torch.zeros(0, dtype=torch.long)
    if not config.recomputes or total == 0:
        return BlendReport(empty, 0, total)
    skip = segments[0].num_tokens if first_exact and segments[0].is_uniform else 0
    candidates = torch.arange(skip, total)
    starts = torch.tensor(layout.segment_starts, dtype=torch.long)
    sinks = (starts[:, None] + torch.arange(config.sink_tokens)).flatten()
    lengths = torch.tensor([seg.num_tokens for seg in segments])
    sinks = sinks[(torch.arange(config.sink_tokens)[None, :] < lengths[:, None]).flatten()]
    sinks = sinks[sinks >= skip]
    budget = max(int(round(config.ratio * total)), int(sinks.numel()))
    if candidates.numel() == 0 or budget == 0:
        return BlendReport(empty, int(candidates.numel()), total)

    # token bookkeeping (candidates, sinks, the selection) stays on the CPU; what indexes the
    # model's tensors (token ids, cache rows, masks, kept hidden states) is moved to their device
    ids = torch.tensor([t for seq in token_ids for t in seq], dtype=torch.long)
    embed = model.model.embed_tokens
    device = embed.weight.device
    layers = len(model.model.layers)
    check = min(config.check_layer, layers)
    question_ids = suffix or score_question
    if config.selection != "deviation" and not question_ids:
        raise ValueError(f"selection={config.selection!r} ranks tokens by the question; pass its tokens")
    new_pos = torch.arange(built.next_position, built.next_position + len(question_ids or []))
    question = None
    if config.ratio > 0.0 and budget < candidates.numel():
        hidden = embed(ids[candidates].unsqueeze(0).to(device))
        hidden = _run_layers(model, rotary, layout, built.cache, candidates, hidden, 0, check)
        if check < layers:
            deviation = _deviation(model, layout, built.cache, candidates, hidden, check)
        else:
            deviation = torch.zeros(candidates.numel(), device=device)
        relevance = None
        if question_ids and (suffix or config.selection != "deviation"):
            # the question's layers below the check layer run alone (over the refreshed rows)
            question = _run_layers(
                model,
                rotary,
                layout,
                built.cache,
                candidates[:0],
                embed(torch.tensor([question_ids], device=device)),
                0,
                check,
                new_pos,
            )
            if config.selection != "deviation" and check < layers:
                relevance = _question_relevance(model, rotary, layout, candidates, hidden, question, new_pos, check)
            if not suffix:  # scored only: take its rows back out of the cache
                layer: Any
                for layer in built.cache.layers[:check]:
                    layer.keys, layer.values = (
                        layer.keys[:, :, : -len(question_ids)],
                        layer.values[:, :, : -len(question_ids)],
                    )
                question = None
        selected = select_tokens(_ranking(config, deviation, relevance).cpu(), candidates, sinks, budget)
        keep = torch.searchsorted(candidates, selected)
        hidden = hidden[:, keep.to(device)]
        start = check
    else:
        selected = candidates if budget >= candidates.numel() else sinks
        hidden = embed(ids[selected].unsqueeze(0).to(device))
        start = 0
    if not suffix:
        _run_layers(model, rotary, layout, built.cache, selected, hidden, start, layers)
        return BlendReport(selected, int(candidates.numel()), total)
    suffix_ids = torch.tensor([suffix], dtype=torch.long, device=device)
    if question is None:
        question = embed(suffix_ids)
        if start > 0:  # the question's layers below the check layer run alone, before joining
            question = _run_layers(model, rotary, layout, built.cache, selected[:0], question, 0, start, new_pos)
    hidden = _run_layers(
        model, rotary, layout, built.cache, selected, torch.cat([hidden, question], dim=1), start, layers, new_pos
    )
    logits = output_logits(model, hidden[:, -1:])[0, -1]
    return BlendReport(selected, int(candidates.numel()), total, logits)


def repair(
    model: Any,
    rotary: Rotary,
    built: AssembledCache,
    prefix: PassageKV,
    segments: list[PassageKV],
    token_ids: list[list[int]],
    config: RecomputeConfig,
    *,
    first_exact: bool = False,
    suffix: list[int] | None = None,
) -> torch.Tensor | None:
    """What the dense strategy runs between assembling the cache and the question's prefill:
    the selective recompute (:func:`blend`), then the APE temperature on the passage rows.

    An inactive ``config`` leaves ``built`` untouched (plain reuse). With ``suffix`` (and no
    temperature, which must act before the question is read), the question is prefilled in the
    recompute pass itself and its next-token logits ``[vocab]`` are returned; ``None`` means the
    caller prefills the question as usual.
    """
    if not config.active:
        return None
    fuse = suffix is not None and config.temperature == 1.0
    if config.recomputes:
        report = blend(
            model,
            rotary,
            built,
            prefix,
            segments,
            token_ids,
            config,
            first_exact=first_exact,
            suffix=suffix if fuse else None,
            score_question=suffix,
        )
        if report.logits is not None:
            return report.logits
    scale_context_keys(built.cache, prefix.keys.shape[2], built.context_rows.tolist(), config.temperature)
    return None
