"""SQuAD answer metrics against the behaviour of the official SQuAD v1.1 evaluation script
(``evaluate-v1.1.py``: ``normalize_answer``, ``f1_score``, max over ground truths), plus the
substring match (sub-EM) ragcompress reports."""

from __future__ import annotations

import collections
import re
import string

import pytest

from ragcompress.errors import InputError
from ragcompress.evaluation import Question, f1, normalize_answer, select_questions, sub_em


def official_normalize(s: str) -> str:
    """``normalize_answer`` of evaluate-v1.1.py, verbatim in behaviour."""

    def remove_articles(text: str) -> str:
        return re.sub(r"\b(a|an|the)\b", " ", text)

    def white_space_fix(text: str) -> str:
        return " ".join(text.split())

    def remove_punc(text: str) -> str:
        exclude = set(string.punctuation)
        return "".join(ch for ch in text if ch not in exclude)

    return white_space_fix(remove_articles(remove_punc(s.lower())))


def official_f1(prediction: str, ground_truths: list[str]) -> float:
    """``metric_max_over_ground_truths(f1_score, ...)`` of evaluate-v1.1.py."""

    def f1_score(pred: str, truth: str) -> float:
        pred_tokens, truth_tokens = official_normalize(pred).split(), official_normalize(truth).split()
        common = collections.Counter(pred_tokens) & collections.Counter(truth_tokens)
        num_same = sum(common.values())
        if num_same == 0:
            return 0
        precision, recall = num_same / len(pred_tokens), num_same / len(truth_tokens)
        return (2 * precision * recall) / (precision + recall)

    return max(f1_score(prediction, truth) for truth in ground_truths)


CASES = [
    ("The Cat!", ["cat"]),
    ("A  man, a plan, a canal: Panama", ["man plan canal panama"]),
    ("Denver Broncos", ["Denver Broncos", "The Denver Broncos"]),
    ("the Broncos of Denver", ["Denver Broncos"]),
    ("Santa Clara, California", ["Levi's Stadium", "Santa Clara"]),
    ("don't stop", ["dont"]),
    ("an apple and the pear", ["apple pear"]),
    ("1,000 people", ["1000"]),
    ("", ["anything"]),
    ("Theatre", ["the atre"]),
    ("Geelong, Victoria", ["Melbourne"]),
    ("ÉCOLE normale", ["école Normale"]),
]


@pytest.mark.parametrize(("prediction", "golds"), CASES)
def test_normalisation_and_f1_match_the_official_script(prediction, golds):
    assert normalize_answer(prediction) == official_normalize(prediction)
    assert f1(prediction, golds) == pytest.approx(official_f1(prediction, golds))


def test_known_values():
    assert normalize_answer("The  Cat, the HAT!") == "cat hat"
    assert f1("the cat sat", ["cat"]) == pytest.approx(2 * 0.5 * 1.0 / 1.5)  # precision 1/2, recall 1
    assert f1("cat", ["dog", "cat"]) == 1.0  # best over golds
    assert f1("", ["cat"]) == 0.0 and f1("dog", ["cat"]) == 0.0


def test_sub_em_is_a_whole_word_match_after_normalisation():
    assert sub_em("It is in Paris, France.", ["paris"]) == 1.0
    assert sub_em("Parisian food", ["Paris"]) == 0.0  # words, not characters
    assert sub_em("the Denver Broncos won", ["Denver Broncos"]) == 1.0
    assert sub_em("Denver", ["Denver Broncos"]) == 0.0
    assert sub_em("anything", ["The", "!"]) == 0.0  # golds that normalise to nothing never match
    assert sub_em("Levi's Stadium", ["Levis Stadium"]) == 1.0


def _questions(*passage_ids):
    return [Question(str(i), f"q{i}?", ["a"], pid) for i, pid in enumerate(passage_ids)]


def test_select_questions_by_article_then_evenly_spaced():
    """What a benchmark's ``--sample N --articles A`` and ``ragcompress eval --sample --article`` ask."""
    qs = _questions("A#0", "A#1", "B#0", "B#1", "B#2", "C#0", "C#1", "C#2")
    assert select_questions(qs) == qs
    assert [q.id for q in select_questions(qs, articles=["B", "C"])] == ["2", "3", "4", "5", "6", "7"]
    assert [q.id for q in select_questions(qs, 3, ["B", "C"])] == ["2", "4", "6"]
    assert [q.id for q in select_questions(qs, 4)] == ["0", "2", "4", "6"]
    assert select_questions(qs, 100) == qs
    with pytest.raises(InputError, match=r"no question of the articles \['D'\]; the file's articles: A, B, C$"):
        select_questions(qs, articles=["D"])
    with pytest.raises(InputError, match=r"\['B#2'\] \(name an article without its #N\)"):
        select_questions(qs, articles=["B#2"])
    with pytest.raises(InputError, match="passage_id"):
        select_questions([*qs, Question("x", "q?", ["a"])], articles=["A"])


def test_questions_outside_a_sample_are_the_rest_of_its_articles():
    """``--outside N``: the confirmation sample is exactly what ``--sample N`` left out."""
    qs = _questions("A#0", "A#1", "B#0", "B#1", "B#2", "C#0", "C#1", "C#2")
    chosen = select_questions(qs, 3, ["B", "C"])
    rest = select_questions(qs, articles=["B", "C"], outside=3)
    assert [q.id for q in rest] == ["3", "5", "7"]
    assert not {q.id for q in rest} & {q.id for q in chosen}
    assert sorted(q.id for q in rest + chosen) == [q.id for q in select_questions(qs, articles=["B", "C"])]
    assert [q.id for q in select_questions(qs, 2, ["B", "C"], outside=3)] == ["3", "5"]
    with pytest.raises(InputError, match="no question is left"):
        select_questions(qs, articles=["A"], outside=2)


GOOD = '{"id": "1", "question": "Who?", "answers": ["Melbourne"], "passage_id": "Victoria#0"}\n'


@pytest.mark.parametrize(
    ("line", "message"),
    [
        (
            b'{"id": "2", "question": "Who?", "answers": [{"text": "Melbourne", "answer_start": 3}]}\n',
            "list of strings",
        ),
        (b'{"id": "2", "question": "Who?", "answers": "Melbourne"}\n', "list of strings"),
        (b'{"id": "2", "question": "Who?", "answers": [1901]}\n', "list of strings"),
        (b'{"id": "2", "question": "Who?", "answers": []}\n', "'2' has no answer to score against"),
        (b'{"id": "2", "question": "Who?", "answers": ["The", " "]}\n', "'2' has no answer to score against"),
        (b'{"id": "2", "question": "Who?", "answers": ["x"], "passage_id": 7}\n', "passage_id"),
        (b'{"id": "2", "question": "Caf\xe9?", "answers": ["x"]}\n', "expected"),
    ],
)
def test_questions_that_cannot_be_scored_are_refused_naming_the_line(tmp_path, line, message):
    """A SQuAD-style ``answers`` (objects, or one string) once became a list of characters or
    crashed the scoring after every question was answered; an empty answer list scored 0 silently."""
    from ragcompress.evaluation import read_questions

    path = tmp_path / "questions.jsonl"
    path.write_bytes(GOOD.encode() + line)
    with pytest.raises(InputError, match=f"questions.jsonl:2: .*{re.escape(message)}"):
        read_questions(path, scored=True)


def test_questions_without_answers_are_read_when_nothing_is_scored(tmp_path):
    from ragcompress.evaluation import read_questions

    path = tmp_path / "questions.jsonl"
    path.write_text(GOOD + '{"id": "2", "question": "Where?", "answers": []}\n{"id": "3", "question": "Who?"}\n')
    assert [q.answers for q in read_questions(path)] == [["Melbourne"], [], []]  # bench asks; it scores nothing
    path.write_text(GOOD + '{"id": "3", "question": "Who?"}\n')
    with pytest.raises(InputError, match='questions.jsonl:2: expected {"id", "question", "answers": \\[...\\]}'):
        read_questions(path, scored=True)
    assert [q.id for q in read_questions(path, scored=True, limit=1)] == ["1"]
