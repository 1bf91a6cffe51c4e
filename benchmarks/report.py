"""README.md's result tables, rendered from ``docs/results/*.json`` (no number is typed by hand).

Each generated table sits in README.md between ``<!-- report:NAME -->`` and
``<!-- /report:NAME -->``; ``reporting.registry.BLOCKS`` maps NAME to its renderer:

* ``core``: cached answering vs full prefill on SQuAD-dev (``core_*.json``, ``benchmarks/core_eval.py``);
* ``ttft``: TTFT table of the first ``bench --json`` shape (``bench_*_int8.json``: ``rows`` of
  ``ttft_full_ms`` / ``ttft_cached_ms``, no model, no run metadata);
* ``ttft-curve``: one table per model from the current ``ragcompress bench --json`` shape
  (``bench_curve_*.json``: ``model``, ``rows`` with the four paths of ``ragcompress.bench.PATHS``,
  ``meta``), the columns of ``ragcompress.bench.table()`` plus the model and the share of first
  tokens equal to full prefill's; ``indexing-curve`` and ``packed-curve`` render the same files'
  ``indexing`` and ``packed_attention`` objects;
* ``packed``: the packed attention path vs dequantize-then-SDPA from the ``bench_*_int8.json`` files;
* ``compression``: the headline compression settings on Qwen (``compression_qwen.json``, 16
  questions, and ``compression_qwen32.json``, 32), each sub-EM against full prefill and against
  uncompressed reuse;
* ``sweep:*`` / ``needle:*`` (docs/compression.md §1-6): the first round's sweeps of every
  method x ratio x quant (``compression_<model>.json`` with ``compression_kl_<model>.json``,
  :data:`SWEEP_TABLES`) and the needle-in-a-haystack runs (``needle_*.json``);
* ``lowrank-frontier`` / ``kvzip-cost`` / ``layer-padding`` (docs/compression.md §8):
  eviction x rank x bits (``lowrank_*.json``, ``benchmarks/lowrank_frontier.py --publish``),
  KVzip's scoring cost against a plain forward (``kvzip_cost_*.json``) and the dense path's
  per-layer padding against the layout it replaced (``layer_padding_*.json``);
* ``kernel-gpu`` / ``kernel-cpu-ttft`` (docs/kernels.md): the fused kernel per call on a GPU
  (``gpu_check_*.json``, ``benchmarks/gpu_check.sh``) and the packed CPU path's TTFT against the
  dense path (``kernel_cpu_ttft_*.json``, ``benchmarks/kernel_bench.py --ttft --json``);
* ``keep-freed-memory``: ``bench`` with the command's allocator setting off and on
  (``keep_freed_memory_qwen.json``, :mod:`ragcompress.runtime.memory`);
* ``serve-memory`` (docs/serve.md): a long-running ``ragcompress serve`` with the allocator
  setting off and on, resident memory and server TTFT over many requests
  (``serve_memory_*.json``, ``benchmarks/serve_memory.py``);
* ``kill-landings`` (docs/guarantees.md): where the external SIGKILLs of
  ``test_external_sigkill_at_random_instants_then_resume`` landed, one run
  (``kill_landings.json``, written by the test under ``$RAGCOMPRESS_KILL_TABLE``);
* ``text-compression`` (docs/llamaindex.md): every text compressor of one
  ``benchmarks/text_compression.py --out`` run (``text_compression_smollm2.json``);
* ``store-scale``: stores at 1k..100k passages and Ray indexing against one process
  (``store_scale.json``, ``ray_throughput.json``, ``benchmarks/store_scale.py``);
  ``scale-estimate``: 10M passages on N nodes, simulated (``scale_estimate.json``).

Every quality figure of a cached or compressed row comes with its reference and its percentage of
full prefill. Files in ``docs/results/`` that do not record the run metadata of
``ragcompress.provenance.run_meta`` (git, threads, repeats, limit, questions, model) are named on stderr.

    .venv/bin/python benchmarks/report.py           # rewrite the blocks of README.md in place
    .venv/bin/python benchmarks/report.py --check   # exit 1 naming the first block that differs

A block whose files are missing fails; to switch the TTFT table to the new shape, replace the
``ttft`` markers by ``ttft-curve`` ones (and ``packed`` by ``packed-curve``) and run the script.
The code is the package ``benchmarks/reporting/``, one module per family of results files
(``core``, ``ttft``, ``compression``, ``frontier``, ``recompute``, ``distill``, ``presets``,
``scaling``, ``serve``, ``kernels``, ``guarantees``, ``text``), what they share in ``shared``
(paths, reading results and their run metadata, table formatting), ``registry`` (block name to
renderer), ``documents`` (finding, rendering and checking blocks) and ``cli``; this file is the
command and keeps the names tests and scripts import from ``report``. New code imports from the
module a name lives in. It imports the standard library, ``ragcompress.stats``,
``ragcompress.provenance`` and ``benchmarks/frontier_rows.py``; the ``ttft-curve`` block's
renderer imports ``ragcompress.bench`` (the table ``ragcompress bench`` prints), and with it torch
and transformers, which is most of a ``--check`` run: about 5 s of CPU (12 s on two busy cores).
``tests/test_report.py`` runs it in-process.
"""

from __future__ import annotations

import sys

from ragcompress.provenance import META_KEYS

from reporting.cli import main
from reporting.documents import blocks, check
from reporting.frontier import render_protection
from reporting.guarantees import index_memory_tables, kill_landing_table
from reporting.presets import POOLED_ABLATIONS, PRESET_MEASUREMENTS, TWO_THREAD_TTFT, pooled_presets, render_presets
from reporting.registry import render_block
from reporting.scaling import render_store_scale
from reporting.shared import DOCS, README, RESULTS, ReportError, meta_notes, recorded_meta

__all__ = [
    "DOCS",
    "META_KEYS",
    "POOLED_ABLATIONS",
    "PRESET_MEASUREMENTS",
    "README",
    "RESULTS",
    "TWO_THREAD_TTFT",
    "ReportError",
    "blocks",
    "check",
    "index_memory_tables",
    "kill_landing_table",
    "main",
    "meta_notes",
    "pooled_presets",
    "recorded_meta",
    "render_block",
    "render_presets",
    "render_protection",
    "render_store_scale",
]

if __name__ == "__main__":
    sys.exit(main())
