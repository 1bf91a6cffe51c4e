"""Learned passage caches (#15) on held-out articles: the adaptor vs plain reuse vs full prefill.

Uses the held-out examples ``ragcompress train`` built (``OUT/teacher.safetensors``: questions of articles
never trained on, each with its top-k passages retrieved over the held-out passages, the base
model's full-prefill greedy answer and its full next-token distributions along that answer).
For every setting each passage is encoded alone (``PassageEncoder``, with or without the
adaptor), compressed, serialised and parsed back through the store codec, and the question is
read over the cache the runtime's dense path assembles (``DenseStrategy.prepare_segments``,
per-head masks for evicted tokens), so what is measured is what the query path serves:

* ``kl_answer``: KL(full prefill || cached) per answer position (teacher-forced along the full
  prefill's answer, end row included), full vocabulary, nats; its 95 % bootstrap interval over
  questions, the per-question values, and for an adaptor row ``kl_vs_baseline``: its mean KL
  over that of the same compression without an adaptor, with the paired bootstrap interval;
* ``agreement``: share of questions whose greedy cached answer (up to 32 tokens) is full
  prefill's, compared as decoded text (``ragcompress.evaluation.question_quality``, as every
  benchmark compares answers);
* ``sub_em`` and ``sub_em_pct_of_full``: SQuAD substring match of the greedy answers vs gold;
* ``index_cost``: median seconds to encode (and score) the passages relative to a plain forward.

    .venv/bin/python benchmarks/distill_eval.py --out runs/distill/smollm2-135m \\
        --json docs/results/distill_smollm2-135m.json
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import statistics
import time
from dataclasses import asdict
from functools import partial
from pathlib import Path
from typing import Any

import torch

from ragcompress.cli.options import show_progress
from ragcompress.compressors import CompressionContext, make_compressor
from ragcompress.compressors.adaptive import AdaptiveBudget
from ragcompress.compressors.scorer import ScorerCompressor
from ragcompress.distill.adaptor import Adaptor, remove_adapter
from ragcompress.distill.checkpoint import load_tree
from ragcompress.distill.corpus import data_hash
from ragcompress.distill.packaged import resolve_adaptor
from ragcompress.distill.teacher import check_teacher_data
from ragcompress.distill.train import (
    TRAINING_ADAPTER,
    Distiller,
    Example,
    build_examples,
    load_corpora,
)
from ragcompress.errors import InputError
from ragcompress.evaluation import Quality, read_questions, select_questions
from ragcompress.indexing.encoder import PassageEncoder
from ragcompress.indexing.inputs import iter_passages
from ragcompress.kv.quant import QuantConfig
from ragcompress.models import load_model
from ragcompress.prompt import PromptTemplate
from ragcompress.runtime.generate import TokenStream, kl_per_position, stop_token_ids, teacher_forced_logprobs
from ragcompress.runtime.prepare import DenseStrategy, PrefixContext, plain_prefill
from ragcompress.stats import bootstrap_ci, paired_comparison, paired_ratio
from ragcompress.store import codec

from common import SQUAD, adaptor_provenance, measured_by, question_article, results_meta, row_run

MAX_NEW_TOKENS = 32  # the answers compared (SmolLM2 answers in sentences; the gold often comes late)
# name -> (adaptor: None | "trained" (OUT/adaptor) | "compare" (--compare-adaptor), method, ratio, quant)
SETTINGS: dict[str, tuple[str | None, str, float | None, str]] = {
    "plain reuse": (None, "none", None, "none"),
    "adaptor": ("trained", "none", None, "none"),
    "compared adaptor": ("compare", "none", None, "none"),
    "global:kvzip 0.25 int4": (None, "global:kvzip", 0.25, "int4"),
    "adaptor + global:learned 0.25 int4": ("trained", "global:learned", 0.25, "int4"),
    "adaptor + global:kvzip 0.25 int4": ("trained", "global:kvzip", 0.25, "int4"),
    "adaptor + global:kvzip 0.25 int4, base-scored": ("trained", "global:kvzip", 0.25, "int4"),
    "compared adaptor + global:kvzip 0.25 int4": ("compare", "global:kvzip", 0.25, "int4"),
    # issue 15's middle ratio: half the tokens in int4 (6x fewer bytes than fp16)
    "global:kvzip 0.5 int4": (None, "global:kvzip", 0.5, "int4"),
    "adaptor + global:kvzip 0.5 int4": ("trained", "global:kvzip", 0.5, "int4"),
    "compared adaptor + global:kvzip 0.5 int4": ("compare", "global:kvzip", 0.5, "int4"),
}
# Settings whose kept rows are chosen by the scores of the *base* model's cache of each passage (as
# training chose the student's: ``Distiller.kept_rows``), the adaptor's cache supplying the rows.
BASE_SCORED = frozenset({"adaptor + global:kvzip 0.25 int4, base-scored"})


def baseline_of(name: str) -> str:
    """The setting an adaptor row is judged against: the row without an adaptor at the same ratio
    and bits (plain reuse; ``global:kvzip`` when compressed, as issue 15's target states it); a
    row without an adaptor is its own."""
    which, _, ratio, quant = SETTINGS[name]
    if which is None:
        return name
    return next(n for n, (w, _, r, q) in SETTINGS.items() if w is None and (r, q) == (ratio, quant))


def segments(
    encoder: PassageEncoder,
    passages: list[list[int]],
    method: str,
    ratio: float | None,
    quant: str,
    score_encoder: PassageEncoder | None = None,
) -> list:
    """Each passage's cache as a store would serve it: encoded alone, compressed, serialised.
    ``score_encoder``: eviction scores come from its cache of the passage (the base model's, for a
    ``BASE_SCORED`` setting) instead of ``encoder``'s."""
    params: dict[str, Any] = {} if ratio is None else {"ratio": ratio, "keep_first": 1, "keep_last": 0}
    compressor = make_compressor(method, **params)
    out = []
    for ids in passages:
        kv = encoder.encode([ids])[0]
        if score_encoder is None:
            kept = compressor.compress(kv, CompressionContext(encoder, ids))
        else:
            assert isinstance(compressor, (AdaptiveBudget, ScorerCompressor)), f"{method} evicts by no score"
            scorer = compressor.inner if isinstance(compressor, AdaptiveBudget) else compressor
            scored = score_encoder.encode([ids])[0]
            kept = compressor.select(kv, scorer.score(scored, CompressionContext(score_encoder, ids)))
        out.append(codec.decode(codec.encode(kept, QuantConfig(quant)), torch.float32))
    return out


@torch.inference_mode()
def measure(encoder: PassageEncoder, example: Example, segs: list, stop_ids: set[int]) -> tuple[float, list[int]]:
    """Full-vocabulary KL along the teacher's answer and the greedy cached answer, each over its
    own cache from the library's dense path (``DenseStrategy.prepare_segments``: the caches were
    compressed in memory, never stored), decoded and teacher-forced as the library does."""
    lm = encoder.lm
    context = PrefixContext.from_prefix(lm, encoder.tokens, encoder.prefix_kv)
    prepare = partial(DenseStrategy().prepare_segments, context, segs, example.suffix, MAX_NEW_TOKENS, [])
    assert example.qa_full is not None
    student = teacher_forced_logprobs(lm.model, prepare(), example.answer, len(example.answer) + 1)
    kl = float(kl_per_position(example.qa_full, student).mean())
    generation = TokenStream(lm.model, prepare, MAX_NEW_TOKENS, stop_ids).run()
    return kl, generation.token_ids


@torch.inference_mode()
def full_prefill_answer(encoder: PassageEncoder, example: Example, stop_ids: set[int]) -> list[int]:
    """The base model's greedy answer from a plain prefill of prefix + passages + question (the
    library's full prefill and token generator)."""
    ids = list(encoder.prefix_ids) + [t for p in example.passages for t in p] + example.suffix
    prepared = partial(plain_prefill, encoder.lm, ids, MAX_NEW_TOKENS)
    return TokenStream(encoder.lm.model, prepared, MAX_NEW_TOKENS, stop_ids).run().token_ids


def all_held_out(
    lm: Any, out: Path, passages: Path, questions: Path, adaptor: Adaptor
) -> tuple[list[Example], list[str]]:
    """Teacher examples of *every* question of the adaptor's held-out articles (top-3 over their
    passages, full-vocabulary answer rows), built once into ``OUT/teacher-heldout-all.safetensors``
    (and reused only for the same model and data: :func:`read_held_out_teacher`), and the ids of
    the questions training validated on (its evenly spaced ``val_examples``): numbers outside
    those are free of the stopping choice made on the validation curve. The teacher's bar is
    drawn on a terminal only, as ``train`` draws its own (``show_progress``), never into a log."""
    from ragcompress.distill.checkpoint import save_tree

    articles = adaptor.meta["val_articles"]
    path = out / "teacher-heldout-all.safetensors"
    from ragcompress.retrieval import Embedder

    # the files and split the examples come from, as training's teacher files record them
    data_sha256 = data_hash(passages, questions, articles)
    embedder = Embedder()
    _, val_corpus = load_corpora(list(iter_passages(passages)), questions, articles, embedder)
    validated = [q.id for q in select_questions(val_corpus.questions, adaptor.meta["config"]["val_examples"] or None)]
    if path.is_file():
        examples = read_held_out_teacher(path, lm, data_sha256)
    else:  # the teacher is the base model; the distiller's LoRA layers are removed afterwards
        out.mkdir(parents=True, exist_ok=True)
        distiller = Distiller(lm, Adaptor.initial(lm.model, kind="forward"))
        try:
            examples = build_examples(
                distiller,
                val_corpus,
                embedder,
                3,
                None,
                "teacher (all held-out)",
                path.with_suffix(".part"),
                True,
                data_sha256=data_sha256,
                progress=show_progress(False),
            )
        finally:
            remove_adapter(lm.model, TRAINING_ADAPTER)
        saved = {"examples": [asdict(e) for e in examples], "base_fingerprint": lm.fingerprint}
        save_tree({**saved, "training_data_sha256": data_sha256}, path)
    if {e.qid for e in examples} != {q.id for q in val_corpus.questions}:
        raise SystemExit(f"{path} holds other questions than {articles}'s; delete it to rebuild")
    return examples, validated


def read_held_out_teacher(path: Path, lm: Any, data_sha256: str) -> list[Example]:
    """The examples of an earlier ``all_held_out`` build, only if it was the base model ``lm``'s
    (``resume.check_run``) and built from the data ``data_sha256`` (``corpus.data_hash`` of the
    passages, questions and held-out articles): another model's distributions, or an edited
    question's old teacher, would be scored as this run's. A file from before the model or the
    data was recorded is refused, to be rebuilt (``check_teacher_data``'s ``required``)."""
    from ragcompress.distill.resume import check_run

    saved = load_tree(path)
    if not isinstance(saved, dict):
        raise SystemExit(f"{path} is from before its base model was recorded in it; delete it to rebuild")
    try:
        check_run(path, saved, lm)
        check_teacher_data(path, saved, data_sha256, required=True)
    except InputError as exc:  # one line, as the benchmark's other refusals
        raise SystemExit(str(exc)) from None
    return [Example(**e) for e in saved["examples"]]


def mergeable_rows(
    other: Path, full_answers: list, qids: list[str], adaptor_hash: str | None, compared_hash: str | None
) -> dict[str, Any]:
    """The rows of another run's results file (``--merge``), refused (``SystemExit``) unless it
    measured the same examples with the same full-prefill answers, through the same adaptor and
    against the same compared adaptor as this run (a file that names none is refused too)."""
    data = json.loads(other.read_text())
    if data["full_prefill"]["token_ids"] != full_answers or data["full_prefill"].get("qids", qids) != qids:
        raise SystemExit(f"{other} measured other examples or other full-prefill answers; not merged")
    meta = data.get("meta", {})
    if adaptor_hash is not None and meta.get("adaptor_hash") != adaptor_hash:
        raise SystemExit(f"{other} read its caches through another adaptor than this run's, or names none; not merged")
    if compared_hash is not None and (meta.get("compared_adaptor") or {}).get("hash") != compared_hash:
        raise SystemExit(f"{other} compared another adaptor than this run's, or names none; not merged")
    return data["rows"]


def earlier_rows(
    earlier: dict[str, Any], settings: list[str], adaptor_hash: str | None, compared_hash: str | None
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The rows (and indexing costs) of an earlier run's results file that this run keeps: not
    those of ``settings`` (measured again), nor rows read through another adaptor (or compared
    adaptor) than this run's, nor through one the file does not name: they would be labelled
    with this run's. The costs go with the trained adaptor's rows."""
    meta = earlier.get("meta", {})
    stale = {
        "trained": adaptor_hash is not None and meta.get("adaptor_hash") != adaptor_hash,
        "compare": compared_hash is not None and (meta.get("compared_adaptor") or {}).get("hash") != compared_hash,
    }
    rows = {
        name: row
        for name, row in earlier.get("rows", {}).items()
        if name not in settings and not stale.get(row.get("adaptor"), False)
    }
    return rows, {} if stale["trained"] else earlier.get("index_cost", {})


def check_held_out(examples: list[Example], articles: dict[str, str], *adaptors: Any) -> None:
    """Refuse (``SystemExit``) to measure an adaptor on examples of an article it was trained on,
    or on examples whose questions are not in the questions file (their article unknown): every
    figure of an adaptor comes from articles it never saw (:func:`common.adaptor_provenance`)."""
    unknown = [e.qid for e in examples if e.qid not in articles]
    if unknown:
        raise SystemExit(
            f"{len(unknown)} examples ask questions that --questions does not hold (e.g. {unknown[0]}); "
            "their articles cannot be checked against the adaptors' training articles"
        )
    asked = {articles[e.qid] for e in examples}
    for adaptor in adaptors:
        if adaptor is not None:
            adaptor_provenance(adaptor, asked, f"adaptor {adaptor.hash[:16]}")


def earlier_full_prefill(path: Path, qids: list[str]) -> list[list[int]] | None:
    """The full-prefill answers an earlier run of ``path`` decoded, reused (they are the slowest
    part of a rerun) only when that run measured these very questions in this order; a file of
    other questions is refused rather than paired with them by position."""
    if not path.is_file():
        return None
    full = json.loads(path.read_text()).get("full_prefill", {})
    earlier_qids = full.get("qids")
    if full.get("token_ids") is None:
        return None
    if earlier_qids is None and len(full["token_ids"]) == len(qids):  # written before qids were recorded
        return list(full["token_ids"])
    if earlier_qids != qids:
        raise SystemExit(f"{path} holds results of other questions; pass another --json or delete it to start over")
    return list(full["token_ids"])


def subset_stats(row: dict[str, Any], keep: list[bool], baseline: tuple[str, dict[str, Any]] | None) -> dict[str, Any]:
    """A row's figures over the questions ``keep`` marks (e.g. outside the validation sample)."""
    pick = lambda values: [v for v, k in zip(values, keep, strict=True) if k]  # noqa: E731
    kls = pick(row["kl_per_question"])
    stats: dict[str, Any] = {
        "questions": len(kls),
        "kl_answer": statistics.mean(kls),
        "kl_ci95": list(bootstrap_ci(kls)),
        "agreement": statistics.mean(pick(row["agreement_per_question"])),
        "sub_em": statistics.mean(pick(row["sub_em_per_question"])),
    }
    if baseline is not None:
        stats["kl_vs_baseline"] = {"baseline": baseline[0], **paired_ratio(kls, pick(baseline[1]["kl_per_question"]))}
    return stats


def index_cost(lm: Any, template: PromptTemplate, adaptor: Adaptor, passages: list[list[int]], repeats: int) -> dict:
    """Median seconds to produce the caches of ``passages`` per setting, side by side (one untimed
    warm-up round, then ``repeats`` rounds, the order rotating from round to round), and the
    ratio to the plain forward (the base encoder)."""
    base, adapted = PassageEncoder(lm, template), PassageEncoder(lm, template, adaptor)
    learned = make_compressor("global:learned", ratio=0.25, keep_first=1, keep_last=0)
    kvzip = make_compressor("global:kvzip", ratio=0.25, keep_first=1, keep_last=0)

    def run(encoder: PassageEncoder, compressor: Any = None) -> None:
        for ids in passages:
            kv = encoder.encode([ids])[0]
            if compressor is not None:
                compressor.compress(kv, CompressionContext(encoder, ids))

    cases = {
        "plain forward": lambda: run(base),
        "adaptor": lambda: run(adapted),
        "adaptor + global:learned": lambda: run(adapted, learned),
        "global:kvzip": lambda: run(base, kvzip),
    }
    samples: dict[str, list[float]] = {name: [] for name in cases}
    names = list(cases)
    for round_ in range(-1, repeats):  # interleaved, so contention hits every case alike; -1: the warm-up
        shift = round_ % len(names)
        for name in names[shift:] + names[:shift]:
            start = time.perf_counter()
            cases[name]()
            if round_ >= 0:
                samples[name].append(time.perf_counter() - start)
    medians = {name: statistics.median(values) for name, values in samples.items()}
    return {name: {"seconds": medians[name], "x_plain": medians[name] / medians["plain forward"]} for name in cases}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="the training folder (teacher.safetensors, adaptor/)")
    parser.add_argument(
        "--adaptor", default=None, help="the adaptor measured (a folder or packaged name; default OUT/adaptor)"
    )
    parser.add_argument(
        "--held-out",
        choices=["sample", "all"],
        default="sample",
        help="'sample': training's validation examples (OUT/teacher.safetensors); 'all': every question of "
        "the adaptor's held-out articles (built once into OUT), with figures outside the validation sample",
    )
    parser.add_argument("--passages", type=Path, default=SQUAD / "passages.jsonl", help="for --held-out all")
    parser.add_argument("--model", default=None)
    parser.add_argument("--questions", type=Path, default=SQUAD / "questions.jsonl")
    parser.add_argument(
        "--compare-adaptor",
        type=Path,
        default=None,
        help="another adaptor folder for the same model (e.g. the other kind), measured as 'compared adaptor' rows",
    )
    parser.add_argument(
        "--settings",
        nargs="*",
        default=None,
        help="default: every setting the adaptors allow, but the base-scored ablation",
    )
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--cost-repeats", type=int, default=3)
    parser.add_argument("--json", type=Path, required=True)
    parser.add_argument(
        "--merge",
        type=Path,
        nargs="*",
        default=[],
        help="results of other runs over the same examples to add rows from",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    if args.settings is None:
        args.settings = [  # an ablation (BASE_SCORED) runs only when named
            name
            for name, row in SETTINGS.items()
            if (row[0] != "compare" or args.compare_adaptor) and name not in BASE_SCORED
        ]
    lm = load_model(args.model)
    needs_adaptor = args.cost_repeats > 0 or any(SETTINGS[name][0] == "trained" for name in args.settings)
    adaptor_spec = args.adaptor or args.out / "adaptor"
    adaptor = resolve_adaptor(adaptor_spec, lm.ref) if needs_adaptor or args.held_out == "all" else None
    compared = Adaptor.load(args.compare_adaptor) if args.compare_adaptor else None
    adaptors = {"trained": adaptor, "compare": compared, None: None}
    template = PromptTemplate.from_tokenizer(lm.tokenizer)
    validated: list[str] | None = None
    if args.held_out == "all":
        assert adaptor is not None
        examples, validated = all_held_out(lm, args.out, args.passages, args.questions, adaptor)
    else:
        examples = [Example(**e) for e in load_tree(args.out / "teacher.safetensors")["val"]]
    asked_questions = read_questions(args.questions)
    golds = {q.id: q.answers for q in asked_questions}
    check_held_out(examples, {q.id: question_article(q) for q in asked_questions}, adaptor, compared)
    stop_ids = stop_token_ids(lm.tokenizer, lm.model)
    decode = lambda ids: lm.tokenizer.decode(ids, skip_special_tokens=True).strip()  # noqa: E731
    base_encoder = PassageEncoder(lm, template)
    qids = [e.qid for e in examples]
    earlier_full = earlier_full_prefill(args.json, qids)
    full_answers = earlier_full or [full_prefill_answer(base_encoder, e, stop_ids) for e in examples]
    full_texts = [decode(a) for a in full_answers]
    example_golds = [golds[e.qid] for e in examples]
    full_sub_em = Quality.of(full_texts, example_golds, full_texts).means()["sub_em"]

    # rows of an earlier run of the same examples are kept (settings can be measured in parts)
    earlier = json.loads(args.json.read_text()) if args.json.is_file() else {}
    rows, earlier_cost = earlier_rows(
        earlier, args.settings, adaptor.hash if adaptor else None, compared.hash if compared else None
    )
    adaptor_meta = {k: v for k, v in adaptor.meta.items() if k != "config"} if adaptor else earlier.get("adaptor", {})

    def write(rows: dict[str, Any], cost: dict[str, Any]) -> dict[str, Any]:
        """The results file as it stands (written after every setting: a cut-short run keeps them)."""
        for other in args.merge:  # e.g. settings measured by a concurrent run
            theirs = mergeable_rows(
                other, full_answers, qids, adaptor.hash if adaptor else None, compared.hash if compared else None
            )
            rows = rows | {k: v for k, v in theirs.items() if k not in rows}
        rows = {name: rows[name] for name in SETTINGS if name in rows}  # table order
        for name, row in rows.items():
            reference = baseline_of(name)
            if reference != name and "kl_per_question" in row and "kl_per_question" in rows.get(reference, {}):
                base_row = rows[reference]
                row["kl_vs_baseline"] = {
                    "baseline": reference,
                    **paired_ratio(row["kl_per_question"], base_row["kl_per_question"]),
                    # a mean of KLs follows its tail (one confident wrong token costs nats)
                    "median_per_question_ratio": statistics.median(
                        a / max(b, 1e-12)
                        for a, b in zip(row["kl_per_question"], base_row["kl_per_question"], strict=True)
                    ),
                }
                for measure in ("sub_em", "agreement"):  # wins / losses against the baseline, exact McNemar
                    key = f"{measure}_per_question"
                    if key in row and key in base_row:
                        row[f"{measure}_vs_baseline"] = paired_comparison(row[key], base_row[key])
            if validated is not None and "agreement_per_question" in row:
                keep = [e.qid not in validated for e in examples]
                base = (reference, rows[reference]) if reference != name and reference in rows else None
                row["outside_validation"] = subset_stats(row, keep, base)
        result: dict[str, Any] = {
            "meta": {
                **results_meta(
                    {
                        "questions": len(examples),
                        "model": lm.ref,
                        "repeats": args.cost_repeats or earlier.get("meta", {}).get("repeats"),
                    }
                ),
                "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
                "load": os.getloadavg(),
                "measured_by": measured_by(row.get("run", {}) for row in rows.values()),
                "sample": "held-out articles " + ", ".join(adaptor_meta.get("val_articles", [])),
                "validation_sample": validated,  # set: every question of them, this being training's sample
                "adaptor_hash": adaptor.hash if adaptor else earlier.get("meta", {}).get("adaptor_hash"),
                "adaptor_kind": adaptor.kind if adaptor else earlier.get("meta", {}).get("adaptor_kind"),
                "compared_adaptor": (
                    {
                        "hash": compared.hash,
                        "kind": compared.kind,
                        "metrics": compared.meta.get("metrics"),
                        **{
                            k: compared.meta[k]
                            for k in ("method", "ratio", "quant", "init_adaptor_hash")
                            if k in compared.meta
                        },
                    }
                    if compared
                    else earlier.get("meta", {}).get("compared_adaptor")
                ),
            },
            "adaptor": adaptor_meta,
            "full_prefill": {
                "qids": qids,
                "sub_em": full_sub_em,
                "answers": [decode(a) for a in full_answers],
                "token_ids": full_answers,
            },
            "rows": rows,
            "index_cost": cost,
        }
        if not args.settings and earlier.get("meta"):  # nothing measured now: the figures are the earlier run's
            for key in ("date", "load", "git", "threads"):
                result["meta"][key] = earlier["meta"].get(key, result["meta"][key])
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1))
        return rows

    for name in args.settings:
        which, method, ratio, quant = SETTINGS[name]
        if which is not None and adaptors[which] is None:
            raise SystemExit(f"setting {name!r} needs {'--compare-adaptor' if which == 'compare' else 'OUT/adaptor'}")
        encoder = PassageEncoder(lm, template, adaptors[which])
        kls, answers = [], []
        for example in examples:
            segs = segments(
                encoder, example.passages, method, ratio, quant, base_encoder if name in BASE_SCORED else None
            )
            kl, answer = measure(encoder, example, segs, stop_ids)
            kls.append(kl)
            answers.append(decode(answer))
        quality = Quality.of(answers, example_golds, full_texts)
        means = quality.means()
        rows[name] = {
            "adaptor": which,
            "method": method,
            "ratio": ratio or 1.0,
            "quant": quant,
            "kl_answer": statistics.mean(kls),
            "kl_ci95": list(bootstrap_ci(kls)),
            "kl_per_question": kls,
            "agreement_per_question": quality.agree,
            "sub_em_per_question": quality.sub_em,
            "agreement": means["agreement"],
            "agreement_ci95": quality.ci95()["agreement"],
            "sub_em": means["sub_em"],
            "sub_em_pct_of_full": 100 * means["sub_em"] / full_sub_em if full_sub_em else None,
            "answers": answers,
            # the code that measured this row: earlier rows kept from another run keep theirs
            "run": row_run(),
        }
        print(
            f"{name}: KL {rows[name]['kl_answer']:.4f} agreement {rows[name]['agreement']:.2f} sub-EM {rows[name]['sub_em']:.2f}",
            flush=True,
        )
        write(rows, earlier_cost)

    cost_passages = [ids for e in examples[:2] for ids in e.passages][:4]
    cost = earlier_cost
    if adaptor is not None and args.cost_repeats:
        cost = index_cost(lm, template, adaptor, cost_passages, args.cost_repeats)
    rows = write(rows, cost)
    print(json.dumps({k: {m: v for m, v in r.items() if m != "answers"} for k, r in rows.items()}, indent=1))
    print(json.dumps(cost, indent=1))


if __name__ == "__main__":
    main()
