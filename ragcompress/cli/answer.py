"""The commands that answer from a store: ``ask``, ``eval``, ``bench``, ``calibrate``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from ragcompress.cli.options import (
    BACKEND_OPTION,
    CALIBRATE_OPTION,
    DEVICE_OPTION,
    DTYPE_OPTION,
    FALLBACK_OPTION,
    PRESET_HELP,
    RECOMPUTE_OPTION,
    SELECTION_OPTION,
    STORE_OPTION,
    emit,
    options_from_flags,
    path_option,
    preset_matches_store,
    quiet_libraries,
    recompute_schedule,
    show_progress,
    writable_file,
)
from ragcompress.errors import RagCompressError


def ask(
    store: Path = STORE_OPTION,
    question: str = typer.Option(..., "--question"),
    top_k: int = typer.Option(3, "--top-k", min=1),
    max_new_tokens: int = typer.Option(32, "--max-new-tokens", min=1),
    recompute: str | None = RECOMPUTE_OPTION,
    selection: str | None = SELECTION_OPTION,
    preset: str | None = typer.Option(None, "--preset", help=PRESET_HELP),
    backend: str | None = BACKEND_OPTION,
    fallback_margin: float | None = FALLBACK_OPTION,
    calibrate: bool = CALIBRATE_OPTION,
    compare_full: bool = typer.Option(False, "--compare-full", help="also answer by full-text prefill and time it"),
    dtype: str | None = DTYPE_OPTION,
    device: str | None = DEVICE_OPTION,
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Answer a question from the stored caches of the retrieved passages."""
    if not question.strip():  # before the model loads (seconds)
        raise RagCompressError("--question is empty; ask a question with some text in it")
    schedule = recompute_schedule(recompute)
    quiet_libraries()
    from ragcompress.runtime.engine import Engine

    engine = Engine.open(
        store,
        options=options_from_flags(
            preset, max_new_tokens, schedule, selection, backend, fallback_margin, calibrate=calibrate
        ),
        dtype=dtype,
        device=device,
    )
    try:
        preset_matches_store(engine.store.manifest, preset)
        entries = engine.retrieve(question, top_k)
        answer = engine.answer_cached(question, entries)
        data = answer.to_json()
        lines = [
            f"answer: {answer.answer}",
            "passages: " + ", ".join(answer.passage_ids),
            f"TTFT from cache: {answer.ttft_s * 1000:.0f} ms ({answer.backend} attention)"
            if answer.backend != "fallback"
            else f"TTFT: {answer.ttft_s * 1000:.0f} ms (a near tie from the caches, answered by full prefill)",
        ]
        if len(entries) < top_k:
            lines.append(
                f"note: --top-k {top_k}, but the store holds {len(engine.store)} passages: all of them were read"
            )
        if compare_full:
            full = engine.answer_full(question, entries)
            data["full"] = full.to_json()
            data["ttft_speedup"] = full.ttft_s / answer.ttft_s
            lines += [
                f"TTFT of full prefill: {full.ttft_s * 1000:.0f} ms "
                f"({than_the_cache(data['ttft_speedup'])}); full-prefill answer: {full.answer}"
            ]
    finally:
        engine.close()
    emit(data, as_json, "\n".join(lines))


def than_the_cache(speedup: float) -> str:
    """Full prefill's TTFT against the cached path's, ``speedup`` being full's over cached's: the
    larger one over the smaller, so the ratio is true either way ("0.6x slower" said faster)."""
    if f"{speedup:.1f}" == "1.0" == f"{1 / speedup:.1f}":
        return "as fast as from cache"
    if speedup >= 1.0:
        return f"{speedup:.1f}x slower than from cache"
    return f"{1 / speedup:.1f}x faster than from cache"


def evaluate(
    store: Path = STORE_OPTION,
    questions: Path = path_option(..., "--questions", help="JSONL of {id, question, answers, passage_id?}"),
    top_k: int = typer.Option(3, "--top-k", min=1),
    limit: int | None = typer.Option(None, "--limit", min=1, help="the first N questions (after --article/--sample)"),
    sample: int | None = typer.Option(
        None, "--sample", min=1, help="N questions evenly spaced over the file (as the benchmarks' --sample)"
    ),
    articles: list[str] = typer.Option(
        [], "--article", help="only questions of this article (passage_id ARTICLE#N); repeatable"
    ),
    outside: int | None = typer.Option(
        None,
        "--outside",
        min=1,
        help="only questions not among the N that --sample N picks (after --article): a confirmation sample",
    ),
    max_new_tokens: int = typer.Option(32, "--max-new-tokens", min=1),
    recompute: str | None = RECOMPUTE_OPTION,
    selection: str | None = SELECTION_OPTION,
    preset: str | None = typer.Option(None, "--preset", help=PRESET_HELP),
    backend: str | None = BACKEND_OPTION,
    fallback_margin: float | None = FALLBACK_OPTION,
    calibrate: bool = CALIBRATE_OPTION,
    dtype: str | None = DTYPE_OPTION,
    device: str | None = DEVICE_OPTION,
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Answer questions from caches and by full prefill; report quality, agreement and speedup."""
    schedule = recompute_schedule(recompute)
    quiet_libraries()
    from ragcompress.evaluation import iter_eval, read_questions, select_questions, summarize
    from ragcompress.runtime.engine import Engine

    items = select_questions(read_questions(questions, scored=True), sample, articles, outside)[:limit]
    engine = Engine.open(
        store,
        options=options_from_flags(
            preset, max_new_tokens, schedule, selection, backend, fallback_margin, calibrate=calibrate
        ),
        dtype=dtype,
        device=device,
    )
    try:
        matches = preset_matches_store(engine.store.manifest, preset)
        seen = adaptor_training_overlap(engine, items)
        results = iter_eval(engine, items, top_k)
        if show_progress(as_json):
            from tqdm import tqdm

            results = tqdm(results, total=len(items), unit="question", desc="evaluating")
        done: list[Any] = []
        try:
            done.extend(results)
        except (RagCompressError, KeyboardInterrupt):
            if done:  # what was measured before the failure is printed, not lost with it
                typer.echo(
                    f"stopped after {len(done)} of {len(items)} questions; those gave:\n"
                    + eval_figures(summarize(engine, done, top_k), top_k),
                    err=True,
                )
            raise
        summary = {**summarize(engine, done, top_k), "preset": preset, "preset_matches_store": matches}
        stored = len(engine.store)
    finally:
        engine.close()
    human = eval_figures(summary, top_k)
    if summary["fallback_rate"]:
        human += (
            f"\n{100 * summary['fallback_rate']:.0f} % of the questions fell back to full prefill (--fallback-margin): "
            f"mean TTFT speedup {summary['ttft_speedup_mean']:.1f}x"
        )
    if stored < top_k:  # as ask says it: recall@k of a store of fewer passages
        human += f"\nnote: --top-k {top_k}, but the store holds {stored} passages: all of them were read"
    if sample is not None and sample > summary["n"] and limit is None:
        human += f"\nnote: --sample {sample}, but the questions (after --article/--outside) are {summary['n']}: all were asked"
    if seen is not None:
        summary["adaptor_training_overlap"] = seen
        human += (
            f"\nnote: {seen['questions']} of {summary['n']} questions come from articles the store's adaptor "
            f"{seen['adaptor'][:16]} was trained on ({', '.join(seen['articles'])}): their figures are not held "
            "out; --article selects others"
        )
    emit(summary, as_json, human)


def eval_figures(summary: dict[str, Any], top_k: int) -> str:
    """``eval``'s figures for people: sub-EM, F1 and TTFT of both paths, agreement, speedup."""
    recall = "not measured (no passage_id)" if summary["recall_at_k"] is None else f"{summary['recall_at_k']:.3f}"
    return (
        f"questions: {summary['n']}  recall@{top_k}: {recall}\n"
        f"full prefill : sub-EM {summary['full']['sub_em']:.3f}  F1 {summary['full']['f1']:.3f}  "
        f"TTFT {summary['full']['ttft_s_median'] * 1000:.0f} ms\n"
        f"from cache   : sub-EM {summary['compressed']['sub_em']:.3f}  F1 {summary['compressed']['f1']:.3f}  "
        f"TTFT {summary['compressed']['ttft_s_median'] * 1000:.0f} ms\n"
        f"agreement {summary['agreement']:.3f}  TTFT speedup {summary['ttft_speedup']:.1f}x "
        f"({summary['torch_threads']} torch threads{'' if summary['device'] == 'cpu' else ', ' + summary['device']})  "
        f"compression {summary['compression']:.2f}x vs fp16"
    )


def adaptor_training_overlap(engine: Any, items: list[Any]) -> dict[str, Any] | None:
    """The questions of ``items`` from articles the store's packaged adaptor was trained on (an
    adaptor answers those better than it would new text), or None: no adaptor, an adaptor of
    unknown training data, or no such question."""
    from ragcompress.distill.packaged import packaged_adaptor
    from ragcompress.evaluation import article_key

    adaptor = packaged_adaptor(engine.store.manifest.adaptor_hash)
    if adaptor is None:
        return None
    trained = {article_key(a) for a in adaptor.meta.get("train_articles", [])}
    seen = [q.article for q in items if q.article is not None and article_key(q.article) in trained]
    return {"adaptor": adaptor.hash, "questions": len(seen), "articles": sorted(set(seen))} if seen else None


def bench(
    store: Path = STORE_OPTION,
    questions: Path | None = path_option(None, "--questions", help="JSONL of questions (default: bundled sample)"),
    top_k: str = typer.Option("1,2,4,8,16", "--top-k", help="comma-separated context sizes (passages)"),
    limit: int = typer.Option(3, "--limit", min=1, help="questions per context size"),
    repeats: int = typer.Option(3, "--repeats", min=1, help="timed runs per question and path (median)"),
    plot_path: Path | None = path_option(
        None, "--plot", callback=writable_file, help="write a PNG of TTFT against context size"
    ),
    indexing: int = typer.Option(
        8,
        "--indexing-passages",
        min=0,
        help="passages re-indexed in memory (on --device) to time indexing (0: skip)",
    ),
    packed: bool = typer.Option(
        True,
        "--packed/--no-packed",
        help="on a quantized store, also time the packed attention path against "
        "dequantize-then-SDPA at the largest top-k",
    ),
    preset: str | None = typer.Option(None, "--preset", help=PRESET_HELP),
    dtype: str | None = DTYPE_OPTION,
    device: str | None = DEVICE_OPTION,
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """TTFT across context sizes against full prefill; KV bytes; indexing throughput.

    Full prefill, prefix-cached prefill, stored caches and the question-only floor, alternating
    in one run."""
    quiet_libraries()
    from ragcompress.bench import bench as run_bench
    from ragcompress.bench import (
        bench_meta,
        indexing_throughput,
        packed_ttft_overhead,
        plot,
        store_indexer,
        table,
        to_json,
    )
    from ragcompress.data import SAMPLE_QUESTIONS
    from ragcompress.evaluation import read_questions
    from ragcompress.runtime.engine import Engine

    try:
        top_ks = list(dict.fromkeys(int(k) for k in top_k.split(",")))  # each size measured once, in the given order
    except ValueError:
        raise RagCompressError(f"--top-k takes comma-separated integers, got {top_k!r}") from None
    if min(top_ks) < 1:
        raise RagCompressError(f"--top-k takes passage counts of 1 or more, got {top_k!r}")
    if repeats % 2 == 0:
        raise RagCompressError(
            f"--repeats takes an odd count (each figure is a median, and the median of {repeats} runs is "
            f"the mean of the middle two); use {repeats - 1} or {repeats + 1}"
        )
    items = read_questions(questions or SAMPLE_QUESTIONS, limit)
    engine = Engine.open(store, options=options_from_flags(preset), dtype=dtype, device=device)
    comparison = throughput = None
    try:
        matches = preset_matches_store(engine.store.manifest, preset)
        if max(top_ks) > len(engine.store):
            raise RagCompressError(f"--top-k {max(top_ks)} exceeds the {len(engine.store)} passages in {store}")
        indexer = store_indexer(engine) if indexing else None  # a store it cannot re-encode fails before timing
        rows = run_bench(engine, items, top_ks, repeats)
        if indexer is not None:
            throughput = indexing_throughput(engine, indexing, repeats, indexer)
        if packed and engine.store.quant.bits is not None:
            comparison = packed_ttft_overhead(engine, [q.question for q in items], max(top_ks), repeats)
        meta = bench_meta(repeats, limit, len(items), engine.store.manifest.model_ref)
        data = {**to_json(engine, rows, meta), "preset": preset, "preset_matches_store": matches}
    finally:
        engine.close()
    human = table(rows)
    if throughput is not None:
        data["indexing"] = throughput.to_json()
        human += (
            f"\n\nindexing: {throughput.indexer_passages_per_s:.1f} passages/s vs plain forward "
            f"{throughput.forward_passages_per_s:.1f} passages/s ({throughput.ratio:.2f}x of the forward's throughput)"
        )
    if comparison is not None:
        data["packed_attention"] = comparison.to_json()
        human += (
            f"\n\npacked attention ({comparison.packed_backend}; packed-torch is the kernel's PyTorch reference, "
            f"not the Triton kernel) vs dequantize-then-SDPA, top-{max(top_ks)}: "
            f"TTFT {comparison.packed_ttft_s * 1000:.0f} ms vs {comparison.assembled_ttft_s * 1000:.0f} ms, "
            f"ratio {comparison.ratio:.2f} (median per question), same first token "
            f"{comparison.same_first_token:.0%}"
        )
    emit(data, as_json, human)  # the measurement first: a plot that fails to write does not lose it
    if plot_path is not None:
        try:
            plot(rows, plot_path, title=f"{data['model']}, {len(items)} questions")
        except OSError as exc:
            raise RagCompressError(f"cannot write the plot {plot_path}: {exc.strerror or exc}") from None


def calibrate(
    store: Path = STORE_OPTION,
    samples: int = typer.Option(16, "--samples", min=1, help="passage groups measured"),
    top_k: int = typer.Option(3, "--top-k", min=1, help="passages per group"),
    dtype: str | None = DTYPE_OPTION,
    device: str | None = DEVICE_OPTION,
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Choose the store's attention temperature (APE) by KL to full prefill, without labels.

    The temperature is recorded in the manifest, and every stored-cache answer applies it
    (docs/recompute.md)."""
    quiet_libraries()
    import dataclasses

    from ragcompress.runtime.calibration import calibrate_temperature
    from ragcompress.runtime.engine import Engine
    from ragcompress.runtime.options import AnswerOptions
    from ragcompress.store import Manifest
    from ragcompress.store.manifest import sealed_attention
    from ragcompress.store.writer import StoreLock

    with Engine.open(store, options=AnswerOptions(calibrate=False), dtype=dtype, device=device) as engine:
        result = calibrate_temperature(engine, samples=samples, top_k=top_k, progress=show_progress(as_json))
        lock = StoreLock(store)
        try:  # a temperature measured on one build is not recorded in another swapped in meanwhile
            engine.store.check_replacement()
            manifest = Manifest.read(store)
            dataclasses.replace(manifest, attention=sealed_attention(result.as_dict())).write(store)
        finally:
            lock.release()
    table = ", ".join(f"T={t}: {kl:.4f}" for t, kl in result.kl.items())
    emit(
        result.as_dict(),
        as_json,
        f"attention temperature {result.temperature:g} recorded in {store}/manifest.json "
        f"(mean KL to full prefill over {result.samples} groups: {table})",
    )
