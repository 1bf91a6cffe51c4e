"""The teacher's examples of a run and their files in ``--out``.

Computing the teacher is the slowest part of a run's start (one full prefill and a greedy answer
per example), so each example is saved as soon as it is computed (``teacher-train.part``,
``teacher-val.part``: a killed run resumes from them) and the finished set once
(``teacher.safetensors``). Those files hold the base model's distributions under this run's
settings, so every one records the base model's fingerprint, the settings it was computed
with (:func:`teacher_settings`) and the training data (``training_data_sha256``: the passages
and questions an example's id, text and retrieved neighbours come from), and a run refuses one
that records another model, other settings, other data, another split, other questions
(``--train-questions``, ``--val-examples``), or nothing it could be checked by
(:func:`check_teacher_file`, :func:`check_teacher_data`, :func:`check_split`,
:func:`check_chosen`): it would distil from it as if it were its own. A file from before the
data was recorded in it is checked by the rest only. Every example's prompts, and the probe a
compressed student scores its passages with, are checked against the model's positions before
the first teacher pass (:func:`check_positions`).
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from ragcompress.compressors.base import check_fits
from ragcompress.distill.checkpoint import load_tree, save_tree
from ragcompress.distill.config import TrainConfig
from ragcompress.distill.corpus import Corpus, question_of, views_of
from ragcompress.distill.distiller import MAX_ANSWER, Distiller, passage_key
from ragcompress.distill.objective import Example
from ragcompress.distill.resume import check_run, settings_differ
from ragcompress.errors import InputError
from ragcompress.evaluation import select_questions
from ragcompress.indexing.inputs import PassageInput
from ragcompress.interrupts import raise_if_stopped
from ragcompress.kv.rope import position_limit

if TYPE_CHECKING:
    from ragcompress.retrieval import Embedder


def teacher_settings(distiller: Distiller, k: int) -> dict[str, int]:
    """What a teacher example is computed with besides the model and its question: the passages
    retrieved for it, the teacher tokens kept per position and the continuation's length."""
    return {"top_k": k, "teacher_top": distiller.teacher_top, "continuation": distiller.continuation}


def check_teacher(path: Path, saved: dict[str, Any], settings: dict[str, int]) -> None:
    """Refuse teacher examples computed with other :func:`teacher_settings`: a run would distil
    from them while recording its own."""
    recorded = saved.get("teacher_settings")
    if recorded is not None and recorded != settings:
        differ = ", ".join(settings_differ(recorded, settings))
        raise InputError(
            f"{path} holds teacher examples computed with {differ}; train with those settings, or delete "
            f"{path.name} (or use another --out folder) to compute them again"
        )


def check_teacher_data(path: Path, saved: dict[str, Any], data_sha256: str | None, *, required: bool = False) -> None:
    """Refuse teacher examples computed from other training data: keyed by question id, they
    would hold an edited question's old text, or passages retrieved before one was added, while
    the adaptor recorded the new data's hash (a run killed before its first checkpoint has no
    checkpoint whose data check would notice). Unchecked where either side records none, unless
    ``required``: then a file that records none is refused too, for examples that are scored
    rather than trained from (``benchmarks/distill_eval.py``'s held-out teacher, built once and
    cheap to build again, where an edited question's old teacher would be scored as the new one's)."""
    recorded = saved.get("training_data_sha256")
    if path.name == "teacher.safetensors":  # the examples finished, computed in the part files beside it
        also = " and the teacher-*.part files beside it"
    else:
        part = path.with_suffix(".part")
        also = f" and {part.name} beside it" if part != path else ""
    if required and not recorded:
        raise InputError(
            f"{path} is from before its training data was recorded in it, so it cannot be checked against the "
            f"passages, questions and held-out articles; delete {path.name}{also} to compute them again"
        )
    if recorded and data_sha256 and recorded != data_sha256:
        raise InputError(
            f"{path} holds teacher examples of other training data (sha256 {recorded[:16]}, not {data_sha256[:16]}: "
            f"the passages, questions, --extra-passages or held-out articles differ); delete {path.name}{also} "
            "to compute them again, or run on the files they were computed from"
        )


def check_teacher_file(path: Path, saved: Any, distiller: Distiller, k: int, data_sha256: str | None = None) -> None:
    """Refuse a teacher file (``teacher.safetensors`` or a ``teacher-*.part``) of another base
    model (:func:`check_run`), other :func:`teacher_settings` (:func:`check_teacher`) or other
    training data (:func:`check_teacher_data`), and one that records neither the base model nor
    its settings (the list format of files from before they were recorded): nothing says it
    holds this model's distributions under this run's settings, so it is computed again rather
    than distilled from unchecked."""
    if isinstance(saved, dict) and saved.get("base_fingerprint"):
        check_run(path, saved, distiller.lm)
    if not isinstance(saved, dict) or not saved.get("base_fingerprint") or saved.get("teacher_settings") is None:
        raise InputError(
            f"{path} is a teacher file from before the base model and the teacher settings were recorded in it, "
            f"so its examples cannot be checked against {distiller.lm.ref} or this run's settings; delete "
            f"{path.name} (or use another --out folder) to compute them again"
        )
    check_teacher(path, saved, teacher_settings(distiller, k))
    check_teacher_data(path, saved, data_sha256)


class Planned(NamedTuple):
    """One teacher example to compute: its id (:func:`views_of`), its question and the token ids
    of its retrieved passages, in the order the prompt holds them."""

    example_id: str
    question: str
    passages: list[list[int]]


def plan_examples(
    distiller: Distiller, corpus: Corpus, embedder: Embedder, k: int, limit: int | None, views: int = 1
) -> list[Planned]:
    """The examples of ``limit`` evenly spaced questions (all when None), ``views`` per question
    (:func:`views_of`), each checked (:func:`check_positions`): retrieval and tokenizing only, so
    a run refuses one before its first teacher pass. Every teacher example is computed from such
    a plan (:func:`build_examples`, :func:`teacher_examples`), so the check is made here, once."""
    questions = select_questions(corpus.questions, limit or None)
    vectors = embedder.embed([q.question for q in questions])
    retrieved = corpus.retrieve(vectors, k if views == 1 else 2 * k)
    planned = [
        Planned(example_id, q.question, [distiller.tokens.passage(corpus.passages[i].text) for i in chosen])
        for q, rows in zip(questions, retrieved, strict=True)
        for example_id, chosen in views_of(q.id, rows, k, views)
    ]
    check_positions(distiller, planned, corpus.passages)
    return planned


def check_positions(distiller: Distiller, planned: list[Planned], passages: list[PassageInput]) -> None:
    """Refuse an example whose prompts need more positions than the model handles
    (:func:`~ragcompress.kv.rope.position_limit`; :meth:`Distiller.teacher_positions` counts the
    question with its answer and the reconstruction prompt), naming its question. Past that
    limit the teacher's full prefill is not what the student's separately encoded pieces compute
    (LongRoPE's long factors, dynamic NTK's rescaled base: the two disagree even with an adaptor
    of zeros), and ``ask`` refuses the same prompt, so the adaptor would learn a context the
    runtime never serves. It is refused rather than trained on fewer passages: the runtime
    refuses a prompt too long (``PromptTooLongError``) and never drops retrieved passages, so a
    shortened example would not be the one ``ask --top-k`` builds either; the user chooses the
    remedy (a lower ``--top-k``, then used by ``ask`` too, or shorter passages).

    Then refuse a passage the examples read that the student's eviction cannot score within the
    positions (:func:`~ragcompress.compressors.base.check_fits`, as ``index`` refuses it: KVzip's
    probe repeats the passage after it, about ``prefix + 2n`` positions; at ratio 1 it keeps every
    row and scores none), named among ``passages`` (which hold every passage of ``planned``): a
    compressed student scores each passage it reads during the steps, so one past them stopped
    the run at its first step, after the whole teacher pass."""
    limit = position_limit(distiller.lm.config)
    for example_id, question, example in planned:
        needed = distiller.teacher_positions(example, distiller.tokens.suffix(question))
        if needed > limit:
            raise InputError(
                f"question {example_id} ({question!r}) with its {len(example)} retrieved passages needs {needed} "
                f"positions (prefix, passages, question and {MAX_ANSWER} answer tokens) but {distiller.lm.ref} "
                f"handles {limit}, so ask would refuse it; train with a lower --top-k or split the long passages"
            )
    compressor = distiller.compressor
    if compressor is None:
        return
    reader: dict[tuple[int, ...], str] = {}  # a passage's token ids -> the first example reading it
    for example_id, _, example in planned:
        for ids in example:
            reader.setdefault(tuple(ids), example_id)
    remedy = (
        "train for a --method that does not probe past the passage (snapkv, expected-attention, knorm) or split "
        "the passage"
    )
    for passage in passages:
        ids = distiller.tokens.passage(passage.text)
        if (read_by := reader.get(tuple(ids))) is not None:
            check_fits(compressor, distiller.encoder, passage.id, ids, remedy, f", read by question {read_by}")


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
    data_sha256: str | None = None,
    progress: bool = True,
) -> list[Example]:
    """Teacher examples of ``limit`` evenly spaced questions (all when None), ``views`` per
    question (:func:`plan_examples`, every prompt checked first), computed as
    :func:`_compute_examples` computes them (``progress`` draws a bar)."""
    planned = plan_examples(distiller, corpus, embedder, k, limit, views)
    return _compute_examples(distiller, planned, k, desc, partial, keep_full, data_sha256, progress)


def _compute_examples(
    distiller: Distiller,
    planned: list[Planned],
    k: int,
    desc: str,
    partial: Path,
    keep_full: bool = False,
    data_sha256: str | None = None,
    progress: bool = True,
) -> list[Example]:
    """The teacher examples of ``planned`` (:func:`plan_examples`' checked plan); each finished one is appended to ``partial`` (a killed
    run resumes from it, and a run with more views reuses the ones it has), which records the
    training data ``data_sha256`` and is refused for other data. ``progress`` draws a bar."""
    from tqdm import tqdm

    done: dict[str, Example] = {}
    if partial.is_file():
        saved = load_tree(partial)
        check_teacher_file(partial, saved, distiller, k, data_sha256)
        done = {e["qid"]: Example(**e) for e in saved["examples"]}
    for example_id, question, passages in tqdm(planned, desc=desc, unit="example", disable=not progress):
        raise_if_stopped()  # a SIGTERM or Ctrl-C whose KeyboardInterrupt a finalizer swallowed
        if example_id not in done:
            done[example_id] = distiller.teacher(example_id, passages, question, keep_full)
            save_tree(
                {
                    "examples": [asdict(e) for e in done.values()],
                    "base_fingerprint": distiller.lm.fingerprint,
                    "teacher_settings": teacher_settings(distiller, k),
                    **({"training_data_sha256": data_sha256} if data_sha256 else {}),
                },
                partial,
            )
    return [done[example_id] for example_id, _, _ in planned]


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


def check_chosen(path: Path, examples: list[Example], corpus: Corpus, option: str, given: int, side: str) -> None:
    """Refuse cached examples of other questions than ``option`` (``--train-questions``,
    ``--val-examples``: ``given``) chooses now: a run trained and validated on the questions the
    file was computed for while its adaptor recorded the new value."""
    chosen = [q.id for q in select_questions(corpus.questions, given or None)]
    held = list(dict.fromkeys(question_of(e.qid) for e in examples))
    if held != chosen:
        other = "other " if len(held) == len(chosen) else ""
        raise InputError(
            f"{path} holds the teacher examples of {len(held)} {side} questions, not of the {len(chosen)} {other}that "
            f"{option} {given} chooses; train with the {option} it was computed with, or use another --out folder"
        )


def teacher_examples(
    distiller: Distiller,
    config: TrainConfig,
    train: Corpus,
    val: Corpus,
    embedder: Embedder,
    out: Path,
    data_sha256: str,
    progress: bool = True,
) -> tuple[list[Example], list[Example]]:
    """The run's training and held-out teacher examples of the training data ``data_sha256``:
    read back from ``out/teacher.safetensors`` (checked against this run), or computed (resuming
    from the ``.part`` files) and saved there."""
    teacher_path = out / "teacher.safetensors"
    if teacher_path.is_file():
        cached = load_tree(teacher_path)
        check_teacher_file(teacher_path, cached, distiller, config.top_k, data_sha256)
        train_examples = [Example(**e) for e in cached["train"]]
        val_examples = [Example(**e) for e in cached["val"]]
        check_split(distiller, teacher_path, train_examples, train, "training")
        built_views = len(train_examples) // max(1, len({question_of(e.qid) for e in train_examples}))
        if built_views != config.views:
            raise InputError(
                f"{teacher_path} holds {built_views} view(s) per training question, not --views {config.views}: "
                f"pass --views {built_views}, or delete {teacher_path.name} (the teacher-*.part files keep the "
                "examples already computed, so only the missing views are computed again)"
            )
        check_split(distiller, teacher_path, val_examples, val, "held-out")
        check_chosen(teacher_path, train_examples, train, "--train-questions", config.train_questions, "training")
        check_chosen(teacher_path, val_examples, val, "--val-examples", config.val_examples, "held-out")
        # a file computed before prompts were checked may hold one past the model's positions
        texts = {q.id: q.question for q in train.questions + val.questions}
        cached = [Planned(e.qid, texts[question_of(e.qid)], e.passages) for e in train_examples + val_examples]
        check_positions(distiller, cached, train.passages + val.passages)
        return train_examples, val_examples
    train_part, val_part = out / "teacher-train.part", out / "teacher-val.part"
    # both sides planned (and so checked) before the first teacher pass: a held-out prompt too
    # long must not stop the run after the training side's
    train_plan = plan_examples(distiller, train, embedder, config.top_k, config.train_questions or None, config.views)
    val_plan = plan_examples(distiller, val, embedder, config.top_k, config.val_examples)
    train_examples = _compute_examples(
        distiller, train_plan, config.top_k, "teacher (train)", train_part, data_sha256=data_sha256, progress=progress
    )
    val_examples = _compute_examples(
        distiller, val_plan, config.top_k, "teacher (held-out)", val_part, True, data_sha256, progress
    )
    # the .part files may hold examples of another split (a deleted teacher file, other --val-articles)
    check_split(distiller, train_part, train_examples, train, "training")
    check_split(distiller, val_part, val_examples, val, "held-out")
    save_tree(
        {
            "train": [asdict(e) for e in train_examples],
            "val": [asdict(e) for e in val_examples],
            "base_fingerprint": distiller.lm.fingerprint,
            "teacher_settings": teacher_settings(distiller, config.top_k),
            "training_data_sha256": data_sha256,
        },
        teacher_path,
    )
    return train_examples, val_examples
