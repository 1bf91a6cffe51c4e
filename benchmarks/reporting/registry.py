"""Which renderer makes each ``<!-- report:NAME -->`` block (:data:`BLOCKS`): the one table from a
block's name to its code, which the documents' check and rendering go through."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from pathlib import Path

from .compression import (
    SWEEP_TABLES,
    render_compression,
    render_kvzip_cost,
    render_layer_padding,
    render_needle,
    render_sweep,
)
from .core import render_core, render_core_all
from .distill import render_distill, render_training_article_retrieval
from .frontier import render_compression_methods, render_lowrank_frontier, render_protection
from .guarantees import render_index_memory, render_kill_landings
from .kernels import render_kernel_cpu_ttft, render_kernel_gpu
from .presets import render_presets
from .recompute import FIRST_ROUND_RECOMPUTE, render_faithful, render_faithful_price, render_first_round_recompute
from .scaling import render_scale_estimate, render_store_scale
from .serve import render_serve_load, render_serve_memory
from .shared import RESULTS, ReportError
from .text import render_text_compression
from .ttft import (
    render_dtype_ttft,
    render_indexing_curve,
    render_keep_freed_memory,
    render_packed,
    render_packed_curve,
    render_ttft,
    render_ttft_curve,
)

BLOCKS: dict[str, Callable[[Path], str]] = {
    "presets": render_presets,
    "faithful": render_faithful,
    "lowrank-frontier": render_lowrank_frontier,
    "compression-methods-100": lambda results: render_compression_methods("qwen", results),
    "compression-methods-100-smollm2": lambda results: render_compression_methods("smollm2", results),
    "protection-global": render_protection,
    "kvzip-cost": render_kvzip_cost,
    "text-compression": render_text_compression,
    "keep-freed-memory": render_keep_freed_memory,
    "kill-landings": render_kill_landings,
    "serve-memory": render_serve_memory,
    "kernel-gpu": render_kernel_gpu,
    "kernel-cpu-ttft": render_kernel_cpu_ttft,
    "layer-padding": render_layer_padding,
    "dtype-ttft": render_dtype_ttft,
    "training-article-retrieval": render_training_article_retrieval,
    "faithful-price": render_faithful_price,
    "core-all": render_core_all,
    "core": render_core,
    "ttft": render_ttft,
    "ttft-curve": render_ttft_curve,
    "indexing-curve": render_indexing_curve,
    "packed": render_packed,
    "packed-curve": render_packed_curve,
    "compression": render_compression,
    "store-scale": render_store_scale,
    "scale-estimate": render_scale_estimate,
    "serve-load": render_serve_load,
    "distill": render_distill,
    **{name: partial(render_sweep, name) for name in SWEEP_TABLES},
    **{f"recompute-first-round:{tag}": partial(render_first_round_recompute, tag) for tag in FIRST_ROUND_RECOMPUTE},
    "index-memory": render_index_memory,
    "needle:qwen": lambda results: render_needle("needle_qwen.json", results),
    "needle:smollm2": lambda results: render_needle("needle_smollm2_1x128.json", results),
}


def render_block(name: str, results: Path = RESULTS) -> str:
    if name not in BLOCKS:
        raise ReportError(f"README block report:{name} has no renderer (known: {', '.join(BLOCKS)})")
    return BLOCKS[name](results)
