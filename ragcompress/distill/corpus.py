"""The training data of a run: passages and questions split by article into a training and a
held-out side (:class:`Corpus`), and the contexts each question is trained on (:func:`views_of`).

The split is by article, never by passage: a held-out question's answer must not sit in a
training passage of the same article. Examples are built by retrieval over each side's own
passages, so the adaptor learns passages beside the ones retrieval puts next to them.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ragcompress.distill.config import TrainConfig
from ragcompress.errors import InputError
from ragcompress.evaluation import Question, read_questions
from ragcompress.indexing.inputs import PassageInput, iter_passages
from ragcompress.kv.rope import position_limit
from ragcompress.models import LoadedModel
from ragcompress.retrieval import Embedder, exact_top_k

VIEW_SEPARATOR = "@view"  # example id of a question's extra view: "<question id>@view<v>"


def split_articles(titles: list[str], val_articles: list[str] | None = None) -> list[str]:
    """Held-out articles: ``val_articles`` if given (a title repeated counts once, so neither the
    data hash nor a resumed run's split check depends on the repetition), else every third title
    in sorted order."""
    ordered = sorted(set(titles))
    chosen = list(dict.fromkeys(val_articles)) if val_articles else ordered[::3]
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
    """sha256 of the training data files, the split and (if any) every file of ``extra_passages``:
    what the teacher files, ``extra-questions.jsonl`` and the checkpoint record, so that none of
    them is reused on other data."""
    digest = hashlib.sha256()
    files = [passages_path, questions_path]
    if extra_passages:
        extra = Path(extra_passages)
        if not extra.exists():  # hashed before the extra passages are read (iter_passages' message)
            raise InputError(f"input {extra} does not exist")
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
        return [list(row) for row in exact_top_k(question_vectors, self.vectors, k)]


def load_corpora(
    passages: list[PassageInput], questions_path: Path, val_articles: list[str], embedder: Embedder
) -> tuple[Corpus, Corpus]:
    """The training and held-out sides of ``passages`` and their questions, split by article."""
    questions = read_questions(questions_path)
    check_question_ids(questions, questions_path)
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


def check_question_ids(questions: list[Question], path: Path) -> None:
    """Refuse a question id given twice, or holding :data:`VIEW_SEPARATOR`: teacher examples are
    keyed by question id (and a view's by ``<id>@view<v>``), so one of two questions sharing an id
    was silently dropped, and ``q@view1`` would be taken for another view of question ``q``."""
    # the line of each question (read_questions skips blank lines) to name where the id is
    lines = [n for n, raw in enumerate(path.read_bytes().split(b"\n"), start=1) if raw.decode("utf-8").strip()]
    where = lines if len(lines) == len(questions) else [0] * len(questions)
    seen: dict[str, list[int]] = {}
    for question, line in zip(questions, where, strict=True):
        if VIEW_SEPARATOR in question.id:
            raise InputError(
                f"{path}{f':{line}' if line else ''}: question id {question.id!r} holds {VIEW_SEPARATOR!r}, which names a question's extra "
                "views (--views) in training; rename the question"
            )
        seen.setdefault(question.id, []).append(line)
    for qid, numbers in seen.items():
        if len(numbers) > 1:
            on = f" (lines {', '.join(map(str, numbers))})" if all(numbers) else f" ({len(numbers)} times)"
            raise InputError(
                f"{path}: question id {qid!r} is given more than once{on}; training keys its examples by question "
                "id, so all but one would be dropped: give each question its own id"
            )


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


def check_alone(lm: LoadedModel, needs: Iterable[tuple[PassageInput, int]], use: str) -> None:
    """Refuse the first passage of ``needs`` (each with the positions a step run on it alone
    reaches: ``use`` says which step) past the positions ``lm`` handles
    (:func:`~ragcompress.kv.rope.position_limit`), before the step runs on any. Past them LongRoPE
    rotates the whole call with its long factors (dynamic NTK: a rescaled base), so the step would
    compute what the model trained on never does, silently: the base model's question about an
    extra passage (``synthetic.py``), or a cache a ``--kv-rank`` student's basis is fitted on
    (``basis.py``). Training examples are checked as prompts (``teacher.check_positions``)."""
    limit = position_limit(lm.config)
    for passage, needed in needs:
        if needed > limit:
            raise InputError(
                f"passage {passage.id} needs {needed} positions {use}, but {lm.ref} handles {limit}; split it"
            )


# an extra passage this long found inside a held-out passage is a piece of a copy of it
COPY_CHARS = 200


def _plain(text: str) -> str:
    """``text`` with its whitespace runs collapsed and case folded, for finding one text in another."""
    return " ".join(text.split()).casefold()


def held_out_copy(
    candidates: list[PassageInput], held_out_passages: list[PassageInput]
) -> tuple[PassageInput, PassageInput] | None:
    """The first (candidate, held-out passage) where the candidate holds the held-out passage's
    text, or is a piece of it of :data:`COPY_CHARS` or more (a copy chunked otherwise), whitespace
    and case aside: training on it would be training on a held-out article under another name."""
    texts = [(p, _plain(p.text)) for p in held_out_passages]
    for passage in candidates:
        plain = _plain(passage.text)
        for held, text in texts:
            if (text and text in plain) or (len(plain) >= COPY_CHARS and plain in text):
                return passage, held
    return None


def with_extra_passages(
    lm: LoadedModel,
    corpus: Corpus,
    config: TrainConfig,
    embedder: Embedder,
    out: Path,
    progress: bool,
    held_out_passages: list[PassageInput],
    data_sha256: str,
) -> Corpus:
    """The training corpus plus ``config.extra_passages`` and the base model's questions about
    them (``synthetic.py``, cached in ``out/extra-questions.jsonl`` under ``data_sha256``): more examples, from other
    text, retrieved over the union so that a question's passages may come from either. Extra
    passages of a held-out article are refused by its name, and any holding the text of one of
    ``held_out_passages`` (under another title: a copy of an article) by that text."""
    from ragcompress.distill.synthetic import synthetic_questions

    assert config.extra_passages is not None
    extra = list(iter_passages(config.extra_passages))
    held_out = sorted({p.article for p in extra} & set(config.val_articles))
    if held_out:
        raise InputError(f"--extra-passages {config.extra_passages} holds held-out articles {held_out}")
    if copy := held_out_copy(extra, held_out_passages):
        raise InputError(
            f"--extra-passages {config.extra_passages}: passage {copy[0].id} holds the text of held-out "
            f"passage {copy[1].id} (article {copy[1].article}); remove it, or hold out other articles"
        )
    clash = sorted({p.id for p in extra} & {p.id for p in corpus.passages})
    if clash:
        raise InputError(f"--extra-passages {config.extra_passages} repeats passage ids of --passages: {clash[:3]}")
    if viewlike := [p.id for p in extra if VIEW_SEPARATOR in p.id]:  # its question's id would name a view
        raise InputError(
            f"--extra-passages {config.extra_passages}: passage id {viewlike[0]!r} holds {VIEW_SEPARATOR!r}, which "
            "names a question's extra views (--views) in training; rename it"
        )
    questions = synthetic_questions(
        lm, extra, config.extra_questions, out / "extra-questions.jsonl", data_sha256, progress
    )
    vectors = embedder.embed([p.text for p in extra])
    return Corpus(corpus.passages + extra, corpus.questions + questions, np.vstack([corpus.vectors, vectors]))


def question_of(example_id: str) -> str:
    """The question id of an example id (``TrainConfig.views``)."""
    return example_id.split(VIEW_SEPARATOR)[0]


def views_of(question_id: str, retrieved: list[int], k: int, views: int) -> list[tuple[str, list[int]]]:
    """(example id, passage rows) of each view of one question: ``retrieved[:k]`` in retrieval
    order, then ``views - 1`` draws of ``k`` of ``retrieved`` (its ``2k`` nearest) in a drawn
    order, seeded by the question id so that a resumed or repeated run draws the same. A side of
    fewer than ``k`` passages retrieves them all (``exact_top_k``), as the first view holds them:
    each other view is then all of them in a drawn order (``rng.sample`` of ``k`` had raised
    "Sample larger than population" after the model loaded); with ``k`` or more nothing changes."""
    out = [(question_id, list(retrieved[:k]))]
    rng = random.Random(question_id)
    drawn = min(k, len(retrieved))
    for view in range(1, views):
        out.append((f"{question_id}{VIEW_SEPARATOR}{view}", rng.sample(list(retrieved), drawn)))
    return out
