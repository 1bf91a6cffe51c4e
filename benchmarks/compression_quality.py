"""Quality of every compression method at several ratios, with and without int4, on SQuAD-dev.

For a bounded, evenly spaced sample of questions, the top-k passages are retrieved once with
the store's embedder, so every row answers from the *same* passages. Only those passages are
encoded, once; each method scores each passage once and keeps every ratio from those scores
(``select``), and every (method, ratio, quant) gets its own real store (manifest, shards,
catalogue, FAISS index) that is answered through ``Engine.answer_cached`` (the ragged path when
heads keep different counts). The baseline is ``Engine.answer_full``: a plain prefill of the
same token ids, greedy, in the same process.

Indexing time is measured separately, side by side in one process: for a few passages and
repeats, ``encode + compress + serialise`` of each method against ``encode + serialise`` of
``none`` (median per passage, reported as a ratio). Embedding and disk writes are the same for
every method and are left out, which makes the ratio conservative.

    python benchmarks/compression_quality.py --model smollm2-135m --questions 40
    python benchmarks/compression_quality.py --model qwen2.5-coder-0.5b --questions 24

Writes ``<workdir>/results.json`` (resumable: finished rows are kept), prints a Markdown table
and saves a plot of sub-EM against compression.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ragcompress.compressors import CompressionContext, make_compressor
from ragcompress.evaluation import Quality, Question
from ragcompress.indexing import IndexConfig, build_manifest
from ragcompress.indexing.encoder import PassageEncoder
from ragcompress.indexing.indexer import passage_record
from ragcompress.indexing.inputs import PassageInput, iter_passages
from ragcompress.kv import ModelShape, PassageKV
from ragcompress.kv.quant import QuantConfig
from ragcompress.models import LoadedModel, load_model, resolve_model_dir
from ragcompress.prompt import PromptTemplate
from ragcompress.retrieval import Embedder, exact_top_k
from ragcompress.runtime.engine import Engine
from ragcompress.runtime.options import AnswerOptions
from ragcompress.store import KVStore, StoreWriter, create_store
from ragcompress.store.codec import encode

from common import (
    KVPRESS,
    SQUAD,
    cached_scores,
    encoding_key,
    measured_by,
    pick_questions,
    plot_against_compression,
    results_meta,
    row_name,
    row_run,
    side_row,
    tokens_digest,
)

METHODS = ["kvzip", "adaptive:kvzip", "global:kvzip", "snapkv", "expected-attention", "knorm", "streaming"]


@dataclass
class Bench:
    """Everything shared by all rows: model, encoder, questions and their retrieved passages."""

    lm: LoadedModel
    template: PromptTemplate
    encoder: PassageEncoder
    embedder: Embedder
    questions: list[Question]
    retrieved: list[list[str]]  # per question, top-k passage ids in rank order
    passages: dict[str, PassageInput]
    vectors: dict[str, np.ndarray]
    token_ids: dict[str, list[int]]
    full: dict[str, PassageKV]
    workdir: Path


def setup(model: str | None, n_questions: int, top_k: int, workdir: Path, data: Path = SQUAD) -> Bench:
    lm = load_model(model)
    template = PromptTemplate.from_tokenizer(lm.tokenizer)
    encoder = PassageEncoder(lm, template)
    embedder = Embedder()
    passages = {p.id: p for p in iter_passages(data / "passages.jsonl")}
    questions = pick_questions(data / "questions.jsonl", n_questions)
    ids = list(passages)
    pvec = embedder.embed([passages[i].text for i in ids])
    qvec = embedder.embed([q.question for q in questions])
    top = exact_top_k(qvec, pvec, top_k)
    retrieved = [[ids[j] for j in row] for row in top]
    needed = list(dict.fromkeys(pid for row in retrieved for pid in row))
    token_ids = {pid: encoder.tokens.passage(passages[pid].text) for pid in needed}
    # encoded by every invocation, a resumed one too: rows are scored from the float32 caches
    # indexing computes (until 2026-12-06 a resumed run reloaded them from the fp16 store)
    full: dict[str, PassageKV] = {}
    for start in range(0, len(needed), 4):
        batch = needed[start : start + 4]
        for pid, kv in zip(batch, encoder.encode([token_ids[pid] for pid in batch]), strict=True):
            full[pid] = kv
    vectors = {ids[j]: pvec[j] for j in range(len(ids)) if ids[j] in token_ids}
    workdir.mkdir(parents=True, exist_ok=True)
    # the input of benchmarks/kvpress_scores.py (run in kvpress's own virtualenv)
    (workdir / "passages-tokens.json").write_text(
        json.dumps(
            {"model_dir": str(resolve_model_dir(lm.ref)), "prefix_ids": encoder.prefix_ids, "passages": token_ids}
        )
    )
    print(
        f"{lm.ref}: {len(questions)} questions, {len(needed)} passages "
        f"({sum(len(token_ids[p]) for p in needed)} tokens) encoded",
        flush=True,
    )
    return Bench(
        lm,
        template,
        encoder,
        embedder,
        questions,
        retrieved,
        {p: passages[p] for p in needed},
        vectors,
        token_ids,
        full,
        workdir,
    )


def parse_method(method: str) -> tuple[str, dict[str, Any]]:
    """``"global:kvzip[keep_last=0,floor=0.1]"`` -> ``("global:kvzip", {"keep_last": 0, "floor": 0.1})``:
    a row may override a method's parameters (a sweep) and stays a separate row."""
    match = re.fullmatch(r"([^\[]+)(?:\[(.*)\])?", method)
    if match is None:
        raise SystemExit(f"bad method spec {method!r}; expected NAME or NAME[key=value,...]")
    params: dict[str, Any] = {}
    for item in filter(None, (match.group(2) or "").split(",")):
        key, _, value = item.partition("=")
        params[key.strip()] = json.loads(value)
    return match.group(1), params


def build_store(bench: Bench, path: Path, config: IndexConfig, kept: dict[str, PassageKV]) -> None:
    """A real store holding ``kept`` caches (already compressed) for the needed passages."""
    if path.exists():
        shutil.rmtree(path)
    create_store(path, build_manifest(bench.lm, bench.template, config), bench.encoder.prefix_kv)
    quant = config.quant_config()
    records = [passage_record(bench.passages[pid], kv, quant, bench.vectors[pid]) for pid, kv in kept.items()]
    with StoreWriter(path) as writer:
        writer.add(records)
        writer.write_index()


def open_engine(bench: Bench, store: KVStore, max_new_tokens: int) -> Engine:
    """An engine over ``store`` sharing the loaded model, warmed up like ``Engine.open``."""
    engine = Engine(store, bench.lm, bench.embedder, AnswerOptions(max_new_tokens=max_new_tokens))
    engine.warm_up()
    return engine


def answer_rows(bench: Bench, path: Path, max_new_tokens: int) -> tuple[list[dict[str, Any]], float]:
    with KVStore.open(path) as store:
        engine = open_engine(bench, store, max_new_tokens)
        rows = []
        for q, pids in zip(bench.questions, bench.retrieved, strict=False):
            entries = [store.entry(pid) for pid in pids]
            answer = engine.answer_cached(q.question, entries)
            rows.append({"answer": answer.answer, "ttft_s": answer.ttft_s})
        stored = store.bytes_per_token([store.entry(pid) for pid in bench.full])
    return rows, stored


def full_answers(bench: Bench, path: Path, max_new_tokens: int) -> list[str]:
    with KVStore.open(path) as store:
        engine = open_engine(bench, store, max_new_tokens)
        return [
            engine.answer_full(q.question, [store.entry(p) for p in pids]).answer
            for q, pids in zip(bench.questions, bench.retrieved, strict=False)
        ]


def summarise(bench: Bench, answers: list[str], full: list[str]) -> dict[str, float]:
    """A row's sub-EM, F1 and agreement with the ``full`` prefill answers (:class:`Quality`: a list
    of another length than the questions is an error, not a lower figure)."""
    return Quality.of(answers, [q.answers for q in bench.questions], full).means()


def scores_key(bench: Bench, scorer: str) -> dict[str, Any]:
    """What ``scorer``'s cached scores are computed from (:func:`common.load_keyed`): the model,
    its prompt prefix, and the library code that encodes and scores -- or, for kvpress's presses
    (computed by ``kvpress_scores.py`` in its own virtualenv), the model folder it loaded."""
    prefix = tokens_digest(bench.encoder.prefix_ids)
    if scorer.startswith(KVPRESS):
        return {"scorer": scorer, "model_dir": str(resolve_model_dir(bench.lm.ref)), "prefix": prefix}
    return {"scorer": scorer, **encoding_key(bench.lm, bench.encoder.prefix_ids, "compressors")}


def load_or_score(bench: Bench, scorer: str) -> dict[str, torch.Tensor]:
    """Scores ``[L, H, n]`` of every needed passage under ``scorer``, computed once and kept in
    ``<workdir>/scores-<scorer>.safetensors`` so later rows and resumed runs (new wrappers,
    ratios) reuse them, as long as they were computed from the same model, tokens and code."""
    unscorable = (
        f"run benchmarks/kvpress_scores.py {bench.workdir} in a kvpress virtualenv first"
        if scorer.startswith(KVPRESS)
        else None
    )
    path = bench.workdir / f"scores-{scorer}.safetensors"
    return cached_scores(
        path, scores_key(bench, scorer), bench.token_ids, bench.full, scorer, bench.encoder, unscorable
    )


def selector(method: str, ratio: float) -> Any:
    """The compressor that keeps ``ratio`` of a passage given its scores. Scores of a kvpress
    press (``kvpress-<name>``) go through the same selection as ours (``select`` is shared by
    every scorer), so budgets and protected tokens are identical and only the scores differ."""
    return make_compressor(selection_method(method), ratio=ratio, **parse_method(method)[1])


def selection_method(method: str) -> str:
    """The registered method whose ``select`` a row uses (its name in the store's manifest)."""
    wrapper, _, scorer = parse_method(method)[0].rpartition(":")
    if scorer.startswith(KVPRESS):  # selection (budget, protected tokens) is the same for every scorer
        scorer = "knorm"
    return f"{wrapper}:{scorer}" if wrapper else scorer


def indexing_times(bench: Bench, methods: list[str], ratio: float, passages: int, repeats: int) -> dict[str, float]:
    """Median per-passage ``encode + compress + serialise`` seconds per method, side by side."""
    sample = list(bench.full)[:passages]
    times: dict[str, list[float]] = {m: [] for m in ["none", *methods]}
    quant = QuantConfig("none")
    for _ in range(repeats):
        for pid in sample:
            ids = bench.token_ids[pid]
            t0 = time.perf_counter()
            kv = bench.encoder.encode([ids])[0]
            encode_s = time.perf_counter() - t0
            for method in times:
                compressor = make_compressor("none") if method == "none" else selector(method, ratio)
                t0 = time.perf_counter()
                encode(compressor.compress(kv, CompressionContext(bench.encoder, ids)), quant)
                times[method].append(encode_s + time.perf_counter() - t0)
    return {m: statistics.median(v) for m, v in times.items()}


def plot(results: dict[str, Any], path: Path, title: str) -> None:
    """sub-EM against compression, with ``none`` (ratio 1.0) and full prefill marked."""
    rows = results["rows"]

    def references(ax: Any) -> None:
        for quant, marker in (("fp16", "*"), ("int4", "P")):
            ref = rows.get(row_name("none", None, quant))
            if ref:
                ax.plot(
                    [ref["compression"]],
                    [ref["sub_em"]],
                    marker,
                    color="k",
                    markersize=10,
                    label=f"none{' + int4' if quant == 'int4' else ''} (ratio 1.0)",
                )
        ax.axhline(results["full"]["sub_em"], color="grey", ls=":", label="full prefill")

    plot_against_compression(
        rows,
        "sub_em",
        "sub-EM",
        path,
        title,
        lambda r: r["method"] != "none" and not side_row(r["method"]),
        references,
        alpha=0.9,
        markersize=4,
    )


def table(results: dict[str, Any]) -> str:
    full, base = results["full"], results["indexing_s"]["none"]
    lines = [
        f"full prefill: sub-EM {full['sub_em']:.3f}, F1 {full['f1']:.3f} "
        f"({results['n']} questions, top-{results['top_k']}, recall@k {results['recall_at_k']:.2f})",
        "",
        "| method | ratio | quant | sub-EM | F1 | agreement | bytes/token | compression | indexing time / none |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results["rows"].values():
        t = results["indexing_s"].get(r["method"])
        lines.append(
            f"| {r['method']} | {r['ratio']} | {r['quant']} | {r['sub_em']:.3f} | {r['f1']:.3f} | "
            f"{r['agreement']:.3f} | {r['bytes_per_token']:.0f} | {r['compression']:.1f}x | "
            f"{'' if t is None else f'{t / base:.2f}'} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="model name (default: the embedded SmolLM2-135M)")
    parser.add_argument("--questions", type=int, default=40)
    parser.add_argument("--top-k", type=int, default=3)
    parser.add_argument("--methods", nargs="+", default=METHODS)
    parser.add_argument("--ratios", nargs="+", type=float, default=[0.5, 0.25, 0.125])
    parser.add_argument("--quants", nargs="+", default=["fp16", "int4"])
    parser.add_argument("--group-size", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--timing-passages", type=int, default=4)
    parser.add_argument("--timing-repeats", type=int, default=3)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/ragcompress-bench"))
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (1 avoids oversubscription on shared CPUs)"
    )
    parser.add_argument("--report-only", action="store_true", help="print the table and plot from results.json")
    parser.add_argument("--plot", type=Path, default=None, help="PNG path (default docs/img/compression-<model>.png)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    tag = (args.model or "smollm2-135m").replace("/", "_")
    workdir = args.workdir / tag
    if args.report_only:
        results: dict[str, Any] = json.loads((workdir / "results.json").read_text())
        results.setdefault("indexing_s", {"none": 1.0})
        print(table(results))
        plot(
            results,
            args.plot or Path("docs/img") / f"compression-{tag}.png",
            f"{results['model']}: sub-EM vs compression (SQuAD-dev, {results['n']} questions, top-{results['top_k']})",
        )
        return
    bench = setup(args.model, args.questions, args.top_k, workdir)
    results_path = workdir / "results.json"
    key = {
        "questions": [q.id for q in bench.questions],
        "top_k": args.top_k,
        "group_size": args.group_size,
        "max_new_tokens": args.max_new_tokens,
    }
    results = json.loads(results_path.read_text()) if results_path.is_file() else {}
    if results.get("key") != key:
        results = {"key": key, "rows": {}}
    results.update(model=bench.lm.ref, n=len(bench.questions), top_k=args.top_k, retrieved=bench.retrieved)
    results["recall_at_k"] = sum(
        q.passage_id in r for q, r in zip(bench.questions, bench.retrieved, strict=False)
    ) / len(bench.questions)
    fp16 = float(ModelShape.from_config(bench.lm.config).fp16_bytes_per_token)

    # each row says which code measured it and from which uncompressed caches: "encoded" (float32,
    # as indexing computes them, by every invocation); rows of older resumed runs say "fp16 store"
    provenance = {**row_run(threads=args.threads), "full_caches": "encoded"}

    def save() -> None:
        rows = results["rows"].values()
        results["meta"] = {
            **results_meta({"questions": len(bench.questions), "model": bench.lm.ref, "threads": args.threads}),
            "measured_by": measured_by(rows, ("git", "full_caches")),
        }
        results_path.write_text(json.dumps(results, indent=1))

    timed = set(results.get("indexing_s", {}))
    ours = [m for m in args.methods if KVPRESS not in m]  # kvpress scores are computed elsewhere
    if args.timing_passages and not {"none", *ours} <= timed:  # all ratios from one process
        results["indexing_s"] = indexing_times(bench, ours, 0.25, args.timing_passages, args.timing_repeats)
        save()
        print(
            "indexing time / none: "
            + ", ".join(f"{m} {t / results['indexing_s']['none']:.2f}" for m, t in results["indexing_s"].items()),
            flush=True,
        )

    none_kept = dict(bench.full)
    for quant in args.quants:
        name = row_name("none", None, quant)
        config = IndexConfig("none", None, quant, args.group_size)
        # rebuilt unless its row is kept: a store left by an earlier invocation (another results
        # key, other code) would be answered and stamped as this run's
        if name not in results["rows"] or not (workdir / name / "manifest.json").is_file():
            build_store(bench, workdir / name, config, none_kept)
        if "full" not in results:
            full = full_answers(bench, workdir / name, args.max_new_tokens)
            results["full"] = {"answers": full, **summarise(bench, full, full)}
            save()
        if name not in results["rows"]:
            rows, stored = answer_rows(bench, workdir / name, args.max_new_tokens)
            answers = [r["answer"] for r in rows]
            results["rows"][name] = {
                "method": "none",
                "ratio": 1.0,
                "quant": quant,
                "answers": answers,
                **summarise(bench, answers, results["full"]["answers"]),
                "bytes_per_token": stored,
                "compression": fp16 / stored,
                **provenance,
            }
            save()
        print(f"{name}: sub-EM {results['rows'][name]['sub_em']:.3f}", flush=True)

    scores: dict[str, dict[str, torch.Tensor]] = {}  # scorer -> passage -> [L, H, n], computed once
    for ratio, method in [(r, m) for r in args.ratios for m in args.methods]:
        todo = [q for q in args.quants if row_name(method, ratio, q) not in results["rows"]]
        if not todo:
            continue
        scorer = parse_method(method)[0].split(":")[-1]
        if scorer not in scores:
            scores[scorer] = load_or_score(bench, scorer)
        compressor = selector(method, ratio)
        kept = {pid: compressor.select(kv, scores[scorer][pid]) for pid, kv in bench.full.items()}
        for quant in todo:
            t0 = time.perf_counter()
            name = row_name(method, ratio, quant)
            build_store(
                bench, workdir / name, IndexConfig(selection_method(method), ratio, quant, args.group_size), kept
            )
            rows, stored = answer_rows(bench, workdir / name, args.max_new_tokens)
            answers = [r["answer"] for r in rows]
            results["rows"][name] = {
                "method": method,
                "ratio": ratio,
                "quant": quant,
                "answers": answers,
                **summarise(bench, answers, results["full"]["answers"]),
                "bytes_per_token": stored,
                "compression": fp16 / stored,
                **provenance,
            }
            save()
            print(
                f"{name}: sub-EM {results['rows'][name]['sub_em']:.3f} "
                f"compression {fp16 / stored:.1f}x ({time.perf_counter() - t0:.0f} s)",
                flush=True,
            )

    results.setdefault("indexing_s", {"none": 1.0})
    order = {m: i for i, m in enumerate(["none", *args.methods])}
    results["rows"] = dict(
        sorted(
            results["rows"].items(), key=lambda kv: (order.get(kv[1]["method"], 99), -kv[1]["ratio"], kv[1]["quant"])
        )
    )
    save()
    print(table(results))
    plot(
        results,
        args.plot or Path("docs/img") / f"compression-{tag}.png",
        f"{bench.lm.ref}: sub-EM vs compression (SQuAD-dev, {len(bench.questions)} questions, top-{args.top_k})",
    )


if __name__ == "__main__":
    main()
