"""``benchmarks/distill_eval.py`` reuses an earlier run's full-prefill answers only for the same
questions: pairing another run's answers with these questions by position would score every
row against the wrong reference; and its held-out teacher file only for the same base model and
data."""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import pytest

distill_eval = importlib.import_module("distill_eval")


def write(path: Path, full_prefill: dict) -> Path:
    path.write_text(json.dumps({"full_prefill": full_prefill, "rows": {}}))
    return path


def test_no_earlier_file_means_nothing_reused(tmp_path):
    assert distill_eval.earlier_full_prefill(tmp_path / "none.json", ["a", "b"]) is None


def test_the_same_questions_reuse_the_earlier_answers(tmp_path):
    path = write(tmp_path / "r.json", {"qids": ["a", "b"], "token_ids": [[1, 2], [3]]})
    assert distill_eval.earlier_full_prefill(path, ["a", "b"]) == [[1, 2], [3]]


@pytest.mark.parametrize("qids", [["b", "a"], ["a", "c"], ["a"]])
def test_other_questions_are_refused(tmp_path, qids):
    path = write(tmp_path / "r.json", {"qids": ["a", "b"], "token_ids": [[1, 2], [3]]})
    with pytest.raises(SystemExit, match="other questions"):
        distill_eval.earlier_full_prefill(path, qids)


def test_a_file_without_question_ids_is_reused_only_at_the_same_length(tmp_path):
    path = write(tmp_path / "r.json", {"token_ids": [[1, 2], [3]]})
    assert distill_eval.earlier_full_prefill(path, ["a", "b"]) == [[1, 2], [3]]
    with pytest.raises(SystemExit, match="other questions"):
        distill_eval.earlier_full_prefill(path, ["a", "b", "c"])


def test_the_held_out_teacher_file_is_reused_only_for_its_base_model_and_data(tmp_path):
    from types import SimpleNamespace

    from ragcompress.distill.checkpoint import save_tree

    lm = SimpleNamespace(fingerprint="a" * 64, ref="tiny")
    path = tmp_path / "teacher-heldout-all.safetensors"
    data = "d" * 64
    save_tree({"examples": [], "base_fingerprint": lm.fingerprint, "training_data_sha256": data}, path)
    assert distill_eval.read_held_out_teacher(path, lm, data) == []
    with pytest.raises(SystemExit, match="another base model"):
        distill_eval.read_held_out_teacher(path, SimpleNamespace(fingerprint="b" * 64, ref="other"), data)
    # training's own check (teacher.check_teacher_data), with the file's part beside it named
    with pytest.raises(
        SystemExit,
        match=r"holds teacher examples of other training data \(sha256 d{16}, not e{16}: .*\); delete "
        r"teacher-heldout-all.safetensors and teacher-heldout-all.part beside it to compute them again",
    ):
        distill_eval.read_held_out_teacher(path, lm, "e" * 64)
    save_tree({"examples": [], "base_fingerprint": lm.fingerprint}, path)  # from before the data was recorded
    with pytest.raises(
        SystemExit,
        match=r"is from before its training data was recorded in it, so it cannot be checked against the passages, "
        r"questions and held-out articles; delete teacher-heldout-all.safetensors and teacher-heldout-all.part",
    ):
        distill_eval.read_held_out_teacher(path, lm, data)
    save_tree([], path)  # the list format, from before the model was recorded
    with pytest.raises(SystemExit, match="before its base model was recorded"):
        distill_eval.read_held_out_teacher(path, lm, data)


def test_merge_takes_rows_only_from_a_run_of_the_same_examples_and_adaptors(tmp_path):
    """--merge: another run's rows join this file only when that run answered the same examples
    with the same full-prefill answers through the same adaptor (and compared the same one); a
    file that names no adaptor joins only a run without one."""

    def run(path: Path, meta: dict, token_ids=([1, 2], [3])) -> Path:
        full = {"qids": ["a", "b"], "token_ids": list(token_ids)}
        path.write_text(json.dumps({"full_prefill": full, "rows": {"r": {"n": 2}}, "meta": meta}))
        return path

    answers = [[1, 2], [3]]
    same = run(tmp_path / "same.json", {"adaptor_hash": "h1", "compared_adaptor": {"hash": "c1"}})
    assert distill_eval.mergeable_rows(same, answers, ["a", "b"], "h1", "c1") == {"r": {"n": 2}}
    old = run(tmp_path / "old.json", {})
    assert distill_eval.mergeable_rows(old, answers, ["a", "b"], None, None) == {"r": {"n": 2}}
    with pytest.raises(SystemExit, match="or names none"):
        distill_eval.mergeable_rows(old, answers, ["a", "b"], "h1", None)
    with pytest.raises(SystemExit, match="another adaptor than this run's"):
        distill_eval.mergeable_rows(same, answers, ["a", "b"], "h2", "c1")
    with pytest.raises(SystemExit, match="compared another adaptor"):
        distill_eval.mergeable_rows(same, answers, ["a", "b"], "h1", "c2")
    with pytest.raises(SystemExit, match="other examples"):
        distill_eval.mergeable_rows(run(tmp_path / "x.json", {}, ([9], [3])), answers, ["a", "b"], "h1", None)


def test_an_adaptor_is_measured_only_on_articles_it_never_saw():
    """distill_eval.py checks the trained and the compared adaptor against the articles of the
    examples it measures (each example's question looked up in --questions), before measuring."""
    from types import SimpleNamespace

    def adaptor(*trained: str):
        return SimpleNamespace(hash="f" * 64, meta={"train_articles": list(trained)})

    examples = [SimpleNamespace(qid="q1"), SimpleNamespace(qid="q2")]
    articles = {"q1": "Apollo_program", "q2": "Victoria_(Australia)", "q3": "Yuan_dynasty"}
    distill_eval.check_held_out(examples, articles, adaptor("Yuan_dynasty"), None)
    with pytest.raises(SystemExit, match="was trained on"):
        distill_eval.check_held_out(examples, articles, adaptor("Yuan_dynasty"), adaptor("Victoria_(Australia)"))
    with pytest.raises(SystemExit, match="unrecorded articles"):
        distill_eval.check_held_out(examples, articles, adaptor())
    with pytest.raises(SystemExit, match="cannot be checked"):
        distill_eval.check_held_out([SimpleNamespace(qid="q9")], articles, adaptor("Yuan_dynasty"))


def test_a_title_and_an_id_prefix_name_the_same_article():
    """Training records an article by its passages' title where they have one, the benchmarks
    ask by the question's passage-id prefix: "Yuan dynasty" and "Yuan_dynasty" are one article."""
    from types import SimpleNamespace

    from common import adaptor_provenance

    trained_by_title = SimpleNamespace(hash="f" * 64, meta={"train_articles": ["Yuan dynasty"]})
    with pytest.raises(SystemExit, match="was trained on"):
        adaptor_provenance(trained_by_title, {"Yuan_dynasty"})
    assert adaptor_provenance(trained_by_title, {"Apollo_program"})["train_articles"] == ["Yuan dynasty"]


def test_a_rerun_keeps_only_the_earlier_rows_of_its_own_adaptors():
    """Rows read through the trained (or compared) adaptor are kept only when the earlier file
    names that very adaptor: a file naming another, or none, would have its rows labelled with
    this run's adaptor. Rows of the settings measured again are replaced; base rows stay."""
    earlier = {
        "meta": {"adaptor_hash": "a1", "compared_adaptor": {"hash": "c1"}},
        "rows": {"reuse": {"adaptor": None}, "ad": {"adaptor": "trained"}, "cmp": {"adaptor": "compare"}},
        "index_cost": {"ad": 1.0},
    }
    assert distill_eval.earlier_rows(earlier, [], "a1", "c1") == (earlier["rows"], {"ad": 1.0})
    assert set(distill_eval.earlier_rows(earlier, ["reuse"], "a1", "c1")[0]) == {"ad", "cmp"}
    assert distill_eval.earlier_rows(earlier, [], "a2", "c1") == (
        {"reuse": {"adaptor": None}, "cmp": {"adaptor": "compare"}},
        {},
    )
    for unnamed in ({"compared_adaptor": {"hash": "c1"}}, {}):
        rows, cost = distill_eval.earlier_rows({**earlier, "meta": unnamed}, [], "a1", "c1")
        assert "ad" not in rows and cost == {}
    assert set(distill_eval.earlier_rows({**earlier, "meta": {"adaptor_hash": "a1"}}, [], "a1", "c1")[0]) == {
        "reuse",
        "ad",
    }
    assert distill_eval.earlier_rows({**earlier, "meta": {}}, [], None, None)[0] == earlier["rows"]  # nothing to check


def test_the_held_out_teacher_file_is_reused_only_for_its_own_data_and_draws_no_bar_off_a_terminal(
    tiny_model_dir, tmp_path, capfd, monkeypatch
):
    """``--held-out all`` computes every held-out question's teacher example once into
    ``OUT/teacher-heldout-all.safetensors`` and reads it back on later runs. Only the model and
    the question ids were compared, so a file built from other passages or an edited question was
    measured as this data's teacher; it is refused, with the remedy, by the data's hash (what the
    training's teacher files record). The teacher's bar is drawn only on a terminal, as ``train``
    draws its own (``show_progress``), not into a captured log."""
    from types import SimpleNamespace

    from ragcompress.data import SAMPLE_PASSAGES, SAMPLE_QUESTIONS
    from ragcompress.models import load_model

    lm = load_model(str(tiny_model_dir("llama")))
    adaptor = SimpleNamespace(meta={"val_articles": ["Apollo_program"], "config": {"val_examples": 2}})
    out = tmp_path / "run"
    examples, validated = distill_eval.all_held_out(lm, out, SAMPLE_PASSAGES, SAMPLE_QUESTIONS, adaptor)
    assert len(validated) == 2 and set(validated) <= {e.qid for e in examples}
    assert "teacher (all held-out)" not in capfd.readouterr().err

    def refused(*args, **kwargs):
        raise AssertionError("the teacher was computed again")

    monkeypatch.setattr(distill_eval, "build_examples", refused)
    again, _ = distill_eval.all_held_out(lm, out, SAMPLE_PASSAGES, SAMPLE_QUESTIONS, adaptor)
    assert [e.qid for e in again] == [e.qid for e in examples]
    records = [json.loads(line) for line in SAMPLE_QUESTIONS.read_text().splitlines()]
    edited = next(r for r in records if r["id"] == examples[0].qid)
    edited["question"] = "Which rocket carried the crew?"  # the same id, another question
    questions = tmp_path / "questions.jsonl"
    questions.write_text("".join(json.dumps(r) + "\n" for r in records))
    with pytest.raises(
        SystemExit,
        match=r"teacher-heldout-all.safetensors holds teacher examples of other training data .*"
        r"delete teacher-heldout-all.safetensors and teacher-heldout-all.part beside it to compute them again",
    ):
        distill_eval.all_held_out(lm, out, SAMPLE_PASSAGES, questions, adaptor)
