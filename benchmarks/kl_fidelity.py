"""Fidelity beyond QA: teacher-forced KL of next-token distributions, compressed vs uncompressed.

Reuses the stores ``compression_quality.py`` built (same questions, same retrieved passages,
one store per method / ratio / quant). For each question the prompt's suffix followed by the
first gold answer is teacher-forced in one forward pass over each store's cache, and the
next-token distribution at every position is compared with the one from the uncompressed
store (``none``, ratio 1.0, fp16):

    KL(P_uncompressed || P_compressed), averaged over positions (suffix + answer, and the
    answer's positions alone) and questions, in nats.

A ``full prefill`` row compares the uncompressed cached path with a plain prefill of the same
tokens (the price of encoding passages independently, which no compression ratio removes).

Both sides go through the query path: ``Engine.prepare`` (dense backend, no recompute) or
``runtime.prepare.full_prefill`` builds the request, and ``common.teacher_forced_logprobs`` reads
the suffix and the answer over its cache in one pass, keeping every position's logits.

    python benchmarks/compression_quality.py --questions 30      # builds the stores
    python benchmarks/kl_fidelity.py --questions 30
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from ragcompress.models import load_model
from ragcompress.retrieval import Embedder
from ragcompress.runtime.engine import Engine
from ragcompress.runtime.generate import kl_per_position
from ragcompress.runtime.options import AnswerOptions
from ragcompress.runtime.prepare import full_prefill
from ragcompress.store import KVStore

from common import (
    SQUAD,
    pick_questions,
    plot_against_compression,
    row_name,
    row_run,
    side_row,
    store_created,
    teacher_forced_logprobs,
)

# Every store's caches as the dense path assembles them (dequantized, re-rotated), no recompute:
# the distributions compared are those of the caches themselves, on any device.
OPTIONS = AnswerOptions(backend="dense")


def cached_logprobs(engine: Engine, question: str, pids: list[str], answer: list[int]) -> torch.Tensor:
    """``[len(suffix) + len(answer), vocab]`` log-probabilities after each token of the question's
    suffix and of ``answer``, teacher-forced over the store's caches of ``pids``."""
    prepared = engine.prepare(question, [engine.store.entry(pid) for pid in pids], OPTIONS)
    return teacher_forced_logprobs(engine.lm.model, prepared, answer)


def full_prefill_logprobs(engine: Engine, question: str, pids: list[str], answer: list[int]) -> torch.Tensor:
    """The same rows from a plain prefill of the same token ids (no cache reuse)."""
    entries = [engine.store.entry(pid) for pid in pids]
    prepared = full_prefill(engine.context, engine.full_prompt_ids(question, entries, OPTIONS), OPTIONS.max_new_tokens)
    keep = len(engine.suffix_ids(question, entries, OPTIONS)) + len(answer)
    return teacher_forced_logprobs(engine.lm.model, prepared, answer, keep=keep)


def plot(rows: dict[str, dict], path: Path, title: str) -> None:
    """KL (suffix + answer) against compression, one line per method, int4 dashed."""
    plot_against_compression(
        rows,
        "kl_suffix_answer",
        "KL(uncompressed || compressed), nats/token",
        path,
        title,
        lambda r: "compression" in r and not side_row(r["method"]),
        markersize=5,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None)
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (1 avoids oversubscription on shared CPUs)"
    )
    parser.add_argument("--questions", type=int, default=40)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/ragcompress-bench"))
    parser.add_argument("--reference-quant", default="fp16")
    parser.add_argument("--rows", nargs="*", default=None, help="row names of results.json to compare (default: all)")
    parser.add_argument("--full-prefill", action="store_true", help="add the full-prefill vs cached row (slow)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    tag = (args.model or "smollm2-135m").replace("/", "_")
    workdir = args.workdir / tag
    quality = json.loads((workdir / "results.json").read_text())
    questions = pick_questions(SQUAD / "questions.jsonl", args.questions)
    if [q.id for q in questions] != quality["key"]["questions"]:
        raise SystemExit("the quality run used other questions; run compression_quality.py with the same --questions")
    lm = load_model(args.model)
    embedder = Embedder()
    reference_name = row_name("none", None, args.reference_quant)
    reference_created = store_created(workdir / reference_name)
    with KVStore.open(workdir / reference_name) as store:
        engine = Engine(store, lm, embedder, OPTIONS)
        retrieved = quality.get("retrieved") or [
            [e.id for e in engine.retrieve(q.question, quality["top_k"])] for q in questions
        ]
        inputs, reference, full_kl = [], [], []
        for q, pids in zip(questions, retrieved, strict=False):
            answer = lm.tokenizer(q.answers[0], add_special_tokens=False)["input_ids"]
            inputs.append((q.question, pids, answer))
            ref = cached_logprobs(engine, q.question, pids, answer)
            reference.append(ref)
            if args.full_prefill:
                full_kl.append(kl_per_position(ref, full_prefill_logprobs(engine, q.question, pids, answer)))

    def summary(kls: list[torch.Tensor]) -> dict[str, float]:
        every = torch.cat(kls)
        answer = torch.cat([k[-(len(a) + 1) : -1] for k, (_, _, a) in zip(kls, inputs, strict=False)])
        return {"kl_suffix_answer": float(every.mean()), "kl_answer": float(answer.mean())}

    rows = (
        {"full prefill": {"method": "full prefill", "ratio": 1.0, "quant": "-", **summary(full_kl)}} if full_kl else {}
    )
    done = json.loads((workdir / "kl.json").read_text()) if (workdir / "kl.json").is_file() else {}
    asked = [q.id for q in questions]
    for name, row in quality["rows"].items():
        if name == reference_name or (args.rows and name not in args.rows):
            continue
        earlier = done.get(name, {})
        # the stores as built now (compression_quality rebuilds a store whose row it measures
        # again): an earlier KL of other stores is not this row's
        built = {"store": store_created(workdir / name), "reference": reference_created}
        if built["store"] is None:
            raise SystemExit(
                f"{workdir / name} is gone, so its row's KL cannot be measured or checked against it; rerun "
                "compression_quality.py for that row, or leave it out with --rows"
            )
        # measured by an earlier run against the same reference, over the same questions and stores
        if (
            earlier.get("reference") == reference_name
            and earlier.get("questions") == asked
            and earlier.get("built") == built
        ):
            rows[name] = earlier
            continue
        with KVStore.open(workdir / name) as store:
            engine = Engine(store, lm, embedder, OPTIONS)
            kls = [
                kl_per_position(ref, cached_logprobs(engine, question, pids, answer))
                for ref, (question, pids, answer) in zip(reference, inputs, strict=False)
            ]
        rows[name] = {
            "method": row["method"],
            "ratio": row["ratio"],
            "quant": row["quant"],
            "compression": row["compression"],
            "reference": reference_name,
            "questions": asked,
            "built": built,
            "run": row_run(),
            **summary(kls),
        }
        print(f"{name}: KL {rows[name]['kl_suffix_answer']:.4f} (answer {rows[name]['kl_answer']:.4f})", flush=True)
    (workdir / "kl.json").write_text(json.dumps(rows, indent=1))
    plot(
        rows,
        Path("docs/img") / f"compression-kl-{tag}.png",
        f"{lm.ref}: teacher-forced KL vs compression (SQuAD-dev, {len(questions)} questions)",
    )
    print(
        f"\n{lm.ref}: KL(uncompressed `{reference_name}` || row), nats per token, "
        f"{len(questions)} questions, teacher-forced suffix + first gold answer\n"
    )
    print("| method | ratio | quant | compression | KL suffix+answer | KL answer |")
    print("|---|---|---|---|---|---|")
    for row in rows.values():
        comp = f"{row['compression']:.1f}x" if "compression" in row else "-"
        print(
            f"| {row['method']} | {row['ratio']} | {row['quant']} | {comp} | "
            f"{row['kl_suffix_answer']:.4f} | {row['kl_answer']:.4f} |"
        )


if __name__ == "__main__":
    main()
