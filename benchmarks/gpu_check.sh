#!/usr/bin/env bash
# GPU check (docs/kernels.md, "GPU check"): on a CUDA machine, run the tests marked `gpu` (the ones
# CI skips) with the compiled Triton kernels (TRITON_INTERPRET unset): tests/test_kernels.py (the
# packed kernel, fp16 and bf16), tests/test_lowrank_kernel.py (the latent kernel),
# tests/test_recompute.py (selective recompute with the model on CUDA against the CPU) and
# tests/test_engine_on_cuda.py (the engine's answers with the model on CUDA); then time the
# kernel against dequantize-then-SDPA and fp16 SDPA (benchmarks/gpu_kernel_bench.py ->
# kernel_bench.py), writing everything into $OUT, or ./gpu_results when OUT is unset. The
# interpreter tests are CI's (Triton 3.6's interpreter fails them under numpy >= 2.4, an
# interpreter bug; the compiled kernel is unaffected).
#
#   bash benchmarks/gpu_check.sh [kernel_bench flags, e.g. --contexts 8192 16384]
#   PYTHON=/path/to/python bash benchmarks/gpu_check.sh
#
# Needs this repository and a Python with torch (a CUDA build), triton, pytest and ragcompress's own
# dependencies (transformers >= 5.24, safetensors, numpy, ...); nothing is installed or downloaded
# (benchmarks/gpu_wheels.sh fetches, on a machine with an index, the wheels a bare CUDA image
# lacks). ragcompress and ragcompress_kernels are imported from this checkout (PYTHONPATH). Stages
# are capped at 330 s (tests; 19 of the 22 gpu tests there were then took about 4 minutes on an H200, most of it autotuning) and
# 240 s (timing: 27 s there for the packed kernel alone; the latent kernel's rows, added since,
# autotune at keys no test uses), about 10 minutes at most. Exit 0 only if every test passed, none was
# skipped, and the timing completed; exit 2 (one line on stderr) when there is no CUDA device or a
# prerequisite is missing.
#
# Writes: kernel_tests.log, kernel_tests.xml (JUnit), kernel_bench.log, kernel_bench.json,
# gpu_check.json (summary: per stage exit code, seconds, test counts, device).

set -uo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
py=${PYTHON:-python3}
out=${OUT:-$PWD/gpu_results}
unset TRITON_INTERPRET

die() {
    echo "gpu_check: $*" >&2
    exit 2
}

command -v "$py" >/dev/null 2>&1 || die "no Python '$py' (set PYTHON=/path/to/python)"
"$py" -c 'import torch' >/dev/null 2>&1 || die "$py cannot import torch"
"$py" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() and torch.cuda.device_count() > 0 else 1)' \
    >/dev/null 2>&1 || die "no CUDA device (torch.cuda.is_available() is False for $py); nothing was run"
"$py" -c 'import triton' >/dev/null 2>&1 || die "$py cannot import triton"

export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"

missing=$("$py" - "$repo" 2>/dev/null <<'EOF'
import importlib, os, sys
missing = []
for name in ("pytest", "ragcompress", "ragcompress_kernels", "ragcompress.store.codec", "ragcompress.runtime.packed",
             "ragcompress.runtime.engine"):
    try:
        module = importlib.import_module(name)
    except Exception as exc:  # ImportError, or a dependency failing at import
        missing.append(f"{name} ({type(exc).__name__}: {exc})")
        break
    if name.startswith("ragcompress") and "." not in name:  # both top-level packages
        where = os.path.realpath(module.__file__)
        if not where.startswith(os.path.realpath(sys.argv[1]) + os.sep):
            missing.append(f"{name} imports from {where}, not from this checkout")
print("; ".join(missing))
EOF
)
[ -z "$missing" ] || die "cannot import: $missing"

mkdir -p "$out" && out=$(cd "$out" && pwd) || die "cannot create $out"
cd "$repo" || die "cannot enter $repo"
export TRITON_CACHE_AUTOTUNING=1 # the timing stage reuses the tests' autotuning (same keys)
export TRITON_PRINT_AUTOTUNING=1 # the chosen kernel configs go into the logs

tests="tests/test_kernels.py tests/test_lowrank_kernel.py tests/test_recompute.py tests/test_engine_on_cuda.py tests/test_benchmark_dense_path.py"
echo "gpu_check: $tests -m gpu (compiled kernels on $("$py" -c 'import torch; print(torch.cuda.get_device_name())'))"
t0=$SECONDS
# shellcheck disable=SC2086
timeout 330 "$py" -m pytest -p no:cacheprovider $tests -m gpu -v -rfEs --tb=short --durations=12 \
    --junitxml="$out/kernel_tests.xml" 2>&1 | tee "$out/kernel_tests.log"
tests_rc=${PIPESTATUS[0]}
tests_s=$((SECONDS - t0))

echo "gpu_check: timing (benchmarks/gpu_kernel_bench.py $*)"
t0=$SECONDS
timeout 240 "$py" benchmarks/gpu_kernel_bench.py --out "$out/kernel_bench.json" "$@" 2>&1 | tee "$out/kernel_bench.log"
bench_rc=${PIPESTATUS[0]}
bench_s=$((SECONDS - t0))

"$py" - "$out" "$tests_rc" "$tests_s" "$bench_rc" "$bench_s" <<'EOF'
import json, os, sys
import xml.etree.ElementTree as ET

import torch

out, tests_rc, tests_s, bench_rc, bench_s = sys.argv[1], *map(int, sys.argv[2:])
counts = {"passed": 0, "failed": 0, "skipped": 0}
cuda = dict(counts)
xml = os.path.join(out, "kernel_tests.xml")
if os.path.exists(xml):
    for case in ET.parse(xml).iter("testcase"):
        state = "failed" if case.find("failure") is not None or case.find("error") is not None else (
            "skipped" if case.find("skipped") is not None else "passed")
        counts[state] += 1
        if "on_cuda" in case.get("name", ""):
            cuda[state] += 1
bench = {}
path = os.path.join(out, "kernel_bench.json")
try:
    bench = json.load(open(path))
except (OSError, ValueError):  # not written (refused, or cut off before the first context)
    pass
ok = tests_rc == 0 and cuda["passed"] > 0 and counts["skipped"] == counts["failed"] == 0 and bench_rc == 0
summary = {
    "ok": ok,
    "device": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    "tests": {"exit": tests_rc, "timed_out": tests_rc == 124, "seconds": tests_s, **counts, "cuda_tests": cuda},
    "timing": {"exit": bench_rc, "timed_out": bench_rc == 124, "seconds": bench_s,
               "rows": len(bench.get("rows", [])), "complete": bench.get("complete", False)},
}
json.dump(summary, open(os.path.join(out, "gpu_check.json"), "w"), indent=2)
print("gpu_check:", json.dumps(summary))
sys.exit(0 if ok else 1)
EOF
