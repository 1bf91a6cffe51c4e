"""``ragcompress bench``: TTFT and KV memory of cached answering against full prefill, by context size.

For each top-k (the context size knob) and each question, the same retrieved passages are
answered from the store and by a plain full prefill, alternating, ``repeats`` times; the table
reports medians and their ratio, all from one process, so machine noise hits both sides alike.
"""

from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ragcompress.evaluation import Question
from ragcompress.indexing import fp16_bytes_per_token
from ragcompress.runtime.engine import Engine


@dataclass(frozen=True)
class BenchRow:
    top_k: int
    context_tokens: float  # median prompt tokens before the question (prefix + passages)
    ttft_full_ms: float
    ttft_cached_ms: float
    speedup: float
    kv_bytes_fp16: float  # median fp16 KV bytes of the retrieved passages
    kv_bytes_stored: float  # median stored bytes of the same passages (blobs as on disk)


def bench(engine: Engine, questions: list[Question], top_ks: list[int], repeats: int) -> list[BenchRow]:
    fp16_per_token = fp16_bytes_per_token(engine.lm.config)
    with engine.first_token_only():
        return [_bench_row(engine, questions, top_k, repeats, fp16_per_token) for top_k in top_ks]


def _bench_row(engine: Engine, questions: list[Question], top_k: int, repeats: int, fp16_per_token: float) -> BenchRow:
    full_ms, cached_ms, contexts, fp16_bytes, stored_bytes = [], [], [], [], []
    for item in questions:
        entries = engine.retrieve(item.question, top_k)
        full_runs, cached_runs = [], []
        for _ in range(repeats):  # interleaved: noise hits both paths alike
            cached_runs.append(engine.answer_cached(item.question, entries).ttft_s)
            full_runs.append(engine.answer_full(item.question, entries).ttft_s)
        full_ms.append(statistics.median(full_runs) * 1000)
        cached_ms.append(statistics.median(cached_runs) * 1000)
        tokens = sum(e.num_tokens for e in entries)
        contexts.append(engine.prefix.num_tokens + tokens)
        fp16_bytes.append(tokens * fp16_per_token)
        stored_bytes.append(sum(e.length for e in entries))
    full, cached = statistics.median(full_ms), statistics.median(cached_ms)
    return BenchRow(
        top_k,
        statistics.median(contexts),
        full,
        cached,
        full / cached,
        statistics.median(fp16_bytes),
        statistics.median(stored_bytes),
    )


def table(rows: list[BenchRow]) -> str:
    lines = [
        "| top-k | context tokens | TTFT full (ms) | TTFT cached (ms) | speedup | KV fp16 (KiB) | KV stored (KiB) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r.top_k} | {r.context_tokens:.0f} | {r.ttft_full_ms:.0f} | {r.ttft_cached_ms:.0f} | "
            f"{r.speedup:.1f}x | {r.kv_bytes_fp16 / 1024:.0f} | {r.kv_bytes_stored / 1024:.0f} |"
        )
    return "\n".join(lines)


def plot(rows: list[BenchRow], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    x = [r.context_tokens for r in rows]
    ax.plot(x, [r.ttft_full_ms for r in rows], "o-", label="full prefill")
    ax.plot(x, [r.ttft_cached_ms for r in rows], "s-", label="from stored caches")
    ax.set_xlabel("context tokens (prefix + retrieved passages)")
    ax.set_ylabel("TTFT (ms, median)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def to_json(rows: list[BenchRow]) -> dict[str, Any]:
    return {"rows": [asdict(r) for r in rows]}
