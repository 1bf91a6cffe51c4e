"""The timing half of ``benchmarks/gpu_check.sh``: ``kernel_bench.py``'s CUDA comparison, written as JSON.

    python benchmarks/gpu_kernel_bench.py --out RESULTS.json [kernel_bench.py flags]

Runs :func:`kernel_bench.run_kernels` (fused ``packed_attention(backend="triton")``, or
``latent_attention`` for ``latent`` segments, vs dequantize + SDPA vs fp16 SDPA over an uncompressed
cache, each timed with ``triton.testing.do_bench``) one context at a time and rewrites ``--out``
after each, so a run cut short by a time limit keeps the rows it measured. Defaults: contexts
512-8192 tokens of 512-token passages (1, 2, 4, 8, 16 passages), int4, int8 and latent segments,
decode (1 query token) and prefill (32), Hq 32 / Hkv 8 / d 128.
Refuses (exit 2, one line) without a CUDA device: CPU timings belong to ``kernel_bench.py``.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import kernel_bench  # noqa: E402


def tuned_configs() -> dict[str, str]:
    """The kernel's autotuned config per autotune key (what the timed runs used)."""
    from ragcompress_kernels import quantized_attention

    tuner = getattr(quantized_attention, "_packed_attn_fwd_tuned", None)
    return {str(key): str(config) for key, config in getattr(tuner, "cache", {}).items()}


def main() -> None:
    parser = kernel_bench.shape_arguments(argparse.ArgumentParser(description=__doc__.splitlines()[0]))
    parser.add_argument("--out", required=True, help="JSON file to write")
    args = parser.parse_args()
    if args.contexts is None:
        args.contexts = [512, 1024, 2048, 4096, 8192]  # 1-16 passages of 512 tokens
    if not torch.cuda.is_available():
        print(
            "gpu_kernel_bench: no CUDA device; nothing was timed (use kernel_bench.py for CPU paths)", file=sys.stderr
        )
        raise SystemExit(2)
    import triton

    props = torch.cuda.get_device_properties(0)
    record: dict[str, Any] = {
        "what": "fused packed_attention (latent_attention for latent segments, Triton) vs dequantize+SDPA vs fp16 SDPA over an uncompressed cache",
        "timer": "triton.testing.do_bench(warmup=25, rep=100, return_mode='median'), milliseconds per call",
        "started": datetime.now(UTC).isoformat(timespec="seconds"),
        "device": {
            "name": props.name,
            "capability": f"{props.major}.{props.minor}",
            "multiprocessors": props.multi_processor_count,
            "memory_gib": round(props.total_memory / 2**30, 1),
        },
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "cuda": torch.version.cuda,
            "triton": triton.__version__,
        },
        "args": {k: v for k, v in vars(args).items() if k != "out"},
        "complete": False,
        "rows": [],
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    for context in args.contexts:
        rows = kernel_bench.run_kernels(argparse.Namespace(**{**vars(args), "contexts": [context]}))
        for row in rows:
            row["passages"] = max(1, context // args.passage_len)
        record["rows"] += rows
        record["seconds"] = round(time.perf_counter() - start, 1)
        record["autotuned"] = tuned_configs()
        out.write_text(json.dumps(record, indent=2))
    record["complete"] = True
    out.write_text(json.dumps(record, indent=2))
    print(f"wrote {out} ({len(record['rows'])} rows, {record['seconds']} s)")


if __name__ == "__main__":
    main()
