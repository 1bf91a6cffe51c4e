"""The settings of a ``ragcompress train`` run (:class:`TrainConfig`), checked before any work.

Bad settings (a compression it cannot train, a number below its least value) fail here, before
the passages are embedded and hours are spent training; every setting is recorded in the
adaptor's JSON (``adaptor.meta["config"]``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from ragcompress.compressors.base import Compressor
from ragcompress.kv.lowrank import RankSpec
from ragcompress.kv.quant import QuantConfig

CONTINUATION = 32  # reconstruction tokens per example
DEFAULT_SCORER_PASSAGES = 40  # passages the learned scorer is fitted on unless told
# the least value of each numeric setting (one left unset, None, takes its default); a value
# below it failed only after the teacher pass, in torch or peft (batch 0: a division by zero,
# eval_every 0: a modulo by zero, top_k 0: an index error), or wrote an adaptor of no steps
MINIMA: dict[str, float] = {
    "top_k": 1, "rank": 1, "alpha": 1, "warmup": 0, "batch": 1, "steps": 1, "minutes": 0, "clip": 0,
    "continuation_weight": 0, "hard_weight": 0, "teacher_top": 1, "val_examples": 1, "train_questions": 0,
    "views": 1, "continuation": 1, "eval_every": 1, "checkpoint_every": 1, "scorer_passages": 0,
    "group_size": 1, "kv_rank": 1, "calibration_passages": 1, "keep_first": 0, "keep_last": 0,
    "extra_questions": 0,
}  # fmt: skip


@dataclass
class TrainConfig:
    """Every training setting (recorded in the adaptor's JSON)."""

    top_k: int = 3  # passages retrieved per question
    kind: str = "forward"  # adaptor kind (ragcompress/distill/adaptor.py)
    rank: int = 8
    alpha: int = 16
    lr: float = 3e-4
    clip: float = 1.0  # gradient norm clip (0: none); Qwen2.5's outlier activations made lr 1e-3 diverge
    # the learning rate rises linearly over the first ``warmup`` steps and, with ``decay`` "cosine",
    # falls to a tenth by ``steps`` (Qwen at a constant 5e-4 jumped in its first steps and diverged
    # after 40; docs/distill.md); both are functions of the step, so a resumed run follows the same curve
    # (a cosine one resumes only with its ``steps``, resume.check_resumed_steps: they set its fall)
    warmup: int = 0
    decay: str = "constant"
    batch: int = 4  # examples per optimizer step (gradient accumulation)
    steps: int = 150
    minutes: float = 40.0  # step time this invocation may spend (a resumed run gets it afresh)
    continuation_weight: float = 0.5
    # weight of the cross-entropy of the teacher's greedy answer tokens beside the answer KL (0: KL
    # only, as every adaptor before it): a target sharpened towards the argmax that agreement counts
    hard_weight: float = 0.0
    teacher_top: int = 64  # teacher tokens kept per position
    val_examples: int = 16
    train_questions: int = 0  # 0: every training question; else that many, evenly spaced
    # training examples per question: its retrieved passages in retrieval order, then ``views - 1``
    # other contexts of ``top_k`` passages drawn from its ``2 * top_k`` nearest, in a drawn order.
    # Distillation needs no gold answer (the teacher answers whatever it is given), so each is a
    # valid example. Tried on the Qwen low-rank student, whose held-out KL had stopped falling
    # after about one pass over 139 single-view examples: 3 views did not lower it either (its
    # overfitting is to the training articles, not the contexts; docs/distill.md)
    views: int = 1
    continuation: int = CONTINUATION
    eval_every: int = 10
    checkpoint_every: int = 5
    # passages the learned retention scorer is fitted on; None: 40 for a general adaptor (method
    # "none": a store built with it may evict by the scorer), 0 for one trained for a store another
    # scorer evicts (nothing would read it; a learned-scorer student is refused by student_compressor)
    scorer_passages: int | None = None
    # the store the adaptor is trained for: the student's passages are evicted by ``method`` at
    # ``ratio`` and quantized by ``quant`` as indexing will (kind "forward" only)
    method: str = "none"
    ratio: float = 1.0
    quant: str = "none"
    value_quant: str | None = None  # the values' own width (index --value-quant); None: quant
    group_size: int = 32
    # ... and projected to rank ``kv_rank`` (index --rank; values too unless ``kv_rank_values`` is
    # False) on a basis fitted on the first ``calibration_passages`` training passages
    kv_rank: int | None = None
    kv_rank_values: bool = True
    calibration_passages: int = 64
    keep_first: int | None = None  # tokens ``method`` always keeps (None: its default, as indexing)
    keep_last: int | None = None
    # ``method``'s scores weighted by each row's value norm (index --value-norm; adaptive:/global: only)
    value_norm: bool = False
    seed: int = 0
    val_articles: list[str] = field(default_factory=list)
    # other text for training examples (a passages JSONL or a folder of documents, chunked as
    # ``index`` chunks them), with questions the base model writes about ``extra_questions`` of its
    # passages, evenly spaced (0: every one; ``synthetic.py``); training side only, never validation
    extra_passages: str | None = None
    extra_questions: int = 0
    # start from this adaptor's trained factors (a path or packaged name; fresh optimizer) instead
    # of the adaptor of zeros: continues a finished run whose checkpoint is gone, e.g. a packaged one
    init_adaptor: str | None = None

    def __post_init__(self) -> None:  # bad settings fail before hours of training
        self.check_numbers()
        if self.decay not in ("constant", "cosine"):
            raise ValueError(f"decay is 'constant' or 'cosine', not {self.decay!r}")
        if self.kind not in ("forward", "cache"):
            raise ValueError(f"kind is 'forward' or 'cache', not {self.kind!r}")
        self.quant_config()
        student_compressor(self)
        self.rank_spec()
        if (self.method != "none" or self.quant != "none" or self.kv_rank) and self.kind != "forward":
            raise ValueError("a compressed student (--method / --quant / --kv-rank) is trained with kind 'forward'")

    def check_numbers(self) -> None:
        """Refuse a numeric setting below its least value (:data:`MINIMA`; ``minutes`` 0 finishes a
        run from its checkpoint without new steps) and a learning rate that is not positive: torch
        refused a negative one only after the teacher pass, and 0 wrote an untrained adaptor."""
        for name, least in MINIMA.items():
            value = getattr(self, name)
            if value is not None and not value >= least:  # not >=: NaN is refused too
                raise ValueError(f"{name} must be >= {least}, not {value!r}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr (--lr) must be a positive number, not {self.lr!r}")

    def quant_config(self) -> QuantConfig:
        """The store quantization the student is trained for."""
        return QuantConfig(self.quant, self.group_size, self.value_quant)

    def scorer_fit_passages(self) -> int:
        """How many passages the scorer is fitted on (``scorer_passages``, or its default)."""
        if self.scorer_passages is not None:
            return self.scorer_passages
        return DEFAULT_SCORER_PASSAGES if self.method == "none" else 0

    def rank_spec(self) -> RankSpec | None:
        """The store's low-rank setting the student is trained for (None: full rows)."""
        return None if self.kv_rank is None else RankSpec(rank=self.kv_rank, values=self.kv_rank_values)


def lr_factor(config: TrainConfig, step: int) -> float:
    """The learning rate of optimizer step ``step`` (0-based) as a fraction of ``config.lr``."""
    if step < config.warmup:
        return (step + 1) / config.warmup
    if config.decay == "constant":
        return 1.0
    span = max(1, config.steps - config.warmup)
    progress = min(1.0, (step - config.warmup) / span)
    return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress))


def student_compressor(config: TrainConfig) -> Compressor | None:
    """The eviction the student is trained with (``None``: every row kept), with indexing's
    defaults for what each method always keeps."""
    if config.method == "none":
        if config.ratio != 1.0 or config.value_norm:
            given = f"--ratio {config.ratio}" if config.ratio != 1.0 else "--value-norm"
            raise ValueError(f"{given} needs an eviction --method (e.g. global:kvzip)")
        return None
    if "learned" in config.method:
        raise ValueError("the student's eviction needs a fixed scorer; 'learned' is fitted after training")
    from ragcompress.compressors import make_compressor

    protected = {"keep_first": config.keep_first, "keep_last": config.keep_last}
    params = {k: v for k, v in protected.items() if v is not None} | ({"value_norm": True} if config.value_norm else {})
    return make_compressor(config.method, ratio=config.ratio, **params)
