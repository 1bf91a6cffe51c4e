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


@pytest.mark.parametrize("latent", [False, True])
def test_dequantize_then_sdpa_attends_in_the_querys_dtype(monkeypatch, latent):
    """The "deq+sdpa" baseline of packed and latent rows alike rebuilds the passage rows and
    attends in the query's dtype (fp16 on a GPU), as the fused kernel it is compared with does, not
    in the fp32 of the references."""
    import torch

    from common import synthetic_latent_segments, synthetic_segments

    seg = (
        synthetic_latent_segments(64, 32, 2, 64, "cpu") if latent else synthetic_segments(64, 32, 2, 64, "int4", "cpu")
    )
    seen = []
    original = kernel_bench.attention_over_dense_ref
    monkeypatch.setattr(
        kernel_bench,
        "attention_over_dense_ref",
        lambda q, k, v, keys, values, *rest: (seen.append(keys.dtype), original(q, k, v, keys, values, *rest))[1],
    )
    query = torch.randn(1, 4, 1, 64, dtype=torch.bfloat16)
    key = value = torch.randn(1, 2, 65, 64, dtype=torch.bfloat16)
    full = torch.randn(1, 2, 64 + 65, 64, dtype=torch.bfloat16)
    kernel_bench.time_paths(lambda fn: (fn(), 1.0)[1], seg, query, key, value, full, full, cuda=False)
    assert seen == [torch.bfloat16]


def test_kernel_static_compiles_a_config_for_the_h100_without_a_gpu():
    """``benchmarks/kernel_static.py`` (registers and spills per autotune config, from Triton's own
    ptxas): it failed on its first compile once the kernel gained ROT_DIM and PAIRED, and nothing
    ran it. One decode config is compiled here (about 2 s)."""
    kernel_static = importlib.import_module("kernel_static")
    from ragcompress_kernels import quantized_attention

    config = quantized_attention._hopper_configs()[0]
    row = kernel_static.compile_config(quantized_attention._packed_attn_fwd, 90, 4, True, 16, config)
    assert row["registers"] > 0 and row["block_n"] == config.kwargs["BLOCK_N"]
