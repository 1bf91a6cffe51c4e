"""``benchmarks/compression_quality.py``'s row figures (``summarise``) come from
``ragcompress.evaluation.Quality``."""

from __future__ import annotations

import importlib
from types import SimpleNamespace

import pytest

from ragcompress.evaluation import Question

compression_quality = importlib.import_module("compression_quality")  # benchmarks/ is on pytest's pythonpath


def bench(*golds: str) -> SimpleNamespace:
    return SimpleNamespace(questions=[Question(str(i), f"q{i}", [g]) for i, g in enumerate(golds)])


def test_a_row_scores_every_question():
    row = compression_quality.summarise(bench("red", "blue"), ["red", "green"], ["red", "blue"])
    assert row == {"sub_em": 0.5, "f1": 0.5, "agreement": 0.5}


def test_a_short_reference_list_is_an_error_not_a_lower_agreement():
    """zip(strict=False) paired the first answers only and divided by all of them: agreement 0.5
    for two answers that both equal full prefill's, when one full-prefill answer was missing."""
    with pytest.raises(ValueError, match="one of each per question"):
        compression_quality.summarise(bench("red", "blue"), ["red", "blue"], ["red"])
