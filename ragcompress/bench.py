"""``ragcompress bench``: TTFT and KV memory of cached answering against three baselines, by context size.

For each top-k (the context size knob) and each question, the same retrieved passages are
answered four ways (:data:`PATHS`), once untimed to warm up and then ``repeats`` times, the order
rotating from one round to the next and from one question to the next; the table reports medians
and their ratios, all from one process, so machine noise hits every path alike. TTFT is what
:class:`~ragcompress.runtime.engine.Answer` says: from the request's start (prompt already
tokenized, on every path) to the first token's logits. :func:`indexing_throughput` times the
offline side against a plain forward. :func:`packed_ttft_overhead` compares the packed attention
path with the dense one the same way.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, replace
from functools import partial
from itertools import islice
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ragcompress.errors import InputError, need_matplotlib
from ragcompress.evaluation import Question
from ragcompress.provenance import run_meta
from ragcompress.runtime.engine import Answer, Engine
from ragcompress.runtime.options import AnswerOptions
from ragcompress.store.catalogue import Entry

if TYPE_CHECKING:
    from ragcompress.indexing import Indexer

# The four ways a question's first token is reached, timed side by side (DESIGN §3):
#   full                the whole prompt prefilled, no reuse (the plain baseline)
#   full_prefix_cached  the shared prefix's cache reused, passages and question prefilled (the fair
#                       peer: a serving engine with automatic prefix caching)
#   cached              ragcompress: stored passage caches loaded, placed, question prefilled
#   floor               the question prefilled over an already assembled cache (cached - floor is
#                       the cache work: read, checksum, dequantize, rotate, assemble, and a
#                       selective recompute where the options ask for one)
PATHS = ("full", "full_prefix_cached", "cached", "floor")


@dataclass(frozen=True)
class BenchRow:
    """One context size. TTFTs are medians over questions of each question's median over
    ``repeats`` alternating runs after an untimed warm-up (:func:`alternating_ttft`); speedups
    are ratios of those medians."""

    top_k: int
    questions: int
    context_tokens: float  # median prompt tokens before the question (prefix + passages)
    ttft_s: dict[str, float]  # by path (PATHS)
    speedup: dict[str, float]  # cached against full ("vs_full") and full_prefix_cached ("vs_prefix_cached")
    cache_work_s: float  # median over questions of cached - floor
    cache_work_share: float  # cache_work_s / ttft_s["cached"]
    # median bytes of the retrieved passages: "stored" (blobs on disk, a low-rank basis spread over
    # the store's tokens), "fp16"
    kv_bytes: dict[str, float]
    same_first_token: float  # fraction of questions whose cached and full first tokens agree


def alternating_ttft(
    runs: Mapping[str, Callable[[], Answer]], repeats: int, first: int = 0
) -> tuple[dict[str, float], dict[str, Answer]]:
    """Warm median TTFT of each run, and each run's last answer: one untimed warm-up round, then
    ``repeats`` timed rounds (an odd number makes each median one run, not the mean of two).

    The warm-up takes what only a question's first run pays (its passages' blobs read into the
    page cache, the allocator grown to its sizes) out of every side's median alike. The order of
    the runs rotates by one from round to round, starting ``first`` places on: callers pass the
    question's index, so that no run leads every question's first timed round."""
    if repeats < 1:
        raise ValueError(f"repeats must be at least 1, got {repeats}")
    names = list(runs)
    times: dict[str, list[float]] = {name: [] for name in names}
    last: dict[str, Answer] = {}
    for round_ in range(-1, repeats):  # round -1: the warm-up, not timed
        shift = (first + round_) % len(names)
        for name in names[shift:] + names[:shift]:
            answer = runs[name]()
            if round_ >= 0:
                last[name] = answer
                times[name].append(answer.ttft_s)
    return {name: statistics.median(t) for name, t in times.items()}, last


def timed_options(engine: Engine) -> AnswerOptions:
    """The answer options :func:`bench` times: the engine's, decoding one token (decoding further
    adds nothing to TTFT)."""
    return engine.options.replace(max_new_tokens=1)


def bench(engine: Engine, questions: list[Question], top_ks: list[int], repeats: int) -> list[BenchRow]:
    """One row per top-k: the four paths over the same retrieved passages, alternating."""
    first_token = timed_options(engine)
    return [_bench_row(engine, questions, top_k, repeats, first_token) for top_k in top_ks]


def _bench_row(engine: Engine, questions: list[Question], top_k: int, repeats: int, options: AnswerOptions) -> BenchRow:
    per_path: dict[str, list[float]] = {path: [] for path in PATHS}
    work: list[float] = []
    contexts: list[int] = []
    fp16_bytes: list[int] = []
    stored_bytes: list[float] = []
    same = 0
    fp16_per_token = engine.store.shape.fp16_bytes_per_token
    basis_per_token = engine.store.basis_bytes_per_token()  # a low-rank basis, counted once per store
    for number, item in enumerate(questions):
        entries = engine.retrieve(item.question, top_k)
        question = item.question
        medians, last = alternating_ttft(
            {
                "full": partial(engine.answer_full, question, entries, options),
                "full_prefix_cached": partial(engine.answer_prefix_cached, question, entries, options),
                "cached": partial(engine.answer_cached, question, entries, options),
                "floor": partial(_floor, engine, question, entries, options),
            },
            repeats,
            first=number,
        )
        for path in PATHS:
            per_path[path].append(medians[path])
        work.append(medians["cached"] - medians["floor"])
        same += last["cached"].token_ids[:1] == last["full"].token_ids[:1]
        tokens = sum(e.num_tokens for e in entries)
        contexts.append(engine.prefix.num_tokens + tokens)
        fp16_bytes.append(tokens * fp16_per_token)
        stored_bytes.append(engine.store.stored_bytes(entries) + basis_per_token * tokens)  # as index and eval count
    ttft = {path: statistics.median(times) for path, times in per_path.items()}
    cache_work = statistics.median(work)
    return BenchRow(
        top_k=top_k,
        questions=len(questions),
        context_tokens=statistics.median(contexts),
        ttft_s=ttft,
        speedup={
            "vs_full": ttft["full"] / ttft["cached"],
            "vs_prefix_cached": ttft["full_prefix_cached"] / ttft["cached"],
        },
        cache_work_s=cache_work,
        cache_work_share=cache_work / ttft["cached"],
        kv_bytes={"stored": statistics.median(stored_bytes), "fp16": statistics.median(fp16_bytes)},
        same_first_token=same / len(questions),
    )


def _floor(engine: Engine, question: str, entries: list[Entry], options: AnswerOptions) -> Answer:
    """The cached path with its cache assembled before the clock starts: the question's prefill.
    A selective recompute is left out (it carries the question in its own pass, so a prepared
    request would hold the first token already and time nothing): cached - floor then counts
    the recompute as cache work. The near-tie fallback is left out for the same reason (its
    check prefills the question inside ``prepare``)."""
    plain = options.replace(recompute=replace(options.recompute.with_ratio(0.0), sink_tokens=0), fallback_margin=0.0)
    return engine.answer_prepared(engine.prepare(question, entries, plain), entries, plain)


@dataclass(frozen=True)
class IndexingThroughput:
    """Passages per second of the indexer (tokenize + encode + compress + quantize + serialise +
    embed) against the model's plain forward over the same passages after the cached prefix
    (tokenize + forward: both sides' clocks start from the passages' text)."""

    passages: int
    repeats: int
    indexer_passages_per_s: float
    forward_passages_per_s: float
    ratio: float  # indexer / forward throughput (1.0: indexing costs nothing beyond the forward)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def store_indexer(engine: Engine) -> Indexer:
    """An indexer with the store's own settings (compression, quantization, a low-rank store's
    basis, the packaged adaptor it was encoded through). A store encoded through an adaptor that
    is not packaged (a ``ragcompress train`` folder) cannot be re-encoded by ``bench``: refused
    before anything is timed, naming the way round it."""
    from ragcompress.distill.packaged import packaged_adaptor_dir
    from ragcompress.indexing import Indexer

    recorded = engine.store.manifest.adaptor_hash
    if recorded is not None and packaged_adaptor_dir(recorded) is None:
        raise InputError(
            f"store {engine.store.path} was encoded through adaptor {recorded[:16]}, which is not packaged: "
            "indexing cannot be timed without it (--indexing-passages 0 skips that)"
        )
    return Indexer.for_store(engine.store.manifest, engine.lm, engine.embedder).with_store_basis(engine.store)


def indexing_throughput(
    engine: Engine, passages: int, repeats: int, indexer: Indexer | None = None
) -> IndexingThroughput:
    """Re-index the store's first ``passages`` passages in memory (nothing is written) with its
    own settings (``indexer``: :func:`store_indexer` by default), alternating with the plain
    forward of the same batch; medians of ``repeats`` after one untimed warm-up round."""
    from ragcompress.indexing.inputs import PassageInput

    indexer = indexer or store_indexer(engine)
    batch = [PassageInput(e.id, e.text, e.title, e.meta) for e in islice(engine.store.catalogue.entries(), passages)]
    if not batch:
        raise InputError(f"store {engine.store.path} holds no passages to time indexing on")
    times: dict[str, list[float]] = {"indexer": [], "forward": []}
    for round_ in range(-1, repeats):  # round -1: the warm-up, not timed
        for name in ("indexer", "forward") if round_ % 2 == 0 else ("forward", "indexer"):
            start = time.perf_counter()
            if name == "indexer":
                indexer.records(batch)  # ends on the CPU (records are written from there)
            else:
                indexer.encoder.forward([indexer.encoder.tokens.passage(p.text) for p in batch])
                if indexer.encoder.device.type == "cuda":  # the forward's kernels, not their launch
                    torch.cuda.synchronize(indexer.encoder.device)
            if round_ >= 0:
                times[name].append(time.perf_counter() - start)
    indexer_s, forward_s = statistics.median(times["indexer"]), statistics.median(times["forward"])
    return IndexingThroughput(
        len(batch), repeats, len(batch) / indexer_s, len(batch) / forward_s, forward_s / indexer_s
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
    request, rotate, SDPA) over the same retrieved entries, alternating. Both sides reuse the
    stored caches as they are: a selective recompute or an attention temperature (the engine's
    options, the store's calibration) edits an assembled cache, which the packed path never builds."""
    dense = engine.options.replace(max_new_tokens=1, backend="dense", recompute=0.0, calibrate=False)
    packed = dense.replace(backend=packed_backend)
    ratios, dense_all, packed_all, same = [], [], [], 0
    for number, question in enumerate(questions):
        entries = engine.retrieve(question, top_k)
        medians, last = alternating_ttft(
            {
                "dense": partial(engine.answer_cached, question, entries, dense),
                "packed": partial(engine.answer_cached, question, entries, packed),
            },
            repeats,
            first=number,
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
    """The Markdown table of a bench run (printed by ``ragcompress bench``; the README's curve
    tables are this table rendered from the results JSON by ``benchmarks/report.py``)."""
    lines = [
        "| top-k | questions | context tokens | TTFT full (ms) | full, prefix cached (ms) | cached (ms) | floor (ms) | "
        "vs full | vs prefix cached | cache work | KV stored / fp16 (KiB) | same first token as full |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        t = {path: r.ttft_s[path] * 1000 for path in PATHS}
        lines.append(
            f"| {r.top_k} | {r.questions} | {r.context_tokens:.0f} | {t['full']:.0f} | {t['full_prefix_cached']:.0f} | "
            f"{t['cached']:.0f} | {t['floor']:.0f} | {r.speedup['vs_full']:.1f}x | "
            f"{r.speedup['vs_prefix_cached']:.1f}x | {r.cache_work_s * 1000:.0f} ms ({r.cache_work_share:.0%}) | "
            f"{r.kv_bytes['stored'] / 1024:.0f} / {r.kv_bytes['fp16'] / 1024:.0f} | {r.same_first_token:.0%} |"
        )
    return "\n".join(lines)


LABELS = {
    "full": "full prefill",
    "full_prefix_cached": "full prefill, system prefix cached",
    "cached": "from stored caches (ragcompress)",
    "floor": "floor: question only, cache assembled",
}


def plot(rows: list[BenchRow], path: Path, title: str = "") -> None:
    """TTFT of the four paths against context size (log scale)."""
    need_matplotlib("plot draws", "bench")  # the CLI checks --plot before measuring; a library caller learns it here
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    x = [r.context_tokens for r in rows]
    for name, marker in zip(PATHS, "osD^", strict=True):
        ax.plot(x, [r.ttft_s[name] * 1000 for r in rows], f"{marker}-", label=LABELS[name])
    ax.set_xlabel("context tokens (prefix + retrieved passages)")
    ax.set_ylabel("TTFT (ms, median)")
    ax.set_yscale("log")
    if title:
        ax.set_title(title)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def bench_meta(repeats: int, limit: int, questions: int, model: str) -> dict[str, Any]:
    """What a ``bench --json`` records of its run (:func:`ragcompress.provenance.run_meta`):
    ``questions`` is how many questions each row timed (``limit``, or fewer when the questions
    file holds fewer), ``model`` the store's, and ``load_avg`` the load average at the end."""
    meta = run_meta(repeats=repeats, limit=limit, questions=questions, model=model)
    return {**meta, "load_avg": [round(x, 2) for x in os.getloadavg()]}


def to_json(engine: Engine, rows: list[BenchRow], meta: dict[str, Any]) -> dict[str, Any]:
    """The ``bench --json`` object (DESIGN §3), with what was measured: the rows' ``top_k``, the
    answer ``options`` timed (:func:`timed_options`, as the cached path applied them: the store's
    calibrated temperature included) and the model's ``dtype``."""
    return {
        "model": engine.store.manifest.model_ref,
        "store": str(engine.store.path),
        "device": str(engine.lm.model.device),
        "rows": [asdict(r) for r in rows],
        "meta": meta,
        "top_k": [r.top_k for r in rows],
        "options": engine.calibrated(timed_options(engine)).to_json(),
        "dtype": engine.lm.dtype_name,
    }
