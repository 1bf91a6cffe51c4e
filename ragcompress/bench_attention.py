"""Side-by-side timings of attention over stored, quantized segments.

:func:`packed_ttft_overhead` measures what the packed CPU path (the kernel's PyTorch reference,
``runtime/packed.py``) costs in time-to-first-token against the best plain-PyTorch path of the
same math (``Engine.answer_cached``: dequantize every segment once per request, rotate, SDPA),
on the same questions and passages, interleaved in one process. :func:`attention_timings` times
one attention call over synthetic segments (used by ``benchmarks/kernel_bench.py``).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from ragcompress.kv import PassageKV
from ragcompress.quant import QuantConfig
from ragcompress.store import codec


@dataclass(frozen=True)
class TTFTComparison:
    """Median TTFT of both paths and the median per-question ratio ``packed / assembled``."""

    questions: int
    repeats: int
    assembled_ttft_s: float
    packed_ttft_s: float
    ratio: float
    same_first_token: float

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


def packed_ttft_overhead(engine: Any, questions: list[str], top_k: int = 3, repeats: int = 3) -> TTFTComparison:
    """TTFT of ``answer_packed(backend="torch")`` vs ``engine.answer_cached`` (same retrieved
    entries), each question ``repeats`` times per path, alternating which path goes first."""
    from ragcompress.runtime.packed import answer_packed

    ratios, assembled_all, packed_all, same = [], [], [], 0
    with engine.first_token_only():
        for question in questions:
            entries = engine.retrieve(question, top_k)
            times: dict[str, list[float]] = {"assembled": [], "packed": []}
            first: dict[str, list[int]] = {}
            for rep in range(repeats):
                order = ("assembled", "packed") if rep % 2 == 0 else ("packed", "assembled")
                for path in order:
                    if path == "assembled":
                        answer = engine.answer_cached(question, entries)
                    else:
                        answer = answer_packed(engine, question, entries, backend="torch")
                    times[path].append(answer.ttft_s)
                    first[path] = answer.token_ids[:1]
            assembled, packed = statistics.median(times["assembled"]), statistics.median(times["packed"])
            assembled_all.append(assembled)
            packed_all.append(packed)
            ratios.append(packed / assembled)
            same += first["assembled"] == first["packed"]
    return TTFTComparison(
        len(questions),
        repeats,
        statistics.median(assembled_all),
        statistics.median(packed_all),
        statistics.median(ratios),
        same / max(1, len(questions)),
    )


class PlainRotary:
    """Llama-style RoPE tables from ``inv_freq`` (synthetic benchmarks need no model)."""

    def __init__(self, head_dim: int, base: float = 500000.0) -> None:
        self.inv_freq = 1.0 / base ** (torch.arange(0, head_dim, 2).float() / head_dim)

    def cos_sin(self, positions: torch.Tensor, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = positions.float().unsqueeze(-1) * self.inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos(), emb.sin()


def synthetic_segments(
    context: int, passage_len: int, kv_heads: int, head_dim: int, scheme: str, device: torch.device | str, seed: int = 0
) -> Any:
    """One layer of ``context // passage_len`` random passages stored with ``scheme`` through the
    store codec and packed for the kernel (``QuantizedSegments``), starting at position 0."""
    from ragcompress.runtime.packed import PackedSegments, read_quantized

    gen = torch.Generator().manual_seed(seed)
    blobs = []
    for _ in range(max(1, context // passage_len)):
        keys = torch.randn(1, kv_heads, passage_len, head_dim, generator=gen)
        values = torch.randn(1, kv_heads, passage_len, head_dim, generator=gen)
        blobs.append(read_quantized(codec.encode(PassageKV.full(keys, values), QuantConfig(scheme))))
    return PackedSegments.from_blobs(blobs, 0, PlainRotary(head_dim), device).layers[0]


def median_time(fn: Callable[[], Any], repeats: int = 5) -> float:
    """Median wall time of ``fn()`` in seconds after one warm-up call (CPU timing)."""
    fn()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)
