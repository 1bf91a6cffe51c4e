"""Fused packed attention vs dequantize-then-SDPA vs fp16 SDPA over the uncompressed cache.

    .venv/bin/python benchmarks/kernel_bench.py [--contexts 1024 2048 ...] [--schemes int4 int8]
    .venv/bin/python benchmarks/kernel_bench.py --ttft --store STORE [--questions N] [--json FILE]

On a CUDA GPU each configuration (context, scheme, prefill/decode) is timed with
``triton.testing.do_bench`` (median per call) and printed as milliseconds and ratios against the baselines measured
in the same run:

- ``fused``:       ``packed_attention(backend="triton")`` over the quantized segments (prefill over
                   several passages also ``fused split-K``: one split per passage, which the
                   default plan keeps for decode)
- ``deq+sdpa``:    dequantize + rotate the segments (PyTorch), then SDPA, per call
- ``fp16 sdpa``:   SDPA over an fp16 cache of the same length, already rotated (no compression)

Without a GPU it times the PyTorch paths on the CPU (the reference ``packed_attention_ref``,
which dequantizes per call, and SDPA over the uncompressed cache) and says that GPU numbers were
not measured. ``--ttft`` runs :func:`ragcompress.bench.packed_ttft_overhead` on a store: both sides
are ``Engine.answer_cached`` with per-call ``AnswerOptions`` (``backend="dense"`` against
``backend="packed-torch"``).
"""

from __future__ import annotations

import argparse
import json

import torch

from ragcompress_kernels import attention_over_dense_ref, dequantize_segments_ref, latent_attention, packed_attention
from ragcompress_kernels.latent_attention import rebuild_latent_segments_ref

from common import LATENT_SCHEME, median_time, results_meta, synthetic_latent_segments, synthetic_segments


def sdpa_full(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Plain SDPA over an uncompressed cache (decode: no mask needed; prefill: bottom-right causal)."""
    q_len, total = query.shape[2], keys.shape[2]
    mask = None
    if q_len > 1:
        mask = torch.ones(q_len, total, dtype=torch.bool, device=query.device).tril(total - q_len)
    group = query.shape[1] // keys.shape[1]
    return torch.nn.functional.scaled_dot_product_attention(query, keys, values, attn_mask=mask, enable_gqa=group > 1)


def time_paths(timer, seg, query, key, value, full_k, full_v, cuda: bool) -> dict[str, float]:
    """Seconds per call of each path on one configuration (``seg``: packed segments, or latent
    ones; "deq+sdpa": rebuild keys and values, then SDPA in the query's dtype)."""
    d = query.shape[-1]
    latent = hasattr(seg, "k_basis")
    kernel = latent_attention if latent else packed_attention

    def deq_sdpa():
        # both kinds rebuilt, then attended in the query's dtype (fp16 on a GPU), as the fused
        # kernels compute: latent_attention's torch backend is its fp32 reference
        rebuild = rebuild_latent_segments_ref if latent else dequantize_segments_ref
        keys, values, valid = rebuild(seg)
        return attention_over_dense_ref(query, key, value, keys.to(query.dtype), values.to(query.dtype), valid, d**-0.5)

    times = {
        "deq+sdpa": timer(deq_sdpa),
        "fp16 sdpa" if cuda else "fp32 sdpa": timer(lambda: sdpa_full(query, full_k, full_v)),
    }
    if cuda:
        times["fused"] = timer(lambda: kernel(query, key, value, seg, backend="triton"))
        if query.shape[2] > 16 and seg.num_segments > 1:
            # the default plan splits decode only; prefill as one split per passage, for the
            # comparison docs/kernels.md asks for (prefill runs B * H_kv * row-tile programs)
            times["fused split-K"] = timer(
                lambda: kernel(query, key, value, seg, backend="triton", num_splits=seg.num_segments)
            )
    return times


def cuda_time(fn) -> float:
    """Median seconds per call of ``fn`` on the GPU (``triton.testing.do_bench``, whose default
    ``return_mode`` is the mean: one slow call, e.g. a clock or power-state change, would move it)."""
    from triton.testing import do_bench

    return do_bench(fn, warmup=25, rep=100, return_mode="median") / 1e3


def run_kernels(args: argparse.Namespace) -> list[dict]:
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.float16 if cuda else torch.float32
    if cuda:
        timer = cuda_time
    else:

        def timer(fn):
            return median_time(fn, repeats=args.repeats)

    rows = []
    heads, kv_heads, d = args.q_heads, args.kv_heads, args.head_dim
    prefix = 64
    for context in args.contexts:
        for scheme in args.schemes:
            if scheme == LATENT_SCHEME:
                seg = synthetic_latent_segments(context, args.passage_len, kv_heads, d, device)
            else:
                seg = synthetic_segments(context, args.passage_len, kv_heads, d, scheme, device)
            rows_seg = seg.k_codes.shape[1]
            for phase, q_len in (("decode", 1), ("prefill", args.prefill_len)):
                torch.manual_seed(0)
                total = prefix + q_len
                query = torch.randn(1, heads, q_len, d, device=device, dtype=dtype)
                key = torch.randn(1, kv_heads, total, d, device=device, dtype=dtype)
                value = torch.randn(1, kv_heads, total, d, device=device, dtype=dtype)
                full_k = torch.randn(1, kv_heads, rows_seg + total, d, device=device, dtype=dtype)
                full_v = torch.randn(1, kv_heads, rows_seg + total, d, device=device, dtype=dtype)

                times = time_paths(timer, seg, query, key, value, full_k, full_v, cuda)
                row = {
                    "context": context,
                    "scheme": scheme,
                    "phase": phase,
                    "q_len": q_len,
                    "device": torch.cuda.get_device_name() if cuda else "cpu",
                    **{f"{k}_ms": v * 1e3 for k, v in times.items()},
                }
                if cuda:
                    row["fused_vs_deq+sdpa"] = times["deq+sdpa"] / times["fused"]
                    row["fused_vs_fp16_sdpa"] = times["fp16 sdpa"] / times["fused"]
                    if "fused split-K" in times:
                        row["fused_split-K_vs_fused"] = times["fused"] / times["fused split-K"]
                else:
                    row["deq+sdpa_vs_fp32_sdpa"] = times["fp32 sdpa"] / times["deq+sdpa"]
                rows.append(row)
                print(
                    " ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()), flush=True
                )
    if not cuda:
        print(
            "No CUDA device: GPU numbers (fused Triton kernel) were NOT measured; the rows above time the "
            "PyTorch reference paths on the CPU only. Ratios > 1 mean the first path is faster."
        )
    return rows


def run_ttft(args: argparse.Namespace) -> dict:
    """The TTFT comparison on ``args.store``; with ``--json`` also written there with the run's
    metadata, the store's settings and the machine's load average before and after (the
    ``kernel-cpu-ttft`` table of docs/kernels.md renders it)."""
    import os
    from pathlib import Path

    from ragcompress.bench import packed_ttft_overhead
    from ragcompress.runtime.engine import Engine

    load_before = os.getloadavg()
    with Engine.open(args.store) as engine:
        with open(args.questions_file) as handle:
            records = [json.loads(line) for line in handle if line.strip()]
        # questions whose gold passage is in the store (all of them when the file has no passage_id)
        questions = [
            r["question"]
            for r in records
            if "passage_id" not in r or engine.store.catalogue.get(r["passage_id"]) is not None
        ]
        result = packed_ttft_overhead(engine, questions[: args.questions], args.top_k, args.repeats).to_json()
        manifest = engine.store.manifest
        result["store"] = {
            "passages": engine.store.catalogue.count(),
            "compression": manifest.compression,
            "model": manifest.model_ref,
        }
    result["top_k"] = args.top_k
    result["load_average_1min"] = {"before": load_before[0], "after": os.getloadavg()[0]}
    result["meta"] = results_meta(
        {"repeats": args.repeats, "questions": args.questions, "model": result["store"]["model"]}
    )
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return result


def shape_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The shapes a kernel timing sweeps (shared with ``gpu_kernel_bench.py``)."""
    parser.add_argument("--contexts", type=int, nargs="+", default=None)
    parser.add_argument(
        "--schemes",
        nargs="+",
        default=["int4", "int8", LATENT_SCHEME],
        help=f"segment codes: int2/int4/int8 (the packed kernel) or {LATENT_SCHEME!r} (the latent kernel over the "
        "smallest preset's shape: rank-32 int4 key latents, int2 value rows)",
    )
    parser.add_argument("--q-heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--passage-len", type=int, default=512)
    parser.add_argument("--prefill-len", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5, help="CPU timing repeats (on CUDA do_bench decides)")
    return parser


def main() -> None:
    parser = shape_arguments(argparse.ArgumentParser(description=__doc__.splitlines()[0]))
    parser.add_argument("--ttft", action="store_true", help="TTFT of the packed CPU path vs the assembled path")
    parser.add_argument("--store")
    parser.add_argument("--questions-file", default="../shared/data/squad-dev/questions.jsonl")
    parser.add_argument("--questions", type=int, default=10)
    parser.add_argument("--top-k", type=int, default=3)
    parser.add_argument("--json", help="--ttft: also write the result (with run metadata) to this file")
    args = parser.parse_args()
    if args.ttft:
        if not args.store:
            parser.error("--ttft needs --store")
        run_ttft(args)
        return
    if args.contexts is None:
        args.contexts = [1024, 2048, 4096, 8192, 16384, 32768] if torch.cuda.is_available() else [1024, 4096]
    run_kernels(args)


if __name__ == "__main__":
    main()
