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

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any, TypeGuard

import torch

from ragcompress.architecture import output_logits
from ragcompress.kv import PassageKV
from ragcompress.kv.rope import Rotary
from ragcompress.runtime import cache_pass
from ragcompress.runtime.assemble import AssembledCache
from ragcompress.runtime.cache_pass import CacheLayout
from ragcompress.runtime.calibration import scale_context_keys
from ragcompress.runtime.token_selection import (
    SELECTIONS,
    question_reading,
    question_relevance,
    ranking,
    select_tokens,
    value_deviation,
)

__all__ = ["SELECTIONS", "BlendReport", "RecomputeConfig", "blend", "repair", "select_tokens"]


def is_number(value: object) -> TypeGuard[int | float]:
    """An int or a float, not a bool (``True`` is an int) nor a string (``float("0.5")`` reads one):
    what the answering configs take for their fractions and margins."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _schedule_points(points: Any) -> tuple[tuple[int, float], ...]:
    """``(passages, ratio)`` pairs of a recompute schedule, as ints and floats, or a ValueError
    naming the expected form (a string such as ``"3:0.05"`` is the CLI's notation, not this)."""
    try:
        if isinstance(points, (str, bytes)):
            raise TypeError
        return tuple((int(k), float(r)) for k, r in points)
    except (TypeError, ValueError):
        raise ValueError(
            f"a recompute schedule (ratio_by_passages) is (passages, ratio) pairs such as ((3, 0.05), (5, 0.1)); "
            f"got {points!r}"
        ) from None


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
                 the check layer), ``mixed`` (the sum of both, each scaled to its maximum) or
                 ``question-deep`` (the question's attention over every layer, read from one
                 pass of it over the cache as stored; no check pass)
    ratio_by_passages: ``(passages, ratio)`` points, increasing in passages; when given, a
                 request with ``k`` retrieved passages recomputes the fraction interpolated
                 linearly in ``k`` between the points around it (the nearest point's outside
                 them) instead of ``ratio``, which must then equal the first point's. More
                 passages leave room for more: full prefill's cost grows with them, the cached
                 path's fixed cost (loading, the question) does not (docs/recompute.md)
    final_ratio: CacheBlend's gradual filtering (§4.3): the fraction of passage tokens still
                 carried through the last layer. Before each layer above the check layer the
                 tokens carried so far are ranked again by ``selection`` at that layer and the
                 best ``total x r(layer)`` go on, ``r`` falling linearly from the request's ratio
                 at the check layer to ``final_ratio`` at the last; a dropped token keeps its
                 stored KV above the layer it left at; sinks are never dropped. ``None`` (or a
                 value not below the request's ratio) carries every selected token through
                 every layer
    """

    ratio: float = 0.0
    sink_tokens: int = 0
    check_layer: int = 1
    temperature: float = 1.0
    selection: str = "deviation"
    ratio_by_passages: tuple[tuple[int, float], ...] = ()
    final_ratio: float | None = None

    def __post_init__(self) -> None:
        for name in ("ratio", "temperature") + (("final_ratio",) if self.final_ratio is not None else ()):
            value = getattr(self, name)
            if not is_number(value) or not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value!r}")
        for name in ("sink_tokens", "check_layer"):
            if type(getattr(self, name)) is not int:
                raise ValueError(f"{name} must be an integer, got {getattr(self, name)!r}")
        if not 0.0 <= self.ratio <= 1.0:
            raise ValueError(f"recompute ratio must be in [0, 1], got {self.ratio}")
        points = _schedule_points(self.ratio_by_passages)
        object.__setattr__(self, "ratio_by_passages", points)
        passages = [k for k, _ in points]
        if any(k < 1 or not 0.0 <= r <= 1.0 for k, r in points) or passages != sorted(set(passages)):
            raise ValueError(
                f"a recompute schedule (ratio_by_passages; --recompute 3:0.05,5:0.1) must be (passages >= 1, "
                f"ratio in [0, 1]) points with passages increasing, got {list(points)}"
            )
        if points and self.ratio != points[0][1]:
            raise ValueError(
                f"ratio {self.ratio} differs from the first point of ratio_by_passages ({points[0][1]}); "
                "with_ratio() gives one fraction for every request"
            )
        if self.sink_tokens < 0:
            raise ValueError(f"sink_tokens must be >= 0, got {self.sink_tokens}")
        if self.check_layer < 1:
            raise ValueError(f"check_layer must be >= 1, got {self.check_layer}")
        if self.temperature <= 0.0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if self.final_ratio is not None and not 0.0 <= self.final_ratio <= 1.0:
            raise ValueError(f"final_ratio must be in [0, 1], got {self.final_ratio}")
        if self.selection not in SELECTIONS:
            raise ValueError(f"selection must be one of {', '.join(SELECTIONS)}, got {self.selection!r}")

    @classmethod
    def coerce(cls, value: RecomputeConfig | float | None) -> RecomputeConfig:
        """Accept a config, a bare ratio, or ``None`` (no recompute)."""
        if value is None:
            return cls()
        if isinstance(value, RecomputeConfig):
            return value
        if not is_number(value):
            raise ValueError(f"recompute must be a RecomputeConfig, a fraction in [0, 1] or None, got {value!r}")
        return cls(ratio=float(value))

    def with_ratio(self, ratio: float | Sequence[tuple[int, float]]) -> RecomputeConfig:
        """This config with another fraction (an explicit ``--recompute``), its selection, sinks
        and check layer kept: a number is one fraction for every request, ``(passages, ratio)``
        points a schedule (``ratio_by_passages``)."""
        if is_number(ratio):
            return replace(self, ratio=float(ratio), ratio_by_passages=())
        points = _schedule_points(ratio)
        if not points:
            raise ValueError("a recompute schedule needs at least one (passages, ratio) point")
        return replace(self, ratio=float(points[0][1]), ratio_by_passages=points)

    def ratio_for(self, passages: int) -> float:
        """The fraction recomputed for a request that retrieved ``passages`` passages."""
        points = self.ratio_by_passages
        if not points or passages <= points[0][0]:
            return self.ratio
        for (k0, r0), (k1, r1) in zip(points, points[1:], strict=False):
            if passages <= k1:
                return r0 + (r1 - r0) * (passages - k0) / (k1 - k0)
        return points[-1][1]

    @property
    def recomputes(self) -> bool:
        return self.ratio > 0.0 or any(r > 0.0 for _, r in self.ratio_by_passages) or self.sink_tokens > 0

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
    layout = CacheLayout(prefix, segments)
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
    ratio = config.ratio_for(len(segments))
    budget = max(int(round(ratio * total)), int(sinks.numel()))
    if candidates.numel() == 0 or budget == 0:
        return BlendReport(empty, int(candidates.numel()), total)

    # token bookkeeping (candidates, sinks, the selection) stays on the CPU; what indexes the
    # model's tensors (token ids, cache rows, masks, kept hidden states) is moved to their device
    ids = torch.tensor([t for seq in token_ids for t in seq], dtype=torch.long)
    embed = model.model.embed_tokens
    device = embed.weight.device
    layers = len(model.model.layers)
    if config.check_layer > layers:
        raise ValueError(f"check_layer {config.check_layer} is beyond the model's {layers} layers")
    check = config.check_layer
    question_ids = suffix or score_question
    if config.selection != "deviation" and not question_ids:
        raise ValueError(f"selection={config.selection!r} ranks tokens by the question; pass its tokens")
    new_pos = torch.arange(built.next_position, built.next_position + len(question_ids or []))
    question = None
    if ratio > 0.0 and budget < candidates.numel() and config.selection == "question-deep":
        question_embedded = embed(torch.tensor([question_ids], device=device))
        reading = question_reading(model, rotary, layout, built.cache, candidates, question_embedded, new_pos)
        selected = select_tokens(reading.cpu(), candidates, sinks, budget)
        hidden = embed(ids[selected].unsqueeze(0).to(device))
        start = 0
    elif ratio > 0.0 and budget < candidates.numel():
        hidden = embed(ids[candidates].unsqueeze(0).to(device))
        hidden = cache_pass.run_layers(model, rotary, layout, built.cache, candidates, hidden, 0, check)
        # at the last layer the check pass has run every candidate through every layer: nothing to rank
        deviation = value_deviation(model, layout, built.cache, candidates, hidden, check) if check < layers else None
        relevance = None
        if question_ids and (suffix or config.selection != "deviation"):
            # the question's layers below the check layer run alone (over the refreshed rows)
            question = cache_pass.run_layers(
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
                relevance = question_relevance(model, rotary, layout, candidates, hidden, question, new_pos, check)
            if not suffix:  # scored only: take its rows back out of the cache
                cache_pass.drop_appended(built.cache, len(question_ids), check)
                question = None
        if deviation is not None:
            selected = select_tokens(ranking(config.selection, deviation, relevance).cpu(), candidates, sinks, budget)
        else:  # all of them were recomputed
            selected = candidates
        keep = torch.searchsorted(candidates, selected)
        hidden = hidden[:, keep.to(device)]
        start = check
    else:
        selected = candidates if budget >= candidates.numel() else sinks
        hidden = embed(ids[selected].unsqueeze(0).to(device))
        start = 0
    carry = _Carry(model, rotary, layout, built.cache, config, total, check, sinks)
    if not suffix:
        carry(selected, hidden, start, layers)
        return BlendReport(selected, int(candidates.numel()), total)
    suffix_ids = torch.tensor([suffix], dtype=torch.long, device=device)
    if question is None:
        question = embed(suffix_ids)
        if start > 0:  # the question's layers below the check layer run alone, before joining
            question = cache_pass.run_layers(
                model, rotary, layout, built.cache, selected[:0], question, 0, start, new_pos
            )
    hidden = carry(selected, torch.cat([hidden, question], dim=1), start, layers, new_pos)
    logits = output_logits(model, hidden[:, -1:])[0, -1]
    return BlendReport(selected, int(candidates.numel()), total, logits)


@dataclass
class _Carry:
    """Carries the selected tokens (and the question riding along) through layers ``start …
    stop-1``: in one :func:`cache_pass.run_layers` call, or, with ``config.final_ratio`` below the
    request's ratio, one layer at a time, dropping the tokens that rank lowest at each layer above
    the check layer (gradual filtering). They are ranked there by their value deviation at that
    layer, combined as ``config.selection`` asks with the question's relevance when the question
    rides along (``question``, ``mixed``; read from its own hidden state at that layer);
    ``question-deep`` selections are ranked by deviation like any other token. ``sinks`` (the
    passages' first tokens, ``config.sink_tokens``) are never dropped: EPIC recomputes them
    through every layer, and so does a narrowing recompute."""

    model: Any
    rotary: Rotary
    layout: CacheLayout
    cache: Any
    config: RecomputeConfig
    total: int
    check: int
    sinks: torch.Tensor

    def __call__(
        self,
        tokens: torch.Tensor,
        hidden: torch.Tensor,
        start: int,
        stop: int,
        new_pos: torch.Tensor | None = None,
    ) -> torch.Tensor:
        ratio = tokens.numel() / max(self.total, 1)
        final = self.config.final_ratio
        if final is None or final >= ratio or stop - start < 2:
            return cache_pass.run_layers(
                self.model, self.rotary, self.layout, self.cache, tokens, hidden, start, stop, new_pos
            )
        for index in range(start, stop):
            if index > self.check:
                keep = self.keep(index, stop, tokens, hidden, ratio, final, new_pos)
                if keep is not None:  # the kept tokens' rows, then the question's (if it rides along)
                    rows = torch.cat(
                        [keep.to(hidden.device), torch.arange(tokens.numel(), hidden.shape[1], device=hidden.device)]
                    )
                    tokens, hidden = tokens[keep], hidden[:, rows]
            if hidden.shape[1] == 0:  # nothing carried (a final ratio near 0, the question not riding
                return hidden  # along): the layers above keep their stored rows
            hidden = cache_pass.run_layers(
                self.model, self.rotary, self.layout, self.cache, tokens, hidden, index, index + 1, new_pos
            )
        return hidden

    def keep(
        self,
        index: int,
        stop: int,
        tokens: torch.Tensor,
        hidden: torch.Tensor,
        ratio: float,
        final: float,
        new_pos: torch.Tensor | None,
    ) -> torch.Tensor | None:
        """Sorted positions in ``tokens`` of the ones carried into layer ``index``, or ``None``
        when all of them go on."""
        span = max(stop - 1 - self.check, 1)
        target = ratio + (final - ratio) * (index - self.check) / span
        budget = max(int(round(target * self.total)), int(torch.isin(tokens, self.sinks).sum()))
        if budget >= tokens.numel():
            return None
        passage = tokens.numel()
        deviation = value_deviation(self.model, self.layout, self.cache, tokens, hidden[:, :passage], index)
        relevance = None
        if self.config.selection in ("question", "mixed") and new_pos is not None and new_pos.numel():
            relevance = question_relevance(
                self.model, self.rotary, self.layout, tokens, hidden[:, :passage], hidden[:, passage:], new_pos, index
            )
        scores = ranking(self.config.selection if relevance is not None else "deviation", deviation, relevance)
        kept = select_tokens(scores.cpu(), tokens, self.sinks, budget)
        return torch.searchsorted(tokens, kept)


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
