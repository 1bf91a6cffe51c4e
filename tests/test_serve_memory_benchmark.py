"""``benchmarks/serve_memory.py``'s arithmetic: the growth slope and the paired TTFT ratios that the
``serve-memory`` table of docs/serve.md reports."""

from __future__ import annotations

import importlib

import pytest

pytest.importorskip("httpx")
serve_memory = importlib.import_module("serve_memory")  # benchmarks/serve_memory.py
MIB = 2**20


def test_growth_is_the_least_squares_slope_in_mib_per_100_requests():
    rising = [1000 * MIB + i * MIB // 2 for i in range(50)]  # half a MiB more after every request
    assert serve_memory.slope_mib_per_100(rising) == pytest.approx(50.0)
    noisy_flat = [900 * MIB + (MIB if i % 2 else -MIB) for i in range(40)]
    assert abs(serve_memory.slope_mib_per_100(noisy_flat)) < 0.5
    assert serve_memory.slope_mib_per_100([7 * MIB] * 20) == 0


def test_ratios_pair_the_same_request_of_the_same_round_and_leave_out_the_warmup():
    plan = [("q", 3), ("q", 2), ("q", 6), ("q", 12)]
    runs = [
        {"round": 0, "setting": "off", "ttft_s": [9.0, 2.0, 2.0, 4.0]},
        {"round": 0, "setting": "on", "ttft_s": [1.0, 1.0, 1.0, 1.0]},
        {"round": 1, "setting": "on", "ttft_s": [1.0, 2.0, 2.0, 2.0]},  # the order alternates by round
        {"round": 1, "setting": "off", "ttft_s": [1.0, 2.0, 2.0, 2.0]},
    ]
    ratios = serve_memory.paired_ratios(runs, plan, warmup=1)
    # requests 1..3 of each round: 0.5, 0.5, 0.25 and 1, 1, 1; the first request (9.0) is warm-up
    assert ratios["requests"] == 6
    assert ratios["all"] == pytest.approx(0.75)
    assert ratios["top1-4"] == pytest.approx(0.75)  # 0.5 and 1.0 (top-2)
    assert ratios["top5-8"] == pytest.approx(0.75)  # 0.5 and 1.0 (top-6)
    assert ratios["top9-16"] == pytest.approx(0.625)  # 0.25 and 1.0 (top-12)


def test_the_plan_is_the_same_for_every_service_and_draws_every_top_k_in_range():
    questions = ["a", "b", "c"]
    plan = serve_memory.request_plan(questions, 300, 16, seed=0)
    assert plan == serve_memory.request_plan(questions, 300, 16, seed=0)
    assert [q for q, _ in plan[:4]] == ["a", "b", "c", "a"]
    assert {k for _, k in plan} == set(range(1, 17))
