"""``ragcompress train``: KV-Distill for precomputed passage caches.

The student is what ragcompress serves: every retrieved passage encoded *alone* after the
prefix (with the adaptor's LoRA layers on, kind ``forward``; or its base cache corrected, kind
``cache``), its cache moved to the position it takes in the prompt, and the frozen base model
reading the question over those caches. For a ``forward`` adaptor the backward pass runs through
the passages' forward (the LoRA parameters are peft's, injected into the model and on only
while passages are encoded). The teacher is the
base model's full prefill of the same token ids. The loss is the KL divergence between the
teacher's and the student's next-token distributions:

* over the answer: the teacher's own greedy answer (what "agreement with full prefill"
  measures), teacher-forced, from the question's last token to the answer's end;
* over a question-independent continuation: after KVzip's "Repeat the previous passage
  exactly." the first ``CONTINUATION`` tokens of the last passage (reconstruction, so the caches
  keep what any question could need, not only what the training questions asked);
* optionally (``hard_weight``), cross-entropy of the teacher's greedy answer tokens themselves
  (hard-label distillation): KL spreads its gradient over the teacher's whole distribution, while
  agreement with full prefill depends only on its argmax; with weight ``w`` the answer rows' target
  is the teacher's distribution moved towards its argmax, ``(p + w * onehot) / (1 + w)``.

Teacher distributions are computed once and cached (``teacher.safetensors``), as their top ``top_k``
tokens plus the remaining mass: the KL is then exact between the teacher's and the student's
distributions coarsened to those ``top_k + 1`` outcomes (a lower bound of the full KL, and
equal to it when the teacher's mass sits in its top tokens; ``benchmarks/distill_eval.py``
reports the full KL). Examples are built by retrieval: each training question's ``top_k``
passages retrieved over the *training* passages, in retrieval order, so the adaptor learns to
be read beside other passages. Validation questions and passages come from held-out articles
(``split_articles``), never trained on.

Training is resumable (``checkpoint.safetensors`` every ``checkpoint_every`` steps), shows a progress
bar, and ends by fitting the learned retention scorer (``scorer.py``) on the adaptor's caches of
the training passages, saving the adaptor (``adaptor/``), the history and a loss-curve plot.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
import torch

from ragcompress.compressors.base import CompressionContext, Compressor
from ragcompress.compressors.kvzip import REPEAT_PROMPT, KVzipCompressor
from ragcompress.distill import scorer as learned_scorer
from ragcompress.distill.adaptor import FACTORS, SCORER_BIAS, SCORER_WEIGHT, Adaptor, lora_active, remove_adapter
from ragcompress.distill.checkpoint import load_tree, save_tree
from ragcompress.errors import InputError
from ragcompress.evaluation import Question, read_questions, select_questions
from ragcompress.indexing.encoder import PassageEncoder
from ragcompress.indexing.inputs import PassageInput, iter_passages
from ragcompress.kv.cache import build_dynamic_cache
from ragcompress.kv.lowrank import LowRankBasis, RankSpec
from ragcompress.kv.quant import QuantConfig, quantize_dequantize
from ragcompress.kv.rope import rotate_half
from ragcompress.models import LoadedModel
from ragcompress.prompt import PromptTemplate
from ragcompress.runtime.attention import KV_MASK_KWARG
from ragcompress.runtime.generate import forward_logits, stop_token_ids

if TYPE_CHECKING:
    from ragcompress.retrieval import Embedder

CONTINUATION = 32  # reconstruction tokens per example
MAX_ANSWER = 10  # teacher's greedy answer length cap
DEFAULT_SCORER_PASSAGES = 40  # passages the learned scorer is fitted on unless told
TRAINING_ADAPTER = "ragcompress-training"  # peft adapter name of the LoRA layers being trained


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
    # scorer evicts (nothing would read it; a learned-scorer student is refused above)
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

    def __post_init__(self) -> None:  # bad compression settings fail before hours of training
        if self.views < 1:
            raise ValueError(f"views must be >= 1, not {self.views}")
        if self.minutes < 0:  # 0 finishes a run from its checkpoint without new steps
            raise ValueError(f"minutes must be >= 0, not {self.minutes}")
        if self.decay not in ("constant", "cosine") or self.warmup < 0:
            raise ValueError(f"decay is 'constant' or 'cosine' and warmup >= 0, not {self.decay!r} / {self.warmup}")
        if self.kind not in ("forward", "cache"):
            raise ValueError(f"kind is 'forward' or 'cache', not {self.kind!r}")
        self.quant_config()
        student_compressor(self)
        self.rank_spec()
        if (self.method != "none" or self.quant != "none" or self.kv_rank) and self.kind != "forward":
            raise ValueError("a compressed student (--method / --quant / --kv-rank) is trained with kind 'forward'")

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


@dataclass
class Example:
    """One training/validation example: retrieved passages, the question's suffix, the teacher's
    answer and, for the answer and the continuation objectives, the teacher's top tokens."""

    qid: str
    passages: list[list[int]]
    suffix: list[int]
    answer: list[int]
    qa_idx: torch.Tensor  # [len(answer) + 1, top] int64
    qa_lp: torch.Tensor  # [len(answer) + 1, top] log-probs
    cont_suffix: list[int]
    cont: list[int]
    cont_idx: torch.Tensor  # [len(cont), top]
    cont_lp: torch.Tensor
    qa_full: torch.Tensor | None = None  # held-out examples: every answer row's full log-probs


# -- data ---------------------------------------------------------------------------------------


def split_articles(titles: list[str], val_articles: list[str] | None = None) -> list[str]:
    """Held-out articles: ``val_articles`` if given, else every third title in sorted order."""
    ordered = sorted(set(titles))
    chosen = list(val_articles) if val_articles else ordered[::3]
    unknown = sorted(set(chosen) - set(ordered))
    if unknown:
        raise InputError(
            f"validation articles not in the passages: {unknown} (pass --val-articles once per title, "
            f"exactly as the passages' titles spell it: {ordered})"
        )
    if len(chosen) == len(ordered):
        raise InputError("every article is held out; nothing is left to train on")
    return chosen


def data_hash(
    passages_path: Path, questions_path: Path, val_articles: list[str], extra_passages: str | None = None
) -> str:
    """sha256 of the training data files, the split and (if any) every file of ``extra_passages``."""
    digest = hashlib.sha256()
    files = [passages_path, questions_path]
    if extra_passages:
        extra = Path(extra_passages)
        files += sorted(p for p in extra.rglob("*") if p.is_file()) if extra.is_dir() else [extra]
    for path in files:
        digest.update(path.read_bytes())
    digest.update(json.dumps(sorted(val_articles)).encode())
    return digest.hexdigest()


@dataclass
class Corpus:
    """Passages and questions of one side of the split, with retrieval over its passages."""

    passages: list[PassageInput]
    questions: list[Question]
    vectors: np.ndarray

    def retrieve(self, question_vectors: np.ndarray, k: int) -> list[list[int]]:
        scores = question_vectors @ self.vectors.T
        return [list(np.argsort(-row, kind="stable")[:k]) for row in scores]


def load_corpora(
    passages: list[PassageInput], questions_path: Path, val_articles: list[str], embedder: Embedder
) -> tuple[Corpus, Corpus]:
    """The training and held-out sides of ``passages`` and their questions, split by article."""
    questions = read_questions(questions_path)
    article = {p.id: p.article for p in passages}
    sides = []
    for held_out in (False, True):
        ps = [p for p in passages if (p.article in val_articles) == held_out]
        qs = [q for q in questions if (article.get(q.passage_id or "", "") in val_articles) == held_out]
        sides.append(Corpus(ps, qs, embedder.embed([p.text for p in ps])))
    train, val = sides
    ids_train = {p.article for p in train.passages}
    if ids_train & {p.article for p in val.passages}:
        raise AssertionError("an article is on both sides of the split")
    return train, val


def check_questions(passages: list[PassageInput], questions_path: Path, train: Corpus) -> None:
    """Refuse questions the split cannot place: no ``passage_id``, or one not in the passages (their
    article is unknown, so they could be a held-out article's; ``load_corpora`` puts them on the
    training side)."""
    known = {p.id for p in passages}
    unplaced = [q.id for q in train.questions if q.passage_id not in known]
    if unplaced:
        raise InputError(
            f"{questions_path}: {len(unplaced)} question(s) name no passage of the passages file (e.g. {unplaced[0]}); "
            "training splits questions by their passage's article, so each needs a passage_id of --passages"
        )


def require_questions(corpus: Corpus, side: str, questions_path: Path) -> None:
    """Refuse a side of the split without questions (nothing to train on, or to validate on)."""
    if not corpus.questions:
        articles = sorted({p.article for p in corpus.passages})
        raise InputError(
            f"{questions_path} holds no question of the {side} articles {articles}; give questions of both "
            "sides of the split (or other --val-articles)"
        )


def with_extra_passages(
    lm: LoadedModel, corpus: Corpus, config: TrainConfig, embedder: Embedder, out: Path, progress: bool
) -> Corpus:
    """The training corpus plus ``config.extra_passages`` and the base model's questions about
    them (``synthetic.py``, cached in ``out/extra-questions.jsonl``): more examples, from other
    text, retrieved over the union so that a question's passages may come from either."""
    from ragcompress.distill.synthetic import synthetic_questions

    assert config.extra_passages is not None
    extra = list(iter_passages(config.extra_passages))
    held_out = sorted({p.article for p in extra} & set(config.val_articles))
    if held_out:
        raise InputError(f"--extra-passages {config.extra_passages} holds held-out articles {held_out}")
    clash = sorted({p.id for p in extra} & {p.id for p in corpus.passages})
    if clash:
        raise InputError(f"--extra-passages {config.extra_passages} repeats passage ids of --passages: {clash[:3]}")
    questions = synthetic_questions(lm, extra, config.extra_questions, out / "extra-questions.jsonl", progress)
    vectors = embedder.embed([p.text for p in extra])
    return Corpus(corpus.passages + extra, corpus.questions + questions, np.vstack([corpus.vectors, vectors]))


# -- teacher and student ------------------------------------------------------------------------


class Losses(NamedTuple):
    """One example's losses: the answer and continuation KLs (trained), the cross-entropy of the
    teacher's greedy answer tokens (trained with ``hard_weight``) and, for monitoring, the share
    of answer rows whose argmax is the teacher's (no gradient)."""

    kl_answer: torch.Tensor
    kl_cont: torch.Tensor
    ce_answer: torch.Tensor
    top1_answer: float


def binned_kl(teacher_idx: torch.Tensor, teacher_lp: torch.Tensor, student_lp: torch.Tensor) -> torch.Tensor:
    """Per-row KL(teacher || student) over the teacher's top tokens plus one "rest" outcome.

    teacher_idx, teacher_lp: ``[rows, top]``; student_lp: ``[rows, vocab]`` log-probabilities.
    """
    p = teacher_lp.exp()
    q_top = student_lp.gather(-1, teacher_idx)
    p_rest = (1.0 - p.sum(-1)).clamp_min(1e-8)
    q_rest = (1.0 - q_top.exp().sum(-1)).clamp_min(1e-8)
    return (p * (teacher_lp - q_top)).sum(-1) + p_rest * (p_rest.log() - q_rest.log())


def refuse_untrainable(lm: LoadedModel) -> None:
    """Refuse a model whose caches training cannot move to their place in the prompt: one that
    mixes attention layer types, or scales its RoPE (``InputError`` naming it)."""
    layer_types = getattr(lm.model.config, "layer_types", None) or []
    if len(set(layer_types)) > 1:
        raise InputError(
            f"{lm.ref} mixes attention layer types (e.g. Gemma-3's sliding and global layers): training "
            "places caches with one RoPE table; train adaptors for models with one layer type"
        )
    scaling = float(getattr(lm.model.model.rotary_emb, "attention_scaling", 1.0) or 1.0)
    if abs(scaling - 1.0) > 1e-6:
        raise InputError(
            f"{lm.ref} scales its RoPE (attention scaling {scaling:g}): training moves caches by composing "
            "RoPE rotations, which that scaling breaks; train adaptors for models without it"
        )


class Distiller:
    """The teacher (base model, full prefill) and the student (adaptor-encoded, independently
    cached passages, base model reading the question) over one loaded model."""

    def __init__(
        self,
        lm: LoadedModel,
        adaptor: Adaptor,
        teacher_top: int = 64,
        continuation: int = CONTINUATION,
        compressor: Compressor | None = None,
        quant: QuantConfig | None = None,
    ) -> None:
        refuse_untrainable(lm)  # before the training LoRA layers are injected into the model
        self.lm = lm
        self.model = lm.model
        self.template = PromptTemplate.from_tokenizer(lm.tokenizer)
        # the encoder corrects a cache adaptor's caches; a forward adaptor's LoRA layers are the
        # ones trained here (lora_name), not the encoder's copy of the initial ones
        self.encoder = PassageEncoder(lm, self.template, adaptor if adaptor.kind == "cache" else None)
        self.tokens = self.encoder.tokens
        self.rotary = self.encoder.rotary
        self.prefix_ids = self.encoder.prefix_ids
        self.prefix_layers = self.encoder._prefix_rotated
        self.adaptor = adaptor
        # kind "forward": the LoRA layers trained, injected under their own name; kind "cache":
        # the factors as parameters, shared with the adaptor's tensors
        self.lora_name = None
        if adaptor.kind == "forward":
            remove_adapter(self.model, TRAINING_ADAPTER)
            self.lora_name = adaptor.attach(self.model, TRAINING_ADAPTER)
        self._factors: dict[str, torch.nn.Parameter] = {}
        if self.lora_name is None:
            self._factors = {name: torch.nn.Parameter(adaptor.tensors[name].clone()) for name in FACTORS}
            adaptor.tensors.update(self._factors)
        # the student's compression (kind "forward"): which rows the store keeps, how it quantizes
        self.compressor = compressor if compressor is not None and compressor.name != "none" else None
        self.quant = quant if quant is not None and quant.scheme != "none" else None
        # a low-rank store's basis (train --kv-rank): fitted on this encoder's caches, so set after
        # construction (student_basis); TrainConfig refuses --kv-rank for kind "cache"
        self.basis: LowRankBasis | None = None
        if self.compressed and self.lora_name is None:
            raise InputError(
                f"a compressed student (--method / --quant / --kv-rank) is trained with a 'forward' adaptor, not one "
                f"of kind {adaptor.kind!r}; train it with --kind forward in another --out folder"
            )
        self._kept: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # passage_key -> kept_rows
        self.stop_ids = stop_token_ids(lm.tokenizer, lm.model)
        self.teacher_top = teacher_top
        self.continuation = continuation
        self._passages: dict[tuple[int, ...], tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    @property
    def compressed(self) -> bool:
        """Whether the student reads its passages as a compressed store gives them back."""
        return self.compressor is not None or self.quant is not None or self.basis is not None

    # the parameters trained -------------------------------------------------------------------

    def trainable(self) -> list[torch.nn.Parameter]:
        """What the optimizer updates (every base-model weight is frozen)."""
        for param in self.model.parameters():
            param.requires_grad_(False)
        if self.lora_name is None:
            params = list(self._factors.values())
        else:
            params = [p for n, p in self.model.named_parameters() if f".{self.lora_name}." in n]
        for param in params:
            param.requires_grad_(True)
        return params

    def factors(self) -> dict[str, torch.Tensor]:
        """The adaptor's current LoRA tensors (detached copies, adaptor naming)."""
        if self.lora_name is None:
            return {name: p.detach().clone() for name, p in self._factors.items()}
        from peft import get_peft_model_state_dict

        state = get_peft_model_state_dict(self.model, adapter_name=self.lora_name)
        return {name: t.detach().clone() for name, t in state.items()}

    def load_factors(self, tensors: dict[str, torch.Tensor]) -> None:
        """Set the trained tensors (resuming from a checkpoint)."""
        with torch.no_grad():
            if self.lora_name is None:
                for name, value in tensors.items():
                    self._factors[name].copy_(value)
                return
            from peft import set_peft_model_state_dict

            set_peft_model_state_dict(self.model, tensors, adapter_name=self.lora_name)

    # teacher ---------------------------------------------------------------------------------

    def _top(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        lp = logits.float().log_softmax(-1)
        values, idx = lp.topk(self.teacher_top, dim=-1)
        return idx, values

    @torch.no_grad()
    def teacher(self, qid: str, passages: list[list[int]], question: str, keep_full: bool = False) -> Example:
        """The base model's full prefill of prefix + passages, read once (its cache is cropped
        back to the passages for the second objective): greedy answer and top tokens."""
        context = list(self.prefix_ids) + [t for ids in passages for t in ids]
        out = self.model(input_ids=torch.tensor([context]), use_cache=True, logits_to_keep=1)
        cache = out.cache if hasattr(out, "cache") else out.past_key_values
        suffix = self.tokens.suffix(question)
        rows = [forward_logits(self.model, torch.tensor([suffix]), cache, len(context), 1)[-1]]
        answer: list[int] = []
        while int(rows[-1].argmax()) not in self.stop_ids and len(answer) < MAX_ANSWER:
            answer.append(int(rows[-1].argmax()))  # each step's row is the teacher-forced row
            rows.append(
                forward_logits(
                    self.model, torch.tensor([answer[-1:]]), cache, len(context) + len(suffix) + len(answer) - 1, 1
                )[-1]
            )
        qa_idx, qa_lp = self._top(torch.stack(rows))
        cache.crop(len(context) - cache.get_seq_length())
        cont_suffix = self.tokens.suffix(REPEAT_PROMPT)
        cont = passages[-1][: self.continuation]
        logits = forward_logits(self.model, torch.tensor([cont_suffix + cont]), cache, len(context), len(cont) + 1)
        cont_idx, cont_lp = self._top(logits[:-1])
        full = torch.stack(rows).float().log_softmax(-1) if keep_full else None
        return Example(qid, passages, suffix, answer, qa_idx, qa_lp, cont_suffix, cont, cont_idx, cont_lp, full)

    # student ---------------------------------------------------------------------------------

    def base_passage(self, ids: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The base model's cache of one passage after the prefix (keys un-rotated,
        ``[layers, kv_heads, n, d]``) and its projection inputs ``[layers, n, hidden]``:
        computed once per passage, reused by every step (plain tensors, no graph)."""
        layers, inputs = self.encoder.forward_capturing([ids])
        kv = self.encoder._unrotate_full(layers, start=len(self.prefix_ids), batch_index=0, length=len(ids))
        assert inputs is not None
        return kv.keys.clone(), kv.values.clone(), inputs[:, 0].clone()

    def student_cache_tensors(
        self, passages: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
    ) -> tuple[list[torch.Tensor], list[torch.Tensor], int]:
        """Per layer ``[1, kv_heads, T, d]`` keys and values of the prefix and the adaptor's caches
        of ``passages`` (each encoded alone, placed one after another as the runtime places
        them), differentiable in the adaptor's factors; ``T``."""
        adaptor = self.encoder.adaptor
        assert adaptor is not None
        start = len(self.prefix_ids)
        keys = [[k] for k, _ in self.prefix_layers]
        values = [[v] for _, v in self.prefix_layers]
        for base_k, base_v, x in passages:
            heads, n = base_k.shape[1], base_k.shape[2]
            k = base_k + adaptor.delta("k", x, heads)
            v = base_v + adaptor.delta("v", x, heads)
            cos, sin = self.rotary.cos_sin(torch.arange(start, start + n), 0)  # [n, d]
            k = k * cos + rotate_half(k) * sin
            for layer in range(k.shape[0]):
                keys[layer].append(k[layer].unsqueeze(0))
                values[layer].append(v[layer].unsqueeze(0))
            start += n
        return [torch.cat(k, dim=2) for k in keys], [torch.cat(v, dim=2) for v in values], start

    def student_logprobs(
        self,
        keys: list[torch.Tensor],
        values: list[torch.Tensor],
        total: int,
        ids: list[int],
        rows: int,
        **attention_kwargs: Any,
    ) -> torch.Tensor:
        """Log-probabilities of the last ``rows`` positions of ``ids`` read over the cache (at
        positions ``total…``; ``attention_kwargs``: the per-head row mask of a compressed one)."""
        cache = build_dynamic_cache(self.lm.config, keys, values)
        logits = forward_logits(self.model, torch.tensor([ids]), cache, total, rows, **attention_kwargs)
        return logits.float().log_softmax(-1)

    def passage(self, ids: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """:meth:`base_passage`, memoised by token ids."""
        key = tuple(ids)
        if key not in self._passages:
            self._passages[key] = self.base_passage(ids)
        return self._passages[key]

    def student_forward_tensors(self, passages: list[list[int]]) -> tuple[list[torch.Tensor], list[torch.Tensor], int]:
        """As :meth:`student_cache_tensors` for a ``forward`` adaptor: the passages encoded alone
        (one right-padded batch) with the LoRA layers being trained on, each moved from the
        position right after the prefix to its place in the prompt (a RoPE rotation by the
        offset), differentiable through the passages' forward."""
        assert self.lora_name is not None
        p = start = len(self.prefix_ids)
        keys = [[k] for k, _ in self.prefix_layers]
        values = [[v] for _, v in self.prefix_layers]
        if self.compressed:
            raise ValueError("a compressed student's cache comes with a row mask: use student_compressed_tensors")
        with lora_active(self.model, self.lora_name):
            layers = self.encoder.forward_with_grad(passages)
        for row, ids in enumerate(passages):
            n, shift = len(ids), start - p
            cos, sin = self.rotary.cos_sin(torch.full((n,), shift), 0)
            for layer, (k, v) in enumerate(layers):
                k_row = k[row : row + 1, :, p : p + n]
                keys[layer].append(k_row * cos + rotate_half(k_row) * sin if shift else k_row)
                values[layer].append(v[row : row + 1, :, p : p + n])
            start += n
        return [torch.cat(k, dim=2) for k in keys], [torch.cat(v, dim=2) for v in values], start

    def kept_rows(self, ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """The rows the store keeps of passage ``ids``: the compressor's ``positions [L, H,
        n_max]`` and ``lengths [L, H]``, scored on the base model's cache once per passage (the
        adaptor's own cache changes every step, and KVzip's scoring pass costs more than a step;
        at indexing the scores come from the adaptor's cache, so the student approximates them)."""
        key = passage_key(ids)
        if key not in self._kept:
            assert self.compressor is not None
            with torch.inference_mode():
                kv = self.encoder.encode([ids])[0]
                kept = self.compressor.compress(kv, CompressionContext(self.encoder, ids))
            self._kept[key] = (kept.positions.clone(), kept.lengths.clone())
        return self._kept[key]

    def kept_rows_state(self, settings: str) -> dict[str, Any]:
        """:meth:`kept_rows` so far, to save beside a checkpoint: KVzip's pass over every new
        passage made the evaluation model's first epoch several times slower than the rest, work
        a resumed run need not redo."""
        return {"settings": settings, "rows": {k: list(v) for k, v in self._kept.items()}}

    def restore_kept_rows(self, state: dict[str, Any], settings: str) -> bool:
        """Take saved kept rows if they were chosen under the same ``settings`` (model,
        compressor); returns whether they were taken."""
        if state.get("settings") != settings:
            return False
        self._kept.update({k: (v[0], v[1]) for k, v in state["rows"].items()})
        return True

    def student_compressed_tensors(
        self, passages: list[list[int]]
    ) -> tuple[list[torch.Tensor], list[torch.Tensor], int, torch.Tensor]:
        """:meth:`student_forward_tensors` for a compressed store: each passage's rows evicted as
        :meth:`kept_rows` says (padded per head as the runtime's assembled cache is), quantized
        straight-through as the store codec will, each kept key rotated to its token's place in
        the prompt; also the per-head row mask ``[layers, kv_heads, T]`` the runtime's attention
        reads (``ragcompress.runtime.attention``)."""
        assert self.lora_name is not None
        p = start = len(self.prefix_ids)
        keys = [[k] for k, _ in self.prefix_layers]
        values = [[v] for _, v in self.prefix_layers]
        layer_count, heads = len(self.prefix_layers), self.prefix_layers[0][0].shape[1]
        masks = [torch.ones((layer_count, heads, p), dtype=torch.bool)]
        with lora_active(self.model, self.lora_name):
            layers = self.encoder.forward_with_grad(passages)
        for row, ids in enumerate(passages):
            n = len(ids)
            k = torch.stack([lk[row, :, p : p + n] for lk, _ in layers])  # [L, H, n, d] at p..p+n-1
            v = torch.stack([lv[row, :, p : p + n] for _, lv in layers])
            k = self.rotary.unrotate(k, torch.arange(p, p + n), 0)
            if self.compressor is not None:
                positions, lengths = self.kept_rows(ids)
            else:
                positions = torch.arange(n).expand(layer_count, heads, n)
                lengths = torch.full((layer_count, heads), n, dtype=torch.long)
            index = positions.unsqueeze(-1).expand(-1, -1, -1, k.shape[-1])
            k, v = torch.gather(k, 2, index), torch.gather(v, 2, index)
            if self.quant is not None or self.basis is not None:
                k, v = self.store_round_trip(k, v, lengths)
            cos, sin = self.rotary.table_cos_sin(positions + start, 0)  # one RoPE call per distinct position
            k = k * cos + rotate_half(k) * sin
            for layer in range(layer_count):
                keys[layer].append(k[layer].unsqueeze(0))
                values[layer].append(v[layer].unsqueeze(0))
            masks.append(torch.arange(positions.shape[-1]) < lengths.unsqueeze(-1))
            start += n
        return [torch.cat(k, dim=2) for k in keys], [torch.cat(v, dim=2) for v in values], start, torch.cat(masks, 2)

    def store_round_trip(
        self, keys: torch.Tensor, values: torch.Tensor, lengths: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Kept rows (keys un-rotated) as the store gives them back: quantized, or projected on
        the basis with quantized latents, straight-through (``quantize_dequantize``,
        ``LowRankBasis.round_trip``)."""
        quant = self.quant or QuantConfig("none")

        def round_trip(kind: str, rows: torch.Tensor) -> torch.Tensor:
            if self.basis is not None and self.basis.ranks(kind) is not None:
                return self.basis.round_trip(kind, rows, lengths, quant)
            return quantize_dequantize(kind, rows, lengths, quant)

        return round_trip("k", keys), round_trip("v", values)

    def losses(self, example: Example) -> Losses:
        """Mean per-token binned KL over the answer rows and over the continuation rows, and the
        answer rows' cross-entropy of (and argmax agreement with) the teacher's greedy tokens."""
        mask: dict[str, torch.Tensor] = {}
        if self.compressed:
            keys, values, total, kv_mask = self.student_compressed_tensors(example.passages)
            mask = {KV_MASK_KWARG: kv_mask}
        elif self.lora_name is not None:
            keys, values, total = self.student_forward_tensors(example.passages)
        else:
            keys, values, total = self.student_cache_tensors([self.passage(ids) for ids in example.passages])
        ids = example.suffix + example.answer
        qa = self.student_logprobs(keys, values, total, ids, len(example.answer) + 1, **mask)
        cont_ids = example.cont_suffix + example.cont
        cont = self.student_logprobs(keys, values, total, cont_ids, len(example.cont) + 1, **mask)[:-1]
        greedy = example.qa_idx[:, :1]  # the teacher's argmax of each answer row (topk is sorted)
        return Losses(
            binned_kl(example.qa_idx, example.qa_lp, qa).mean(),
            binned_kl(example.cont_idx, example.cont_lp, cont).mean(),
            -qa.gather(-1, greedy).mean(),
            float((qa.detach().argmax(-1, keepdim=True) == greedy).float().mean()),
        )


# -- the run ------------------------------------------------------------------------------------


def passage_key(ids: list[int]) -> str:
    """A passage's token ids as a short stable key (sha256)."""
    return hashlib.sha256(np.asarray(ids, dtype=np.int64).tobytes()).hexdigest()


VIEW_SEPARATOR = "@view"  # example id of a question's extra view: "<question id>@view<v>"


def question_of(example_id: str) -> str:
    """The question id of an example id (``TrainConfig.views``)."""
    return example_id.split(VIEW_SEPARATOR)[0]


def views_of(question_id: str, retrieved: list[int], k: int, views: int) -> list[tuple[str, list[int]]]:
    """(example id, passage rows) of each view of one question: ``retrieved[:k]`` in retrieval
    order, then ``views - 1`` draws of ``k`` of ``retrieved`` (its ``2k`` nearest) in a drawn
    order, seeded by the question id so that a resumed or repeated run draws the same."""
    out = [(question_id, list(retrieved[:k]))]
    rng = random.Random(question_id)
    for view in range(1, views):
        out.append((f"{question_id}{VIEW_SEPARATOR}{view}", rng.sample(list(retrieved), k)))
    return out


def teacher_settings(distiller: Distiller, k: int) -> dict[str, int]:
    """What a teacher example is computed with besides the model and its question: the passages
    retrieved for it, the teacher tokens kept per position and the continuation's length."""
    return {"top_k": k, "teacher_top": distiller.teacher_top, "continuation": distiller.continuation}


def settings_differ(recorded: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """``name=recorded (this run: current)`` for each setting a file records otherwise than this
    run asks (the refusals of a resumed run name them so)."""
    return [
        f"{name}={recorded[name]!r} (this run: {value!r})"
        for name, value in current.items()
        if name in recorded and recorded[name] != value
    ]


def check_teacher(path: Path, saved: dict[str, Any], settings: dict[str, int]) -> None:
    """Refuse teacher examples computed with other :func:`teacher_settings` (files from before
    they were recorded are not checked): a run would distil from them while recording its own."""
    recorded = saved.get("teacher_settings")
    if recorded is not None and recorded != settings:
        differ = ", ".join(settings_differ(recorded, settings))
        raise InputError(
            f"{path} holds teacher examples computed with {differ}; train with those settings, or delete "
            f"{path.name} (or use another --out folder) to compute them again"
        )


def build_examples(
    distiller: Distiller,
    corpus: Corpus,
    embedder: Embedder,
    k: int,
    limit: int | None,
    desc: str,
    partial: Path,
    keep_full: bool = False,
    views: int = 1,
) -> list[Example]:
    """Teacher examples of ``limit`` evenly spaced questions (all when None), ``views`` per
    question (:func:`views_of`); each finished one is appended to ``partial`` (a killed run
    resumes from it, and a run with more views reuses the ones it has)."""
    from tqdm import tqdm

    questions = select_questions(corpus.questions, limit or None)
    done: dict[str, Example] = {}
    if partial.is_file():
        saved = load_tree(partial)
        if isinstance(saved, dict):  # files from before the fingerprint was recorded: a list, split checked only
            check_run(partial, saved, distiller.lm)
            check_teacher(partial, saved, teacher_settings(distiller, k))
            saved = saved["examples"]
        done = {e["qid"]: Example(**e) for e in saved}
    vectors = embedder.embed([q.question for q in questions])
    retrieved = corpus.retrieve(vectors, k if views == 1 else 2 * k)
    examples = []
    for q, rows in tqdm(list(zip(questions, retrieved, strict=True)), desc=desc, unit="question"):
        for example_id, chosen in views_of(q.id, rows, k, views):
            if example_id not in done:
                passages = [distiller.tokens.passage(corpus.passages[i].text) for i in chosen]
                done[example_id] = distiller.teacher(example_id, passages, q.question, keep_full)
                save_tree(
                    {
                        "examples": [asdict(e) for e in done.values()],
                        "base_fingerprint": distiller.lm.fingerprint,
                        "teacher_settings": teacher_settings(distiller, k),
                    },
                    partial,
                )
            examples.append(done[example_id])
    return examples


def check_split(distiller: Distiller, path: Path, examples: list[Example], corpus: Corpus, side: str) -> None:
    """Refuse cached teacher examples that do not belong to this run's side of the split: a
    question of another article, or a passage from outside the side's passages (another
    ``--val-articles`` on the same folder would otherwise train on held-out text)."""
    questions = {q.id for q in corpus.questions}
    passages = {passage_key(distiller.tokens.passage(p.text)) for p in corpus.passages}
    for e in examples:
        if question_of(e.qid) not in questions or any(passage_key(ids) not in passages for ids in e.passages):
            raise InputError(
                f"{path}: the {side} example of question {e.qid} was built for another split of the articles "
                f"(its question or a retrieved passage is not on the {side} side now); use the --val-articles "
                "it was built with, or another --out folder"
            )


def validation_loss(distiller: Distiller, examples: list[Example]) -> dict[str, float]:
    with torch.no_grad():
        losses = [distiller.losses(e) for e in examples]
    return {name: float(np.mean([float(getattr(x, name)) for x in losses])) for name in Losses._fields}


def plot_history(history: dict[str, Any], path: Path, title: str) -> None:
    import textwrap

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    train = history["train"]
    if train:
        steps = [r["step"] for r in train]
        for key, style in (("kl_answer", "-"), ("kl_cont", "--")):
            ys = [r[key] for r in train]
            window = 5
            smooth = [float(np.mean(ys[max(0, i - window + 1) : i + 1])) for i in range(len(ys))]
            ax.plot(steps, smooth, style, color="C0", label=f"train {key} (mean of 5 steps)")
    val = history["val"]
    for key, style in (("kl_answer", "-o"), ("kl_cont", "--s")):
        ax.plot([r["step"] for r in val], [r[key] for r in val], style, color="C1", label=f"held-out {key}")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("KL(full prefill || cached), nats/token (top-k binned)")
    ax.set_title(textwrap.fill(title, 90), fontsize=9)  # a long list of held-out articles would run off the figure
    ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def fit_scorer(
    distiller: Distiller, passages: list[PassageInput], limit: int
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """KVzip scores of the trained adaptor's caches of up to ``limit`` training passages -> the probe."""
    from tqdm import tqdm

    encoder = PassageEncoder(distiller.lm, distiller.template, distiller.adaptor)  # its final tensors
    kvzip = KVzipCompressor(ratio=0.5)
    samples = []
    step = max(1, len(passages) // max(1, limit))
    for passage in tqdm(passages[::step][:limit], desc="scorer (KVzip targets)", unit="passage"):
        ids = distiller.tokens.passage(passage.text)
        kv = encoder.encode([ids])[0]
        with torch.inference_mode():
            scores = kvzip.score(kv, CompressionContext(encoder, ids))
        samples.append((kv, scores))
    return learned_scorer.fit(samples)


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


def student_basis(
    distiller: Distiller, passages: list[PassageInput], config: TrainConfig, path: Path
) -> LowRankBasis | None:
    """The basis the student projects its kept rows on (``config.kv_rank``; None: none), fitted as
    ``index --rank`` fits a store's (``indexing/calibrate.py``) on the first training passages,
    encoded by the base model: the adaptor moves during training, the basis stays, and a store
    fits its own on its own passages. Kept in ``path`` so a resumed run projects on the same one,
    with the settings it was fitted for beside it (a run resumed with another ``--kv-rank`` fits anew)."""
    from ragcompress.indexing.calibrate import fit_calibration_basis
    from ragcompress.store.basis import basis_from_bytes, basis_to_bytes

    spec = config.rank_spec()
    if spec is None:
        return None
    settings = json.dumps([distiller.lm.fingerprint, spec.as_dict(), config.calibration_passages], sort_keys=True)
    stamp = path.with_suffix(".json")  # absent: a run from before it was written, fitted for this run
    if path.is_file() and (not stamp.is_file() or stamp.read_text() == settings):
        return basis_from_bytes(path.read_bytes())
    basis = fit_calibration_basis(distiller.encoder, passages, spec, config.calibration_passages)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(basis_to_bytes(basis))
    tmp.replace(path)
    stamp.write_text(settings)
    return basis


def check_run(
    path: Path, saved: dict[str, Any], lm: LoadedModel, held_out: list[str] | None = None, now: list[str] | None = None
) -> None:
    """Refuse to resume from ``path`` (a checkpoint or the teacher examples) saved by a run of
    another base model, or holding out other articles (``held_out``; ``now``: this run's): the
    adaptor would have trained on what is held out now. Files from before the fingerprint was
    recorded are checked by their split only."""
    base = saved.get("base_fingerprint")
    if base and base != lm.fingerprint:
        raise InputError(
            f"{path} was made with another base model (fingerprint {base[:16]}), not {lm.ref} "
            f"({lm.fingerprint[:16]}); use that model, or another --out folder"
        )
    if held_out is not None and now is not None and sorted(held_out) != sorted(now):
        raise InputError(
            f"{path} was trained holding out {sorted(held_out)}, not {sorted(now)}: its adaptor has seen what "
            "this run holds out; use the --val-articles it was trained with, or another --out folder"
        )


# the settings that define the store an adaptor is trained for (its student's compression)
COMPRESSION_SETTINGS = (
    "method", "ratio", "quant", "value_quant", "group_size", "kv_rank", "kv_rank_values", "calibration_passages",
    "keep_first", "keep_last", "value_norm",
)  # fmt: skip


def check_resumed_compression(config: TrainConfig, saved: dict[str, Any], path: Path) -> None:
    """Refuse to resume a run for another compression than it trained for: its factors, history
    and held-out metrics (``held_out_start``) belong to the first, so the adaptor would record a
    loss curve across two stores. Continuing from a finished adaptor is ``--init-adaptor``."""
    differ = settings_differ(saved, {name: getattr(config, name) for name in COMPRESSION_SETTINGS})
    if differ:
        raise InputError(
            f"{path} trains an adaptor for {', '.join(differ)}; resume with those settings, or train for this "
            "compression in another --out folder (--init-adaptor OUT/adaptor starts from the finished adaptor)"
        )


def resumed_settings(config: TrainConfig, settings: dict[str, Any], path: Path) -> None:
    """A resumed run trains the checkpoint's factors, whose rank, alpha and kind are fixed: take
    them into ``config`` (what the adaptor records), warning when this run asked for others."""
    # no "kind": a cache adaptor (Adaptor.kind), the only kind before "forward" was recorded
    saved = {"rank": int(settings["rank"]), "alpha": int(settings["alpha"]), "kind": settings.get("kind", "cache")}
    asked = {name: getattr(config, name) for name in saved}
    if asked != saved:
        differ = ", ".join(
            f"--{name} {saved[name]} (not {asked[name]})" for name in saved if saved[name] != asked[name]
        )
        warnings.warn(
            f"resuming {path}: its adaptor keeps {differ}; use another --out folder to train with those",
            stacklevel=3,
        )
    config.rank, config.alpha, config.kind = saved["rank"], saved["alpha"], saved["kind"]


def resumed_ancestry(checkpoint: dict[str, Any], config: TrainConfig, lm: LoadedModel, path: Path) -> dict[str, Any]:
    """The adaptor a resumed run started from (``--init-adaptor``): its hash and the articles it
    trained on, which the new adaptor's ``train_articles`` include. A checkpoint from before those
    articles were recorded names only the hash: they are read from that adaptor (``--init-adaptor``
    naming it, or the packaged one of that hash), and the run is refused when neither is found."""
    from ragcompress.distill.adaptor import packaged_adaptor, resolve_adaptor

    ancestry = {key: checkpoint[key] for key in ("init_adaptor_hash", "init_train_articles") if checkpoint.get(key)}
    start_hash = ancestry.get("init_adaptor_hash")
    if start_hash is None or "init_train_articles" in ancestry:
        return ancestry
    start = resolve_adaptor(config.init_adaptor, lm.ref) if config.init_adaptor else None
    if start is None or start.hash != start_hash:
        start = packaged_adaptor(start_hash)
    if start is None:
        raise InputError(
            f"{path} continues adaptor {start_hash[:16]} without recording the articles it trained on (a checkpoint "
            "from before they were recorded); resume with --init-adaptor naming that adaptor, so that this "
            "adaptor's train_articles include them"
        )
    return ancestry_of(start)


def ancestry_of(start: Adaptor) -> dict[str, Any]:
    """What a run started from ``start`` records of it: its hash, and its articles, which are
    this run's too (an adaptor's train_articles are every article it descends from)."""
    return {"init_adaptor_hash": start.hash, "init_train_articles": sorted(start.meta.get("train_articles", []))}


def kept_rows_settings(lm: LoadedModel, config: TrainConfig) -> str:
    """What the compressed student's kept rows (``Distiller.kept_rows``) were chosen under: the
    model and every setting of the eviction (``student_compressor``); value weighting only when
    on, so that the rows saved by runs from before it was recorded are still taken."""
    settings = [lm.fingerprint, config.method, config.ratio, config.keep_first, config.keep_last]
    return json.dumps(settings + (["value_norm"] if config.value_norm else []), sort_keys=True)


def warm_start(lm: LoadedModel, config: TrainConfig) -> Adaptor:
    """The adaptor ``config.init_adaptor`` names, as the starting point of training: same model,
    kind ``forward``, its LoRA factors in fp32 (a packaged adaptor may store fp16); its rank and
    alpha replace ``config``'s."""
    from ragcompress.distill.adaptor import resolve_adaptor

    assert config.init_adaptor is not None
    start = resolve_adaptor(config.init_adaptor, lm.ref)
    start.check_model(lm.fingerprint, lm.ref)
    if start.kind != config.kind:
        raise InputError(f"--init-adaptor {config.init_adaptor} is of kind {start.kind!r}, not {config.kind!r}")
    seen = sorted(set(start.meta.get("train_articles", [])) & set(config.val_articles))
    if seen:
        raise InputError(
            f"--init-adaptor {config.init_adaptor} was trained on {seen}, held out here; its numbers on them "
            f"would not be held-out ones (hold out what it held out: {start.meta.get('val_articles')})"
        )
    config.rank, config.alpha = int(start.settings["rank"]), int(start.settings["alpha"])
    tensors = {k: v.float() for k, v in start.lora_tensors.items()}
    return Adaptor(dict(start.settings), tensors, ancestry_of(start))


def train(
    lm: LoadedModel, passages_path: Path, questions_path: Path, out: Path, config: TrainConfig, progress: bool = True
) -> Adaptor:
    """Train (or resume) an adaptor for ``lm`` into ``out``; returns the saved adaptor."""
    from tqdm import tqdm

    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out} is a file; training writes a folder there (checkpoint, examples, adaptor/)")
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(config.seed)
    passages = list(iter_passages(passages_path))
    config.val_articles = split_articles([p.article for p in passages], config.val_articles)
    from ragcompress.retrieval import Embedder

    embedder = Embedder()  # retrieval over each side of the split builds the training examples
    train_corpus, val_corpus = load_corpora(passages, questions_path, config.val_articles, embedder)
    check_questions(passages, questions_path, train_corpus)
    require_questions(val_corpus, "held-out", questions_path)
    if config.extra_passages:
        train_corpus = with_extra_passages(lm, train_corpus, config, embedder, out, progress)
    require_questions(train_corpus, "training", questions_path)

    checkpoint_path, teacher_path = out / "checkpoint.safetensors", out / "teacher.safetensors"
    checkpoint = load_tree(checkpoint_path) if checkpoint_path.is_file() else None
    if checkpoint is not None:
        check_run(
            checkpoint_path, checkpoint, lm, checkpoint.get("config", {}).get("val_articles"), config.val_articles
        )
        check_resumed_compression(config, checkpoint.get("config", {}), checkpoint_path)
        ancestry = resumed_ancestry(checkpoint, config, lm, checkpoint_path)  # the init adaptor's, if any
        adaptor = Adaptor(checkpoint["settings"], dict(checkpoint["initial"]), ancestry)
        resumed_settings(config, adaptor.settings, checkpoint_path)
    elif config.init_adaptor:
        adaptor = warm_start(lm, config)
    else:
        adaptor = Adaptor.initial(lm.model, config.rank, config.alpha, kind=config.kind)
    initial = dict(adaptor.tensors)
    # the adaptor it descends from (--init-adaptor), kept in every checkpoint of the run
    ancestry = {key: value for key in ("init_adaptor_hash", "init_train_articles") if (value := adaptor.meta.get(key))}
    distiller = Distiller(
        lm,
        adaptor,
        config.teacher_top,
        config.continuation,
        student_compressor(config),
        config.quant_config(),
    )

    distiller.basis = student_basis(distiller, train_corpus.passages, config, out / "student-basis.safetensors")

    if teacher_path.is_file():
        cached = load_tree(teacher_path)
        check_run(teacher_path, cached, lm)
        check_teacher(teacher_path, cached, teacher_settings(distiller, config.top_k))
        train_examples = [Example(**e) for e in cached["train"]]
        val_examples = [Example(**e) for e in cached["val"]]
        check_split(distiller, teacher_path, train_examples, train_corpus, "training")
        built_views = len(train_examples) // max(1, len({question_of(e.qid) for e in train_examples}))
        if built_views != config.views:
            raise InputError(
                f"{teacher_path} holds {built_views} view(s) per training question, not --views {config.views}: "
                f"pass --views {built_views}, or delete {teacher_path.name} (the teacher-*.part files keep the "
                "examples already computed, so only the missing views are computed again)"
            )
        check_split(distiller, teacher_path, val_examples, val_corpus, "held-out")
    else:
        train_part, val_part = out / "teacher-train.part", out / "teacher-val.part"
        train_examples = build_examples(
            distiller,
            train_corpus,
            embedder,
            config.top_k,
            config.train_questions or None,
            "teacher (train)",
            train_part,
            views=config.views,
        )
        val_examples = build_examples(
            distiller,
            val_corpus,
            embedder,
            config.top_k,
            config.val_examples,
            "teacher (held-out)",
            val_part,
            True,
        )
        # the .part files may hold examples of another split (a deleted teacher file, other --val-articles)
        check_split(distiller, train_part, train_examples, train_corpus, "training")
        check_split(distiller, val_part, val_examples, val_corpus, "held-out")
        save_tree(
            {
                "train": [asdict(e) for e in train_examples],
                "val": [asdict(e) for e in val_examples],
                "base_fingerprint": lm.fingerprint,
                "teacher_settings": teacher_settings(distiller, config.top_k),
            },
            teacher_path,
        )

    kept_path = out / "kept-rows.safetensors"  # the compressed student's rows (kept_rows), if any
    kept_settings = kept_rows_settings(lm, config)
    if distiller.compressor is not None and kept_path.is_file():
        distiller.restore_kept_rows(load_tree(kept_path), kept_settings)

    trainable = distiller.trainable()
    optimizer = torch.optim.AdamW(trainable, lr=config.lr, weight_decay=0.0)
    history: dict[str, Any] = {"train": [], "val": []}
    start_step, elapsed, budget = 0, 0.0, config.minutes * 60
    if checkpoint is not None:
        distiller.load_factors(checkpoint["params"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        history, start_step, elapsed = checkpoint["history"], checkpoint["step"], checkpoint["elapsed"]
        budget += elapsed  # --minutes is this invocation's: a resumed run does not stop early
    else:
        history["val"].append({"step": 0, **validation_loss(distiller, val_examples)})

    def save_checkpoint(step: int) -> None:
        if distiller.compressor is not None:
            save_tree(distiller.kept_rows_state(kept_settings), kept_path)
        save_tree(
            {
                "step": step,
                "elapsed": elapsed,
                "settings": adaptor.settings,
                "initial": initial,
                "params": distiller.factors(),
                "optimizer": optimizer.state_dict(),
                "history": history,
                "config": asdict(config),
                "base_fingerprint": lm.fingerprint,
                **ancestry,
            },
            checkpoint_path,
        )

    rng = random.Random(config.seed)
    order = [
        i
        for _ in range(math.ceil(config.steps * config.batch / len(train_examples)) + 1)
        for i in rng.sample(range(len(train_examples)), len(train_examples))
    ]
    bar = tqdm(total=config.steps, initial=start_step, desc="training", unit="step", disable=not progress)
    step = start_step
    lm.model.train(False)
    while step < config.steps and elapsed < budget:
        begin = time.perf_counter()
        for group in optimizer.param_groups:
            group["lr"] = config.lr * lr_factor(config, step)
        optimizer.zero_grad()
        qa_sum = cont_sum = 0.0
        for i in order[step * config.batch : (step + 1) * config.batch]:
            losses = distiller.losses(train_examples[i])
            total = losses.kl_answer + config.continuation_weight * losses.kl_cont
            if config.hard_weight:
                total = total + config.hard_weight * losses.ce_answer
            (total / config.batch).backward()
            qa_sum, cont_sum = qa_sum + float(losses.kl_answer.detach()), cont_sum + float(losses.kl_cont.detach())
        if config.clip:
            torch.nn.utils.clip_grad_norm_(trainable, config.clip)
        optimizer.step()
        step += 1
        elapsed += time.perf_counter() - begin
        history["train"].append({"step": step, "kl_answer": qa_sum / config.batch, "kl_cont": cont_sum / config.batch})
        if step % config.eval_every == 0 or step == config.steps:
            history["val"].append({"step": step, **validation_loss(distiller, val_examples)})
        if step % config.checkpoint_every == 0:
            save_checkpoint(step)
        bar.update(1)
        bar.set_postfix(kl=f"{qa_sum / config.batch:.3f}", val=f"{history['val'][-1]['kl_answer']:.3f}")
    bar.close()
    if history["val"][-1]["step"] != step:
        history["val"].append({"step": step, **validation_loss(distiller, val_examples)})
    save_checkpoint(step)

    adaptor.tensors = distiller.factors()
    weight, bias, r2 = (None, None, None)
    if scorer_passages := config.scorer_fit_passages():
        weight, bias, r2 = fit_scorer(distiller, train_corpus.passages, scorer_passages)
        adaptor.tensors[SCORER_WEIGHT], adaptor.tensors[SCORER_BIAS] = weight, bias
    adaptor.meta = {
        "base_model": lm.ref,
        "base_fingerprint": lm.fingerprint,
        "training_data_sha256": data_hash(passages_path, questions_path, config.val_articles, config.extra_passages),
        "train_articles": sorted(
            {p.article for p in train_corpus.passages} | set(ancestry.get("init_train_articles", []))
        ),
        "val_articles": config.val_articles,
        "method": config.method,
        "ratio": config.ratio,
        "quant": config.quant_config().name,
        "lowrank": spec.as_dict() if (spec := config.rank_spec()) else None,
        **({"value_norm": True} if config.value_norm else {}),  # absent: plain scores (every earlier adaptor)
        "config": asdict(config),
        **({"init_adaptor_hash": ancestry["init_adaptor_hash"]} if "init_adaptor_hash" in ancestry else {}),
        "metrics": {
            "steps": step,
            "train_minutes": elapsed / 60,
            "train_examples": len(train_examples),
            "held_out_start": history["val"][0],
            "held_out_end": history["val"][-1],
            "scorer_r2": r2,
        },
    }
    adaptor.save(out / "adaptor")
    (out / "history.json").write_text(json.dumps(history, indent=1))
    plot_history(
        history, out / "loss.png", f"{lm.ref}: KV-Distill adaptor, held-out articles {', '.join(config.val_articles)}"
    )
    return adaptor
