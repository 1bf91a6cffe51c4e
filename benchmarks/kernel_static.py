"""Registers, spills and shared memory of the packed kernel for a GPU, without one.

    .venv/bin/python benchmarks/kernel_static.py [--arch 90] [--out RESULTS.json]

Compiles ``_packed_attn_fwd`` with ``triton.compile`` for ``GPUTarget("cuda", ARCH, 32)`` (Triton's
own ptxas, no driver) at the four autotune keys that ``benchmarks/gpu_kernel_bench.py`` times
(GQA 4, head_dim 128, int4 or int8 keys and values, decode with split-K or prefill without), over
every autotune config, and reads each cubin's resource usage with Triton's ``cuobjdump
-res-usage``: registers per thread, stack and local (spill) bytes, shared memory. What it cannot
say is time; it says where a config runs out of registers, which a timing on the GPU then has
to confirm or not.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# the launcher's argument types for fp16 queries and caches (ragcompress_kernels/quantized_attention.py)
POINTERS = {
    **dict.fromkeys(["Q", "K", "V", "KS", "KM", "VS", "VM", "OUT"], "*fp16"),
    **dict.fromkeys(["KC", "VC"], "*u8"),
    **dict.fromkeys(["POS", "SEG_START", "SEG_LEN", "SPLIT_SEG"], "*i32"),
    **dict.fromkeys(["COS", "SIN", "M_PART", "L_PART", "ACC_PART"], "*fp32"),
    "qk_scale": "fp32",
}
# (bits, split, BLOCK_M): decode (1 query token x GQA 4 -> 16-row tiles, split-K) and prefill (32 tokens)
KEYS = [(4, True, 16), (8, True, 16), (4, False, 64), (8, False, 64)]
RESOURCES = re.compile(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)")


def compile_config(fn, arch: int, bits: int, split: bool, block_m: int, config) -> dict:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    # what the launcher passes (quantized_attention.py): whole-head RoPE tables, halves not pairs
    consts: dict[str, int | bool | str] = dict(
        GROUP=4, HEAD_DIM=128, ROT_DIM=128, PAIRED=False, BITS=bits, V_BITS=bits, GROUP_SIZE=32, V_GROUP=32
    )
    consts["SPLIT"] = split
    consts.update(DOT_PRECISION="tf32", BLOCK_M=block_m, **config.kwargs)
    # a compile-time parameter the kernel gained since would be typed a runtime int below and
    # fail deep inside Triton (ROT_DIM and PAIRED once did): name it instead
    if missing := [p.name for p in fn.params if p.is_constexpr and p.name not in consts]:
        raise SystemExit(f"kernel_static.py does not set the kernel's compile-time parameters {missing}; add them")
    names = fn.arg_names
    signature = {n: "constexpr" if n in consts else POINTERS.get(n, "i32") for n in names}
    source = ASTSource(fn, signature=signature, constexprs={(names.index(k),): v for k, v in consts.items()})
    started = time.perf_counter()
    kernel = triton.compile(
        source,
        target=GPUTarget("cuda", arch, 32),
        options=dict(num_warps=config.num_warps, num_stages=config.num_stages),
    )
    seconds = time.perf_counter() - started
    cuobjdump = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(kernel.asm["cubin"])
        cubin.flush()
        usage = subprocess.run([str(cuobjdump), "-res-usage", cubin.name], capture_output=True, text=True, check=True)
    found = RESOURCES.search(usage.stdout)
    if found is None:
        raise RuntimeError(f"cuobjdump printed no resource usage:\n{usage.stdout}")
    regs, stack, _, local = map(int, found.groups())
    return {
        "bits": bits,
        "split": split,
        "block_m": block_m,
        "block_n": config.kwargs["BLOCK_N"],
        "num_warps": config.num_warps,
        "num_stages": config.num_stages,
        "registers": regs,
        "stack_bytes": stack,
        "local_bytes": local,
        "shared_bytes": kernel.metadata.shared,
        "compile_s": round(seconds, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability x 10 (90: H100/H200)")
    parser.add_argument("--out", type=Path, help="JSON file to write")
    args = parser.parse_args()

    import triton

    from ragcompress_kernels import quantized_attention

    rows = []
    for bits, split, block_m in KEYS:
        for config in quantized_attention._hopper_configs():
            row = compile_config(quantized_attention._packed_attn_fwd, args.arch, bits, split, block_m, config)
            rows.append(row)
            print(" ".join(f"{k}={v}" for k, v in row.items()), flush=True)
    result = {
        "what": "resource usage of _packed_attn_fwd per autotune config, compiled without a GPU",
        "arch": args.arch,
        "triton": triton.__version__,
        "rows": rows,
    }
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
