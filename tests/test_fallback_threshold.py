"""benchmarks/fallback_threshold.py prices a fallback margin from per-question records."""

from __future__ import annotations

import fallback_threshold  # benchmarks/ is on pytest's pythonpath
import pytest


def record(margin: float, agree: float, ttft: float) -> dict:
    return {"full": {"ttft": 4.0}, "prefix_cached_ttft": 3.0, "reuse": {"margin": margin, "agree": agree, "ttft": ttft}}


def test_questions_below_the_margin_agree_and_pay_a_prefix_cached_prefill():
    records = [record(0.01, 0.0, 0.5), record(0.2, 1.0, 0.5), record(0.3, 0.0, 0.5), record(0.4, 1.0, 0.5)]
    none = fallback_threshold.price(records, "reuse", 0.0)
    assert (none["fallback"], none["agreement"], none["ttft_speedup_mean"]) == (0.0, 0.5, 8.0)
    one = fallback_threshold.price(records, "reuse", 0.1)
    assert (one["fallback"], one["agreement"]) == (0.25, 0.75)
    assert one["ttft_speedup_mean"] == pytest.approx(4.0 / (0.5 + 3.0 / 4))  # the mean carries the fallback
    assert one["ttft_speedup_median"] == 8.0  # the median does not


def test_a_look_ahead_takes_the_smallest_margin_up_to_where_the_answer_leaves_full_prefills():
    agreeing = {"full": {"tokens": [5, 6]}, "reuse": {"margin": 0.5, "margins": [0.5, 0.1, 0.4], "greedy": [5, 6, 0]}}
    leaving = {"full": {"tokens": [5, 6]}, "reuse": {"margin": 0.5, "margins": [0.5, 0.3, 0.01], "greedy": [5, 7, 0]}}
    assert fallback_threshold.smallest_margin(agreeing, "reuse", 1) == 0.5
    assert fallback_threshold.smallest_margin(agreeing, "reuse", 2) == 0.1
    assert fallback_threshold.smallest_margin(leaving, "reuse", 3) == 0.3  # its own margins end where it leaves


def test_a_measured_fallback_prices_questions_below_the_margin_by_its_own_records():
    records = [record(0.01, 0.0, 0.5), record(0.2, 1.0, 0.5)]
    for r, agree in zip(records, (0.0, 1.0), strict=True):
        r["reuse+f0.999"] = {"agree": agree, "ttft": 2.5, "backend": "fallback"}
    one = fallback_threshold.price(records, "reuse", 0.1, measured="reuse+f0.999")
    assert (one["fallback"], one["agreement"]) == (0.5, 0.5)  # its fallback disagreed
    assert one["ttft_speedup_mean"] == pytest.approx(4.0 / ((2.5 + 0.5) / 2))
    records[0]["reuse+f0.999"]["backend"] = "dense"
    with pytest.raises(ValueError, match="did not fall back"):
        fallback_threshold.price(records, "reuse", 0.1, measured="reuse+f0.999")
