"""``ragcompress bench``: TTFT and KV memory of cached answering against full prefill, by context size.

For each top-k (the context size knob) and each question, the same retrieved passages are
answered from the store and by a plain full prefill, ``repeats`` times, the order alternating
from one round to the next; the table reports medians and their ratio, all from one process, so
machine noise hits both sides alike. :func:`packed_ttft_overhead` compares the packed attention
path with the dense one the same way.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any

from ragcompress.evaluation import Question
from ragcompress.runtime.engine import Answer, Engine
from ragcompress.runtime.options import AnswerOptions


@dataclass(frozen=True)
class BenchRow:
    top_k: int
    context_tokens: float  # median prompt tokens before the question (prefix + passages)
    ttft_full_ms: float
    ttft_cached_ms: float
    speedup: float
    kv_bytes_fp16: float  # median fp16 KV bytes of the retrieved passages
    kv_bytes_stored: float  # median stored bytes of the same passages (blobs as on disk)


def alternating_ttft(runs: dict[str, Callable[[], Answer]], repeats: int) -> tuple[dict[str, float], dict[str, Answer]]:
    """Median TTFT of each run over ``repeats`` rounds, the order of the runs rotating from one
    round to the next so that neither side always goes first; and each run's last answer."""
    names = list(runs)
    times: dict[str, list[float]] = {name: [] for name in names}
    last: dict[str, Answer] = {}
    for round_ in range(repeats):
        shift = round_ % len(names)
        for name in names[shift:] + names[:shift]:
            last[name] = runs[name]()
            times[name].append(last[name].ttft_s)
    return {name: statistics.median(t) for name, t in times.items()}, last


def bench(engine: Engine, questions: list[Question], top_ks: list[int], repeats: int) -> list[BenchRow]:
    """One row per top-k: cached against full prefill of the same token ids, alternating."""
    first_token = engine.options.replace(max_new_tokens=1)  # decoding further adds nothing to TTFT
    fp16_per_token = engine.store.shape.fp16_bytes_per_token
    return [_bench_row(engine, questions, top_k, repeats, fp16_per_token, first_token) for top_k in top_ks]


def _bench_row(
    engine: Engine,
    questions: list[Question],
    top_k: int,
    repeats: int,
    fp16_per_token: float,
    options: AnswerOptions,
) -> BenchRow:
    full_ms, cached_ms, contexts, fp16_bytes, stored_bytes = [], [], [], [], []
    for item in questions:
        entries = engine.retrieve(item.question, top_k)
        medians, _ = alternating_ttft(
            {
                "cached": partial(engine.answer_cached, item.question, entries, options),
                "full": partial(engine.answer_full, item.question, entries, options),
            },
            repeats,
        )
        full_ms.append(medians["full"] * 1000)
        cached_ms.append(medians["cached"] * 1000)
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


@dataclass(frozen=True)
class TTFTComparison:
    """Median TTFT of the dense and the packed path and the median per-question ratio
    ``packed / dense``, with how often their first tokens agree."""

    questions: int
    repeats: int
    assembled_ttft_s: float
    packed_ttft_s: float
    ratio: float
    same_first_token: float
    packed_backend: str

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def packed_ttft_overhead(
    engine: Engine, questions: list[str], top_k: int = 3, repeats: int = 3, packed_backend: str = "packed-torch"
) -> TTFTComparison:
    """TTFT of the packed path (``packed-torch``: the kernel's PyTorch reference, the CPU path;
    ``packed-triton`` on a GPU) against the dense path (dequantize every segment once per
    request, rotate, SDPA) over the same retrieved entries, alternating."""
    dense = engine.options.replace(max_new_tokens=1, backend="dense")
    packed = dense.replace(backend=packed_backend)
    ratios, dense_all, packed_all, same = [], [], [], 0
    for question in questions:
        entries = engine.retrieve(question, top_k)
        medians, last = alternating_ttft(
            {
                "dense": partial(engine.answer_cached, question, entries, dense),
                "packed": partial(engine.answer_cached, question, entries, packed),
            },
            repeats,
        )
        dense_all.append(medians["dense"])
        packed_all.append(medians["packed"])
        ratios.append(medians["packed"] / medians["dense"])
        same += last["dense"].token_ids[:1] == last["packed"].token_ids[:1]
    return TTFTComparison(
        len(questions),
        repeats,
        statistics.median(dense_all),
        statistics.median(packed_all),
        statistics.median(ratios),
        same / max(1, len(questions)),
        packed_backend,
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
