"""The bytes frontier of issue 16: bytes per token against KL to full prefill and sub-EM, for
combinations of eviction x rank x bit width, on questions the bases were not fitted on.

Split by article: the low-rank bases are fitted on the first ``--calibration-passages`` passages
of ``--calibration-articles`` (full caches, encoded as indexing encodes them); the evaluated
questions are those of the *other* articles (``--split eval``), or a few of the calibration
articles' questions to choose settings on (``--split dev``). Every row is a real store (manifest,
basis file, shards, catalogue) holding the passages the questions retrieve (top-k over the whole
corpus, so retrieval is what a whole-corpus store returns), answered through
``Engine.answer_cached`` (dense backend, default ``AnswerOptions``: greedy, 32 new tokens).

Per row: sub-EM, F1, agreement with full prefill, median TTFT, bytes per token (blobs as written
plus the basis file once, over the store's tokens) and teacher-forced KL(full prefill || row) of
the next-token distributions at the positions that predict the first gold answer's tokens
(nats/token; ``kl_full_first``: the answer's first token alone), over ``--kl-questions`` evenly
spaced questions (each needs a full prefill, the slowest step on a CPU). Only those rows of the
reference are kept: a vocabulary of 150k makes every prompt position cost 300 kB.
Full-prefill answers are computed in the run, by its code (they were once reused from
``runs/core272-ck`` where the retrieved ids matched, with nothing to tell whether the code that
wrote them still answers the same: results files of that time count them, ``reused_core272``).

Row names: ``METHOD@RATIO/QUANT/RANK``, e.g. ``none@1/fp16/-`` (the uncompressed reference),
``global:kvzip@0.25/int4/r32`` (fixed rank 32, keys and values), ``.../r16k`` (keys only),
``.../e0.9`` (energy 0.9 per layer), ``.../p0.9`` (energy 0.9, progressive by depth);
``global:kvzip@0.21f0.2/...`` guarantees every head of every layer 0.2 of its per-head budget
before the pooled rest goes by score (``IndexConfig.floor``; ``global:``'s default is 0);
``int2g64`` quantizes in groups of 64 instead of the default 32 (``index --group-size``),
``int4v2`` stores keys at int4 and values at int2 (``index --quant int4 --value-quant int2``); a
``+adaptor`` suffix encodes the passages through ``--adaptor`` (``+adaptor-LABEL`` names a second
adaptor's row of the same store apart, e.g. an earlier checkpoint of it); a final ``~merge``
merges evicted rows' values into kept rows instead of dropping them (:func:`merged_values`, an
ablation measured and not adopted: docs/compression.md §8); a final ``~basescore`` on a
``+adaptor`` row evicts by the scores of the *base* model's cache of each passage, as the
adaptor's training chose the student's kept rows, instead of by those of the adaptor's cache; a
final ``~vnorm`` weights each score by its value's norm over the mean of its layer and head
(``IndexConfig.value_norm``, VATP-style; docs/compression.md §8); a final ``~pool`` averages each
score with its neighbours' (SnapKV's 1-D pooling at its width, :func:`pool_scores`) before the
budget is applied, so kept rows come in short runs rather than as isolated tokens; a final
``~corpus`` spends the same total rows under one score threshold over every passage of the store
instead of a budget per passage (:func:`corpus_select`); a final ``~entity`` doubles the scores of
the tokens factoid answers are made of, numbers and capitalised words not at a sentence's start
(:func:`entity_tokens`; the rule it was measured under is in docs/rules.md). Eviction rows protect
each passage's first token and none of its last (``keep_first=1, keep_last=0``, issue 16's setting)
unless a final ``~keepF-L`` names other counts (``~keep4-4``: the scorers' own default).

    python benchmarks/lowrank_frontier.py --model qwen2.5-coder-0.5b --split eval \\
        --rows none@1/fp16/- none@1/int4/- global:kvzip@0.25/int4/- global:kvzip@0.5/int4/r16
    python benchmarks/lowrank_frontier.py --model qwen2.5-coder-0.5b \\
        --publish "runs/lowrank/qwen2.5-coder-0.5b/eval/results*.json" docs/results/lowrank_qwen.json
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import shutil
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ragcompress.compressors.adaptive import AdaptiveBudget
from ragcompress.compressors.scorer import ScorerCompressor, gather_kept
from ragcompress.compressors.snapkv import SnapKVCompressor, pool_scores
from ragcompress.distill.adaptor import Adaptor
from ragcompress.errors import InputError
from ragcompress.evaluation import Quality, Question, read_questions, select_questions
from ragcompress.indexing import IndexConfig
from ragcompress.indexing.calibrate import calibration_caches
from ragcompress.indexing.encoder import PassageEncoder
from ragcompress.indexing.indexer import Indexer, passage_record
from ragcompress.indexing.inputs import PassageInput, iter_passages
from ragcompress.kv import ModelShape, PassageKV
from ragcompress.kv.lowrank import CalibrationMoments, LowRankBasis, RankSpec
from ragcompress.kv.quant import QuantConfig
from ragcompress.models import LoadedModel, load_model
from ragcompress.provenance import git_revision
from ragcompress.retrieval import Embedder, exact_top_k
from ragcompress.runtime.engine import Engine
from ragcompress.runtime.generate import kl_per_position
from ragcompress.runtime.options import AnswerOptions
from ragcompress.runtime.prepare import full_prefill
from ragcompress.store import KVStore, StoreWriter, create_store
from ragcompress.store.basis import basis_to_bytes

from common import (
    ENCODING_CODE,
    SQUAD,
    adaptor_provenance,
    cached_scores,
    encoding_key,
    library_digest,
    load_keyed,
    measured_by,
    model_slug,
    question_article,
    results_meta,
    row_run,
    save_keyed,
    teacher_forced_logprobs,
)
from frontier_rows import DEFAULT_PROTECTION, match_row, named_protection

CORE272 = Path(__file__).resolve().parents[1] / "runs" / "core272-ck"
OPTIONS = AnswerOptions(backend="dense")
# the library code full.pt's answers and teacher-forced rows are computed by (checked_reference)
REFERENCE_CODE = ("runtime", "store", *ENCODING_CODE)


@dataclass(frozen=True)
class RowSpec:
    """One store setting of the grid (see the module docstring for the name)."""

    name: str
    method: str
    ratio: float
    quant: str
    rank: RankSpec | None
    adaptor: bool = False  # encoded through --adaptor (a KV-Distill adaptor, #15)
    group_size: int = QuantConfig().group_size
    value_quant: str | None = None  # values' own width (``int4v2``: int2)
    merge: bool = False  # ``~merge``: evicted rows' values merged into kept rows (merged_values)
    base_scores: bool = False  # ``~basescore``: an adapted row evicted by the base cache's scores
    floor: float | None = None  # ``@RATIOfF``: every head's guaranteed share of its budget (global: default 0)
    value_norm: bool = False  # ``~vnorm``: scores weighted by the value's relative norm (IndexConfig.value_norm)
    pool: bool = False  # ``~pool``: scores averaged over neighbouring tokens first (SnapKV's pooling, its width)
    corpus: bool = False  # ``~corpus``: one score threshold over every passage of the store (corpus_select)
    entity: bool = False  # ``~entity``: the scores of name, date and number tokens doubled (entity_tokens)
    keep: tuple[int, int] | None = None  # ``~keepF-L``: tokens protected first and last (default 1 and 0)

    @classmethod
    def parse(cls, name: str) -> RowSpec:
        try:
            match = match_row(name)
        except ValueError as exc:
            raise SystemExit(str(exc)) from None
        if match["basescore"] and not match["adaptor"]:
            raise SystemExit(f"bad row {name!r}: ~basescore only changes a +adaptor row's scores")
        if match["entity"] and "kvzip" not in match["method"]:
            # doubling raises a token only where scores are positive (KVzip's attention
            # probabilities); knorm's and the learned scorer's are not, and "none" keeps every row
            raise SystemExit(f"bad row {name!r}: ~entity doubles KVzip's scores; use a kvzip method")
        rank_text = match["rank"]
        rank = None
        if rank_text != "-":
            values = not rank_text.endswith("k")
            number = rank_text[1:].rstrip("k")
            if rank_text[0] == "r":
                rank = RankSpec(rank=int(number), values=values)
            else:
                schedule = "global" if rank_text[0] == "e" else "progressive"
                rank = RankSpec(energy=float(number), schedule=schedule, values=values)
        group = int(match["group"]) if match["group"] else QuantConfig().group_size
        value_quant = f"int{match['vbits']}" if match["vbits"] else None
        return cls(
            name,
            match["method"],
            float(match["ratio"]),
            match["quant"],
            rank,
            bool(match["adaptor"]),
            group,
            value_quant,
            bool(match["merge"]),
            bool(match["basescore"]),
            float(match["floor"]) if match["floor"] else None,
            bool(match["vnorm"]),
            bool(match["pool"]),
            bool(match["corpus"]),
            bool(match["entity"]),
            named_protection(match),
        )

    def index_config(self, adaptor: Path | None = None) -> IndexConfig:
        ratio = None if self.method == "none" else self.ratio
        # method "none" takes no protection (its compressor refuses keep_*): left at the config's None
        first, last = (None, None) if self.method == "none" else self.keep or DEFAULT_PROTECTION
        rank = self.rank
        return IndexConfig(
            method=self.method,
            ratio=ratio,
            quant=self.quant,
            value_quant=self.value_quant,
            group_size=self.group_size,
            rank=rank.rank if rank else None,
            rank_energy=rank.energy if rank else None,
            rank_schedule=rank.schedule if rank else "global",
            rank_values=rank.values if rank else True,
            adaptor=str(adaptor) if self.adaptor and adaptor else None,
            floor=self.floor,
            value_norm=self.value_norm,
            keep_first=first,
            keep_last=last,
        )


def split_questions(
    articles: set[str], split: str, limit: int, only: list[str] | None = None, outside: int = 0
) -> list[Question]:
    """Questions of the calibration articles (``dev``) or of the others (``eval``; ``only``: of
    these of them), file order, evenly thinned to ``limit``. ``outside``: only those *not* among the
    ``outside`` that ``limit=outside`` picks, so a setting chosen on those is confirmed on the rest."""
    questions = [
        q for q in read_questions(SQUAD / "questions.jsonl") if (question_article(q) in articles) == (split == "dev")
    ]
    if only:
        if split == "dev" or set(only) & articles:
            raise SystemExit(f"--eval-articles {only} must be eval-split articles (not {sorted(articles)})")
        questions = [q for q in questions if question_article(q) in only]
    try:
        return select_questions(questions, limit or None, outside=outside or None)
    except InputError as exc:
        raise SystemExit(f"--outside {outside}: {exc}") from None


def retrieve(embedder: Embedder, passages: list[PassageInput], questions: list[Question], k: int) -> list[list[str]]:
    """Top-``k`` passage ids over the whole corpus, per question (what a whole-corpus store returns)."""
    pvec = embedder.embed([p.text for p in passages])
    qvec = embedder.embed([q.question for q in questions])
    top = exact_top_k(qvec, pvec, k)
    return [[passages[j].id for j in row] for row in top]


def core272_full_answers(model: str, top_k: int) -> dict[str, dict[str, Any]]:
    """Question id -> its full-prefill answer and retrieved ids from ``runs/core272-ck``."""
    found: dict[str, dict[str, Any]] = {}
    for path in sorted(CORE272.glob(f"{model_slug(model)}-*-top{top_k}-shard*.jsonl")):
        for line in path.read_text().splitlines():
            row = json.loads(line)
            found[row["id"]] = {
                "answer": row["full"]["answer"],
                "retrieved": row["retrieved"],
                "cached": row["cached"]["answer"],
                "cached_ttft_s": row["cached"]["ttft_s"],
            }
    return found


CORE272_ROW = "core272:none@1/int8/-"


def quality_of(frontier: Frontier, answers: list[str], references: list[str]) -> Quality:
    """``answers`` to the run's questions scored against their golds and ``references``."""
    return Quality.of(answers, [q.answers for q in frontier.questions], references)


def core272_cached_row(frontier: Frontier, full_answers: list[str]) -> dict[str, Any]:
    """The int8 store's cached answers to the same questions from ``runs/core272-ck`` (same model,
    top-k, retrieval, prompt and decoding; recorded by ``core_eval.py``): the uncompressed-reuse
    reference when no fp16 store row was run. Bytes per token: ``docs/results/core272_*.json``'s."""
    found = core272_full_answers(frontier.lm.ref, frontier.args.top_k)
    answers = []
    for q, pids in zip(frontier.questions, frontier.retrieved, strict=True):
        if q.id not in found or found[q.id]["retrieved"] != pids:
            raise SystemExit(f"{CORE272} has no cached answer over the same passages for question {q.id}")
        answers.append(found[q.id]["cached"])
    tag = "qwen" if "qwen" in frontier.lm.ref else "smollm2"
    sizes = json.loads((Path("docs/results") / f"core272_{tag}.json").read_text())[0]
    quality = quality_of(frontier, answers, full_answers)
    return {
        "method": "none",
        "ratio": 1.0,
        "quant": "int8",
        "rank": None,
        "ranks_k": None,
        "ranks_v": None,
        **quality.means(),  # sub_em, f1, agreement
        "kl_full_answer": None,
        "kl_full_first": None,
        "kl_questions": 0,
        "ttft_s_median": statistics.median(found[q.id]["cached_ttft_s"] for q in frontier.questions),
        "bytes_per_token": sizes["kv_bytes_per_token"]["stored"],
        "compression": sizes["compression"],
        "per_question_sub_em": quality.sub_em,
        "source": f"{CORE272} (cached answers of the int8 store; bytes from docs/results/core272_{tag}.json)",
    }


class Frontier:
    """Shared state of one run: model, questions, passages and their full caches, scores, bases."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.lm: LoadedModel = load_model(args.model)
        self.embedder = Embedder()
        self.indexer = Indexer.from_config(self.lm, IndexConfig(), self.embedder)
        self.encoder: PassageEncoder = self.indexer.encoder
        corpus = list(iter_passages(SQUAD / "passages.jsonl"))
        articles = set(args.calibration_articles)
        self.questions = split_questions(articles, args.split, args.questions, args.eval_articles, args.outside)
        self.retrieved = retrieve(self.embedder, corpus, self.questions, args.top_k)
        needed = list(dict.fromkeys(pid for row in self.retrieved for pid in row))
        by_id = {p.id: p for p in corpus}
        self.passages = {pid: by_id[pid] for pid in needed}
        self.vectors = dict(zip(needed, self.embedder.embed([by_id[p].text for p in needed]), strict=True))
        self.token_ids = {pid: self.encoder.tokens.passage(by_id[pid].text) for pid in needed}
        self.calibration = [p for p in corpus if p.id.split("#")[0] in articles]
        step = max(1, len(self.questions) // max(1, args.kl_questions))  # a full prefill each: bounded
        self.kl_rows = set(range(0, len(self.questions), step)[: args.kl_questions])
        self.workdir: Path = args.workdir / args.split
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.adaptor = Adaptor.load(args.adaptor) if args.adaptor else None
        self._full: dict[bool, dict[str, PassageKV]] = {}
        self._adapted_encoder: PassageEncoder | None = None
        self._moments: CalibrationMoments | None = None
        self._scores: dict[tuple[str, bool], dict[str, torch.Tensor]] = {}

    def _tag(self, adapted: bool) -> str:
        """File-name tag of the caches' encoder: '' (base model) or the adaptor's hash."""
        if not adapted:
            return ""
        if self.adaptor is None:
            raise SystemExit("a +adaptor row needs --adaptor PATH")
        return f"-{self.adaptor.hash[:16]}"

    def cache_key(self, adapted: bool, *code: str, **more: Any) -> dict[str, Any]:
        """What this run's cached caches and scores are computed from (:func:`common.load_keyed`):
        the model, its prompt prefix, the adaptor and the library code that encodes (and ``code``,
        e.g. the scorers')."""
        adaptor = self.adaptor.hash if adapted and self.adaptor is not None else None
        return {**encoding_key(self.lm, self.encoder.prefix_ids, *code), "adaptor": adaptor, **more}

    def adaptor_provenance(self) -> dict[str, Any]:
        """What a ``+adaptor`` row was encoded with; its training articles must not be the
        questions' (refused here: every figure of an adaptor comes from articles it never saw)."""
        assert self.adaptor is not None
        return adaptor_provenance(self.adaptor, {question_article(q) for q in self.questions})

    def encoder_for(self, adapted: bool) -> PassageEncoder:
        """The passage encoder of base rows or of ``+adaptor`` rows (as ``index --adaptor`` builds it)."""
        if not adapted:
            return self.encoder
        if self._adapted_encoder is None:
            self._adapted_encoder = PassageEncoder(self.lm, self.indexer.template, self.adaptor)
        return self._adapted_encoder

    def full(self, adapted: bool = False) -> dict[str, PassageKV]:
        """Every needed passage's uncompressed cache, encoded as indexing encodes it (through the
        adaptor for ``+adaptor`` rows: its caches and its KVzip scores are the adapted ones)."""
        if adapted not in self._full:
            self._full[adapted] = self._full_caches(adapted)
        return self._full[adapted]

    def _full_caches(self, adapted: bool) -> dict[str, PassageKV]:
        path = self.workdir / f"full-caches{self._tag(adapted)}.safetensors"
        key = self.cache_key(adapted)
        saved = load_keyed(path, key, self.token_ids)  # a run over more questions may have encoded these
        full = {
            pid: PassageKV.full(saved[f"{pid}/keys"], saved[f"{pid}/values"])
            for pid in self.passages
            if f"{pid}/keys" in saved
        }
        ids = [pid for pid in self.passages if pid not in full]
        if ids:
            t0 = time.perf_counter()
            encoder = self.encoder_for(adapted)
            for start in range(0, len(ids), 8):
                batch = ids[start : start + 8]
                full.update(zip(batch, encoder.encode([self.token_ids[p] for p in batch]), strict=True))
            tensors = dict(saved)
            for pid in ids:
                tensors[f"{pid}/keys"], tensors[f"{pid}/values"] = full[pid].keys, full[pid].values
            save_keyed(path, tensors, key, self.token_ids)
            print(f"encoded {len(ids)} passages in {time.perf_counter() - t0:.0f} s", flush=True)
        return full

    def basis(self, spec: RankSpec) -> LowRankBasis:
        if self._moments is None:
            # named by the sample: a workdir shared by runs of other calibration settings keeps each
            # one's moments apart (until 2026-12-06 one unnamed file served them all)
            sample = f"{'+'.join(sorted(self.args.calibration_articles))}-first{self.args.calibration_passages}"
            path = self.args.workdir / f"calibration-moments-{sample}.safetensors"
            used = self.calibration[: self.args.calibration_passages]
            tokens = {"moments": [t for p in used for t in self.encoder.tokens.passage(p.text)]}
            moments = CalibrationMoments()
            state = load_keyed(path, self.cache_key(False), tokens)
            if state:  # tensors: moments/count, moments/sums.<kind>, moments/outer.<kind>
                moments.count = state.pop("moments/count")
                for name, tensor in state.items():
                    field, kind = name.removeprefix("moments/").split(".")
                    getattr(moments, field)[kind] = tensor
            else:
                for kv in calibration_caches(self.encoder, self.calibration, self.args.calibration_passages):
                    moments.add(kv)
                assert moments.count is not None
                state = {"moments/count": moments.count}
                for field in ("sums", "outer"):
                    state.update({f"moments/{field}.{kind}": t for kind, t in getattr(moments, field).items()})
                save_keyed(path, state, self.cache_key(False), tokens)
            self._moments = moments
        return self._moments.basis(spec)

    def scores(self, scorer: str, adapted: bool = False) -> dict[str, torch.Tensor]:
        """Scores ``[L, H, n]`` of every needed passage's cache, computed once (kept in the workdir)."""
        if (scorer, adapted) not in self._scores:
            path = self.workdir / f"scores-{scorer}{self._tag(adapted)}.safetensors"
            key = self.cache_key(adapted, "compressors", scorer=scorer)
            self._scores[scorer, adapted] = cached_scores(
                path, key, self.token_ids, self.full(adapted), scorer, self.encoder_for(adapted)
            )
        return self._scores[scorer, adapted]

    def build(self, row: RowSpec) -> Path:
        """The row's store (rebuilt each time: building costs seconds, answering minutes)."""
        config = row.index_config(self.args.adaptor)
        path = self.workdir / "stores" / (re.sub(r"[^A-Za-z0-9.-]+", "-", row.name) + self._tag(row.adaptor))
        if path.exists():
            shutil.rmtree(path)
        compressor = config.compressor()
        full = self.full(row.adaptor)
        kept = dict(full)
        if row.method != "none":
            scores = self.scores(row.method.split(":")[-1], row.adaptor and not row.base_scores)
            if row.pool:
                scores = {pid: pool_scores(s, SnapKVCompressor.kernel) for pid, s in scores.items()}
            if row.entity:
                tokenizer = self.lm.tokenizer
                scores = {
                    pid: s * (1.0 + entity_tokens(tokenizer, self.token_ids[pid]).to(s.dtype))
                    for pid, s in scores.items()
                }
            if row.corpus:
                assert isinstance(compressor, AdaptiveBudget), (
                    f"{row.method}: ~corpus pools a global: or adaptive: budget"
                )
                kept = corpus_select(compressor, full, scores)
            else:
                assert isinstance(compressor, (AdaptiveBudget, ScorerCompressor)), f"{row.method} evicts by no score"
                kept = {pid: compressor.select(kv, scores[pid]) for pid, kv in full.items()}
            if row.merge:
                kept = {pid: merge_evicted(kv, kept[pid], scores[pid]) for pid, kv in full.items()}
        indexer = Indexer.from_config(self.lm, config, self.embedder)
        basis = None
        if row.rank is not None:
            basis = self.basis(row.rank)
            calibration = f"{'+'.join(self.args.calibration_articles)}:first-{self.args.calibration_passages}"
            indexer = indexer.with_basis(basis, row.rank, calibration)
        create_store(
            path, indexer.manifest, self.encoder.prefix_kv, basis_to_bytes(basis) if basis is not None else None
        )
        quant = config.quant_config()
        records = [passage_record(self.passages[p], kv, quant, self.vectors[p], basis) for p, kv in kept.items()]
        with StoreWriter(path) as writer:
            writer.add(records)
            writer.write_index()
        return path


def entity_tokens(tokenizer: Any, token_ids: list[int]) -> torch.Tensor:
    """``[n]`` bool: the passage tokens a factoid answer is made of, from the passage's own text
    (query-agnostic): a token holding a digit, a token starting a capitalised word that does not
    open a sentence, and the continuation pieces of such a word."""
    flags: list[bool] = []
    sentence_start, previous_end, previous_entity = True, " ", False
    for piece in (tokenizer.decode([t]) for t in token_ids):
        text = piece.strip()
        if not text:  # whitespace: a newline or space of its own
            flags.append(False)
            previous_end, previous_entity = piece[-1:] or " ", False
            continue
        word_start = piece[0].isspace() or not previous_end.isalnum()
        if any(c.isdigit() for c in text):
            entity = True
        elif word_start:
            entity = text[0].isupper() and not sentence_start
        else:
            entity = previous_entity and text[0].isalnum()
        flags.append(entity)
        sentence_start = text.rstrip("\"')]").endswith((".", "!", "?"))
        previous_end, previous_entity = piece[-1], entity
    return torch.tensor(flags, dtype=torch.bool)


def corpus_select(
    compressor: AdaptiveBudget, full: dict[str, PassageKV], scores: dict[str, torch.Tensor]
) -> dict[str, PassageKV]:
    """``global:``'s pool taken from one passage to the whole store: the same total rows as
    ``compressor.select`` on each passage (the sum of its per-passage budgets), spent on the
    highest scores of any passage, so a passage whose scores are high keeps more rows and one
    whose scores are low fewer. Protected rows are kept as ``select`` keeps them."""
    inner = compressor.inner
    prepared: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    total = 0
    for pid, kv in full.items():
        budget = inner.budget_for(kv)
        ranked = compressor.ranked_scores(kv, scores[pid])
        protected = inner.protected(kv, budget)
        prepared[pid] = (ranked.masked_fill(protected, float("-inf")), protected)
        layers, heads, _ = ranked.shape
        total += layers * heads * min(budget, kv.num_tokens) - int(protected.sum())
    pooled = torch.cat([s.flatten() for s, _ in prepared.values()])
    threshold = pooled.topk(total).values[-1] if total > 0 else torch.tensor(float("inf"))
    return {pid: gather_kept(full[pid], protected | (s >= threshold)) for pid, (s, protected) in prepared.items()}


def merged_values(kv: PassageKV, keep: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    """Values ``[L, H, n, d]`` of ``kv`` with every evicted row merged into a kept one (an ablation
    of issue 16, D2O / CaM style, values only): per layer and KV head, each evicted row goes to the
    kept row whose pre-RoPE key has the highest cosine with its own, and that kept row's value
    becomes the ``scores``-weighted mean of its own and its assigned rows' values. Keys, positions
    and the kept set are unchanged, so the store's bytes are too. ``keep [L, H, n]``: kept rows."""
    valid = kv.valid_mask()
    keep = keep & valid
    zero = torch.zeros(keep.shape)
    weight = scores.float().clamp_min(1e-6)
    own = torch.where(keep, weight, zero)
    incoming = torch.where(valid & ~keep, weight, zero)
    unit = torch.nn.functional.normalize(kv.keys.float(), dim=-1)
    similarity = (unit @ unit.transpose(-1, -2)).masked_fill(~keep.unsqueeze(-2), float("-inf"))
    target = similarity.argmax(-1)  # [L, H, n]: each row's kept row (a kept row's is itself)
    values = kv.values.float()
    num = (values * own.unsqueeze(-1)).scatter_add(
        2, target.unsqueeze(-1).expand_as(values), values * incoming.unsqueeze(-1)
    )
    den = own.scatter_add(2, target, incoming)
    merged = torch.where(keep.unsqueeze(-1), num / den.clamp_min(1e-12).unsqueeze(-1), values)
    return merged.to(kv.values.dtype)


def merge_evicted(full: PassageKV, kept: PassageKV, scores: torch.Tensor) -> PassageKV:
    """``kept`` (a selection of ``full``'s rows) with :func:`merged_values` in place of its values."""
    layers, heads, n = full.keys.shape[:3]
    rows = kept.positions.masked_fill(~kept.valid_mask(), n)  # padding rows to a spare column
    keep = torch.zeros((layers, heads, n + 1), dtype=torch.bool).scatter_(2, rows, True)[..., :n]
    merged = PassageKV(full.keys, merged_values(full, keep, scores), full.positions, full.lengths, full.num_tokens)
    return gather_kept(merged, keep)


def answer_ids(frontier: Frontier, question: Question) -> list[int]:
    return frontier.lm.tokenizer(question.answers[0], add_special_tokens=False)["input_ids"]


def full_reference(frontier: Frontier, engine: Engine) -> dict[str, Any]:
    """Full-prefill answers and teacher-forced log-probabilities, by this run's code (kept in
    the workdir, with the code's digest: :func:`checked_reference`)."""
    path = frontier.workdir / "full.pt"
    if path.is_file():
        return checked_reference(torch.load(path), frontier, path)
    answers, logprobs = [], {}
    for i, (q, pids) in enumerate(zip(frontier.questions, frontier.retrieved, strict=True)):
        entries = [engine.store.entry(pid) for pid in pids]
        answers.append(engine.answer_full(q.question, entries, OPTIONS).answer)
        if i not in frontier.kl_rows:
            continue
        answer = answer_ids(frontier, q)
        prepared = full_prefill(
            engine.context, engine.full_prompt_ids(q.question, entries, OPTIONS), OPTIONS.max_new_tokens
        )
        rows = teacher_forced_logprobs(engine.lm.model, prepared, answer, keep=len(answer) + 1)
        logprobs[i] = rows[:-1].half()  # the rows that predict the answer's tokens
    reference: dict[str, Any] = {"answers": answers, "logprobs": logprobs}
    reference["questions"] = [q.id for q in frontier.questions]
    reference["retrieved"] = frontier.retrieved  # the passages (so the top-k) the answers read
    reference["model"] = frontier.lm.ref
    reference["code"] = library_digest(*REFERENCE_CODE)
    torch.save(reference, path)
    print(f"full prefill: {len(answers)} answers computed", flush=True)
    return reference


def checked_reference(reference: dict[str, Any], frontier: Frontier, path: Path) -> dict[str, Any]:
    """``reference`` if it answers this run's questions over the same retrieved passages with the
    same model and library code; another question set, ``--top-k``, model or code in the same
    workdir is refused, and so is a file written before those were recorded (it cannot be checked)."""
    if "retrieved" not in reference or "model" not in reference:
        raise SystemExit(f"{path} does not record its retrieved passages and model; delete it to compute it again")
    ids = [q.id for q in frontier.questions]
    if reference.get("questions") != ids or len(reference["answers"]) != len(ids):
        raise SystemExit(f"{path} answers other questions than this run's; use another --workdir")
    if reference["retrieved"] != frontier.retrieved or reference["model"] != frontier.lm.ref:
        raise SystemExit(
            f"{path} was computed over other retrieved passages (another --top-k) or with another model than "
            f"this run's ({frontier.lm.ref}, top-{frontier.args.top_k}); use another --workdir"
        )
    if reference.get("code") != library_digest(*REFERENCE_CODE):
        raise SystemExit(
            f"{path} was computed by other library code than this run's (ragcompress/{{{','.join(REFERENCE_CODE)}}}"
            " changed since, or it predates the record): its answers and KL rows may not be this code's; "
            "use another --workdir, or delete it and the results it was compared with"
        )
    return reference


def measure(frontier: Frontier, row: RowSpec, reference: dict[str, Any] | None) -> tuple[dict[str, Any], Engine]:
    """Build the row's store and answer every question over it; the engine stays open for the
    full-prefill reference when ``reference`` is None."""
    t0 = time.perf_counter()
    path = frontier.build(row)
    store = KVStore.open(path)
    engine = Engine(store, frontier.lm, frontier.embedder, OPTIONS)
    engine.warm_up()
    if reference is None:
        reference = full_reference(frontier, engine)
    answers, ttfts, kls, first_kls = [], [], [], []
    for i, (q, pids) in enumerate(zip(frontier.questions, frontier.retrieved, strict=True)):
        entries = [store.entry(pid) for pid in pids]
        got = engine.answer_cached(q.question, entries, OPTIONS)
        answers.append(got.answer)
        ttfts.append(got.ttft_s)
        if i not in frontier.kl_rows:
            continue
        answer = answer_ids(frontier, q)
        prepared = engine.prepare(q.question, entries, OPTIONS)
        ours = teacher_forced_logprobs(engine.lm.model, prepared, answer, keep=len(answer) + 1)[:-1]
        ref = reference["logprobs"][i].float()
        kls.append(float(kl_per_position(ref, ours).mean()))
        first_kls.append(float(kl_per_position(ref[:1], ours[:1]).mean()))
    basis_bytes = store.basis_bytes
    per_token = store.bytes_per_token()
    tokens = sum(e.num_tokens for e in store.catalogue.entries())
    fp16 = float(ModelShape.from_config(frontier.lm.config).fp16_bytes_per_token)
    quality = quality_of(frontier, answers, reference["answers"])
    lowrank = store.manifest.compression.get("lowrank")
    result = {
        "method": row.method,
        "ratio": row.ratio,
        "quant": row.index_config().quant_config().name,
        "group_size": row.group_size,
        "rank": None if row.rank is None else row.rank.as_dict(),
        "ranks_k": lowrank["ranks_k"] if lowrank else None,
        "ranks_v": lowrank.get("ranks_v") if lowrank else None,
        **quality.means(),  # sub_em, f1, agreement
        "kl_full_answer": statistics.fmean(kls),
        "kl_full_first": statistics.fmean(first_kls),
        "kl_questions": len(kls),
        "ttft_s_median": statistics.median(ttfts),
        "bytes_per_token": per_token,
        "basis_bytes": basis_bytes,
        "store_tokens": tokens,
        "compression": fp16 / per_token,
        "answers": answers,
        "per_question_sub_em": quality.sub_em,
        "seconds": time.perf_counter() - t0,
        "load": os.getloadavg(),
    }
    if row.rank is not None:  # the basis's sample (the run-wide ``calibration`` is the latest run's)
        result["calibration_passages"] = frontier.args.calibration_passages
    if row.adaptor:
        result["adaptor"] = frontier.adaptor_provenance()
    store.close()
    return result, engine


REFERENCE_ROW = "none@1/fp16/-"
FULL_PREFILL, PREFIX_CACHED = "full prefill", "prefix-cached full prefill"  # side_by_side_ttft's baselines
# timed runs per question and store, after one untimed warm-up run (bench.alternating_ttft): odd, so
# a question's median is one run (files without "repeats" in their "ttft" were timed with 2 runs and
# no warm-up: their median is the mean of each store's first, colder run and its second)
TTFT_REPEATS = 3


def side_by_side_ttft(frontier: Frontier, names: list[str], questions: int) -> dict[str, Any]:
    """Median TTFT of each row's store over the first ``questions`` questions, one process, one
    new token: per question, one untimed warm-up run of every store and then :data:`TTFT_REPEATS`
    timed runs, the order rotating from run to run and from question to question
    (``bench.alternating_ttft``); full prefill and prefix-cached full prefill of the same passages
    (#9's baselines, the same for every store) alternate with them, so each row's speed-up is
    measured in the same run."""
    from ragcompress.bench import alternating_ttft

    first_token = OPTIONS.replace(max_new_tokens=1)
    engines = {}
    for name in names:
        store = KVStore.open(frontier.build(RowSpec.parse(name)))
        engines[name] = Engine(store, frontier.lm, frontier.embedder, first_token)
        engines[name].warm_up()
    samples: dict[str, list[float]] = {name: [] for name in [*names, FULL_PREFILL, PREFIX_CACHED]}
    for number, (q, pids) in enumerate(list(zip(frontier.questions, frontier.retrieved, strict=True))[:questions]):
        runs = {
            name: (
                lambda e=engine, text=q.question, ids=pids: e.answer_cached(
                    text, [e.store.entry(p) for p in ids], first_token
                )
            )
            for name, engine in engines.items()
        }
        any_engine = engines[names[0]]
        entries = [any_engine.store.entry(p) for p in pids]
        runs[FULL_PREFILL] = lambda e=any_engine, text=q.question, got=entries: e.answer_full(text, got, first_token)
        runs[PREFIX_CACHED] = lambda e=any_engine, text=q.question, got=entries: e.answer_prefix_cached(
            text, got, first_token
        )
        medians, _ = alternating_ttft(runs, TTFT_REPEATS, first=number)
        for name, value in medians.items():
            samples[name].append(value)
    return {
        "rows": names,
        "questions": questions,
        "ttft_s_median": {name: statistics.median(v) for name, v in samples.items()},
        "baselines": [FULL_PREFILL, PREFIX_CACHED],
        "repeats": TTFT_REPEATS,
        "warmup": 1,
        "load": os.getloadavg(),
    }


def utc_date(seconds: float | None = None) -> str:
    """``seconds`` since the epoch (now when None) as the results files record dates."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(seconds))


def ttft_date(data: dict[str, Any], path: Path) -> str:
    """When a results file's side-by-side TTFT run ran: its own date, else its rows' run's, else
    (files from before either was recorded) the file's modification time."""
    return data["ttft"].get("date") or data.get("meta", {}).get("date") or utc_date(path.stat().st_mtime)


def publish(sources: list[Path], out: Path) -> dict[str, Any]:
    """Merge results files of one model and split (same questions) into ``out`` for the docs:
    per row, 95 % bootstrap intervals of sub-EM, and paired comparisons (bootstrap interval of
    the difference, exact McNemar) against the uncompressed fp16 store and against full prefill;
    the answers themselves stay in the run's workdir."""
    from ragcompress.stats import bootstrap_ci, paired_comparison

    merged: dict[str, Any] = {}
    earlier = json.loads(out.read_text()) if out.is_file() else {}
    timed: tuple[str, dict[str, Any]] | None = None  # (date, block): the newest side-by-side TTFT run
    for source in sources:
        data = json.loads(source.read_text())
        for name, row in data["rows"].items():  # rows measured before rows recorded their basis's sample
            if row.get("rank") and "calibration_passages" not in row:
                published = earlier.get("rows", {}).get(name)
                row["calibration_passages"] = (
                    published.get("calibration_passages", earlier["calibration"]["passages"])
                    if published
                    else data["calibration"]["passages"]
                )
        if merged and data["key"] != merged["key"]:
            raise SystemExit(f"{source} answered other questions than {sources[0]}")
        rows = {**merged.get("rows", {}), **data["rows"]}
        if data.get("ttft"):  # ratios hold within one run only: the newest run's block, whole
            date = ttft_date(data, source)
            if timed is None or date > timed[0]:
                timed = (date, data["ttft"])
        merged = {**merged, **data, "rows": rows}
    merged.pop("ttft", None)
    if timed is not None:
        merged["ttft"] = timed[1]
    reference_row = REFERENCE_ROW if REFERENCE_ROW in merged["rows"] else CORE272_ROW
    reference = merged["rows"][reference_row]["per_question_sub_em"]
    full = merged["full"]["per_question_sub_em"]
    for row in merged["rows"].values():
        outcomes = row["per_question_sub_em"]
        row["sub_em_ci95"] = list(bootstrap_ci(outcomes))
        row["vs_uncompressed"] = paired_comparison(outcomes, reference)
        row["vs_full"] = paired_comparison(outcomes, full)
        row.pop("answers", None)
    merged["full"]["sub_em_ci95"] = list(bootstrap_ci(full))
    merged["full"].pop("answers", None)
    merged.pop("retrieved", None)
    merged["reference_row"] = reference_row
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(merged, indent=1))
    return merged


def pareto(points: list[tuple[float, float, str]], lower_is_better: bool) -> list[tuple[float, float, str]]:
    """The points no other point beats on both axes (more compression *and* a better y), sorted by
    compression: the frontier a reader picks a setting from."""
    sign = 1.0 if lower_is_better else -1.0
    best = float("inf")
    front = []
    for x, y, name in sorted(points, key=lambda p: (-p[0], sign * p[1])):
        if sign * y < best:
            best = sign * y
            front.append((x, y, name))
    return sorted(front)


def plot(results: list[dict[str, Any]], path: Path) -> None:
    """Compression against fp16 (x, log) against KL to full prefill and sub-EM (% of
    uncompressed), one row of panels per model; every measured row is a point, and only the
    points on the frontier (nothing both smaller and better) are named and joined, so the plot
    stays readable as rows accumulate. The table beside it (compression.md) names every row."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(results), 2, figsize=(11, 4.2 * len(results)), squeeze=False)
    for colour, (data, (kl_ax, em_ax)) in enumerate(zip(results, axes, strict=True)):
        rows = data["rows"]
        reference = rows[data["reference_row"]]["sub_em"] or float("nan")
        scale = {"kl_full_answer": 1.0, "sub_em": 100 / reference}
        panels = (
            (kl_ax, "kl_full_answer", True, "KL(full prefill || row), nats/token"),
            (em_ax, "sub_em", False, "sub-EM, % of uncompressed fp16"),
        )
        for ax, field, lower_is_better, label in panels:
            measured = {name: row for name, row in rows.items() if row[field] is not None}
            for marker, with_rank in (("o", False), ("s", True)):
                shown = [row for row in measured.values() if (row["rank"] is not None) == with_rank]
                ax.plot(
                    [row["compression"] for row in shown],
                    [scale[field] * row[field] for row in shown],
                    marker,
                    color=f"C{colour}",
                    alpha=0.45,
                    label="low-rank keys/values" if with_rank else "full rank",
                )
            points = [(row["compression"], scale[field] * row[field], name) for name, row in measured.items()]
            front = pareto(points, lower_is_better)
            ax.plot([p[0] for p in front], [p[1] for p in front], "-", color=f"C{colour}", linewidth=1)
            for x, y, name in front:
                ax.annotate(
                    name.replace("global:", "g:"), (x, y), fontsize=6, xytext=(3, 3), textcoords="offset points"
                )
            for target in (12, 24):
                ax.axvline(target, color="grey", linestyle=":", linewidth=1)
            ax.set_xscale("log")
            ax.set_xlabel("x fewer bytes than fp16 (bases and scales counted); dotted: 12x, 24x")
            ax.set_ylabel(label)
            ax.set_title(f"{data['model']}, {data['n']} questions", fontsize=9)
        em_ax.axhline(95, color="grey", linestyle="--", linewidth=1)
        em_ax.set_ylim(bottom=0)
        em_ax.legend(fontsize=7, loc="lower left")
    fig.suptitle(
        "Eviction x rank x bits on SQuAD-dev questions the bases were not fitted on (named: the frontier)", fontsize=10
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="qwen2.5-coder-0.5b")
    parser.add_argument("--rows", nargs="+", default=[])
    parser.add_argument(
        "--publish",
        nargs=2,
        action="append",
        metavar=("RESULTS_GLOB", "OUT"),
        help="merge <workdir> results files matching the glob into OUT (docs/results/...), then plot every OUT",
    )
    parser.add_argument("--plot", type=Path, default=Path("docs/img/lowrank-frontier.png"))
    parser.add_argument("--ttft", nargs="+", default=None, help="rows whose TTFT is measured side by side")
    parser.add_argument("--ttft-questions", type=int, default=20)
    parser.add_argument(
        "--core272-reference",
        action="store_true",
        help="add the int8 store's cached answers from runs/core272-ck as a row (the reference without an fp16 row)",
    )
    parser.add_argument("--split", choices=("dev", "eval"), default="eval")
    parser.add_argument("--questions", type=int, default=0, help="at most this many (0: all of the split)")
    parser.add_argument("--top-k", type=int, default=3)
    parser.add_argument("--kl-questions", type=int, default=40, help="evenly spaced questions that get the KL")
    parser.add_argument("--calibration-articles", nargs="+", default=["Yuan_dynasty", "Genghis_Khan"])
    parser.add_argument(
        "--eval-articles",
        nargs="+",
        default=None,
        help="only these eval-split articles' questions (e.g. those an adaptor trained on more articles never saw); "
        "give such a run its own --workdir",
    )
    parser.add_argument(
        "--outside",
        type=int,
        default=0,
        help="only the split's questions not among the N that --questions N picks (a confirmation sample for a "
        "setting chosen on those); give such a run its own --workdir",
    )
    parser.add_argument("--calibration-passages", type=int, default=64)
    parser.add_argument("--workdir", type=Path, default=None, help="default runs/lowrank/<model>")
    parser.add_argument("--out", type=Path, default=None, help="results JSON (default <workdir>/<split>/results.json)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--adaptor", type=Path, default=None, help="adaptor folder for +adaptor rows (trained off the eval split)"
    )
    args = parser.parse_args()
    if args.publish:
        published = [publish(sorted(map(Path, glob.glob(pattern))), Path(out)) for pattern, out in args.publish]
        plot(published, args.plot)
        return
    torch.set_num_threads(args.threads)
    # the code that runs is the tree at the start: a commit during a run of hours is not its code
    args.git = git_revision()
    args.workdir = args.workdir or Path("runs/lowrank") / model_slug(args.model)
    rows = [RowSpec.parse(name) for name in args.rows]
    frontier = Frontier(args)
    out = args.out or frontier.workdir / "results.json"
    results: dict[str, Any] = json.loads(out.read_text()) if out.is_file() else {}
    key = {"questions": [q.id for q in frontier.questions], "top_k": args.top_k, "split": args.split}
    if results.get("key") != key:
        results = {"key": key, "rows": {}}
    reference: dict[str, Any] | None = None
    if (frontier.workdir / "full.pt").is_file():
        reference = checked_reference(torch.load(frontier.workdir / "full.pt"), frontier, frontier.workdir / "full.pt")
    if args.ttft:
        results["ttft"] = side_by_side_ttft(frontier, args.ttft, args.ttft_questions)
        results["ttft"]["date"] = utc_date()
        out.write_text(json.dumps(results, indent=1))
        print(json.dumps(results["ttft"]), flush=True)
    for row in rows:
        if row.name in results["rows"]:
            continue
        result, engine = measure(frontier, row, reference)
        if reference is None:
            reference = torch.load(frontier.workdir / "full.pt")
        # each row names the code and threads that measured it: a resumed run's rows can span
        # several revisions, and the file's own meta.git is only the last writer's
        result["run"] = row_run(git=args.git)  # the revision this process loaded, not one committed since
        results["rows"][row.name] = result
        if args.core272_reference and CORE272_ROW not in results["rows"]:
            results["rows"][CORE272_ROW] = core272_cached_row(
                frontier, torch.load(frontier.workdir / "full.pt")["answers"]
            )
        answers = reference["answers"]
        full = quality_of(frontier, answers, answers)
        results["full"] = {
            "sub_em": full.means()["sub_em"],
            "f1": full.means()["f1"],
            "answers": answers,
            "per_question_sub_em": full.sub_em,
        }
        results.update(
            model=frontier.lm.ref,
            n=len(frontier.questions),
            retrieved=frontier.retrieved,
            calibration={"articles": args.calibration_articles, "passages": args.calibration_passages},
            fp16_bytes_per_token=ModelShape.from_config(frontier.lm.config).fp16_bytes_per_token,
            meta={
                **results_meta({**vars(args), "questions": len(frontier.questions)}),
                "date": utc_date(),
                "load": os.getloadavg(),
                "measured_by": measured_by(r.get("run", {}) for r in results["rows"].values()),
            },
        )
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=1))
        print(
            f"{row.name}: sub-EM {result['sub_em']:.3f} (full {results['full']['sub_em']:.3f}) "
            f"agreement {result['agreement']:.2f} KL {result['kl_full_answer']:.3f} "
            f"{result['compression']:.1f}x TTFT {result['ttft_s_median']:.3f}s ({result['seconds']:.0f} s)",
            flush=True,
        )
        del engine


if __name__ == "__main__":
    main()
