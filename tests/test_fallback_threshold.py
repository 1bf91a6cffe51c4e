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
