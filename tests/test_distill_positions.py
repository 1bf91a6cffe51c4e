"""``ragcompress train`` within the model's positions (``ragcompress.kv.rope.position_limit``),
as ``index`` and ``ask`` are.

Past the limit a full prefill is not what cached pieces compute (LongRoPE's long factors, dynamic
NTK's rescaled base), so the teacher would teach what the runtime never serves, and ``ask``
refuses the prompt. Until 2026-12 train checked neither its teacher's prompts (a LongRoPE-384
model trained on 577-position prompts, teacher and a zero adaptor 0.45 top-1 apart) nor the
learned scorer's KVzip probe, which reaches about ``prefix + 2n`` positions and ran after the last
step: a passage longer than about half the positions stopped the run there with nothing saved.
"""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from ragcompress.data import SAMPLE_PASSAGES, SAMPLE_QUESTIONS
from ragcompress.distill import synthetic
from ragcompress.distill import teacher as teacher_module
from ragcompress.distill.adaptor import Adaptor
from ragcompress.distill.distiller import MAX_ANSWER, Distiller
from ragcompress.distill.teacher import Planned, check_positions
from ragcompress.distill.train import TrainConfig, train
from ragcompress.errors import InputError
from ragcompress.models import load_model

CONFIG = TrainConfig(
    top_k=3, rank=2, alpha=4, steps=1, batch=1, train_questions=2, val_examples=1, continuation=4,
    scorer_passages=0, eval_every=1, checkpoint_every=1, val_articles=["Apollo_program"],
)  # fmt: skip


def longrope(tiny_model_dir, original: int):
    """A tiny Phi-3 with LongRoPE (as tests/test_runtime.py builds it): short factors up to
    ``original`` positions, long ones past it (``max_position_embeddings`` stays 4096)."""
    rope = {
        "rope_type": "longrope",
        "short_factor": [1.0] * 8,
        "long_factor": [4.0 + i for i in range(8)],
        "original_max_position_embeddings": original,
    }
    return load_model(str(tiny_model_dir("phi3", rope_scaling=rope, original_max_position_embeddings=original)))


def dynamic_ntk(tiny_model_dir, positions: int):
    """A tiny Llama with dynamic NTK scaling: its base rescales past ``positions``."""
    rope = {"rope_type": "dynamic", "factor": 4.0}
    return load_model(str(tiny_model_dir("llama", rope_scaling=rope, max_position_embeddings=positions)))


@pytest.fixture
def no_teacher(monkeypatch):
    def refused(*args, **kwargs):
        raise AssertionError("the teacher pass ran")

    monkeypatch.setattr(Distiller, "teacher", refused)


@pytest.mark.parametrize("model, limit", [(longrope, 384), (dynamic_ntk, 300)], ids=["longrope", "dynamic"])
def test_train_refuses_prompts_past_the_models_positions_before_the_teacher_pass(
    tiny_model_dir, tmp_path, no_teacher, model, limit
):
    """Three retrieved sample passages with the prefix and a question need about 600 positions:
    refused by the question's id and text, with train's remedy, before any teacher pass (a
    held-out question as much as a training one) and with nothing written."""
    lm = model(tiny_model_dir, limit)
    out = tmp_path / "run"
    with pytest.raises(
        InputError,
        match=rf"question \S+ \('[^']+\?'\) with its 3 retrieved passages needs \d+ positions .* handles {limit}, "
        r"so ask would refuse it; train with a lower --top-k or split the long passages",
    ):
        train(lm, SAMPLE_PASSAGES, SAMPLE_QUESTIONS, out, dataclasses.replace(CONFIG), progress=False)
    assert not out.exists()


@pytest.mark.parametrize("continuation", [8, 32], ids=["answer-reaches-furthest", "continuation-reaches-furthest"])
def test_the_teacher_is_checked_for_the_furthest_position_it_reaches(tiny_model_dir, continuation):
    """``teacher_positions`` is the furthest any of the teacher's calls reaches (the last answer
    token's, or the reconstruction's with a longer continuation), as the model's rotary embedding
    sees it: with LongRoPE's original length exactly that, the teacher and a zero adaptor's
    student agree (short factors everywhere) and the example is accepted; one position less, it
    is refused."""
    question = "Where did Apollo 11 land?"

    def zero_student(original: int) -> Distiller:
        lm = longrope(tiny_model_dir, original)
        torch.manual_seed(0)
        return Distiller(lm, Adaptor.initial(lm.model, rank=4, alpha=8), teacher_top=16, continuation=continuation)

    distiller = zero_student(384)
    passages = [distiller.tokens.passage(" ".join(["Apollo 11 landed on the Moon in 1969."] * 8))]
    needed = distiller.teacher_positions(passages, distiller.tokens.suffix(question))
    reached = []

    def record(module, args, kwargs):
        positions = kwargs.get("position_ids", args[1] if len(args) > 1 else None)
        reached.append(int(positions.max()) + 1)

    distiller = zero_student(needed)
    hook = distiller.model.model.rotary_emb.register_forward_pre_hook(record, with_kwargs=True)
    try:
        example = distiller.teacher("q", passages, question)
    finally:
        hook.remove()
    assert len(example.answer) == MAX_ANSWER and max(reached) == needed
    with torch.no_grad():
        losses = distiller.losses(example)
    assert float(losses.kl_answer) < 1e-6 and float(losses.kl_cont) < 1e-6
    planned = [Planned("q", question, passages)]
    check_positions(distiller, planned, [])
    with pytest.raises(InputError, match=f"needs {needed} positions .* handles {needed - 1}"):
        check_positions(zero_student(needed - 1), planned, [])


def test_a_teacher_file_computed_past_the_positions_is_refused(tiny_model_dir, tmp_path, monkeypatch):
    """A run whose teacher examples were computed before prompts were checked (here: with the
    check switched off) is not resumed on them."""
    lm = longrope(tiny_model_dir, 384)
    out = tmp_path / "run"
    with monkeypatch.context() as unchecked:
        unchecked.setattr(teacher_module, "check_positions", lambda *args: None)
        train(lm, SAMPLE_PASSAGES, SAMPLE_QUESTIONS, out, dataclasses.replace(CONFIG), progress=False)
    assert (out / "teacher.safetensors").is_file()
    with pytest.raises(InputError, match=r"with its 3 retrieved passages needs \d+ positions .* handles 384"):
        train(lm, SAMPLE_PASSAGES, SAMPLE_QUESTIONS, out, dataclasses.replace(CONFIG, steps=2), progress=False)


def test_the_scorer_is_fitted_on_the_passages_its_probe_can_score(tiny_model_dir, tmp_path):
    """With 384 positions three of the twelve training passages (207, 237 and 191 tokens) are too
    long for KVzip's probe, though not for one-passage prompts: they are left out with a warning,
    and the run saves an adaptor with its scorer (it stopped after its last step, nothing saved)."""
    lm = longrope(tiny_model_dir, 384)
    out = tmp_path / "run"
    config = dataclasses.replace(CONFIG, top_k=1, scorer_passages=2)
    with pytest.warns(UserWarning, match="3 of 12 training passages are too long for the learned scorer's KVzip probe"):
        adaptor = train(lm, SAMPLE_PASSAGES, SAMPLE_QUESTIONS, out, config, progress=False)
    assert adaptor.has_scorer and Adaptor.load(out / "adaptor").has_scorer


def test_a_run_whose_passages_no_scorer_probe_fits_is_refused_up_front(tiny_model_dir, tmp_path, no_teacher):
    """With 250 positions no training passage (116 tokens or more) fits the probe: refused before
    any teacher pass, naming train's option, not index's methods."""
    lm = longrope(tiny_model_dir, 250)
    out = tmp_path / "run"
    config = dataclasses.replace(CONFIG, top_k=1, scorer_passages=None)  # the default: 40 passages
    with pytest.raises(
        InputError,
        match=r"no training passage is short enough .* handles 250 positions\); train with --scorer-passages 0",
    ):
        train(lm, SAMPLE_PASSAGES, SAMPLE_QUESTIONS, out, config, progress=False)
    assert not out.exists()


@pytest.mark.parametrize("method", ["kvzip", "global:kvzip"])
def test_a_passage_past_the_students_probe_is_refused_before_the_teacher_pass(
    tiny_model_dir, tmp_path, no_teacher, method
):
    """A student trained for a KVzip store scores every passage it reads with KVzip's probe, which
    repeats the passage after it (about prefix + 2n positions), during the steps: with 384
    positions a training example's 238-token passage stopped the run at its first step, after the
    whole teacher pass. Refused before it, by the passage's id, with the remedy."""
    lm = longrope(tiny_model_dir, 384)
    out = tmp_path / "run"
    config = dataclasses.replace(CONFIG, top_k=1, train_questions=0, method=method, ratio=0.5)
    with pytest.raises(
        InputError,
        match=rf"^--method {method} scores passage Victoria_\(Australia\)#5 \(238 tokens, read by question \S+\) with "
        r"a probe past the model's positions \(.* handles 384\); train for a --method that does not probe past the passage "
        r"\(snapkv, expected-attention, knorm\) or split the passage$",
    ):
        train(lm, SAMPLE_PASSAGES, SAMPLE_QUESTIONS, out, config, progress=False)
    assert not out.exists()


@pytest.mark.parametrize("method", ["kvzip", "global:kvzip"])
def test_a_student_that_keeps_every_row_is_not_refused_for_its_probe(tiny_model_dir, tmp_path, no_teacher, method):
    """At ``--ratio 1`` (train's default) a KVzip student keeps every row and never scores a
    passage (``compress`` returns before the probe), so the long passage the test above refuses at
    0.5 is no reason to stop: the run goes on to its teacher pass. It was refused by the probe's
    reach alone."""
    lm = longrope(tiny_model_dir, 384)
    config = dataclasses.replace(CONFIG, top_k=1, train_questions=0, method=method, ratio=1.0)
    with pytest.raises(AssertionError, match="the teacher pass ran"):
        train(lm, SAMPLE_PASSAGES, SAMPLE_QUESTIONS, tmp_path / "run", config, progress=False)


def test_every_planned_example_is_checked_where_it_is_planned(tiny_model_dir, tmp_path, embedder, no_teacher):
    """Teacher examples are computed only from ``plan_examples``' plans, so the check is made there,
    once per route: train's (both sides planned, and so checked, before either is computed) and
    ``build_examples``' (``benchmarks/distill_eval.py``'s held-out teacher) alike. Until 2026-12 each
    route called it after planning, and ``compute_examples``, public then, computed any plan unchecked."""
    from ragcompress.distill.corpus import load_corpora
    from ragcompress.distill.teacher import build_examples, plan_examples
    from ragcompress.indexing.inputs import iter_passages

    lm = longrope(tiny_model_dir, 384)
    distiller = Distiller(lm, Adaptor.initial(lm.model, rank=2, alpha=4))
    _, held_out = load_corpora(list(iter_passages(SAMPLE_PASSAGES)), SAMPLE_QUESTIONS, ["Apollo_program"], embedder)
    refused = r"with its 3 retrieved passages needs \d+ positions .* handles 384"
    with pytest.raises(InputError, match=refused):
        plan_examples(distiller, held_out, embedder, 3, None)
    with pytest.raises(InputError, match=refused):
        build_examples(distiller, held_out, embedder, 3, None, "teacher", tmp_path / "teacher.part")
    assert plan_examples(distiller, held_out, embedder, 1, 2)  # one passage each: within the positions


LONG_TEXT = " ".join(f"Sentence number {i} tells about the long essay on rivers and mountains." for i in range(40))


@pytest.mark.parametrize(
    "stage, record, extra, options, refusal",
    [
        pytest.param(
            "ragcompress.distill.synthetic.write_question",
            {"id": "essay#0", "title": "essay", "text": LONG_TEXT},
            True,
            {},
            r"^passage essay#0 needs \d+ positions for the question the base model writes about it \(the passage, "
            rf"the request and {synthetic.MAX_QUESTION_TOKENS} question tokens\), but .* handles 384; split it$",
            id="extra-passage-question",
        ),
        pytest.param(
            "ragcompress.indexing.calibrate.fit_calibration_basis",
            {"id": "Victoria_(Australia)#99", "title": "Victoria_(Australia)", "text": LONG_TEXT},
            False,
            {"quant": "int4", "kv_rank": 8, "calibration_passages": 4},
            r"^passage Victoria_\(Australia\)#99 needs \d+ positions to be encoded for the --kv-rank student's "
            r"basis \(the prefix and the passage: the first 4 training passages, --calibration-passages\), but .* "
            r"handles 384; split it$",
            id="kv-rank-calibration-passage",
        ),
    ],
)
def test_a_passage_the_base_model_reads_alone_past_the_positions_is_refused_before_it_is_read(
    tiny_model_dir, tmp_path, monkeypatch, no_teacher, stage, record, extra, options, refusal
):
    """Two steps of train run the base model on one passage. ``--extra-passages``: it writes a
    question about each chosen passage from a prompt of the passage, the request and its answer.
    ``--kv-rank``: the student's basis is fitted on the first ``--calibration-passages`` training
    passages, each encoded alone after the prefix. A passage past the positions went through
    either unchecked (LongRoPE's long factors: a question from another model than the one trained,
    a basis fitted on what the runtime never serves) and the run went on; refused before the step,
    by the passage's id. An ``extra`` passage comes in a file of its own, a training one first in
    the training passages."""

    def refused(*args, **kwargs):
        raise AssertionError(f"{stage} ran")

    monkeypatch.setattr(stage, refused)
    long = tmp_path / "long.jsonl"
    long.write_text(json.dumps(record) + "\n" + ("" if extra else SAMPLE_PASSAGES.read_text()))
    config = dataclasses.replace(CONFIG, **options, **({"extra_passages": str(long)} if extra else {}))
    lm = longrope(tiny_model_dir, 384)
    out = tmp_path / "run"
    with pytest.raises(InputError, match=refusal):
        train(lm, SAMPLE_PASSAGES if extra else long, SAMPLE_QUESTIONS, out, config, progress=False)
    assert not out.exists()
