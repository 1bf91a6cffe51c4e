"""Quality measurement against the full-prefill baseline (DESIGN §4).

For each question the same retrieved passages are answered twice in one process — from the
stored caches and by a plain full-text prefill of the same prompt — so every metric compares
like with like. Metrics follow SQuAD's answer normalisation.
"""

from __future__ import annotations

import json
import re
import statistics
import string
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from ragcompress.errors import InputError
from ragcompress.interrupts import raise_if_stopped
from ragcompress.runtime.engine import Answer, Engine
from ragcompress.runtime.options import AnswerOptions
from ragcompress.stats import bootstrap_ci, paired_comparison

T = TypeVar("T")

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = set(string.punctuation)


def normalize_answer(text: str) -> str:
    """SQuAD normalisation: lower case, drop punctuation and articles, squeeze spaces."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCT)
    return " ".join(_ARTICLES.sub(" ", text).split())


def sub_em(prediction: str, golds: list[str]) -> float:
    """1.0 when a normalised gold answer occurs in the normalised prediction."""
    pred = f" {normalize_answer(prediction)} "
    return float(any(f" {normalize_answer(g)} " in pred for g in golds if normalize_answer(g)))


def f1(prediction: str, golds: list[str]) -> float:
    """Best token-overlap F1 against any gold answer (SQuAD)."""
    pred_tokens = normalize_answer(prediction).split()
    best = 0.0
    for gold in golds:
        gold_tokens = normalize_answer(gold).split()
        common = sum((Counter(pred_tokens) & Counter(gold_tokens)).values())
        if common:
            precision, recall = common / len(pred_tokens), common / len(gold_tokens)
            best = max(best, 2 * precision * recall / (precision + recall))
    return best


def question_quality(prediction: str, golds: list[str], reference: str) -> dict[str, float]:
    """One question's outcomes: ``sub_em`` and ``f1`` of ``prediction`` against ``golds``, and
    ``agree``, 1.0 when it is ``reference``'s text (full prefill's answer, as a rule).

    Agreement compares the decoded answers as the engine returns them (``Engine.decode``: special
    tokens skipped, surrounding whitespace stripped), character for character and not
    normalised: an answer reworded or punctuated otherwise is another answer. Token ids are not
    compared: two id sequences that decode to the same text are the same answer to a reader."""
    return {"sub_em": sub_em(prediction, golds), "f1": f1(prediction, golds), "agree": float(prediction == reference)}


@dataclass(frozen=True)
class Quality:
    """One setting's per-question outcomes over a list of questions, in question order
    (:func:`question_quality`'s, the lists of each). Every quality figure of a setting (``eval``,
    the benchmarks) is one of these lists, its mean (:meth:`means`) or its interval (:meth:`ci95`)."""

    sub_em: list[float]
    f1: list[float]
    agree: list[float]

    def __post_init__(self) -> None:
        if not len(self.sub_em) == len(self.f1) == len(self.agree):
            raise ValueError(
                f"quality lists of {len(self.sub_em)}, {len(self.f1)} and {len(self.agree)} questions; "
                "each needs one outcome per question"
            )

    @classmethod
    def of(cls, predictions: Sequence[str], golds: Sequence[list[str]], references: Sequence[str]) -> Quality:
        """The outcomes of ``predictions`` against ``golds`` and ``references``, paired by position:
        lists of other lengths are an error (pairing the first ones and dividing by all of them
        made a short reference list read as lower agreement)."""
        if not len(predictions) == len(golds) == len(references):
            raise ValueError(
                f"{len(predictions)} answers, {len(golds)} gold lists and {len(references)} reference answers: "
                "one of each per question, in the same order"
            )
        rows = [question_quality(p, g, r) for p, g, r in zip(predictions, golds, references, strict=True)]
        return cls([r["sub_em"] for r in rows], [r["f1"] for r in rows], [r["agree"] for r in rows])

    def means(self) -> dict[str, float]:
        """``sub_em``, ``f1`` and ``agreement``: the means over the questions."""
        return {
            "sub_em": statistics.fmean(self.sub_em),
            "f1": statistics.fmean(self.f1),
            "agreement": statistics.fmean(self.agree),
        }

    def ci95(self) -> dict[str, list[float]]:
        """The 95 % bootstrap interval of each mean (:func:`ragcompress.stats.bootstrap_ci`), keyed
        as :meth:`means`."""
        return {
            "sub_em": list(bootstrap_ci(self.sub_em)),
            "f1": list(bootstrap_ci(self.f1)),
            "agreement": list(bootstrap_ci(self.agree)),
        }


def article_key(name: str) -> str:
    """One spelling of an article's name: training records an article by its passages' title
    where they have one ("Yuan dynasty"), a question names it by its passage id's prefix
    ("Yuan_dynasty"); compare ``article_key`` of both."""
    return name.replace(" ", "_").casefold()


@dataclass(frozen=True)
class Question:
    id: str
    question: str
    answers: list[str]
    passage_id: str | None = None

    @property
    def article(self) -> str | None:
        """The article a SQuAD-style question is about: its ``passage_id``'s part before ``#``."""
        return None if self.passage_id is None else self.passage_id.split("#")[0]


def read_questions(path: str | Path, limit: int | None = None, *, scored: bool = False) -> list[Question]:
    """JSONL of ``{"id", "question", "answers": [str], "passage_id"?}``; errors name the line.

    ``scored``: every question must have an answer to score against (one that is not empty
    after normalisation: :func:`sub_em` skips those), as ``eval`` needs; ``bench`` and training
    read questions without, and take a line without ``answers`` as one with none."""
    path = Path(path)
    if path.is_dir():
        raise InputError(f"questions file {path} is a folder; give the JSONL file of questions")
    if not path.is_file():
        raise InputError(f"questions file {path} does not exist")
    questions: list[Question] = []
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, start=1):
            where = f"{path}:{number}"
            try:
                line = raw.decode("utf-8")
                if not line.strip():
                    continue
                record = json.loads(line)
                answers = record["answers"] if scored else record.get("answers", [])
                item = Question(str(record["id"]), record["question"], answers, record.get("passage_id"))
            except (ValueError, KeyError, TypeError) as exc:
                expected = '"answers": [...]' if scored else '"answers"?: [...]'
                raise InputError(f'{where}: expected {{"id", "question", {expected}}} ({exc})') from None
            if not isinstance(item.question, str) or not item.question.strip():
                raise InputError(f"{where}: empty question")
            if not isinstance(item.answers, list) or not all(isinstance(a, str) for a in item.answers):
                raise InputError(f'{where}: "answers" must be a list of strings, got {item.answers!r}')
            if scored and not any(normalize_answer(a) for a in item.answers):
                raise InputError(f"{where}: question {item.id!r} has no answer to score against ({item.answers!r})")
            if item.passage_id is not None and not isinstance(item.passage_id, str):
                raise InputError(f'{where}: "passage_id" must be a string (ARTICLE#N), got {item.passage_id!r}')
            questions.append(item)
            if limit is not None and len(questions) >= limit:
                break
    if not questions:
        raise InputError(f"questions file {path} holds no questions")
    return questions


def select_questions(
    questions: list[Question], sample: int | None = None, articles: Sequence[str] = (), outside: int | None = None
) -> list[Question]:
    """The questions of ``articles`` (all when empty), then ``sample`` of them evenly spaced over
    the file (which is grouped by article, so every article is covered). The benchmarks' samples
    (``--sample N --articles A``) are drawn here, so ``ragcompress eval`` can ask the same ones.

    ``outside``: first drop the ``outside`` questions that ``sample=outside`` would pick, so a
    setting chosen on one sample is confirmed on the questions of the same articles it never saw."""
    if articles:
        wanted = set(articles)
        if any(q.passage_id is None for q in questions):
            raise InputError("selecting questions by article needs a passage_id (ARTICLE#N) on every question")
        known = sorted({q.article for q in questions if q.article})
        questions = [q for q in questions if q.article in wanted]
        if not questions:
            hint = " (name an article without its #N)" if any("#" in a for a in wanted) else ""
            shown = ", ".join(known[:8]) + (f" and {len(known) - 8} more" if len(known) > 8 else "")
            raise InputError(f"no question of the articles {sorted(wanted)}{hint}; the file's articles: {shown}")
    if outside:
        chosen = {q.id for q in evenly_spaced(questions, outside)}
        questions = [q for q in questions if q.id not in chosen]
        if not questions:
            raise InputError(f"no question is left outside the {outside} that --sample {outside} picks")
    return evenly_spaced(questions, sample)


def evenly_spaced(items: Sequence[T], count: int | None) -> list[T]:
    """``count`` of ``items`` spread over the whole sequence, in order; all of them when ``count``
    is None or at least their number (spacing more picks than there are repeated some and skipped
    the last ones). Pick ``i`` is item ``floor(i * len / count)``: the first item always, the last
    one only when ``count`` divides evenly. Every published ``--sample N`` and ``--outside N``
    figure was drawn with this rounding, so it stays as it is (another rounding would ask other
    questions)."""
    if count is None or count >= len(items):
        return list(items)
    step = len(items) / count
    return [items[int(i * step)] for i in range(count)]


@dataclass(frozen=True)
class QuestionResult:
    question: Question
    retrieved: list[str]
    cached: Answer
    full: Answer


def iter_eval(
    engine: Engine, questions: list[Question], top_k: int, options: AnswerOptions | None = None
) -> Iterator[QuestionResult]:
    """Answer every question both ways over the same retrieved passages (``options``: the
    engine's by default; the baseline decodes with the same ``max_new_tokens``). Which way goes
    first alternates from one question to the next, so that neither side's TTFT always follows
    the other's (whose reads and allocations it may inherit); greedy answers do not depend on it.
    Each side answers once: its TTFT (``Answer.ttft_s``: the request's start to the first token,
    prompt tokenized before on both sides) is one run, not warmed up per question as
    ``ragcompress bench``'s medians are."""
    for number, item in enumerate(questions):
        raise_if_stopped()  # a SIGTERM or Ctrl-C whose KeyboardInterrupt a finalizer swallowed
        entries = engine.retrieve(item.question, top_k)
        if number % 2 == 0:
            full = engine.answer_full(item.question, entries, options)
            cached = engine.answer_cached(item.question, entries, options)
        else:
            cached = engine.answer_cached(item.question, entries, options)
            full = engine.answer_full(item.question, entries, options)
        yield QuestionResult(item, [e.id for e in entries], cached, full)


def summarize(
    engine: Engine, results: list[QuestionResult], top_k: int | None = None, options: AnswerOptions | None = None
) -> dict[str, Any]:
    """The DESIGN §3 ``eval`` JSON for a list of results (extended with ``torch_threads`` and
    ``device``), and what was measured: ``top_k`` (``recall_at_k``'s k; when given), the answer
    ``options`` of :func:`iter_eval` (the engine's by default) as the cached path applied them
    (the store's calibrated temperature included), and the model's ``dtype``."""
    import torch

    n = len(results)
    full_quality, cached_quality = quality_of(results)

    def side(quality: Quality, pick: Callable[[QuestionResult], Answer]) -> dict[str, float]:
        means = quality.means()
        return {
            "sub_em": means["sub_em"],
            "f1": means["f1"],
            "ttft_s_median": statistics.median(pick(r).ttft_s for r in results),
            "ttft_s_mean": statistics.fmean(pick(r).ttft_s for r in results),
        }

    full, compressed = side(full_quality, lambda r: r.full), side(cached_quality, lambda r: r.cached)
    with_gold = [r for r in results if r.question.passage_id is not None]
    recall = (sum(r.question.passage_id in r.retrieved for r in with_gold) / len(with_gold)) if with_gold else None
    used = {pid for r in results for pid in r.retrieved}
    stored = engine.store.bytes_per_token([engine.store.entry(pid) for pid in sorted(used)])
    fp16 = float(engine.store.shape.fp16_bytes_per_token)
    return {
        "n": n,
        "recall_at_k": recall,
        "full": full,
        "compressed": compressed,
        "agreement": cached_quality.means()["agreement"],
        "ttft_speedup": full["ttft_s_median"] / compressed["ttft_s_median"],
        # mean against mean: the cost of the answers that fell back to full prefill
        # (AnswerOptions.fallback_margin) shows here; the medians would hide it
        "ttft_speedup_mean": full["ttft_s_mean"] / compressed["ttft_s_mean"],
        "fallback_rate": sum(r.cached.backend == "fallback" for r in results) / n,
        # the speedup depends on it: full prefill uses more threads better than the cached path does
        "torch_threads": torch.get_num_threads(),
        "device": str(engine.lm.model.device),
        "kv_bytes_per_token": {"fp16": fp16, "stored": stored},
        "compression": fp16 / stored,
        **({} if top_k is None else {"top_k": top_k}),
        "options": engine.calibrated(options or engine.options).to_json(),
        "dtype": engine.lm.dtype_name,
    }


def quality_of(results: list[QuestionResult]) -> tuple[Quality, Quality]:
    """Full prefill's outcomes and the cached answers', both against full prefill's answers."""
    golds = [r.question.answers for r in results]
    full = [r.full.answer for r in results]
    return Quality.of(full, golds, full), Quality.of([r.cached.answer for r in results], golds, full)


def outcomes(results: list[QuestionResult]) -> list[dict[str, Any]]:
    """Per-question outcomes (what paired tests between settings need), in question order."""
    full, cached = quality_of(results)
    return [
        {"id": r.question.id, "full_sub_em": full_em, "cached_sub_em": cached_em, "agree": agree}
        for r, full_em, cached_em, agree in zip(results, full.sub_em, cached.sub_em, cached.agree, strict=True)
    ]


def intervals(results: list[QuestionResult]) -> dict[str, Any]:
    """95 % bootstrap intervals of sub-EM (both sides) and agreement, and the paired comparison
    of cached against full-prefill sub-EM over the same questions (``ragcompress.stats``)."""
    full, cached = quality_of(results)
    cached_ci = cached.ci95()
    return {
        "ci95": {
            "full_sub_em": full.ci95()["sub_em"],
            "compressed_sub_em": cached_ci["sub_em"],
            "agreement": cached_ci["agreement"],
        },
        "compressed_vs_full_sub_em": paired_comparison(cached.sub_em, full.sub_em),
    }
