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


def test_cpu_run_times_packed_and_latent_segments():
    """Each scheme's rows (the latent kernel's ``smallest`` shape among them) on the CPU: the
    reference path and SDPA over an uncompressed cache of the same length, decode and prefill."""
    import argparse

    args = argparse.Namespace(
        contexts=[256], schemes=["int4", "latent"], q_heads=4, kv_heads=2, head_dim=64, passage_len=128,
        prefill_len=8, repeats=1,
    )  # fmt: skip
    rows = kernel_bench.run_kernels(args)
    assert [(r["scheme"], r["phase"]) for r in rows] == [
        ("int4", "decode"), ("int4", "prefill"), ("latent", "decode"), ("latent", "prefill")
    ]  # fmt: skip
    assert all(r["deq+sdpa_ms"] > 0 and r["fp32 sdpa_ms"] > 0 for r in rows)
