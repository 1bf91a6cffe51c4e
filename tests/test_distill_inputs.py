"""``ragcompress train`` and adaptor files given bad or mismatched input: a one-line
:class:`InputError` naming the problem, never a traceback and never a run that quietly trains on
what it holds out (``ragcompress.distill``)."""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
from pathlib import Path

import pytest
import torch

from ragcompress.data import SAMPLE_PASSAGES, SAMPLE_QUESTIONS
from ragcompress.distill.adaptor import Adaptor
from ragcompress.distill.config import MINIMA
from ragcompress.distill.train import TrainConfig, train
from ragcompress.errors import InputError
from ragcompress.testing import noisy_adaptor

CONFIG = TrainConfig(
    top_k=2, rank=2, alpha=4, steps=1, batch=1, train_questions=1, val_examples=1, continuation=4,
    scorer_passages=0, eval_every=1, checkpoint_every=1, val_articles=["Apollo_program"],
)  # fmt: skip


def _questions(tmp_path, keep) -> object:
    records = [json.loads(line) for line in SAMPLE_QUESTIONS.read_text().splitlines() if line.strip()]
    path = tmp_path / "questions.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in map(keep, records) if r is not None))
    return path


def _truncate(name):
    def mutate(folder):
        path = folder / name
        path.write_bytes(path.read_bytes()[:40])

    return mutate


def _flip_a_weight_bit(folder):
    """One bit of the last tensor's data (a safetensors file ends with its data), as a bad disk does."""
    path = folder / "adaptor.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01
    path.write_bytes(bytes(data))


def _config(edit):
    def mutate(folder):
        config = json.loads((folder / "adaptor.json").read_text())
        (folder / "adaptor.json").write_text(json.dumps(edit(config)))

    return mutate


@pytest.mark.parametrize(
    "mutate, message",
    [
        (_truncate("adaptor.safetensors"), "unreadable"),
        (_truncate("adaptor.json"), "unreadable"),
        (lambda folder: (folder / "adaptor.json").write_bytes(b"\xff\xfe"), "unreadable"),
        (_config(lambda c: [c]), "no settings"),
        (_config(lambda c: {k: v for k, v in c.items() if k not in ("settings", "hash")}), "no settings"),
        (_config(lambda c: {**c, "settings": {**c["settings"], "rank": None}, "hash": None}), "integer rank"),
        (_config(lambda c: {**c, "settings": {"rank": 2, "alpha": 4, "kind": "forward"}, "hash": None}), "modules"),
        (_config(lambda c: {k: v for k, v in c.items() if k != "hash"}), "records no hash"),
        (_config(lambda c: {**c, "hash": "0" * 64}), "do not match the hash"),
        (_flip_a_weight_bit, "do not match the hash .*train it again or copy it whole"),
        (_config(lambda c: {**c, "settings": {**c["settings"], "kind": "cache"}}), "lacks tensors .*train it again"),
        (_config(lambda c: {**c, "settings": {**c["settings"], "kind": "lora"}}), "unknown kind .*train it again"),
        # the hash does not cover it: an edited file was used with any model, unchecked
        (_config(lambda c: {k: v for k, v in c.items() if k != "base_fingerprint"}), "records no base_fingerprint"),
        (_config(lambda c: {**c, "base_fingerprint": ""}), "cannot be checked against the model .*train it again"),
    ],
    ids=[
        "weights",
        "json",
        "utf8",
        "list",
        "no-settings",
        "no-rank",
        "no-modules",
        "no-hash",
        "other-hash",
        "bit-flip",
        "edited-kind",
        "unknown-kind",
        "no-fingerprint",
        "empty-fingerprint",
    ],
)
def test_a_damaged_adaptor_folder_is_refused_in_one_line(tiny_lm, tmp_path, mutate, message):
    folder = noisy_adaptor(tiny_lm, 1).save(tmp_path / "adaptor")
    mutate(folder)
    with pytest.raises(InputError, match=message):
        Adaptor.load(folder)


@pytest.mark.parametrize(
    "keep, message",
    [
        (lambda q: {k: v for k, v in q.items() if k != "passage_id"}, "name no passage"),
        (lambda q: {**q, "passage_id": "elsewhere#0"}, "name no passage"),
        (lambda q: q if q["passage_id"].startswith("Apollo") else None, "no question of the training articles"),
        (lambda q: None if q["passage_id"].startswith("Apollo") else q, "no question of the held-out articles"),
    ],
    ids=["no-passage-id", "unknown-passage", "no-training-question", "no-held-out-question"],
)
def test_train_refuses_questions_the_split_cannot_use(tiny_lm, tmp_path, keep, message):
    questions = _questions(tmp_path, keep)
    with pytest.raises(InputError, match=message):
        train(tiny_lm, SAMPLE_PASSAGES, questions, tmp_path / "run", dataclasses.replace(CONFIG), progress=False)


def test_train_refuses_held_out_articles_it_cannot_use_and_an_out_that_is_a_file(tiny_lm, tmp_path):
    """Split errors are InputErrors, so the CLI prints one line."""
    (tmp_path / "file").write_text("a user's file")
    with pytest.raises(InputError, match="is a file"):
        train(
            tiny_lm, SAMPLE_PASSAGES, SAMPLE_QUESTIONS, tmp_path / "file", dataclasses.replace(CONFIG), progress=False
        )
    assert (tmp_path / "file").read_text() == "a user's file"
    for articles, message in (
        (["Nowhere"], "not in the passages"),
        (["Apollo_program", "Victoria_(Australia)"], "every"),
    ):
        config = dataclasses.replace(CONFIG, val_articles=articles)
        with pytest.raises(InputError, match=message):
            train(tiny_lm, SAMPLE_PASSAGES, SAMPLE_QUESTIONS, tmp_path / "run", config, progress=False)


def test_train_refuses_passages_that_name_no_article(tiny_lm, tmp_path):
    """Without titles or ``<article>#<n>`` ids each passage would be an article of its own, so the
    held-out side would hold neighbours of training passages: refused before anything loads."""
    records = [json.loads(line) for line in SAMPLE_PASSAGES.read_text().splitlines() if line.strip()]
    passages = tmp_path / "passages.jsonl"
    passages.write_text("".join(json.dumps({"id": f"p{i}", "text": r["text"]}) + "\n" for i, r in enumerate(records)))
    with pytest.raises(InputError, match=f"{len(records)} of {len(records)} passages name no article"):
        train(tiny_lm, passages, SAMPLE_QUESTIONS, tmp_path / "run", dataclasses.replace(CONFIG), progress=False)
    assert not (tmp_path / "run").exists()
    # one untitled passage among titled ones would be an article of its own just the same
    mixed = [dict(r) for r in records]
    mixed[3] = {"id": "loose", "text": mixed[3]["text"]}
    passages.write_text("".join(json.dumps(r) + "\n" for r in mixed))
    with pytest.raises(InputError, match=f"1 of {len(records)} passages name no article .*the first: loose"):
        train(tiny_lm, passages, SAMPLE_QUESTIONS, tmp_path / "run", dataclasses.replace(CONFIG), progress=False)


def test_a_resumed_run_refuses_another_split_or_another_base_model(tiny_lm, tiny_model_dir, tmp_path):
    """The checkpoint holds an adaptor trained on the training articles: resuming it under other
    --val-articles (its teacher file deleted, as the --views message suggests) would report
    held-out numbers on articles it trained on; the teacher examples and the checkpoint of another
    base model are not this model's, nor is a checkpoint that does not record its base model."""
    from ragcompress.distill.checkpoint import load_tree, save_tree
    from ragcompress.models import load_model

    out = tmp_path / "run"
    train(tiny_lm, SAMPLE_PASSAGES, SAMPLE_QUESTIONS, out, dataclasses.replace(CONFIG), progress=False)
    other = load_model(str(tiny_model_dir("llama", seed=1)))  # the same shapes, other weights
    for saved in ("teacher.safetensors", "checkpoint.safetensors"):
        copy = tmp_path / f"other-{saved}"
        shutil.copytree(out, copy)
        (copy / ("checkpoint.safetensors" if saved == "teacher.safetensors" else "teacher.safetensors")).unlink()
        with pytest.raises(InputError, match="another base model"):
            train(other, SAMPLE_PASSAGES, SAMPLE_QUESTIONS, copy, dataclasses.replace(CONFIG, steps=2), progress=False)
    unrecorded = tmp_path / "unrecorded"  # a checkpoint from before the base model was recorded
    shutil.copytree(out, unrecorded)
    (unrecorded / "teacher.safetensors").unlink()
    saved = load_tree(unrecorded / "checkpoint.safetensors")
    del saved["base_fingerprint"]
    save_tree(saved, unrecorded / "checkpoint.safetensors")
    with pytest.raises(InputError, match="before the base model was recorded in it"):
        train(
            tiny_lm, SAMPLE_PASSAGES, SAMPLE_QUESTIONS, unrecorded, dataclasses.replace(CONFIG, steps=2), progress=False
        )
    (out / "teacher.safetensors").unlink()
    swapped = dataclasses.replace(CONFIG, steps=2, val_articles=["Victoria_(Australia)"])
    with pytest.raises(InputError, match="holding out"):
        train(tiny_lm, SAMPLE_PASSAGES, SAMPLE_QUESTIONS, out, swapped, progress=False)


def test_a_resumed_run_refuses_other_training_data(tiny_lm, tmp_path):
    """The adaptor records the data of the run that writes it: resuming a checkpoint on other
    files (its teacher file deleted, so nothing else would notice) would drop what the earlier
    data held from its record. The same files resume; a checkpoint from before the data was
    recorded in it is not checked."""
    from ragcompress.distill.checkpoint import load_tree, save_tree

    out = tmp_path / "run"
    first = train(tiny_lm, SAMPLE_PASSAGES, SAMPLE_QUESTIONS, out, dataclasses.replace(CONFIG), progress=False)
    assert load_tree(out / "checkpoint.safetensors")["training_data_sha256"] == first.meta["training_data_sha256"]
    (out / "teacher.safetensors").unlink()
    fewer = tmp_path / "questions.jsonl"
    fewer.write_text("".join(SAMPLE_QUESTIONS.read_text().splitlines(keepends=True)[:-1]))
    more = dataclasses.replace(CONFIG, steps=CONFIG.steps + 1)
    with pytest.raises(InputError, match="was trained on other data .*resume with the files it was trained on"):
        train(tiny_lm, SAMPLE_PASSAGES, fewer, out, more, progress=False)
    saved = load_tree(out / "checkpoint.safetensors")
    del saved["training_data_sha256"]
    save_tree(saved, out / "checkpoint.safetensors")
    resumed = train(tiny_lm, SAMPLE_PASSAGES, SAMPLE_QUESTIONS, out, more, progress=False)
    assert resumed.meta["training_data_sha256"] == first.meta["training_data_sha256"]
    assert resumed.meta["metrics"]["steps"] == CONFIG.steps + 1


def test_teacher_examples_left_by_another_split_are_refused(tiny_lm, tmp_path):
    """A ``teacher-train.part`` left by a run of another split holds, under a training question's
    id, passages that are held out now: reusing it would train on them."""
    from dataclasses import asdict

    from ragcompress.distill.adaptor import remove_adapter
    from ragcompress.distill.checkpoint import save_tree
    from ragcompress.distill.distiller import TRAINING_ADAPTER, Distiller
    from ragcompress.distill.teacher import teacher_settings
    from ragcompress.evaluation import read_questions, select_questions
    from ragcompress.indexing.inputs import iter_passages

    questions = read_questions(SAMPLE_QUESTIONS)
    first = select_questions([q for q in questions if not (q.passage_id or "").startswith("Apollo")], 1)[0]
    apollo = [p.text for p in iter_passages(SAMPLE_PASSAGES) if p.article == "Apollo_program"][:2]
    distiller = Distiller(
        tiny_lm, Adaptor.initial(tiny_lm.model, rank=2, alpha=4), CONFIG.teacher_top, CONFIG.continuation
    )
    example = distiller.teacher(first.id, [distiller.tokens.passage(t) for t in apollo], first.question)
    remove_adapter(tiny_lm.model, TRAINING_ADAPTER)
    out = tmp_path / "run"
    out.mkdir()
    saved = {"examples": [asdict(example)], "base_fingerprint": tiny_lm.fingerprint}
    save_tree({**saved, "teacher_settings": teacher_settings(distiller, CONFIG.top_k)}, out / "teacher-train.part")
    with pytest.raises(InputError, match="another split"):
        train(tiny_lm, SAMPLE_PASSAGES, SAMPLE_QUESTIONS, out, dataclasses.replace(CONFIG), progress=False)


def test_a_run_resumed_for_another_compression_is_refused(tiny_lm, tmp_path, monkeypatch):
    """A checkpoint's factors, loss curve and ``held_out_start`` belong to the compression it
    trained for: resuming it for another (here another ``--quant``, another ``--kv-rank``)
    would record one adaptor's curve across two stores. The basis is fitted once per run."""
    from ragcompress.distill import train as training

    fitted = []
    student_basis = training.student_basis

    def spy(*args, **kwargs):
        basis = student_basis(*args, **kwargs)
        fitted.append(basis.ranks("k"))
        return basis

    monkeypatch.setattr(training, "student_basis", spy)
    config = dataclasses.replace(CONFIG, quant="int4", kv_rank=8, calibration_passages=4)
    out = tmp_path / "run"
    train(tiny_lm, SAMPLE_PASSAGES, SAMPLE_QUESTIONS, out, config, progress=False)
    train(tiny_lm, SAMPLE_PASSAGES, SAMPLE_QUESTIONS, out, dataclasses.replace(config, steps=2), progress=False)
    for other, message in [
        (dataclasses.replace(config, steps=3, kv_rank=16), "kv_rank=8 \\(this run: 16\\)"),
        (dataclasses.replace(config, steps=3, quant="int8"), "quant='int4' \\(this run: 'int8'\\)"),
        (dataclasses.replace(config, steps=3, method="global:kvzip", ratio=0.5), "method='none'.*ratio=1.0"),
    ]:
        with pytest.raises(InputError, match=message):
            train(tiny_lm, SAMPLE_PASSAGES, SAMPLE_QUESTIONS, out, other, progress=False)
    assert fitted == [(8,) * tiny_lm.config.num_hidden_layers] * 2


def test_teacher_examples_left_by_another_base_model_are_refused(tiny_lm, tmp_path):
    """A ``teacher-*.part`` holds the base model's distributions: one left by another model's run
    in the same folder would be distilled from as if this model's."""
    from ragcompress.distill.checkpoint import save_tree

    out = tmp_path / "run"
    out.mkdir()
    save_tree({"examples": [], "base_fingerprint": "0" * 64}, out / "teacher-train.part")
    with pytest.raises(InputError, match="teacher-train.part was made with another base model"):
        train(tiny_lm, SAMPLE_PASSAGES, SAMPLE_QUESTIONS, out, dataclasses.replace(CONFIG), progress=False)
    (out / "teacher-train.part").unlink()
    train(tiny_lm, SAMPLE_PASSAGES, SAMPLE_QUESTIONS, out, dataclasses.replace(CONFIG), progress=False)
    from ragcompress.distill.checkpoint import load_tree

    assert load_tree(out / "teacher-train.part")["base_fingerprint"] == tiny_lm.fingerprint


def test_an_adaptor_records_the_articles_of_the_adaptor_it_started_from(tiny_lm, tmp_path):
    """A chain of ``--init-adaptor`` runs over other passages: the last adaptor's
    ``train_articles`` name every article it descends from, so an evaluation (and a further
    run) refuses the first run's articles too. A checkpoint from before the init adaptor's
    articles were recorded resumes only when that adaptor can be read again."""
    from ragcompress.distill.checkpoint import load_tree, save_tree

    first = train(
        tiny_lm, SAMPLE_PASSAGES, SAMPLE_QUESTIONS, tmp_path / "first", dataclasses.replace(CONFIG), progress=False
    )
    assert first.meta["train_articles"] == ["Victoria_(Australia)"]
    renamed = tmp_path / "passages.jsonl"  # the same text under another article's name
    renamed.write_text(SAMPLE_PASSAGES.read_text().replace('"title": "Victoria_(Australia)"', '"title": "Melbourne"'))
    chained = dataclasses.replace(CONFIG, init_adaptor=str(tmp_path / "first" / "adaptor"))
    second = train(tiny_lm, renamed, SAMPLE_QUESTIONS, tmp_path / "second", chained, progress=False)
    assert second.meta["train_articles"] == ["Melbourne", "Victoria_(Australia)"]
    resumed = train(
        tiny_lm, renamed, SAMPLE_QUESTIONS, tmp_path / "second", dataclasses.replace(chained, steps=2), progress=False
    )
    assert resumed.meta["train_articles"] == ["Melbourne", "Victoria_(Australia)"]
    grandchild = dataclasses.replace(
        CONFIG, init_adaptor=str(tmp_path / "second" / "adaptor"), val_articles=["Victoria_(Australia)"]
    )
    with pytest.raises(InputError, match=r"was trained on \['Victoria_\(Australia\)'\], held out here"):
        train(tiny_lm, SAMPLE_PASSAGES, SAMPLE_QUESTIONS, tmp_path / "third", grandchild, progress=False)
    checkpoint = tmp_path / "second" / "checkpoint.safetensors"
    saved = load_tree(checkpoint)
    del saved["init_train_articles"]  # as written before they were recorded
    save_tree(saved, checkpoint)
    unnamed = dataclasses.replace(CONFIG, steps=3)  # no --init-adaptor: its articles are not found
    with pytest.raises(InputError, match="without recording the articles it trained on.*--init-adaptor"):
        train(tiny_lm, renamed, SAMPLE_QUESTIONS, tmp_path / "second", unnamed, progress=False)
    again = train(
        tiny_lm, renamed, SAMPLE_QUESTIONS, tmp_path / "second", dataclasses.replace(chained, steps=3), progress=False
    )
    assert again.meta["train_articles"] == ["Melbourne", "Victoria_(Australia)"]


def test_a_resumed_run_records_the_rank_and_alpha_it_trains(tiny_lm, tmp_path):
    """A checkpoint's factors have the rank and alpha they were made with: a resume asking for
    others is told so, and the adaptor records what it is, not what was asked."""
    out = tmp_path / "run"
    train(tiny_lm, SAMPLE_PASSAGES, SAMPLE_QUESTIONS, out, dataclasses.replace(CONFIG), progress=False)
    asked = dataclasses.replace(CONFIG, steps=CONFIG.steps + 1, rank=CONFIG.rank * 2, alpha=CONFIG.alpha * 2)
    with pytest.warns(UserWarning, match=rf"keeps --rank {CONFIG.rank} \(not {CONFIG.rank * 2}\)"):
        adaptor = train(tiny_lm, SAMPLE_PASSAGES, SAMPLE_QUESTIONS, out, asked, progress=False)
    assert (adaptor.settings["rank"], adaptor.settings["alpha"]) == (CONFIG.rank, CONFIG.alpha)
    assert (adaptor.meta["config"]["rank"], adaptor.meta["config"]["alpha"]) == (CONFIG.rank, CONFIG.alpha)


def test_a_resumed_run_refuses_other_step_settings_fewer_steps_and_another_start(tiny_lm, tmp_path):
    """A resumed run trained the checkpoint's factors whatever it was given, and its adaptor
    recorded the given --lr and --batch for every step, a --steps below the step it exported, or
    an --init-adaptor it never started from (with no init_adaptor_hash). The same command resumes
    (a finished run exports the same adaptor again), and one started from --init-adaptor records
    its start when resumed without it."""
    out = tmp_path / "run"
    first = train(tiny_lm, SAMPLE_PASSAGES, SAMPLE_QUESTIONS, out, dataclasses.replace(CONFIG, steps=2), progress=False)
    start = str(out / "adaptor")
    for other, message in [
        ({"lr": 1e-3}, r"checkpoint.safetensors was trained with lr=0.0003 \(this run: 0.001\); resume with those"),
        ({"batch": 2}, r"was trained with batch=1 \(this run: 2\)"),
        ({"warmup": 1, "seed": 3}, r"was trained with warmup=0 \(this run: 1\), seed=0 \(this run: 3\)"),
        ({"steps": 1}, r"checkpoint.safetensors is at step 2, past --steps 1; give --steps 2 or more"),
        (
            {"init_adaptor": start},
            r"started from the adaptor of zeros, not from --init-adaptor .*leave --init-adaptor out",
        ),
    ]:
        asked = dataclasses.replace(CONFIG, **{"steps": 3, **other})
        with pytest.raises(InputError, match=message):
            train(tiny_lm, SAMPLE_PASSAGES, SAMPLE_QUESTIONS, out, asked, progress=False)
    again = train(tiny_lm, SAMPLE_PASSAGES, SAMPLE_QUESTIONS, out, dataclasses.replace(CONFIG, steps=2), progress=False)
    assert again.hash == first.hash

    warm = tmp_path / "warm"
    started = dataclasses.replace(CONFIG, init_adaptor=start)
    train(tiny_lm, SAMPLE_PASSAGES, SAMPLE_QUESTIONS, warm, started, progress=False)
    other_start = dataclasses.replace(started, steps=2, init_adaptor=str(warm / "adaptor"))
    with pytest.raises(InputError, match=rf"started from adaptor {first.hash[:16]}, not from --init-adaptor"):
        train(tiny_lm, SAMPLE_PASSAGES, SAMPLE_QUESTIONS, warm, other_start, progress=False)
    resumed = train(
        tiny_lm, SAMPLE_PASSAGES, SAMPLE_QUESTIONS, warm, dataclasses.replace(CONFIG, steps=2), progress=False
    )
    assert resumed.meta["config"]["init_adaptor"] == start and resumed.meta["init_adaptor_hash"] == first.hash


def test_a_resumed_checkpoint_without_a_recorded_kind_is_a_cache_adaptor(tmp_path):
    """A cache adaptor's settings name no kind (``Adaptor.kind``): resuming one without ``--kind
    cache`` recorded ``kind: forward`` in the adaptor's config, silently."""
    from ragcompress.distill.resume import resumed_settings

    config = dataclasses.replace(CONFIG)
    with pytest.warns(UserWarning, match=r"keeps --kind cache \(not forward\)"):
        resumed_settings(config, {"rank": CONFIG.rank, "alpha": CONFIG.alpha}, tmp_path / "checkpoint.safetensors")
    assert config.kind == "cache"


def test_kept_rows_are_taken_only_for_the_eviction_they_were_chosen_by(tiny_lm):
    """``kept-rows.safetensors`` outlives a deleted checkpoint: a new run in the folder takes its
    rows only under the same eviction (``--value-norm`` changes which rows KVzip keeps, and was
    not part of the settings), and rows saved before value weighting was recorded still match."""
    from ragcompress.distill.resume import kept_rows_settings

    base = dataclasses.replace(CONFIG, method="global:kvzip", ratio=0.5)
    settings = kept_rows_settings(tiny_lm, base)
    assert settings == json.dumps([tiny_lm.fingerprint, "global:kvzip", 0.5, None, None])
    for other in [{"value_norm": True}, {"ratio": 0.25}, {"keep_first": 2}, {"keep_last": 2}, {"method": "kvzip"}]:
        assert kept_rows_settings(tiny_lm, dataclasses.replace(base, **other)) != settings, other


def test_negative_minutes_unknown_kinds_and_cache_adaptors_for_compressed_stores_are_refused(tiny_lm):
    """A negative budget would train nothing, an unknown kind only failed after the passages were
    embedded. (Models mixing layer types or scaling their RoPE, refused here until 2026-12-05,
    train since each layer's keys move in that layer's own RoPE: tests/test_distill.py.)"""
    from ragcompress.compressors import make_compressor
    from ragcompress.distill.distiller import Distiller

    with pytest.raises(ValueError, match="minutes must be >= 0"):
        dataclasses.replace(CONFIG, minutes=-1)
    with pytest.raises(ValueError, match="kind is 'forward' or 'cache', not 'lora'"):
        dataclasses.replace(CONFIG, kind="lora")
    cache = Adaptor.initial(tiny_lm.model, rank=2, alpha=4, kind="cache")
    with pytest.raises(InputError, match="trained with a 'forward' adaptor, not one of kind 'cache'"):
        Distiller(tiny_lm, cache, teacher_top=4, continuation=2, compressor=make_compressor("global:kvzip", ratio=0.5))


@pytest.mark.parametrize(
    "name, value",
    [(name, least - 1) for name, least in MINIMA.items()]
    + [
        ("steps", -3),
        ("minutes", float("nan")),
        ("lr", 0.0),
        ("lr", -1e-3),
        ("lr", float("nan")),
        ("lr", float("inf")),
    ],
)
def test_train_config_refuses_a_number_below_its_least_value(name, value):
    """Each of these failed only after the teacher pass (torch's "Invalid learning rate", a
    division or modulo by zero, an index error, peft's rank error), or wrote an adaptor of no
    steps (steps 0, lr 0): refused where the settings are made, naming the setting."""
    with pytest.raises(ValueError, match=rf"^{name}\b.* must be .*{value!r}"):
        dataclasses.replace(CONFIG, **{name: value})


def test_every_numeric_training_setting_is_checked():
    """A numeric setting added to TrainConfig without a least value is noticed here (lr is checked
    on its own; ratio by the eviction method; a seed may be any number)."""
    numeric = {f.name for f in dataclasses.fields(TrainConfig) if f.type.split(" |")[0] in ("int", "float")}
    assert numeric - set(MINIMA) == {"lr", "ratio", "seed"}


def test_minutes_0_finishes_a_run_from_its_checkpoint_and_is_refused_without_one(tiny_lm, tmp_path):
    """``--minutes 0`` with no checkpoint exported the adaptor of zeros and advised running the
    same command again, which never trained; with a checkpoint it exports it without new steps."""
    out = tmp_path / "run"
    idle = dataclasses.replace(CONFIG, minutes=0)
    with pytest.raises(InputError, match=f"--minutes 0 takes no training step, and {out} holds no checkpoint"):
        train(tiny_lm, SAMPLE_PASSAGES, SAMPLE_QUESTIONS, out, idle, progress=False)
    first = train(tiny_lm, SAMPLE_PASSAGES, SAMPLE_QUESTIONS, out, dataclasses.replace(CONFIG), progress=False)
    finished = train(
        tiny_lm, SAMPLE_PASSAGES, SAMPLE_QUESTIONS, out, dataclasses.replace(idle, steps=2), progress=False
    )
    assert finished.meta["metrics"]["steps"] == 1 and finished.hash == first.hash


def test_teacher_examples_of_other_questions_are_refused(tiny_lm, tmp_path):
    """Another ``--train-questions`` or ``--val-examples`` on a folder whose teacher examples are
    computed trained and validated on the cached questions while the adaptor recorded the new
    values; the values they were computed with resume. (The checkpoint refuses them first:
    test_a_resumed_checkpoint_refuses_other_teacher_examples; a copy without it tests the file.)"""
    out = tmp_path / "run"
    train(tiny_lm, SAMPLE_PASSAGES, SAMPLE_QUESTIONS, out, dataclasses.replace(CONFIG), progress=False)
    unchecked = tmp_path / "teacher-only"
    shutil.copytree(out, unchecked)
    (unchecked / "checkpoint.safetensors").unlink()
    for other, message in [
        (
            dataclasses.replace(CONFIG, steps=2, train_questions=0),
            r"teacher.safetensors holds the teacher examples of 1 training questions, not of the 15 that "
            r"--train-questions 0 chooses; train with the --train-questions it was computed with, or use another --out",
        ),
        (
            dataclasses.replace(CONFIG, steps=2, val_examples=3),
            r"of 1 held-out questions, not of the 3 that --val-examples 3 chooses",
        ),
    ]:
        with pytest.raises(InputError, match=message):
            train(tiny_lm, SAMPLE_PASSAGES, SAMPLE_QUESTIONS, unchecked, other, progress=False)
    resumed = train(
        tiny_lm, SAMPLE_PASSAGES, SAMPLE_QUESTIONS, out, dataclasses.replace(CONFIG, steps=2), progress=False
    )
    assert resumed.meta["metrics"]["steps"] == 2 and resumed.meta["metrics"]["train_examples"] == 1


def test_teacher_examples_of_other_teacher_settings_are_refused(tiny_lm, tmp_path):
    """A resumed run with another ``--continuation`` distilled from examples of the old length
    while recording the new one; the teacher files (finished and partial) now say what they
    were computed with."""
    from ragcompress.distill.checkpoint import load_tree, save_tree

    out = tmp_path / "run"
    train(tiny_lm, SAMPLE_PASSAGES, SAMPLE_QUESTIONS, out, dataclasses.replace(CONFIG), progress=False)
    assert load_tree(out / "teacher.safetensors")["teacher_settings"]["continuation"] == CONFIG.continuation
    (out / "checkpoint.safetensors").unlink()  # which refuses them first (checked below: its teacher files)
    longer = dataclasses.replace(CONFIG, continuation=CONFIG.continuation + 2)
    with pytest.raises(InputError, match=r"teacher.safetensors holds teacher examples computed with continuation=4"):
        train(tiny_lm, SAMPLE_PASSAGES, SAMPLE_QUESTIONS, out, longer, progress=False)
    part = load_tree(out / "teacher-train.part")
    other = tmp_path / "other"
    other.mkdir()
    save_tree(part, other / "teacher-train.part")  # a killed run's partial examples, resumed with another length
    with pytest.raises(InputError, match=r"teacher-train.part holds teacher examples computed with continuation=4"):
        train(tiny_lm, SAMPLE_PASSAGES, SAMPLE_QUESTIONS, other, longer, progress=False)


def test_teacher_files_from_before_the_model_and_settings_were_recorded_are_refused(tiny_lm, tmp_path):
    """A teacher file in the list format (a ``teacher-*.part`` of a run from before the base-model
    fingerprint was recorded), or one recording no fingerprint or no teacher settings, was
    distilled from after a check of its split only: nothing says it holds this model's
    distributions under this run's ``--continuation``, top-k and teacher width. It is refused by
    name, and the run computes it again once it is deleted."""
    from ragcompress.distill.checkpoint import load_tree, save_tree

    out = tmp_path / "run"
    train(tiny_lm, SAMPLE_PASSAGES, SAMPLE_QUESTIONS, out, dataclasses.replace(CONFIG), progress=False)
    part, finished = load_tree(out / "teacher-train.part"), load_tree(out / "teacher.safetensors")
    longer = dataclasses.replace(CONFIG, continuation=CONFIG.continuation + 2)  # what the old files could not tell
    old_files = [
        ("teacher-train.part", part["examples"]),  # the list format
        ("teacher-val.part", {"examples": load_tree(out / "teacher-val.part")["examples"]}),
        ("teacher.safetensors", {"train": finished["train"], "val": finished["val"]}),
        ("teacher.safetensors", {k: v for k, v in finished.items() if k != "teacher_settings"}),
    ]
    for i, (name, saved) in enumerate(old_files):
        folder = tmp_path / f"old-{i}"
        folder.mkdir()
        save_tree(saved, folder / name)
        with pytest.raises(InputError, match=rf"{name} is a teacher file from before .* delete {name} \(or"):
            train(tiny_lm, SAMPLE_PASSAGES, SAMPLE_QUESTIONS, folder, longer, progress=False)
    (folder / "teacher.safetensors").unlink()
    train(tiny_lm, SAMPLE_PASSAGES, SAMPLE_QUESTIONS, folder, longer, progress=False)
    assert load_tree(folder / "teacher.safetensors")["teacher_settings"]["continuation"] == longer.continuation


def test_a_kept_student_basis_fitted_on_other_passages_is_refused(tiny_lm, tmp_path):
    """``student-basis.json`` recorded the model, the rank spec and how many passages the basis was
    fitted on, not which: a run in the same folder with the same passages in another order (the
    teacher examples still on the training side; a resumed one is refused earlier, its checkpoint
    recording its data) projected on a basis of passages it no longer starts with. The stamp
    records a hash of their texts, and a basis of other passages, or whose stamp
    does not say which, is refused until it is deleted (then fitted again)."""
    from ragcompress.distill.basis import passages_sha256
    from ragcompress.indexing.inputs import iter_passages

    config = dataclasses.replace(CONFIG, quant="int4", kv_rank=8, calibration_passages=4)
    out = tmp_path / "run"
    train(tiny_lm, SAMPLE_PASSAGES, SAMPLE_QUESTIONS, out, config, progress=False)
    stamp = out / "student-basis.json"
    training_side = [p for p in iter_passages(SAMPLE_PASSAGES) if p.article not in config.val_articles]
    assert json.loads(stamp.read_text())["passages_sha256"] == passages_sha256(training_side[:4])
    reordered = tmp_path / "passages.jsonl"
    reordered.write_text("".join(reversed(SAMPLE_PASSAGES.read_text().splitlines(keepends=True))))
    resumed = dataclasses.replace(config, steps=2)
    with pytest.raises(InputError, match="was trained on other data"):  # the checkpoint records its data
        train(tiny_lm, reordered, SAMPLE_QUESTIONS, out, resumed, progress=False)
    (out / "checkpoint.safetensors").unlink()  # a new run in the folder: the kept basis is still checked
    with pytest.raises(InputError, match="student-basis.safetensors was fitted on other passages than this run's"):
        train(tiny_lm, reordered, SAMPLE_QUESTIONS, out, resumed, progress=False)
    recorded = json.loads(stamp.read_text())
    legacy = [recorded["base_fingerprint"], recorded["lowrank"], recorded["calibration_passages"]]
    stamp.write_text(json.dumps(legacy, sort_keys=True))  # as written before the passages were recorded
    with pytest.raises(InputError, match="student-basis.safetensors has no record of the passages"):
        train(tiny_lm, SAMPLE_PASSAGES, SAMPLE_QUESTIONS, out, resumed, progress=False)
    stamp.unlink()
    with pytest.raises(InputError, match="student-basis.safetensors has no record of the passages"):
        train(tiny_lm, SAMPLE_PASSAGES, SAMPLE_QUESTIONS, out, resumed, progress=False)
    (out / "student-basis.safetensors").unlink()
    train(tiny_lm, SAMPLE_PASSAGES, SAMPLE_QUESTIONS, out, resumed, progress=False)
    assert json.loads(stamp.read_text()) == recorded


@pytest.mark.parametrize("source", ["passages", "init adaptor"])
def test_an_adaptor_is_never_written_trained_on_an_article_it_holds_out(source):
    """adaptor_meta's last guard: train_articles (the training passages' articles and an init
    adaptor's) never share an article with val_articles; such an adaptor is refused, not written."""
    from types import SimpleNamespace

    from ragcompress.distill.train import adaptor_meta

    passages = [SimpleNamespace(article="Apollo_program" if source == "passages" else "Yuan_dynasty")]
    ancestry = {"init_train_articles": ["Apollo_program"]} if source == "init adaptor" else {}
    with pytest.raises(RuntimeError, match=r"both trained on and held out: \['Apollo_program'\]"):
        adaptor_meta(
            SimpleNamespace(ref="m", fingerprint="f"),
            SimpleNamespace(val_articles=["Apollo_program"]),
            "0" * 64,
            SimpleNamespace(passages=passages),
            ancestry,
            SimpleNamespace(history=[]),
            0,
            None,
        )


def test_eval_notes_questions_from_the_stores_adaptors_training_articles():
    """``ragcompress eval`` on a store encoded through a packaged adaptor names the questions that
    come from the articles the adaptor was trained on (their figures are not held out)."""
    from types import SimpleNamespace

    import ragcompress.distill as distill
    from ragcompress.cli.answer import adaptor_training_overlap
    from ragcompress.distill.adaptor import Adaptor
    from ragcompress.evaluation import Question
    from ragcompress.testing import made_up_manifest

    adaptor = Adaptor.load(Path(distill.__file__).parent / "adaptors" / "smollm2-135m")
    trained, held_out = adaptor.meta["train_articles"][0], adaptor.meta["val_articles"][0]
    items = [Question(f"q{i}", "Who?", ["x"], f"{a}#0") for i, a in enumerate([trained, held_out, trained])]

    def engine(encoding: dict) -> SimpleNamespace:
        return SimpleNamespace(store=SimpleNamespace(manifest=made_up_manifest(encoding)))

    seen = adaptor_training_overlap(engine({"adaptor": adaptor.hash}), items)
    assert seen == {"adaptor": adaptor.hash, "questions": 2, "articles": [trained]}
    assert adaptor_training_overlap(engine({"adaptor": adaptor.hash}), items[1:2]) is None
    assert adaptor_training_overlap(engine({}), items) is None


def test_training_data_that_would_leak_held_out_passages_is_refused(tiny_lm, tmp_path):
    """A passage id twice (the held-out one's questions would follow the last copy, on the
    training side), or a held-out passage's text in a training passage under another title: both
    are refused before anything trains; so is an --out that cannot be created."""
    lines = SAMPLE_PASSAGES.read_text().splitlines()
    apollo = json.loads(next(line for line in lines if json.loads(line)["id"].startswith("Apollo_program#")))
    duplicated = tmp_path / "duplicated.jsonl"
    duplicated.write_text("\n".join([*lines, json.dumps({**apollo, "title": "Victoria (Australia)"})]) + "\n")
    with pytest.raises(InputError, match=rf"duplicate passage id '{apollo['id']}'"):
        train(tiny_lm, duplicated, SAMPLE_QUESTIONS, tmp_path / "a", dataclasses.replace(CONFIG), progress=False)
    assert not (tmp_path / "a").exists()  # a refused input leaves no empty --out folder behind
    copied = tmp_path / "copied.jsonl"
    copy = {
        **apollo,
        "id": "Victoria_(Australia)#99",
        "title": "Victoria (Australia)",
        "text": apollo["text"] + " Also.",
    }
    copied.write_text("\n".join([*lines, json.dumps(copy)]) + "\n")
    with pytest.raises(
        InputError, match=rf"Victoria_\(Australia\)#99 holds the text of held-out passage {apollo['id']}"
    ):
        train(tiny_lm, copied, SAMPLE_QUESTIONS, tmp_path / "b", dataclasses.replace(CONFIG), progress=False)
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")  # e.g. a model folder given as --out by mistake
    with pytest.raises(InputError, match=r"--out .*model holds other files \(config.json\) and no training run"):
        train(tiny_lm, SAMPLE_PASSAGES, SAMPLE_QUESTIONS, tmp_path / "model", CONFIG, progress=False)
    (tmp_path / "afile").write_text("")
    with pytest.raises(InputError, match="--out .*afile/sub cannot be created"):
        train(tiny_lm, SAMPLE_PASSAGES, SAMPLE_QUESTIONS, tmp_path / "afile" / "sub", CONFIG, progress=False)


def test_a_repeated_val_article_counts_once():
    """``--val-articles A --val-articles A`` over two articles was refused as holding every article
    out, and with more articles hashed the data otherwise than ``--val-articles A``, so a resumed
    run given the title once was refused as trained on other data."""
    from ragcompress.distill.corpus import data_hash, split_articles

    titles = ["Apollo_program", "Victoria_(Australia)"]
    assert split_articles(titles, ["Apollo_program", "Apollo_program"]) == ["Apollo_program"]
    three = [*titles, "Third"]
    repeated = split_articles(three, ["Third", "Apollo_program", "Third"])
    assert repeated == ["Third", "Apollo_program"]
    assert data_hash(SAMPLE_PASSAGES, SAMPLE_QUESTIONS, repeated) == data_hash(
        SAMPLE_PASSAGES, SAMPLE_QUESTIONS, ["Apollo_program", "Third"]
    )


def test_duplicate_question_ids_and_ids_naming_a_view_are_refused(tiny_lm, tmp_path):
    """Teacher examples are keyed by question id: of two training questions sharing an id, one was
    silently dropped (the other's example served both), and an id holding ``@view`` is taken for
    another view of the question before it. Both are refused by id, before the teacher pass."""
    lines = SAMPLE_QUESTIONS.read_text().splitlines(keepends=True)
    first, second = json.loads(lines[0]), json.loads(lines[1])
    shared = tmp_path / "shared.jsonl"
    shared.write_text("".join([lines[0], json.dumps({**second, "id": first["id"]}) + "\n", *lines[2:]]))
    with pytest.raises(InputError, match=rf"question id '{first['id']}' is given more than once \(lines 1, 2\)"):
        train(tiny_lm, SAMPLE_PASSAGES, shared, tmp_path / "shared", dataclasses.replace(CONFIG), progress=False)
    view = tmp_path / "view.jsonl"
    view.write_text("".join([lines[0], json.dumps({**second, "id": f"{first['id']}@view1"}) + "\n", *lines[2:]]))
    with pytest.raises(InputError, match=rf"view.jsonl:2: question id '{first['id']}@view1' holds '@view'"):
        train(tiny_lm, SAMPLE_PASSAGES, view, tmp_path / "view", dataclasses.replace(CONFIG), progress=False)
    assert not (tmp_path / "shared").exists() and not (tmp_path / "view").exists()


def test_views_of_a_side_of_fewer_passages_than_top_k_are_drawn_orders_of_them_all():
    """A training side of fewer passages than ``--top-k`` with ``--views`` above 1 crashed after the
    model loaded (``random.sample``: "Sample larger than population"); each view is now every
    passage retrieved, in a drawn order, as the first view holds them all; a side of top-k or
    more passages draws as before."""
    from ragcompress.distill.corpus import views_of

    views = views_of("q1", [4], 3, 3)
    assert views == [("q1", [4]), ("q1@view1", [4]), ("q1@view2", [4])]
    two = views_of("q1", [4, 7], 3, 4)
    assert [sorted(rows) for _, rows in two] == [[4, 7]] * 4 and two[0] == ("q1", [4, 7])
    assert views_of("q1", [5, 3, 9, 1], 2, 3)[1:] == [("q1@view1", [9, 5]), ("q1@view2", [5, 1])]  # as before


def test_teacher_files_and_extra_questions_of_other_training_data_are_refused(tiny_lm, tmp_path, monkeypatch):
    """A run killed after the teacher pass but before its first checkpoint, run again on an edited
    questions file, trained on the examples of the old question text (keyed by question id)
    while its adaptor recorded the new data's hash; no checkpoint's data check could notice. The
    teacher files and ``extra-questions.jsonl`` now record the data and are refused for other
    data, each by name, until deleted."""
    from ragcompress.distill import synthetic
    from ragcompress.distill import train as training
    from ragcompress.distill.checkpoint import load_tree

    class Killed(Exception):
        pass

    def killed(*args, **kwargs):
        raise Killed

    out = tmp_path / "run"
    questions = tmp_path / "questions.jsonl"
    questions.write_text(SAMPLE_QUESTIONS.read_text())
    with monkeypatch.context() as patch:
        patch.setattr(training, "run_steps", killed)
        with pytest.raises(Killed):
            train(tiny_lm, SAMPLE_PASSAGES, questions, out, dataclasses.replace(CONFIG), progress=False)
    assert not (out / "checkpoint.safetensors").exists()
    qid = load_tree(out / "teacher.safetensors")["train"][0]["qid"]
    records = [json.loads(line) for line in questions.read_text().splitlines()]
    edited = [{**r, "question": "Who was the first governor?"} if r["id"] == qid else r for r in records]
    questions.write_text("".join(json.dumps(r) + "\n" for r in edited))
    for name, also in [
        ("teacher.safetensors", " and the teacher-\\*.part files beside it"),
        ("teacher-train.part", ""),
    ]:
        with pytest.raises(
            InputError, match=rf"{name} holds teacher examples of other training data .*delete {name}{also} to"
        ):
            train(tiny_lm, SAMPLE_PASSAGES, questions, out, dataclasses.replace(CONFIG), progress=False)
        (out / name).unlink()
    (out / "teacher-val.part").unlink()
    adaptor = train(tiny_lm, SAMPLE_PASSAGES, questions, out, dataclasses.replace(CONFIG), progress=False)
    trained = load_tree(out / "teacher.safetensors")
    assert trained["training_data_sha256"] == adaptor.meta["training_data_sha256"]
    assert "first governor" in tiny_lm.tokenizer.decode(trained["train"][0]["suffix"])

    path = tmp_path / "extra-questions.jsonl"
    assert synthetic.synthetic_questions(tiny_lm, [], 0, path, "a" * 64, progress=False) == []
    assert json.loads(path.read_text()) == {"training_data_sha256": "a" * 64}
    with pytest.raises(InputError, match=r"extra-questions.jsonl holds questions written for other training data"):
        synthetic.synthetic_questions(tiny_lm, [], 0, path, "b" * 64, progress=False)


def test_teacher_data_is_checked_in_one_place_and_required_only_where_asked(tmp_path):
    """``check_teacher_data`` is the one data check of teacher files: training's (a file from
    before the data was recorded is checked by the rest only) and the held-out teacher of
    ``benchmarks/distill_eval.py`` (``required``: such a file is refused, to be rebuilt), each
    naming the part file the examples were computed in beside the finished one."""
    from ragcompress.distill.teacher import check_teacher_data

    data = "d" * 64
    for name in ("teacher.safetensors", "teacher-train.part", "teacher-heldout-all.safetensors"):
        check_teacher_data(tmp_path / name, {}, data)  # nothing recorded: unchecked
        check_teacher_data(tmp_path / name, {"training_data_sha256": data}, data, required=True)
    for name, also in [
        ("teacher.safetensors", " and the teacher-*.part files beside it"),
        ("teacher-train.part", ""),
        ("teacher-heldout-all.safetensors", " and teacher-heldout-all.part beside it"),
    ]:
        with pytest.raises(InputError) as refused:
            check_teacher_data(tmp_path / name, {}, data, required=True)
        assert str(refused.value) == (
            f"{tmp_path / name} is from before its training data was recorded in it, so it cannot be checked "
            f"against the passages, questions and held-out articles; delete {name}{also} to compute them again"
        )
        with pytest.raises(InputError, match=rf"of other training data .*; delete {re.escape(name + also)} to"):
            check_teacher_data(tmp_path / name, {"training_data_sha256": "e" * 64}, data)


def test_a_resumed_checkpoint_refuses_other_teacher_examples(tiny_lm, tmp_path):
    """A checkpoint resumed with other --train-questions, --val-examples, --continuation or
    teacher width was refused by the teacher file only, whose message advises deleting it: the
    checkpoint then resumed on another example set (and validation set: held_out_start and
    held_out_end measured on two) while the adaptor recorded the new settings for every step.
    The checkpoint now refuses them, and examples of other ids than it trained on."""
    from ragcompress.distill.checkpoint import load_tree, save_tree

    out = tmp_path / "run"
    train(tiny_lm, SAMPLE_PASSAGES, SAMPLE_QUESTIONS, out, dataclasses.replace(CONFIG), progress=False)
    for name in ("teacher.safetensors", "teacher-train.part", "teacher-val.part"):
        (out / name).unlink()  # as the teacher file's refusal advised
    for other, message in [
        (
            {"train_questions": 6, "val_examples": 8},
            r"train_questions=1 \(this run: 6\), val_examples=1 \(this run: 8\)",
        ),
        ({"continuation": 16, "teacher_top": 8}, r"teacher_top=64 \(this run: 8\), continuation=4 \(this run: 16\)"),
        ({"views": 2}, r"views=1 \(this run: 2\)"),
    ]:
        asked = dataclasses.replace(CONFIG, steps=2, **other)
        with pytest.raises(InputError, match=rf"checkpoint.safetensors was trained on teacher examples of {message}"):
            train(tiny_lm, SAMPLE_PASSAGES, SAMPLE_QUESTIONS, out, asked, progress=False)
    saved = load_tree(out / "checkpoint.safetensors")
    save_tree({**saved, "examples_sha256": "0" * 64}, out / "checkpoint.safetensors")
    more = dataclasses.replace(CONFIG, steps=2)
    with pytest.raises(InputError, match=r"trained on other teacher examples than the 1 training and 1 held-out"):
        train(tiny_lm, SAMPLE_PASSAGES, SAMPLE_QUESTIONS, out, more, progress=False)
    save_tree(saved, out / "checkpoint.safetensors")
    resumed = train(tiny_lm, SAMPLE_PASSAGES, SAMPLE_QUESTIONS, out, more, progress=False)
    assert resumed.meta["metrics"]["steps"] == 2


def test_a_cosine_run_resumes_only_with_its_steps(tiny_lm, tmp_path):
    """Under ``--decay cosine`` the learning rate falls to a tenth by ``--steps``: a run resumed
    with more steps took its remaining steps on another curve than the one it started (the docs
    said a resumed run follows the same curve). It is refused, naming both; its own steps resume,
    and a constant rate takes more steps as before."""
    out = tmp_path / "run"
    cosine = dataclasses.replace(CONFIG, steps=3, decay="cosine", minutes=1e-9)  # stops after its first step
    train(tiny_lm, SAMPLE_PASSAGES, SAMPLE_QUESTIONS, out, dataclasses.replace(cosine), progress=False)
    with pytest.raises(InputError, match=r"falling to a tenth by step 3, and --steps 6 .*resume with --steps 3"):
        train(tiny_lm, SAMPLE_PASSAGES, SAMPLE_QUESTIONS, out, dataclasses.replace(cosine, steps=6), progress=False)
    finished = train(
        tiny_lm, SAMPLE_PASSAGES, SAMPLE_QUESTIONS, out, dataclasses.replace(cosine, minutes=5), progress=False
    )
    assert finished.meta["metrics"]["steps"] == 3
    constant = tmp_path / "constant"
    train(tiny_lm, SAMPLE_PASSAGES, SAMPLE_QUESTIONS, constant, dataclasses.replace(CONFIG), progress=False)
    more = train(
        tiny_lm, SAMPLE_PASSAGES, SAMPLE_QUESTIONS, constant, dataclasses.replace(CONFIG, steps=2), progress=False
    )
    assert more.meta["metrics"]["steps"] == 2


def test_the_seed_draws_the_starting_factors(tiny_lm, tmp_path):
    """``seed`` drew the example order but not the adaptor of zeros' ``A`` factors (always seed 0)."""
    from ragcompress.distill.checkpoint import load_tree

    out = tmp_path / "run"
    train(tiny_lm, SAMPLE_PASSAGES, SAMPLE_QUESTIONS, out, dataclasses.replace(CONFIG, seed=3), progress=False)
    initial = load_tree(out / "checkpoint.safetensors")["initial"]
    drawn = Adaptor.initial(tiny_lm.model, CONFIG.rank, CONFIG.alpha, seed=3).tensors
    assert initial.keys() == drawn.keys() and all(torch.equal(initial[k], drawn[k]) for k in drawn)
    zero = Adaptor.initial(tiny_lm.model, CONFIG.rank, CONFIG.alpha, seed=0).tensors
    assert not all(torch.equal(initial[k], zero[k]) for k in zero)


def test_a_resumed_run_keeps_the_dtype_it_trained_in(tiny_lm, tiny_model_dir, tmp_path):
    """A checkpoint trained with the model in float32 was resumed by a bfloat16 run, and the
    adaptor recorded no dtype. The checkpoint and adaptor record it; another is refused on resume."""
    from ragcompress.distill.checkpoint import load_tree
    from ragcompress.models import load_model

    out = tmp_path / "run"
    adaptor = train(tiny_lm, SAMPLE_PASSAGES, SAMPLE_QUESTIONS, out, dataclasses.replace(CONFIG), progress=False)
    assert adaptor.meta["dtype"] == "float32" and load_tree(out / "checkpoint.safetensors")["dtype"] == "float32"
    half = load_model(str(tiny_model_dir("llama")), dtype="bfloat16")
    more = dataclasses.replace(CONFIG, steps=2)
    with pytest.raises(
        InputError, match=r"trained with the model in float32, not bfloat16; resume with --dtype float32"
    ):
        train(half, SAMPLE_PASSAGES, SAMPLE_QUESTIONS, out, more, progress=False)


def test_plot_history_without_matplotlib_names_the_train_extra(tmp_path, monkeypatch):
    """A library caller of ``plot_history`` without matplotlib gets the one-line error naming the
    extra, not a ModuleNotFoundError traceback (the CLI checks before training)."""
    import sys

    from ragcompress.distill.train import plot_history
    from ragcompress.errors import RagCompressError

    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(RagCompressError, match=r"the train extra \(pip install -e '\.\[train\]' in a checkout\)"):
        plot_history({"train": [], "val": []}, tmp_path / "loss.png", "t")
