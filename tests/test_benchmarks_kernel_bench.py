"""``benchmarks/kernel_bench.py``'s GPU timer reports the median per call, as every speed figure
of the project does, not ``triton.testing.do_bench``'s default, the mean."""

from __future__ import annotations

import importlib
import statistics

import pytest

triton_testing = pytest.importorskip("triton.testing")
kernel_bench = importlib.import_module("kernel_bench")  # benchmarks/kernel_bench.py


def test_cuda_time_is_the_median_not_the_mean(monkeypatch):
    samples_ms = [1.0, 1.0, 1.0, 1.0, 21.0]  # one slow call among fast ones

    def fake_do_bench(fn, warmup=25, rep=100, grad_to_none=None, quantiles=None, return_mode="mean"):
        fn()
        return getattr(statistics, return_mode)(samples_ms)  # as do_bench reduces its samples

    monkeypatch.setattr(triton_testing, "do_bench", fake_do_bench)
    calls = []
    assert kernel_bench.cuda_time(lambda: calls.append(1)) == pytest.approx(1.0e-3)
    assert calls
