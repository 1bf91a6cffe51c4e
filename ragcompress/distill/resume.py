"""What a run starts from, and the refusals that keep a resumed run honest.

A run in an ``--out`` folder that holds a checkpoint resumes it: the checkpoint's factors,
optimizer state and history (:class:`Checkpointer` writes them, :func:`resume_state` reads them
back). Resuming is refused when the checkpoint (or a teacher file) was made by another base
model, holding out other articles, or for another compression (:func:`check_run`,
:func:`check_resumed_compression`): the adaptor would otherwise report held-out numbers on what
it trained on, or one loss curve across two stores; and with other step settings (learning rate,
batch, schedule, clip, loss weights, seed), fewer steps than it has taken, or another
``--init-adaptor`` than it started from (:func:`check_resumed_steps`, :func:`check_resumed_start`):
the adaptor would record settings its steps were not taken with; and with other teacher
examples (:data:`EXAMPLE_SETTINGS` and the examples' ids, :func:`check_resumed_examples`,
:func:`check_resumed_example_ids`): deleting the teacher file that refuses them would otherwise
resume the checkpoint on another example set, its held-out start and end measured on two
validation sets. Without a checkpoint a run
starts from ``--init-adaptor`` (:func:`warm_start`) or from the adaptor of zeros.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from ragcompress.distill.adaptor import Adaptor
from ragcompress.distill.checkpoint import save_tree
from ragcompress.distill.config import TrainConfig
from ragcompress.distill.distiller import Distiller
from ragcompress.distill.loop import TrainingState
from ragcompress.distill.objective import Example
from ragcompress.errors import InputError, RagCompressWarning
from ragcompress.models import LoadedModel

# the settings that define the store an adaptor is trained for (its student's compression)
COMPRESSION_SETTINGS = (
    "method", "ratio", "quant", "value_quant", "group_size", "kv_rank", "kv_rank_values", "calibration_passages",
    "keep_first", "keep_last", "value_norm",
)  # fmt: skip
ANCESTRY = ("init_adaptor_hash", "init_train_articles")  # what a run records of its --init-adaptor
# the settings of the optimizer steps a checkpoint has taken, which a resumed run takes too
STEP_SETTINGS = ("lr", "batch", "warmup", "decay", "clip", "continuation_weight", "hard_weight", "seed")
# the settings that choose and compute the teacher examples a checkpoint's steps were taken on
EXAMPLE_SETTINGS = (
    "top_k", "teacher_top", "continuation", "views", "train_questions", "val_examples", "extra_questions",
)  # fmt: skip


def settings_differ(recorded: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """``name=recorded (this run: current)`` for each setting a file records otherwise than this
    run asks (the refusals of a resumed run name them so)."""
    return [
        f"{name}={recorded[name]!r} (this run: {value!r})"
        for name, value in current.items()
        if name in recorded and recorded[name] != value
    ]


def check_run(
    path: Path, saved: dict[str, Any], lm: LoadedModel, held_out: list[str] | None = None, now: list[str] | None = None
) -> None:
    """Refuse to resume from ``path`` (a checkpoint or the teacher examples) saved by a run of
    another base model, or holding out other articles (``held_out``; ``now``: this run's): the
    adaptor would have trained on what is held out now. A file from before the fingerprint was
    recorded is refused: nothing says which model its factors or distributions belong to."""
    base = saved.get("base_fingerprint")
    if not base:
        raise InputError(
            f"{path} was written before the base model was recorded in it, so it cannot be checked against "
            f"{lm.ref}; delete {path.name} (or use another --out folder) to start over"
        )
    if base != lm.fingerprint:
        raise InputError(
            f"{path} was made with another base model (fingerprint {base[:16]}), not {lm.ref} "
            f"({lm.fingerprint[:16]}); use that model, or another --out folder"
        )
    if held_out is not None and now is not None and sorted(held_out) != sorted(now):
        raise InputError(
            f"{path} was trained holding out {sorted(held_out)}, not {sorted(now)}: its adaptor has seen what "
            "this run holds out; use the --val-articles it was trained with, or another --out folder"
        )


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


def check_resumed_steps(config: TrainConfig, checkpoint: dict[str, Any], path: Path) -> None:
    """Refuse to resume with another learning rate, batch, schedule, clip, loss weight or seed than
    the checkpoint's steps were taken with (:data:`STEP_SETTINGS`: the adaptor would record the new
    ones for every step), with fewer ``--steps`` than it has taken (it would export the later
    adaptor recording the fewer steps), or, under ``--decay cosine``, with other ``--steps``: the
    cosine falls to a tenth by ``steps`` (:func:`lr_factor`), so the steps still to take would
    follow another curve than the ones taken (a constant rate takes more steps unchanged)."""
    differ = settings_differ(checkpoint.get("config", {}), {name: getattr(config, name) for name in STEP_SETTINGS})
    if differ:
        raise InputError(
            f"{path} was trained with {', '.join(differ)}; resume with those values, or train with these in "
            "another --out folder (--init-adaptor OUT/adaptor starts from the finished adaptor)"
        )
    planned = checkpoint.get("config", {}).get("steps")
    if config.decay == "cosine" and planned is not None and planned != config.steps:
        raise InputError(
            f"{path} follows a cosine learning rate falling to a tenth by step {planned}, and --steps {config.steps} "
            f"would bend the curve of the steps still to take; resume with --steps {planned}, or continue the "
            "finished adaptor in another --out folder (--init-adaptor OUT/adaptor, a schedule of its own)"
        )
    if checkpoint["step"] > config.steps:
        raise InputError(
            f"{path} is at step {checkpoint['step']}, past --steps {config.steps}; give --steps {checkpoint['step']} "
            "or more to resume it, or use another --out folder"
        )


def check_resumed_examples(config: TrainConfig, checkpoint: dict[str, Any], path: Path) -> None:
    """Refuse to resume with other :data:`EXAMPLE_SETTINGS` than the checkpoint's steps were
    taken with: the teacher file refuses them too, but advises deleting it, after which the
    checkpoint resumed on another example set (and validation set: ``held_out_start`` and
    ``held_out_end`` compared two) while the adaptor recorded the new settings for every step."""
    differ = settings_differ(checkpoint.get("config", {}), {name: getattr(config, name) for name in EXAMPLE_SETTINGS})
    if differ:
        raise InputError(
            f"{path} was trained on teacher examples of {', '.join(differ)}; resume with those values, or train with "
            "these in another --out folder (--init-adaptor OUT/adaptor starts from the finished adaptor)"
        )


def examples_hash(train_examples: list[Example], val_examples: list[Example]) -> str:
    """sha256 of the ids of a run's training and held-out examples, in order (what
    :func:`check_resumed_example_ids` compares)."""
    ids = [[e.qid for e in train_examples], [e.qid for e in val_examples]]
    return hashlib.sha256(json.dumps(ids).encode()).hexdigest()


def check_resumed_example_ids(
    checkpoint: dict[str, Any] | None, train_examples: list[Example], val_examples: list[Example], path: Path
) -> None:
    """Refuse to resume a checkpoint on teacher examples of other ids than its steps were taken
    on (a teacher file from before the data was recorded in it, reused on other questions). A
    checkpoint from before the ids were recorded in it is not checked."""
    saved = (checkpoint or {}).get("examples_sha256")
    if saved and saved != examples_hash(train_examples, val_examples):
        raise InputError(
            f"{path} was trained on other teacher examples than the {len(train_examples)} training and "
            f"{len(val_examples)} held-out ones of this run (their ids differ); resume with the teacher files it "
            "was trained on, or use another --out folder"
        )


def check_resumed_start(config: TrainConfig, checkpoint: dict[str, Any], lm: LoadedModel, path: Path) -> None:
    """Refuse ``--init-adaptor`` naming another adaptor than the checkpoint's run started from: the
    checkpoint's factors are resumed, not that adaptor's, and the adaptor would record it as its
    start. Naming the one it started from resumes (the same command that started the run)."""
    if not config.init_adaptor:
        return
    from ragcompress.distill.packaged import resolve_adaptor

    started = checkpoint.get("init_adaptor_hash")
    given = resolve_adaptor(config.init_adaptor, lm.ref, lm.fingerprint).hash
    if given != started:
        began = f"adaptor {started[:16]}" if started else "the adaptor of zeros"
        raise InputError(
            f"{path} continues a run started from {began}, not from --init-adaptor {config.init_adaptor} "
            f"({given[:16]}), and resuming trains the checkpoint's factors; leave --init-adaptor out to resume it, "
            "or start from that adaptor in another --out folder"
        )


def resumed_settings(
    config: TrainConfig,
    settings: dict[str, Any],
    path: Path,
    stacklevel: int = 3,
    started: str = "resuming",
    instead: str = "use another --out folder to train with those",
) -> None:
    """A resumed run (or one started from ``--init-adaptor``: ``started``, ``instead``) trains
    those factors, whose rank, alpha and kind are fixed: take them into ``config`` (what the
    adaptor records), warning when this run asked for others (``stacklevel``: the warning is
    attributed to the caller of ``train``)."""
    # no "kind": a cache adaptor (Adaptor.kind), the only kind before "forward" was recorded
    saved = {"rank": int(settings["rank"]), "alpha": int(settings["alpha"]), "kind": settings.get("kind", "cache")}
    asked = {name: getattr(config, name) for name in saved}
    if asked != saved:
        differ = ", ".join(
            f"--{name} {saved[name]} (not {asked[name]})" for name in saved if saved[name] != asked[name]
        )
        warnings.warn(
            f"{started} {path}: its adaptor keeps {differ}; {instead}",
            RagCompressWarning,
            stacklevel=stacklevel,
        )
    config.rank, config.alpha, config.kind = saved["rank"], saved["alpha"], saved["kind"]


def resumed_ancestry(checkpoint: dict[str, Any], config: TrainConfig, lm: LoadedModel, path: Path) -> dict[str, Any]:
    """The adaptor a resumed run started from (``--init-adaptor``): its hash and the articles it
    trained on, which the new adaptor's ``train_articles`` include. A checkpoint from before those
    articles were recorded names only the hash: they are read from that adaptor (``--init-adaptor``
    naming it, or the packaged one of that hash), and the run is refused when neither is found."""
    from ragcompress.distill.packaged import packaged_adaptor, resolve_adaptor

    ancestry = {key: checkpoint[key] for key in ANCESTRY if checkpoint.get(key)}
    start_hash = ancestry.get("init_adaptor_hash")
    if start_hash is None or "init_train_articles" in ancestry:
        return ancestry
    start = resolve_adaptor(config.init_adaptor, lm.ref, lm.fingerprint) if config.init_adaptor else None
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
    from ragcompress.distill.packaged import resolve_adaptor

    assert config.init_adaptor is not None
    start = resolve_adaptor(config.init_adaptor, lm.ref, lm.fingerprint)
    start.check_model(lm.fingerprint, lm.ref)
    if start.kind != config.kind:
        raise InputError(f"--init-adaptor {config.init_adaptor} is of kind {start.kind!r}, not {config.kind!r}")
    seen = sorted(set(start.meta.get("train_articles", [])) & set(config.val_articles))
    if seen:
        raise InputError(
            f"--init-adaptor {config.init_adaptor} was trained on {seen}, held out here; its numbers on them "
            f"would not be held-out ones (hold out what it held out: {start.meta.get('val_articles')})"
        )
    instead = "start without --init-adaptor to train with those"
    resumed_settings(config, start.settings, Path(config.init_adaptor), 5, "starting from --init-adaptor", instead)
    tensors = {k: v.float() for k, v in start.lora_tensors.items()}
    return Adaptor(dict(start.settings), tensors, ancestry_of(start))


def check_resumed_data(checkpoint: dict[str, Any], data_sha256: str, path: Path) -> None:
    """Refuse to resume a run on other training data than its checkpoint was trained on: the
    adaptor records the data (``training_data_sha256``, ``train_articles``) of the run that
    writes it, so articles only the earlier data held would drop out of its record. A checkpoint
    from before the data was recorded in it is not checked."""
    saved = checkpoint.get("training_data_sha256")
    if saved and saved != data_sha256:
        raise InputError(
            f"{path} was trained on other data (sha256 {saved[:16]}, not {data_sha256[:16]}: the passages, "
            "questions, --extra-passages or held-out articles differ); resume with the files it was trained on, or "
            "train on these in another --out folder (--init-adaptor OUT/adaptor starts from the finished adaptor)"
        )


def check_resumed_dtype(checkpoint: dict[str, Any], lm: LoadedModel, path: Path) -> None:
    """Refuse to resume a checkpoint with the model in another dtype (``--dtype``) than its steps
    were taken in: the adaptor records the dtype of the run that writes it. A checkpoint from
    before the dtype was recorded in it is not checked."""
    saved = checkpoint.get("dtype")
    if saved and saved != lm.dtype_name:
        raise InputError(
            f"{path} was trained with the model in {saved}, not {lm.dtype_name}; resume with --dtype {saved}, or "
            "train in this dtype in another --out folder (--init-adaptor OUT/adaptor starts from the finished adaptor)"
        )


def starting_adaptor(
    lm: LoadedModel, config: TrainConfig, checkpoint: dict[str, Any] | None, checkpoint_path: Path, data_sha256: str
) -> Adaptor:
    """The adaptor a run trains: the checkpoint's (checked against this run, its data
    (``data_sha256``), dtype, steps, examples and start; its rank, alpha, kind and start taken
    into ``config``), else ``--init-adaptor``'s, else the adaptor of zeros (its ``A`` factors drawn
    from ``config.seed``, as the example order is)."""
    if checkpoint is not None:
        check_run(
            checkpoint_path, checkpoint, lm, checkpoint.get("config", {}).get("val_articles"), config.val_articles
        )
        check_resumed_data(checkpoint, data_sha256, checkpoint_path)
        check_resumed_dtype(checkpoint, lm, checkpoint_path)
        check_resumed_compression(config, checkpoint.get("config", {}), checkpoint_path)
        check_resumed_steps(config, checkpoint, checkpoint_path)
        check_resumed_examples(config, checkpoint, checkpoint_path)
        check_resumed_start(config, checkpoint, lm, checkpoint_path)
        ancestry = resumed_ancestry(checkpoint, config, lm, checkpoint_path)  # the init adaptor's, if any
        if "init_adaptor_hash" in ancestry and not config.init_adaptor:  # recorded as the run started
            config.init_adaptor = checkpoint.get("config", {}).get("init_adaptor")
        adaptor = Adaptor(checkpoint["settings"], dict(checkpoint["initial"]), ancestry)
        resumed_settings(config, adaptor.settings, checkpoint_path, stacklevel=4)
        return adaptor
    if config.minutes == 0:  # the run would export the adaptor it starts from as if trained
        raise InputError(
            f"--minutes 0 takes no training step, and {checkpoint_path.parent} holds no checkpoint to finish: "
            "the adaptor would be untrained; give --minutes above 0"
        )
    if config.init_adaptor:
        return warm_start(lm, config)
    return Adaptor.initial(lm.model, config.rank, config.alpha, seed=config.seed, kind=config.kind)


def resume_state(checkpoint: dict[str, Any], distiller: Distiller, optimizer: torch.optim.Optimizer) -> TrainingState:
    """Put a checkpoint's factors and optimizer state back; where its run stood."""
    distiller.load_factors(checkpoint["params"])
    optimizer.load_state_dict(checkpoint["optimizer"])
    return TrainingState(checkpoint["step"], checkpoint["elapsed"], checkpoint["history"])


@dataclass
class Checkpointer:
    """Writes ``checkpoint.safetensors`` (and the compressed student's kept rows beside it, work a
    resumed run need not redo): what :func:`starting_adaptor` and :func:`resume_state` read back."""

    path: Path
    kept_path: Path
    kept_settings: str  # kept_rows_settings
    distiller: Distiller
    optimizer: torch.optim.Optimizer
    adaptor: Adaptor
    initial: dict[str, torch.Tensor]  # the factors the run started from
    config: TrainConfig
    ancestry: dict[str, Any]  # the adaptor it descends from (--init-adaptor), kept in every checkpoint
    data_sha256: str  # the training data (corpus.data_hash), which a resumed run must train on too
    examples_sha256: str  # the ids of its teacher examples (examples_hash), which a resumed run trains on too

    def save(self, state: TrainingState) -> None:
        if self.distiller.compressor is not None:
            save_tree(self.distiller.kept_rows_state(self.kept_settings), self.kept_path)
        save_tree(
            {
                "step": state.step,
                "elapsed": state.elapsed,
                "settings": self.adaptor.settings,
                "initial": self.initial,
                "params": self.distiller.factors(),
                "optimizer": self.optimizer.state_dict(),
                "history": state.history,
                "config": asdict(self.config),
                "base_fingerprint": self.distiller.lm.fingerprint,
                "dtype": self.distiller.lm.dtype_name,
                "training_data_sha256": self.data_sha256,
                "examples_sha256": self.examples_sha256,
                **self.ancestry,
            },
            self.path,
        )
