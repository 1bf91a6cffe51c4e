"""Named, measured settings, so a user never has to know ``global:kvzip --keep-first 1 ...``.

A preset is a store setting (:class:`IndexConfig`, used by ``index``) and an answer setting
(:class:`AnswerOptions`, used by ``ask``/``eval``/``bench`` and the Python and LlamaIndex APIs).
Each one names the results files that chose it (``evidence``); the README's preset measurements
are rendered from the rows of those files that ``benchmarks/report.py`` (``PRESET_MEASUREMENTS``)
names, so no figure is typed twice. Later work that finds a better setting changes it here and there.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

from ragcompress.indexing.config import IndexConfig
from ragcompress.runtime.options import AnswerOptions
from ragcompress.runtime.recompute import RecomputeConfig


@dataclass(frozen=True)
class Preset:
    """A store setting and an answer setting chosen together, and what they were chosen on."""

    name: str
    index: IndexConfig
    answer: AnswerOptions
    summary: str
    evidence: str


PRESETS: dict[str, Preset] = {
    preset.name: preset
    for preset in (
        Preset(
            "fast",
            IndexConfig(quant="int8"),
            AnswerOptions(),
            "plain reuse of int8 caches: the fastest answers, 1.8x fewer bytes than fp16",
            "docs/results/core272_*.json (int8 plain reuse against full prefill on all 272 questions, both models), "
            "docs/results/core_*.json (int8 = uncompressed sub-EM on both models), docs/results/bench_*.json",
        ),
        Preset(
            "small",
            IndexConfig(method="global:kvzip", ratio=0.25, keep_first=1, keep_last=0, quant="int4", adaptor="matching"),
            AnswerOptions(),
            "KVzip scores, one budget over all layers, a quarter of the tokens, int4, encoded through the KV-Distill "
            "adaptor packaged for the model and trained for this store (the base model, with a warning, where none "
            "is): ~12x fewer bytes than fp16 (11.9-12.0x measured)",
            "docs/results/distill_*-kvzip-0.25-int4-81q.json (the adaptor against the same store without it, all 81 "
            "questions of articles it never saw, both packaged models; docs/distill.md); the compression itself: "
            "docs/results/compression_qwen32.json (best ~12x setting on the first round's 32 questions of all six articles)",
        ),
        Preset(
            "smallest",
            IndexConfig(
                method="global:kvzip",
                ratio=0.21,
                keep_first=1,
                keep_last=0,
                quant="int4",
                value_quant="int2",
                rank=32,
                rank_values=False,
                adaptor="matching",
            ),
            AnswerOptions(),
            "KVzip scores, one budget over all layers, 21 % of the tokens, keys projected to rank 32 and coded "
            "in int4, values whole and coded in int2, encoded through the KV-Distill adaptor packaged for the "
            "model and trained for this store (the base model, with a warning, where none is): ~24x fewer bytes "
            "than fp16; the best >= 24x point measured, about nine tenths of the uncompressed store's answers",
            "docs/results/lowrank_qwen.json (100 questions of articles neither the adaptor nor the bases saw, "
            "Qwen2.5-Coder-0.5B, top-3; docs/compression.md section 8), docs/results/confirm_smallest_qwen_33q.json "
            "(the 33 other questions of those articles, measured after the setting was chosen), "
            "docs/results/remeasure_smallest_qwen_*.json (the same 133 questions re-run with the quantizer of "
            "2026-12-04), docs/results/lowrank_smollm2.json (SmolLM2-135M, 40 questions)",
        ),
        Preset(
            "faithful",
            IndexConfig(quant="int8", adaptor="matching", base_copy=True),
            AnswerOptions(
                recompute=RecomputeConfig(ratio=0.05, selection="mixed", ratio_by_passages=((3, 0.05), (5, 0.1)))
            ),
            "int8 caches encoded through the model's packaged general KV-Distill adaptor (SmolLM2-135M and "
            "Qwen2.5-Coder-0.5B ship one; the base model, with a warning, elsewhere), each passage's base-model "
            "cache kept beside it for when it is retrieved first (twice the bytes), 5% of passage tokens "
            "recomputed at query time up to top-3 and 10% from top-5 (7.5% at top-4), chosen by value deviation "
            "and the question's attention together: no setting measured at >= 5x faster TTFT beats it on "
            "agreement, sub-EM and KL at once, at top-3 and at top-5",
            "docs/results/faithful_qwen_top5_fraction*.json (top-5: 10 % against 5 %, the 33 questions that "
            "decided it, the 100 and all 133), docs/results/faithful_smollm2_top5_fraction.json (SmolLM2-135M); "
            "docs/results/faithful_qwen_top4*.json (top-4, the schedule's 7.5 % measured after it was set); "
            "docs/results/first_passage_skip_qwen*.json (the first passage read from its base copy left out of "
            "the check: the same answers, faster); "
            "docs/results/faithful_qwen_base_copy*.json (the base copy against the same adapted store without it: "
            "the same 100 questions, then the other 33 and all 133), docs/results/faithful_smollm2_base_copy.json "
            "(SmolLM2-135M); "
            "docs/results/faithful_qwen_adaptor_recompute.json (Qwen2.5-Coder-0.5B, top-3, 100 questions of the "
            "four articles its adaptor never saw: plain reuse, 5 % and 10 % recompute over the adapted store side "
            "by side; 10 % measured below 5x, so 5 %; faithful_qwen_adaptor_recompute_top5.json: the preset at "
            "top-5); docs/results/faithful_qwen_adaptor.json and "
            "docs/results/faithful_qwen_adaptor_top5.json (the same questions with and without the adaptor, top-3 "
            "and top-5); docs/results/faithful_smollm2_adaptor*.json (SmolLM2-135M, the same for its adaptor); "
            "docs/results/faithful_qwen_top3_base.json (the levers without an adaptor on another 100-question "
            "sample); docs/results/faithful_qwen_confirm_33q.json and docs/results/faithful_qwen_pooled_133q.json (the same "
            "store on the other 33 questions of those articles, after it was chosen, and all 133 pooled); "
            "docs/recompute.md",
        ),
        Preset(
            "distilled",
            IndexConfig(quant="int8", adaptor="default", base_copy=True),
            AnswerOptions(),
            "plain reuse of int8 caches encoded with the model's packaged general KV-Distill adaptor (LoRA layers "
            "on only while passages are encoded), each passage's base-model cache kept beside it for when it is "
            "retrieved first (twice the bytes): plain reuse's speed, about recompute's agreement without it",
            "docs/results/faithful_qwen_base_copy*.json (reuse against ad:reuse: the base copy on the same 100 "
            "questions, the other 33 and all 133), docs/results/faithful_smollm2_base_copy.json (SmolLM2-135M), "
            "docs/results/faithful_qwen_adaptor.json (ad:reuse against reuse, Qwen2.5-Coder-0.5B, 100 questions "
            "of articles the adaptor never saw; docs/results/faithful_qwen_confirm_33q.json and "
            "docs/results/faithful_qwen_pooled_133q.json: the other 33 of those articles, and all 133 pooled), "
            "docs/results/distill_smollm2-135m-81q.json (all questions of "
            "the held-out articles), docs/results/distill_smollm2-135m.json (docs/distill.md)",
        ),
    )
}


def preset(name: str) -> Preset:
    """The preset called ``name``; an unknown name lists the known ones."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}") from None


def index_config(name: str | None = None, **overrides: object) -> IndexConfig:
    """The store setting of preset ``name`` (the defaults without one), with the ``overrides``
    that are not None (explicit options win over the preset). A ``budget`` replaces a preset's
    ``ratio`` and vice versa; a ``quant`` given without a ``value_quant`` codes the values too
    (``--preset smallest --quant int8`` is int8 throughout, not int8 keys beside int2 values)."""
    base = preset(name).index if name else IndexConfig()
    given = {key: value for key, value in overrides.items() if value is not None}
    if "quant" in given and "value_quant" not in given:
        given["value_quant"] = None
    if "budget" in given and "ratio" not in given:
        given["ratio"] = None
    if "ratio" in given and "budget" not in given:
        given["budget"] = None
    try:
        return replace(base, **given)  # type: ignore[arg-type]
    except ValueError as exc:
        defaults = asdict(IndexConfig())
        kept = {key: value for key, value in asdict(base).items() if key not in given and value != defaults[key]}
        if not name or not kept:
            raise
        shown = ", ".join(f"{key}={value!r}" for key, value in kept.items())
        hint = " (--no-base-copy for base_copy)" if kept.get("base_copy") else ""
        raise ValueError(
            f"{exc}; preset {name} also sets {shown}: give the option that overrides the one in conflict{hint}, "
            "or leave out --preset"
        ) from None


def answer_options(name: str | None = None, **overrides: object) -> AnswerOptions:
    """The answer setting of preset ``name`` (the defaults without one), with the ``overrides``
    that are not None."""
    base = preset(name).answer if name else AnswerOptions()
    return replace(base, **{key: value for key, value in overrides.items() if value is not None})  # type: ignore[arg-type]
