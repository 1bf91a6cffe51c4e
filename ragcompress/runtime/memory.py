"""Keep freed memory in the process for the next request (glibc's ``mallopt``).

Every cached answer allocates its cache buffers afresh (a top-16 Qwen2.5-0.5B context is two
~31 MB fp32 buffers), and every forward pass its activations. glibc serves a large allocation
with a fresh ``mmap`` and gives a freed heap top back to the kernel past its trim threshold, so
each request pays a page fault and the zeroing of a page for every 4 KiB it then overwrites
anyway. Serving allocations from the heap and keeping freed pages removes that cost: on the
2-core CPU the dense path's assembly of 16 passages took 51 ms with this setting against 125 ms
without (a one-off profile), in ``bench`` full prefill gained most (README, "The allocator
setting"), and a running ``serve``'s cached-path TTFT was 0.90 (SmolLM2) and 0.93 (Qwen) of
its TTFT without it over 600 requests (an earlier 200-request pair, files not kept: 0.96 and 0.995;
``benchmarks/serve_memory.py``, docs/serve.md). The price is that the process keeps its peak
memory mapped instead of returning it (SmolLM2's service held 120 MiB more; its memory levelled
off after about 150 requests either way), which is what a long-running server does anyway (and
what PyTorch's CPU tuning guide gets from jemalloc or tcmalloc).

The setting is process-wide, so the library never applies it on import: the ``ragcompress``
command does, for every subcommand (``RAGCOMPRESS_KEEP_FREED_MEMORY=0`` turns it off), and an
application embedding the library may call :func:`keep_freed_memory` once at start-up.
"""

from __future__ import annotations

import ctypes
import os
import sys

# glibc's malloc.h
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
TRIM_THRESHOLD = 2**31 - 1  # mallopt takes an int: keep up to 2 GiB of freed heap top
OPT_OUT = "RAGCOMPRESS_KEEP_FREED_MEMORY"
_applied = False  # set once keep_freed_memory succeeded in this process


def freed_memory_kept() -> bool:
    """Whether :func:`keep_freed_memory` applied in this process: results files record it, since
    it moves TTFT (full prefill most; README, "The allocator setting")."""
    return _applied


def keep_freed_memory() -> bool:
    """Serve every allocation from glibc's heap (no per-allocation ``mmap``) and keep freed
    pages instead of trimming them; returns whether it applied (``False`` on a C library
    without ``mallopt``, e.g. musl or macOS, or when ``RAGCOMPRESS_KEEP_FREED_MEMORY=0``)."""
    if os.environ.get(OPT_OUT, "1") == "0" or not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the process's own C library
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    global _applied
    _applied = bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    return _applied
