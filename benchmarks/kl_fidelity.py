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

    python benchmarks/compression_quality.py --questions 30      # builds the stores
    python benchmarks/kl_fidelity.py --questions 30
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from compression_quality import SQUAD, pick_questions, plot_against_compression, row_name, side_row
from transformers import DynamicCache

from ragcompress.models import load_model
from ragcompress.retrieval import Embedder
from ragcompress.runtime.assemble import assemble
from ragcompress.runtime.attention import KV_MASK_KWARG
from ragcompress.runtime.engine import Engine
from ragcompress.store import KVStore


def teacher_forced_logprobs(engine: Engine, pids: list[str], ids: list[int]) -> torch.Tensor:
    """``[len(ids), vocab]`` log-probabilities after each of ``ids`` fed over the store's caches."""
    entries = [engine.store.entry(pid) for pid in pids]
    segments = [engine.store.load_kv(e, engine.dtype) for e in entries]
    built = assemble(engine.lm.config, engine.rotary, engine.prefix_keys, engine.prefix, segments, engine.dtype)
    extra = {} if built.kv_mask is None else {KV_MASK_KWARG: built.kv_mask}
    positions = torch.arange(built.next_position, built.next_position + len(ids)).unsqueeze(0)
    with torch.inference_mode():
        out = engine.lm.model(
            input_ids=torch.tensor([ids]), position_ids=positions, cache=built.cache, use_cache=True, **extra
        )
    return out.logits[0].float().log_softmax(-1)


def full_prefill_logprobs(engine: Engine, pids: list[str], ids: list[int]) -> torch.Tensor:
    entries = [engine.store.entry(pid) for pid in pids]
    prompt = engine.full_prompt_ids("q", entries)[: -len(engine.tokens.suffix("q"))] + ids
    with torch.inference_mode():
        out = engine.lm.model(input_ids=torch.tensor([prompt]), cache=DynamicCache(config=engine.lm.config))
    return out.logits[0, -len(ids) :].float().log_softmax(-1)


def kl(ref: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """Per-position ``KL(ref || other)`` from log-probabilities ``[n, vocab]``."""
    return (ref.exp() * (ref - other)).sum(-1)


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
    with KVStore.open(workdir / reference_name) as store:
        engine = Engine(store, lm, embedder)
        retrieved = quality.get("retrieved") or [
            [e.id for e in engine.retrieve(q.question, quality["top_k"])] for q in questions
        ]
        inputs, reference, full_kl = [], [], []
        for q, pids in zip(questions, retrieved, strict=False):
            suffix = engine.tokens.suffix(q.question)
            answer = lm.tokenizer(q.answers[0], add_special_tokens=False)["input_ids"]
            ids = suffix + answer
            inputs.append((pids, ids, len(answer)))
            ref = teacher_forced_logprobs(engine, pids, ids)
            reference.append(ref)
            if args.full_prefill:
                full_kl.append(kl(ref, full_prefill_logprobs(engine, pids, ids)))

    def summary(kls: list[torch.Tensor]) -> dict[str, float]:
        every = torch.cat(kls)
        answer = torch.cat([k[-(n + 1) : -1] for k, (_, _, n) in zip(kls, inputs, strict=False)])
        return {"kl_suffix_answer": float(every.mean()), "kl_answer": float(answer.mean())}

    rows = (
        {"full prefill": {"method": "full prefill", "ratio": 1.0, "quant": "-", **summary(full_kl)}} if full_kl else {}
    )
    done = json.loads((workdir / "kl.json").read_text()) if (workdir / "kl.json").is_file() else {}
    for name, row in quality["rows"].items():
        if name == reference_name or (args.rows and name not in args.rows):
            continue
        if done.get(name, {}).get("reference") == reference_name:  # measured by an earlier run
            rows[name] = done[name]
            continue
        with KVStore.open(workdir / name) as store:
            engine = Engine(store, lm, embedder)
            kls = [
                kl(ref, teacher_forced_logprobs(engine, pids, ids))
                for ref, (pids, ids, _) in zip(reference, inputs, strict=False)
            ]
        rows[name] = {
            "method": row["method"],
            "ratio": row["ratio"],
            "quant": row["quant"],
            "compression": row["compression"],
            "reference": reference_name,
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
