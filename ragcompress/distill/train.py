"""``ragcompress train``: KV-Distill for precomputed passage caches (the entry point, :func:`train`).

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

Training is resumable (``checkpoint.safetensors`` every ``checkpoint_every`` steps), shows progress
bars where ``progress`` says (the CLI: on a terminal), and ends by fitting the learned retention scorer (``scorer.py``) on the adaptor's caches of
training passages (chosen before training, :func:`scorer_passages`), saving the adaptor
(``adaptor/``), the history and a loss-curve plot.

Where each part lives (this module wires them together, and re-exports the names the CLI and
``benchmarks/distill_eval.py`` import from it):

* ``config.py``: :class:`TrainConfig`, the learning-rate schedule, the student's eviction;
* ``corpus.py``: the split by article, retrieval over each side, a question's views;
* ``objective.py``: an :class:`Example`'s teacher targets and the binned KL;
* ``distiller.py``: :class:`Distiller`, the teacher and the (compressed) student;
* ``teacher.py``: the teacher examples and their files (``teacher.safetensors``, ``teacher-*.part``);
* ``basis.py``: a low-rank student's basis (``student-basis.safetensors`` and its stamp);
* ``resume.py``: the checkpoint, what a run starts from and what a resumed run refuses;
* ``loop.py``: the optimizer steps, validation and checkpoints along the way.
"""

from __future__ import annotations

import json
import shutil
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ragcompress.compressors.base import CompressionContext
from ragcompress.compressors.kvzip import KVzipCompressor
from ragcompress.distill import scorer as learned_scorer
from ragcompress.distill.adaptor import CONFIG, SCORER_BIAS, SCORER_WEIGHT, Adaptor
from ragcompress.distill.basis import student_basis
from ragcompress.distill.checkpoint import load_tree
from ragcompress.distill.config import TrainConfig, student_compressor
from ragcompress.distill.corpus import (
    Corpus,
    check_questions,
    data_hash,
    held_out_copy,
    load_corpora,
    require_questions,
    split_articles,
    with_extra_passages,
)
from ragcompress.distill.distiller import TRAINING_ADAPTER, Distiller, check_student_eviction
from ragcompress.distill.loop import TrainingState, run_steps, validation_loss
from ragcompress.distill.objective import Example
from ragcompress.distill.resume import (
    ANCESTRY,
    Checkpointer,
    check_resumed_example_ids,
    examples_hash,
    kept_rows_settings,
    resume_state,
    starting_adaptor,
)
from ragcompress.distill.teacher import build_examples, teacher_examples
from ragcompress.errors import InputError, RagCompressWarning, need_matplotlib
from ragcompress.indexing.encoder import PassageEncoder
from ragcompress.indexing.inputs import PassageInput, iter_passages, validate
from ragcompress.kv.rope import position_limit
from ragcompress.models import LoadedModel

# the entry point, and what the CLI and benchmarks/distill_eval.py import from this module
__all__ = [
    "TRAINING_ADAPTER",
    "Distiller",
    "Example",
    "TrainConfig",
    "adaptor_meta",
    "build_examples",
    "fit_scorer",
    "load_corpora",
    "plot_history",
    "scorer_passages",
    "train",
]


def plot_history(history: dict[str, Any], path: Path, title: str) -> None:
    """The run's loss curves (training KLs smoothed over 5 steps, held-out KLs) as ``path``: how a
    run is judged at a glance, e.g. where its held-out KL stopped falling."""
    import textwrap

    need_matplotlib("plot_history draws", "train")  # the CLI checks before training; a library caller learns it here
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


def scorer_passages(distiller: Distiller, passages: list[PassageInput], count: int) -> list[list[int]]:
    """Token ids of the training passages the learned scorer is fitted on: ``count`` evenly spaced
    ones among those KVzip can score, its reconstruction probe (the passage repeated after it,
    about ``prefix + 2n`` positions) within the model's positions (:meth:`KVzipCompressor.fits`).
    Chosen before training, because the fit runs after the last step: a passage longer than about
    half the model's positions stopped the run there with nothing saved, and a resumed run the
    same way. A longer passage is left out (a warning says how many); a run where none is short
    enough is refused before any work, with train's remedy."""
    kvzip, encoder = KVzipCompressor(ratio=0.5), distiller.encoder
    token_ids = [distiller.tokens.passage(p.text) for p in passages]
    fitting = [ids for ids in token_ids if kvzip.fits(encoder, ids)]
    limit = position_limit(distiller.lm.config)
    if not fitting:
        raise InputError(
            f"no training passage is short enough for the learned scorer's KVzip probe, which repeats a passage "
            f"after it ({distiller.lm.ref} handles {limit} positions); train with --scorer-passages 0 (an adaptor "
            "without a learned scorer) or split the passages"
        )
    if skipped := len(token_ids) - len(fitting):
        warnings.warn(
            f"{skipped} of {len(token_ids)} training passages are too long for the learned scorer's KVzip probe, "
            f"which repeats a passage after it ({distiller.lm.ref} handles {limit} positions); the scorer is fitted "
            "on the others",
            RagCompressWarning,
            stacklevel=3,
        )
    step = max(1, len(fitting) // max(1, count))
    return fitting[::step][:count]


def fit_scorer(
    distiller: Distiller, passages: list[list[int]], progress: bool = True
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """KVzip scores of the trained adaptor's caches of ``passages`` (:func:`scorer_passages`) -> the
    probe; ``progress`` draws a bar."""
    from tqdm import tqdm

    encoder = PassageEncoder(distiller.lm, distiller.template, distiller.adaptor)  # its final tensors
    kvzip = KVzipCompressor(ratio=0.5)
    samples = []
    for ids in tqdm(passages, desc="scorer (KVzip targets)", unit="passage", disable=not progress):
        kv = encoder.encode([ids])[0]
        with torch.inference_mode():
            scores = kvzip.score(kv, CompressionContext(encoder, ids))
        samples.append((kv, scores))
    return learned_scorer.fit(samples)


# what a run writes into its --out folder (one of them marks the folder as a run's, to resume)
RUN_FILES = frozenset(
    {
        "adaptor", "checkpoint.safetensors", "extra-questions.jsonl", "history.json", "kept-rows.safetensors",
        "loss.png", "student-basis.safetensors", "student-basis.json", "teacher-train.part", "teacher-val.part",
        "teacher.safetensors",
    }
)  # fmt: skip


def train(
    lm: LoadedModel, passages_path: Path, questions_path: Path, out: Path, config: TrainConfig, progress: bool = True
) -> Adaptor:
    """Train (or resume) an adaptor for ``lm`` into ``out``; returns the saved adaptor. An ``out``
    this call created is removed again if the run fails before writing anything into it (a
    refused input leaves no empty folder behind)."""
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out} is a file; training writes a folder there (checkpoint, examples, adaptor/)")
    held = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    if held and not any(name in RUN_FILES or name.startswith("adaptor-") for name in held):
        shown = ", ".join(held[:3]) + (" ..." if len(held) > 3 else "")
        raise InputError(
            f"--out {out} holds other files ({shown}) and no training run; give a new or empty folder "
            "(a run's own folder resumes it)"
        )
    created = not out.exists()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"--out {out} cannot be created ({exc.strerror or exc}); choose a writable folder") from None
    try:
        return _train(lm, passages_path, questions_path, out, config, progress)
    except BaseException:
        if created and out.is_dir() and not any(out.iterdir()):
            out.rmdir()
        raise


def _train(
    lm: LoadedModel, passages_path: Path, questions_path: Path, out: Path, config: TrainConfig, progress: bool
) -> Adaptor:
    torch.manual_seed(config.seed)
    check_student_eviction(lm.config, student_compressor(config))  # before hours of teacher pass
    validate(passages_path)  # index's check: well-formed records, unique ids (questions name passages by id)
    passages = list(iter_passages(passages_path))
    # a passage that names no article would be an article of its own
    if untitled := [p.id for p in passages if not (p.title or "#" in p.id)]:
        raise InputError(
            f'{passages_path}: {len(untitled)} of {len(passages)} passages name no article (a "title", or an '
            f'id "<article>#<n>"; the first: {untitled[0]}), so training cannot hold whole articles out and '
            "would score the adaptor on neighbours of its training passages; add each passage's document as "
            'its "title"'
        )
    config.val_articles = split_articles([p.article for p in passages], config.val_articles)
    from ragcompress.retrieval import Embedder

    embedder = Embedder()  # retrieval over each side of the split builds the training examples
    train_corpus, val_corpus = load_corpora(passages, questions_path, config.val_articles, embedder)
    if copy := held_out_copy(train_corpus.passages, val_corpus.passages):
        raise InputError(
            f"{passages_path}: training passage {copy[0].id} holds the text of held-out passage {copy[1].id} "
            f"(article {copy[1].article}); remove the copy, or hold out other articles"
        )
    check_questions(passages, questions_path, train_corpus)
    require_questions(val_corpus, "held-out", questions_path)

    # what every file the run writes records, and a resumed run's refusals, before any question is
    # written or teacher example computed (the checkpoint's, not a cached file's, name the remedy)
    data_sha256 = data_hash(passages_path, questions_path, config.val_articles, config.extra_passages)
    checkpoint_path = out / "checkpoint.safetensors"
    checkpoint = load_tree(checkpoint_path) if checkpoint_path.is_file() else None
    adaptor = starting_adaptor(lm, config, checkpoint, checkpoint_path, data_sha256)
    if config.extra_passages:
        train_corpus = with_extra_passages(
            lm, train_corpus, config, embedder, out, progress, val_corpus.passages, data_sha256
        )
    require_questions(train_corpus, "training", questions_path)
    initial = dict(adaptor.tensors)
    # the adaptor it descends from (--init-adaptor), kept in every checkpoint of the run
    ancestry = {key: value for key in ANCESTRY if (value := adaptor.meta.get(key))}
    distiller = Distiller(
        lm,
        adaptor,
        config.teacher_top,
        config.continuation,
        student_compressor(config),
        config.quant_config(),
    )

    # chosen before any work: the scorer is fitted after the last step
    scored = scorer_passages(distiller, train_corpus.passages, count) if (count := config.scorer_fit_passages()) else []
    distiller.basis = student_basis(distiller, train_corpus.passages, config, out / "student-basis.safetensors")
    train_examples, val_examples = teacher_examples(
        distiller, config, train_corpus, val_corpus, embedder, out, data_sha256, progress
    )
    check_resumed_example_ids(checkpoint, train_examples, val_examples, checkpoint_path)

    kept_path = out / "kept-rows.safetensors"  # the compressed student's rows (kept_rows), if any
    kept_settings = kept_rows_settings(lm, config)
    if distiller.compressor is not None and kept_path.is_file():
        distiller.restore_kept_rows(load_tree(kept_path), kept_settings)

    trainable = distiller.trainable()
    optimizer = torch.optim.AdamW(trainable, lr=config.lr, weight_decay=0.0)
    checkpointer = Checkpointer(
        checkpoint_path,
        kept_path,
        kept_settings,
        distiller,
        optimizer,
        adaptor,
        initial,
        config,
        ancestry,
        data_sha256,
        examples_hash(train_examples, val_examples),
    )
    if checkpoint is not None:
        state = resume_state(checkpoint, distiller, optimizer)
    else:
        state = TrainingState()
        state.history["val"].append({"step": 0, **validation_loss(distiller, val_examples)})
    run_steps(distiller, config, train_examples, val_examples, optimizer, trainable, state, checkpointer.save, progress)

    adaptor.tensors = distiller.factors()
    weight, bias, r2 = (None, None, None)
    if scored:
        weight, bias, r2 = fit_scorer(distiller, scored, progress)
        adaptor.tensors[SCORER_WEIGHT], adaptor.tensors[SCORER_BIAS] = weight, bias
    adaptor.meta = adaptor_meta(lm, config, data_sha256, train_corpus, ancestry, state, len(train_examples), r2)
    keep_replaced_adaptor(out / "adaptor", adaptor.hash)
    adaptor.save(out / "adaptor")
    (out / "history.json").write_text(json.dumps(state.history, indent=1))
    plot_history(
        state.history,
        out / "loss.png",
        f"{lm.ref}: KV-Distill adaptor, held-out articles {', '.join(config.val_articles)}",
    )
    return adaptor


def keep_replaced_adaptor(folder: Path, new_hash: str) -> None:
    """A resumed run writes its adaptor where the earlier run's finished one is; stores built
    with that one name it by hash and refuse any other, so it is moved aside (``adaptor-HASH16``
    beside it) rather than overwritten, with a warning naming where it went."""
    try:
        old_hash = json.loads((folder / CONFIG).read_text()).get("hash")
    except (OSError, ValueError, AttributeError):
        return  # none there (or not one of ours): nothing a store could name
    if not isinstance(old_hash, str) or old_hash == new_hash:
        return
    kept = folder.with_name(f"{folder.name}-{old_hash[:16]}")
    if kept.exists():
        shutil.rmtree(folder)  # the same adaptor is already kept there
    else:
        folder.rename(kept)
    warnings.warn(
        f"{folder} now holds the adaptor of this run ({new_hash[:16]}); the one it replaces ({old_hash[:16]}), "
        f"which stores built with it need, was moved to {kept}",
        RagCompressWarning,
        stacklevel=3,
    )


def adaptor_meta(
    lm: LoadedModel,
    config: TrainConfig,
    data_sha256: str,
    train_corpus: Corpus,
    ancestry: dict[str, Any],
    state: TrainingState,
    train_examples: int,
    scorer_r2: float | None,
) -> dict[str, Any]:
    """What the adaptor records of its run (``adaptor.json``): the model, the data and its split,
    the compression it was trained for, every setting, its ancestry and its metrics."""
    history = state.history
    trained = sorted({p.article for p in train_corpus.passages} | set(ancestry.get("init_train_articles", [])))
    if overlap := sorted(set(trained) & set(config.val_articles)):
        # the earlier checks (split, --init-adaptor) make this unreachable; an adaptor recording it
        # would let a benchmark report it on articles it was trained on
        raise RuntimeError(f"articles both trained on and held out: {overlap}; the adaptor is not written")
    return {
        "base_model": lm.ref,
        "base_fingerprint": lm.fingerprint,
        "dtype": lm.dtype_name,  # the model's while training (absent: an adaptor from before it was recorded)
        "training_data_sha256": data_sha256,
        "train_articles": trained,
        "val_articles": config.val_articles,
        "method": config.method,
        "ratio": config.ratio,
        "quant": config.quant_config().name,
        "lowrank": spec.as_dict() if (spec := config.rank_spec()) else None,
        **({"value_norm": True} if config.value_norm else {}),  # absent: plain scores (every earlier adaptor)
        "config": asdict(config),
        **({"init_adaptor_hash": ancestry["init_adaptor_hash"]} if "init_adaptor_hash" in ancestry else {}),
        "metrics": {
            "steps": state.step,
            "train_minutes": state.elapsed / 60,
            "train_examples": train_examples,
            "held_out_start": history["val"][0],
            "held_out_end": history["val"][-1],
            "scorer_r2": scorer_r2,
        },
    }
