"""Quality and TTFT of the faithful-reuse levers against full prefill (docs/recompute.md).

For every question the same retrieved passages are answered by a plain full prefill (the
baseline) and by every setting, interleaved in one process, greedy. Per setting: sub-EM, F1,
agreement with the full-prefill answer (same text), teacher-forced KL(full || setting) of the
next-token distributions along the full-prefill answer (its tokens plus the stop), 95 % bootstrap
intervals, and TTFT speed-ups against full prefill and against prefix-cached full prefill (#9's
fair baseline: the shared prefix's cache reused, passages and question prefilled), medians of
the TTFTs measured in this run.

Settings are written ``reuse`` (plain reuse), ``r0.1`` (recompute 10 %), ``s4`` (first 4 tokens
of every passage), ``t0.9`` (APE temperature), ``c2`` (check layer), ``g0.02`` (gradual filtering: the fraction still
carried through the last layer), ``question`` / ``mixed``
(question-aware token selection), ``cal`` (the store's calibrated temperature, ``ragcompress
calibrate``; every other setting runs uncalibrated), joined with ``+``: ``r0.1+mixed``; ``oracle`` is the bound of
the store's quantization (exact, perfectly conditioned passage KV, quantized like the store's); ``reversed`` is a
second full prefill with the retrieved passages in the opposite order, the agreement and KL that an equally valid
prompt keeps with the first (how stable the model's own answers are, not a method). A setting prefixed
``NAME:`` runs on the store given as ``--variant NAME=DIR`` (same model and passages, built
another way, e.g. ``index --context-neighbors 2``); retrieval is the same, since every variant
embeds the same texts with the same embedder.

    .venv/bin/python benchmarks/recompute_quality.py --store runs/squad-qwen2.5-coder-0.5b-int8 \\
        --variant n2=runs/faithful/qwen-int8-n2 --questions ../shared/data/squad-dev/questions.jsonl \\
        --sample 100 --top-k 3 --settings reuse r0.1 r0.1+question r0.1+mixed n2:reuse n2:r0.1+mixed \\
        --checkpoint runs/faithful/qwen-top3.jsonl --out docs/results/faithful_qwen.json

``--checkpoint`` appends every question's outcomes as it finishes; a rerun skips the questions
already there (a long run can be stopped and resumed, or split over processes with ``--shard I/N``
sharing one checkpoint; ``--report-only`` then summarizes the whole sample).

``--dtype bfloat16`` runs every path (full prefill included) with the weights in that dtype; each
record names its dtype and a checkpoint only resumes or reports the records of the run's own
(records written before the option are float32). ``--report-only --reference-full CKPT`` adds how
often each setting's answer, and this run's full prefill's, is the text of the full-prefill answer
in another run's checkpoint (e.g. bf16 against float32: how much a change of dtype alone moves
the model's own answers).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from ragcompress.evaluation import Quality, question_quality
from ragcompress.models import DTYPES
from ragcompress.runtime.engine import Engine
from ragcompress.runtime.generate import Generation, TokenStream, first_token_margin, kl_per_position
from ragcompress.runtime.options import AnswerOptions
from ragcompress.runtime.recompute import SELECTIONS, RecomputeConfig
from ragcompress.stats import bootstrap_ci, paired_comparison
from ragcompress.store import KVStore
from ragcompress.store.manifest import Manifest

from common import (
    measured_by,
    pick_questions,
    question_article,
    results_meta,
    rewind,
    row_run,
    run_keeping_request,
    store_adaptors,
    store_created,
    teacher_forced_logprobs,
)

KEYS = {
    "r": ("ratio", float),
    "s": ("sink_tokens", int),
    "t": ("temperature", float),
    "c": ("check_layer", int),
    "g": ("final_ratio", float),
}
OUTCOMES = ("sub_em", "f1", "agree", "kl", "ttft")
DEFAULT_DTYPE = "float32"  # the weights' dtype of every record written before --dtype


def parse_setting(text: str) -> tuple[str | None, RecomputeConfig, bool, float]:
    """``[variant:]part+part...`` -> (variant or None, config, apply the store's calibration,
    fallback margin: ``f0.025`` answers near ties by full prefill, ``AnswerOptions.fallback_margin``)."""
    variant, _, spec = text.rpartition(":")
    fields: dict = {}
    calibrate = False
    fallback = 0.0
    for part in spec.split("+"):
        if part == "reuse":
            continue
        if part == "cal":
            calibrate = True
            continue
        if part in SELECTIONS:
            fields["selection"] = part
            continue
        if part[0] == "f":
            fallback = float(part[1:])
            continue
        name, cast = KEYS[part[0]]
        fields[name] = cast(part[1:])
    return variant or None, RecomputeConfig(**fields), calibrate, fallback


def run_forced(model, stream: TokenStream, answer: list[int] | None = None) -> tuple[Generation, torch.Tensor]:
    """Decode ``stream`` (the answer and its TTFT, as ``Engine.answer_*`` measure them), then
    teacher-force ``answer`` (default: the tokens just decoded) over the same request's cache:
    ``[len(answer) + 1, vocab]`` log-probs after the prompt and after each answer token."""
    generation, prepared, rows = run_keeping_request(stream)
    forced = generation.token_ids if answer is None else answer
    return generation, teacher_forced_logprobs(model, rewind(prepared, rows), forced, keep=len(forced) + 1)


def kl(full_logp: torch.Tensor, logp: torch.Tensor) -> float:
    """Mean over positions of KL(full || setting), nats."""
    return float(kl_per_position(full_logp, logp).mean())


def disagreements(rows: list[dict], full: list[dict]) -> dict[str, int]:
    """The questions where a setting's answer differs from full prefill's, by which of the two is
    right (sub-EM): what is left of the agreement gap is mostly questions full prefill gets wrong
    too (an unstable answer) or a lost fact (only full right)?"""
    # (full prefill right, setting right) -> name
    names = {
        (False, False): "full_wrong_too",
        (True, False): "only_full_right",
        (False, True): "only_setting_right",
        (True, True): "both_right",
    }
    out = dict.fromkeys(names.values(), 0)
    for row, reference in zip(rows, full, strict=True):
        if not row["agree"]:
            out[names[bool(reference["sub_em"]), bool(row["sub_em"])]] += 1
    return out


def summarize(records: list[dict], settings: list[str]) -> dict:
    """Per setting: means, intervals, TTFT medians and speed-ups, paired test against full."""
    full_ttft = statistics.median(r["full"]["ttft"] for r in records)
    prefix_ttft = statistics.median(r["prefix_cached_ttft"] for r in records)
    # means too: a path that sometimes falls back to full prefill shows its cost in the mean
    # against the mean, where the medians (fast questions are most of them) would hide it
    full_mean = statistics.fmean(r["full"]["ttft"] for r in records)
    prefix_mean = statistics.fmean(r["prefix_cached_ttft"] for r in records)
    full_em = [r["full"]["sub_em"] for r in records]
    table = {}
    for name in ["full"] + settings:
        rows = [r[name] for r in records]
        values = {key: [row[key] for row in rows] for key in OUTCOMES}
        quality = Quality(values["sub_em"], values["f1"], values["agree"])
        means, ci = quality.means(), quality.ci95()
        ttft, mean = statistics.median(values["ttft"]), statistics.fmean(values["ttft"])
        table[name] = {
            "n": len(rows),
            "sub_em": means["sub_em"],
            "f1": means["f1"],
            "agreement": means["agreement"],
            "kl": statistics.fmean(values["kl"]),
            "ttft_s_median": ttft,
            "ttft_speedup": full_ttft / ttft,
            "ttft_speedup_vs_prefix_cached": prefix_ttft / ttft,
            # each question's pair was timed side by side: the median of their ratios stays a paired
            # figure when a report pools runs timed at different speeds, where the ratio of pooled
            # medians can fall below every run's own (faithful_qwen_base_copy_133q.json: 5.3x from
            # halves of 5.6x and 6.0x)
            "ttft_speedup_paired": statistics.median(
                r["full"]["ttft"] / row["ttft"] for r, row in zip(records, rows, strict=True)
            ),
            "ttft_speedup_mean": full_mean / mean,
            "ttft_speedup_mean_vs_prefix_cached": prefix_mean / mean,
            "ci95": {"sub_em": ci["sub_em"], "agreement": ci["agreement"], "kl": bootstrap_ci(values["kl"])},
            "vs_full_sub_em": paired_comparison(values["sub_em"], full_em),
        }
        if name != "full":
            table[name]["disagreements"] = disagreements(rows, [r["full"] for r in records])
        if any("backend" in row for row in rows):
            table[name]["fallback_rate"] = statistics.fmean(row.get("backend") == "fallback" for row in rows)
    table["prefix-cached"] = {"n": len(records), "ttft_s_median": prefix_ttft, "ttft_speedup": full_ttft / prefix_ttft}
    return table


class Variants:
    """The base engine and one engine per ``--variant`` store, all sharing one loaded model."""

    def __init__(self, base: Engine, variants: dict[str, str]) -> None:
        self.base = base
        self.engines = {
            name: Engine(KVStore.open(path), base.lm, base.embedder, base.options) for name, path in variants.items()
        }
        for name, engine in self.engines.items():  # Engine refused another model or tokenizer
            if engine.store.manifest.template != base.store.manifest.template:
                raise SystemExit(f"variant {name} was built with another prompt template")

    def get(self, name: str | None) -> Engine:
        return self.base if name is None else self.engines[name]

    def entries(self, name: str | None, base_entries):
        """The same passages (by id) in the variant's store."""
        if name is None:
            return base_entries
        store = self.engines[name].store
        return [store.entry(e.id) for e in base_entries]


def oracle_stream(engine: Engine, question: str, entries, options: AnswerOptions) -> TokenStream:
    """The bound of any store with this quantization: every passage's *exact* KV (encoded after
    the prefix and the passages before it in retrieved order, i.e. perfectly conditioned:
    ``PassageEncoder.encode`` with those contexts), round-tripped through the store's codec and
    quantization, then the question prefilled over them as on the cached path. Not a method (it
    costs more than a full prefill): what agreement is left when only quantization differs."""
    from ragcompress.indexing.encoder import PassageEncoder
    from ragcompress.prompt import PromptTemplate
    from ragcompress.runtime.generate import Prepared
    from ragcompress.runtime.prepare import DenseStrategy
    from ragcompress.store import codec

    suffix = engine.suffix_ids(question, entries, options)
    encoder = PassageEncoder(engine.lm, PromptTemplate.from_dict(engine.store.manifest.template))

    def prepare() -> Prepared:
        ids = engine.full_prompt_ids(question, entries, options)[: -len(suffix)]
        first = start = engine.prefix.num_tokens
        passages, contexts = [], []
        for entry in entries:
            passages.append(ids[start : start + entry.num_tokens])
            contexts.append(ids[first:start])
            start += entry.num_tokens
        segments = [
            codec.parse(codec.encode(exact, engine.store.quant), engine.store.shape).dense()
            for exact in encoder.encode(passages, contexts)
        ]
        # the dense path's own assembly and checks (issue #8: one path), from caches never stored
        return DenseStrategy().prepare_segments(engine.context, segments, suffix, options.max_new_tokens, passages)

    return TokenStream(engine.lm.model, prepare, options.max_new_tokens, engine.stop_ids)


def question_record(variants: Variants, item, top_k: int, settings: list[str], rotation: int = 0) -> dict:
    """Every setting's outcomes on one question. Full prefill runs first, untimed: its tokens are
    the reference the settings are teacher-forced on. The timed runs (a second full prefill, the
    prefix-cached baseline and every setting) then go in an order that starts ``rotation`` places
    on, so no timed path is always the first to touch a question's passages. The untimed run
    still warms the timed full prefill alone (the same prompt, just before: memory and caches
    already shaped for it), so the ratios against full prefill can only understate the settings'
    speed-ups, not overstate them."""
    engine = variants.base
    entries = engine.retrieve(item.question, top_k)
    full_gen, full_logp = run_forced(engine.lm.model, engine.stream_full(item.question, entries))
    full_text = engine.decode(full_gen.token_ids)
    one_token = engine.options.replace(max_new_tokens=1)
    record: dict = {
        "id": item.id,
        "passages": [e.id for e in entries],
        "full": {
            "answer": full_text,
            **question_quality(full_text, item.answers, full_text),  # sub_em, f1, agree (1.0)
            "kl": 0.0,
            "margin": first_token_margin(full_logp[0]),
            "tokens": list(full_gen.token_ids),
        },
    }
    order = ["full", "prefix-cached", *settings]
    shift = rotation % len(order)
    for name in order[shift:] + order[:shift]:
        if name == "full":
            record["full"]["ttft"] = engine.stream_full(item.question, entries, one_token).run().ttft_s
            continue
        if name == "prefix-cached":
            record["prefix_cached_ttft"] = engine.stream_prefix_cached(item.question, entries, one_token).run().ttft_s
            continue
        if name == "oracle":
            stream = oracle_stream(engine, item.question, entries, engine.options)
        elif name == "reversed":
            stream = engine.stream_full(item.question, entries[::-1])
        else:
            variant, config, calibrate, fallback = parse_setting(name)
            target = variants.get(variant)
            stream = target.stream_cached(
                item.question,
                variants.entries(variant, entries),
                target.options.replace(recompute=config, calibrate=calibrate, fallback_margin=fallback),
            )
        gen, logp = run_forced(engine.lm.model, stream, full_gen.token_ids)
        text = engine.decode(gen.token_ids)
        record[name] = {
            "answer": text,
            **question_quality(text, item.answers, full_text),  # sub_em, f1, agree
            "kl": kl(full_logp, logp),
            "margin": first_token_margin(logp[0]),
            # along full prefill's answer: each position's margin and greedy token (where the
            # path's own answer leaves full prefill's, its margins from there on are not its own)
            "margins": [round(first_token_margin(row), 5) for row in logp],
            "greedy": [int(row.argmax()) for row in logp],
            "ttft": gen.ttft_s,
            "backend": stream.backend,
        }
    return record


# What a checkpoint's records must share to be resumed or reported together (each record holds
# them under "run", with the code revision and torch threads that measured it; records written
# before 2026-12-06 hold none and are taken as they are).
SHARED_RUN_KEYS = ("store", "variants", "max_new_tokens", "threads", "stores_created")


def run_identity(args: argparse.Namespace, threads: int | None) -> dict[str, Any]:
    """The settings of this invocation that every record it resumes or reports must share: the
    stores (and when they were built, so one rebuilt at the same path is another store), the
    answer length, and torch's ``threads`` (TTFT ratios move with them: docs/recompute.md; None
    where the invocation answers nothing and was not told them). Records written before a key
    was recorded are not checked on it."""
    variants = [v.split("=", 1) for v in args.variant]
    stores = [Path(args.store), *(Path(d) for _, d in variants)]
    return {
        "store": str(Path(args.store).resolve()),
        "variants": sorted(f"{n}={Path(d).resolve()}" for n, d in variants),
        "max_new_tokens": args.max_new_tokens,
        "threads": threads,
        # None where a store is gone (a report over a checkpoint whose stores were removed)
        "stores_created": None if None in (created := [store_created(p) for p in stores]) else created,
    }


def checkpointed(
    checkpoint: Path | None,
    top_k: int,
    settings: list[str],
    dtype: str | None = DEFAULT_DTYPE,
    run: dict[str, Any] | None = None,
) -> dict[str, dict]:
    """Records already in ``checkpoint`` for this top-k that hold every setting, by question id;
    only those answered in ``dtype`` (``None``: any), records without one being float32's. With
    ``run`` (:func:`run_identity`), a record answered with another store (or one built at
    another time), variants, answer length or number of threads stops the run (``SystemExit``):
    one results file never mixes them."""
    done: dict[str, dict] = {}
    if checkpoint is not None and checkpoint.is_file():
        for line in checkpoint.read_text().splitlines():
            record = json.loads(line)
            if dtype is not None and record.get("dtype", DEFAULT_DTYPE) != dtype:
                continue
            if record.get("top_k") == top_k and all(name in record for name in settings):
                recorded = record.get("run")
                if run is not None and recorded is not None:
                    for key in SHARED_RUN_KEYS:
                        if key in recorded and run[key] is not None and recorded[key] != run[key]:
                            raise SystemExit(
                                f"{checkpoint}: question {record['id']} was answered with {key} "
                                f"{recorded.get(key)!r}, this run has {run[key]!r}; give another --checkpoint"
                            )
                done[record["id"]] = record
    return done


def one_run(records: Iterable[dict], where: Path) -> dict[str, Any] | None:
    """The run (:data:`SHARED_RUN_KEYS` of :func:`run_identity`) that answered every one of
    ``records``, read from a checkpoint that another invocation wrote (``--pair-with``,
    ``fallback_threshold.py``); ``SystemExit`` when they name more than one, None when none
    records it (checkpoints from before records named their run). Only the keys every record
    names are compared: a run resumed across a change that added a key is still one run."""
    named = [r["run"] for r in records if r.get("run")]
    keys = [k for k in SHARED_RUN_KEYS if all(k in run for run in named)]
    runs = {json.dumps({k: run[k] for k in keys}, sort_keys=True) for run in named}
    if len(runs) > 1:
        raise SystemExit(f"{where}: its records were answered by {len(runs)} runs ({sorted(runs)}); give one run's")
    return json.loads(runs.pop()) if runs else None


def paired_run(args: argparse.Namespace, theirs: dict[str, dict], asked: set[str]) -> dict[str, Any]:
    """What the ``--pair-with`` run was: its stores and their adaptors, checked as this run's are
    (an adaptor trained on an article the questions ask about is refused), and its answer length,
    which must be this run's (answers of other lengths do not pair)."""
    run = one_run(theirs.values(), args.pair_with)
    if run is None:
        return {"run": "not recorded in its checkpoint (written before records named their run)"}
    if run["max_new_tokens"] != args.max_new_tokens:
        raise SystemExit(
            f"{args.pair_with} answered with --max-new-tokens {run['max_new_tokens']}, this run with "
            f"{args.max_new_tokens}: answers of other lengths do not pair"
        )
    stores = {"base": run["store"], **dict(v.split("=", 1) for v in run["variants"])}
    if gone := sorted(path for path in stores.values() if not (Path(path) / "manifest.json").is_file()):
        raise SystemExit(f"{args.pair_with}: its stores {gone} are gone, so their adaptors cannot be checked")
    return {"run": run, "adaptors": store_adaptors(stores, asked, args.adaptor_dir)}


def evaluate(
    variants: Variants,
    questions,
    top_k: int,
    settings: list[str],
    progress: bool,
    checkpoint: Path | None,
    run: dict[str, Any] | None = None,
):
    """Every question's record (read back from ``checkpoint`` where it is already there). ``run``
    (:func:`run_identity`) is written into each new record with the code revision and threads."""
    engine = variants.base
    dtype = engine.lm.dtype_name  # as records and --dtype name it
    done = checkpointed(checkpoint, top_k, settings, dtype, run)
    provenance = {**(run or {}), **row_run()}
    warm = engine.retrieve(questions[0].question, top_k)
    run_forced(engine.lm.model, engine.stream_full(questions[0].question, warm))
    records = []
    for number, item in enumerate(questions, start=1):
        if item.id in done:
            records.append(done[item.id])
            continue
        record = {
            "top_k": top_k,
            "dtype": dtype,
            "run": provenance,
            **question_record(variants, item, top_k, settings, rotation=number),
        }
        records.append(record)
        if checkpoint is not None:
            with open(checkpoint, "a", encoding="utf-8") as handle:
                handle.write(json.dumps(record) + "\n")
        if progress:
            print(
                f"[top-{top_k}] {number}/{len(questions)} "
                + " ".join(
                    f"{n}:{statistics.fmean(r[n]['sub_em'] for r in records):.2f}/"
                    f"{statistics.fmean(r[n]['agree'] for r in records):.2f}"
                    for n in ["full"] + settings
                ),
                file=sys.stderr,
                flush=True,
            )
    return records


def markdown(model: str, n: int, top_k: int, table: dict) -> str:
    """The table as Markdown (also: ``python recompute_quality.py --show OUT.json``)."""
    full = table["full"]["sub_em"]
    lines = [
        f"**{model}, top-{top_k}, {n} questions**",
        "",
        "| setting | sub-EM | % of full | agreement (95 % CI) | KL to full | TTFT (s) | vs full | vs prefix-cached |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, r in table.items():
        if "sub_em" not in r:  # the prefix-cached baseline: timed only
            lines.append(f"| {name} (TTFT only) | | | | | {r['ttft_s_median']:.3f} | {r['ttft_speedup']:.2f}x | |")
            continue
        if r.get("fallback_rate"):
            name = f"{name} ({100 * r['fallback_rate']:.0f} % fell back; mean TTFT {r['ttft_speedup_mean']:.2f}x)"
        share = f"{100 * r['sub_em'] / full:.0f}%" if full else "-"
        low, high = r["ci95"]["agreement"]
        lines.append(
            f"| {name} | {r['sub_em']:.3f} | {share} | {r['agreement']:.2f} ({low:.2f}-{high:.2f}) | "
            f"{r['kl']:.4f} | {r['ttft_s_median']:.3f} | {r['ttft_speedup']:.2f}x | "
            f"{r['ttft_speedup_vs_prefix_cached']:.2f}x |"
        )
    return "\n".join(lines)


def paired_with(args: argparse.Namespace, questions) -> tuple[dict, dict]:
    """Per question, the paired differences in agreement and sub-EM (bootstrap interval, exact
    McNemar) and in KL of: every ``VARIANT:spec`` setting of this run against ``spec`` in the
    ``--pair-with`` checkpoint (another run over the same questions), and every ``--compare A=B``
    pair of this run's settings; and, per top-k, what the ``--pair-with`` run was (:func:`paired_run`)."""
    out: dict = {}
    runs: dict = {}
    dtype = args.dtype or DEFAULT_DTYPE
    for top_k in args.top_k:
        ours = checkpointed(args.checkpoint, top_k, args.settings, dtype)
        pairs = [(ours, a, b) for a, b in (c.split("=", 1) for c in args.compare)]
        if args.pair_with:
            theirs = checkpointed(args.pair_with, top_k, [], dtype)
            runs[f"top{top_k}"] = paired_run(
                args,
                {q.id: theirs[q.id] for q in questions if q.id in theirs},
                {question_article(q) for q in questions},
            )
            pairs += [(theirs, name, name.rpartition(":")[2]) for name in args.settings if ":" in name]
        for other, name, spec in pairs:
            common = [q.id for q in questions if q.id in ours and q.id in other and spec in other[q.id]]
            if not common:
                continue
            a = [ours[i][name] for i in common]
            b = [other[i][spec] for i in common]
            out[f"top{top_k} {name} vs {spec}"] = {
                "n": len(common),
                "agreement": paired_comparison([r["agree"] for r in a], [r["agree"] for r in b]),
                "sub_em": paired_comparison([r["sub_em"] for r in a], [r["sub_em"] for r in b]),
                "kl_mean_difference": statistics.fmean(r["kl"] for r in a) - statistics.fmean(r["kl"] for r in b),
                "full_answers_identical": all(ours[i]["full"]["answer"] == other[i]["full"]["answer"] for i in common),
            }
    return out, runs


def reference_full(args: argparse.Namespace, questions, dtype: str) -> dict:
    """Per top-k and setting (``full`` included), the share of questions whose answer is the
    text of the full-prefill answer in the ``--reference-full`` checkpoint's float32 records,
    over the questions both runs answered: e.g. how often a bf16 run answers as float32 full
    prefill does, beside how often it answers as its own bf16 full prefill (``agreement``)."""
    out: dict = {}
    for top_k in args.top_k:
        ours = checkpointed(args.checkpoint, top_k, args.settings, dtype)
        theirs = checkpointed(args.reference_full, top_k, [], DEFAULT_DTYPE)
        common = [q.id for q in questions if q.id in ours and q.id in theirs]
        if not common:
            continue
        for name in ["full", *args.settings]:
            same = [ours[i][name]["answer"] == theirs[i]["full"]["answer"] for i in common]
            out[f"top{top_k} {name}"] = {
                "n": len(common),
                "reference": f"{args.reference_full.name} ({DEFAULT_DTYPE})",
                "agreement": statistics.fmean(same),
                "ci95": bootstrap_ci([float(x) for x in same]),
            }
    return out


def questions_asked(args: argparse.Namespace) -> tuple[list, dict[str, dict]]:
    """The sampled questions and the provenance of the stores' adaptors (checked against them)."""
    questions = pick_questions(Path(args.questions), args.sample, set(args.articles), args.outside)
    stores = {"base": args.store, **dict(v.split("=", 1) for v in args.variant)}
    return questions, store_adaptors(stores, {question_article(q) for q in questions}, args.adaptor_dir)


def report_only(args: argparse.Namespace) -> None:
    """The result JSON of the sampled questions whose records ``--checkpoint`` holds (a run cut
    short reports on the questions it finished; ``n`` says how many)."""
    questions, adaptors = questions_asked(args)
    manifest = Manifest.read(Path(args.store))
    result: dict = {
        "store": args.store,
        "variants": args.variant,
        "model": manifest.model_ref,
        "dtype": args.dtype or DEFAULT_DTYPE,
        "argv": sys.argv[1:],
        **({"articles": sorted(args.articles)} if args.articles else {}),
        **({"adaptors": adaptors} if adaptors else {}),
        # this process answered nothing: the threads are the run's only if --threads says them
        "meta": {
            **results_meta({**vars(args), "questions": len(questions), "model": manifest.model_ref}),
            "threads": args.threads,
            "from_checkpoint": str(args.checkpoint),
        },
        "tables": {},
    }
    for top_k in args.top_k:
        done = checkpointed(args.checkpoint, top_k, args.settings, result["dtype"], run_identity(args, args.threads))
        records = [done[q.id] for q in questions if q.id in done]
        if records:
            result["tables"][f"top{top_k}"] = summarize(records, args.settings)
            result["meta"].setdefault("measured_by", {})[f"top{top_k}"] = measured_by(
                r.get("run") or {} for r in records
            )
            print(markdown(result["model"], len(records), top_k, result["tables"][f"top{top_k}"]), flush=True)
    if args.reference_full:
        result["reference_full"] = reference_full(args, questions, result["dtype"])
        for name, row in result["reference_full"].items():
            print(f"{name}: n={row['n']}, same answer as {row['reference']}'s full prefill {row['agreement']:.2f}")
    if args.pair_with or args.compare:
        result["paired"], runs = paired_with(args, questions)
        if runs:
            result["pair_with"] = runs
        for name, row in result.get("pair_with", {}).items():
            print(f"--pair-with run, {name}: {json.dumps(row)}")
        for name, row in result["paired"].items():
            print(
                f"{name}: n={row['n']}, agreement {row['agreement']['mean_difference']:+.3f} "
                f"(p={row['agreement']['p_value']:.3f}), sub-EM {row['sub_em']['mean_difference']:+.3f} "
                f"(p={row['sub_em']['p_value']:.3f}), KL {row['kl_mean_difference']:+.4f}"
            )
    result["n"] = max((t["full"]["n"] for t in result["tables"].values()), default=0)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--store")
    parser.add_argument("--variant", action="append", default=[], metavar="NAME=DIR", help="another store")
    parser.add_argument("--questions")
    parser.add_argument("--show", type=Path, help="print the tables of a result JSON and exit")
    parser.add_argument("--sample", type=int, default=100, help="evenly spaced questions (covers every article)")
    parser.add_argument(
        "--outside",
        type=int,
        help="only questions not among the --sample OUTSIDE of these articles (a confirmation sample)",
    )
    parser.add_argument(
        "--adaptor-dir",
        action="append",
        type=Path,
        default=[],
        help="folder of an unpackaged adaptor a store was built with (its training articles are checked)",
    )
    parser.add_argument(
        "--articles", action="append", default=[], help="questions of this article only (once per article)"
    )
    parser.add_argument("--top-k", type=int, nargs="+", default=[3])
    parser.add_argument("--settings", nargs="+", default=["reuse", "r0.1", "r0.1+question", "r0.1+mixed"])
    parser.add_argument("--out", type=Path)
    parser.add_argument("--checkpoint", type=Path, help="per-question JSONL (resumable)")
    parser.add_argument("--max-new-tokens", type=int, default=12)
    parser.add_argument("--threads", type=int, help="torch threads (1 avoids oversubscription on a busy host)")
    parser.add_argument("--quiet", action="store_true")
    parser.add_argument("--shard", default="0/1", help="I/N: run every N-th question from the I-th (one checkpoint)")
    parser.add_argument(
        "--pair-with", type=Path, help="with --report-only: pair VARIANT:spec settings with spec in this checkpoint"
    )
    parser.add_argument(
        "--compare",
        action="append",
        default=[],
        metavar="A=B",
        help="with --report-only: pair setting A with setting B of this run, question by question",
    )
    parser.add_argument(
        "--report-only", action="store_true", help="summarize the sampled questions --checkpoint holds; run nothing"
    )
    parser.add_argument(
        "--dtype",
        choices=DTYPES,
        help="the weights' dtype for every path (default: the store's); records are kept apart by dtype",
    )
    parser.add_argument(
        "--reference-full",
        type=Path,
        help="with --report-only: how often each answer is the full-prefill answer of this checkpoint's float32 run",
    )
    args = parser.parse_args()
    if args.show:
        result = json.loads(args.show.read_text())
        for key, table in result["tables"].items():
            print(markdown(result["model"], table["full"]["n"], int(key[3:]), table), end="\n\n")
        return
    if not (args.store and args.questions):
        parser.error("--store and --questions are required")
    if args.report_only:
        report_only(args)
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    # dense: selective recompute edits the assembled cache, and every setting (reuse too) is
    # measured on the same path
    engine = Engine.open(
        args.store,
        options=AnswerOptions(max_new_tokens=args.max_new_tokens, backend="dense", calibrate=False),
        dtype=args.dtype,
    )
    variants = Variants(engine, dict(v.split("=", 1) for v in args.variant))
    questions, adaptors = questions_asked(args)
    shard, shards = (int(x) for x in args.shard.split("/"))
    questions = questions[shard::shards]
    result = {
        "store": args.store,
        "variants": args.variant,
        "model": engine.lm.ref,
        "dtype": engine.lm.dtype_name,
        "n": len(questions),
        "argv": sys.argv[1:],
        **({"articles": sorted(args.articles)} if args.articles else {}),
        **({"adaptors": adaptors} if adaptors else {}),
        "meta": {
            **results_meta({**vars(args), "questions": len(questions), "model": engine.lm.ref}),
            "loadavg_start": os.getloadavg(),
        },
        "tables": {},
    }
    for top_k in args.top_k:
        records = evaluate(
            variants,
            questions,
            top_k,
            args.settings,
            not args.quiet,
            args.checkpoint,
            run_identity(args, torch.get_num_threads()),
        )
        result["tables"][f"top{top_k}"] = summarize(records, args.settings)
        result["meta"]["loadavg_end"] = os.getloadavg()
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(result, indent=1))
        print(markdown(engine.lm.ref, len(records), top_k, result["tables"][f"top{top_k}"]), flush=True)
        print(flush=True)


if __name__ == "__main__":
    main()
