"""Where selective recompute's time goes: TTFT of full prefill, plain reuse and recompute over one
store, and the recompute's passes timed inside the same requests.

``faithful`` (5 % recompute, ``mixed`` selection) measures 5.8x faster TTFT than full prefill with
one torch thread per process but 4.1–4.7x with two (``docs/results/ttft_threads_faithful_qwen.json``).
This script says why: per question it times (median of ``--repeats``) the three TTFTs and, inside
the recompute requests, every pass through the model's layers that ``runtime.recompute`` makes:

* ``check``: every candidate passage token through the layers below the check layer (CacheBlend's
  deviation test);
* ``question_below_check``: the question's tokens through those layers (their attention ranks
  tokens for ``mixed`` and ``question`` selection);
* ``question_reading``: with ``--selection question-deep``, the question once through every layer
  over the cache as stored, its attention ranking the tokens (no check pass then);
* ``fused``: the selected tokens and the question through the remaining layers, in one pass.

It also times one MLP projection of the model (``up_proj``) at the row counts these passes feed it
(one token, the question, selected + question, the whole prompt): on a CPU the cost of a pass grows
with its rows even at a few dozen, so recomputed tokens cost about what question tokens do.

    .venv/bin/python benchmarks/recompute_cost.py --store runs/store-default --sample 20 \\
        --articles Apollo_program --articles United_Methodist_Church \\
        --articles Jacksonville,_Florida --articles "Victoria_(Australia)" --threads 2 \\
        --out docs/results/recompute_cost_qwen.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections import defaultdict
from functools import partial
from pathlib import Path
from typing import Any

import torch

import ragcompress.runtime.cache_pass as cache_pass
from ragcompress.runtime.engine import Engine
from ragcompress.runtime.options import AnswerOptions
from ragcompress.runtime.recompute import RecomputeConfig

from common import SQUAD, median_time, pick_questions, results_meta

PASSES = ("check", "question_below_check", "question_reading", "fused")


class PassTimer:
    """Wraps ``cache_pass.run_layers`` and records each call's wall time under the name of the
    pass it is (see the module docstring), for the requests answered while :attr:`on` is set."""

    def __init__(self) -> None:
        self.original = cache_pass.run_layers
        self.on = False
        self.seconds: dict[str, float] = defaultdict(float)
        self.rows: dict[str, int] = {}

    def __call__(
        self,
        model: Any,
        rotary: Any,
        layout: Any,
        cache: Any,
        tokens: Any,
        hidden: Any,
        start: int,
        stop: int,
        new_pos: Any = None,
        observe: Any = None,
    ) -> Any:
        began = time.perf_counter()
        out = self.original(model, rotary, layout, cache, tokens, hidden, start, stop, new_pos, observe=observe)
        if self.on:
            if observe is not None:
                name = "question_reading"  # selection="question-deep": the question over the stored cache
            elif start > 0 or (tokens.numel() and new_pos is not None and new_pos.numel()):
                name = "fused"
            else:
                name = "check" if tokens.numel() else "question_below_check"
            self.seconds[name] += time.perf_counter() - began
            self.rows[name] = int(hidden.shape[1])
        return out

    def take(self) -> dict[str, float]:
        taken = {name: self.seconds.get(name, 0.0) for name in PASSES}
        self.seconds.clear()
        return taken


def up_proj_ms(engine: Engine, rows: list[int], repeats: int) -> dict[int, float]:
    """Milliseconds of layer 0's ``mlp.up_proj`` on ``rows`` random inputs (median of at least 5
    calls after a warm-up, :func:`common.median_time`)."""
    projection = engine.lm.model.model.layers[0].mlp.up_proj
    out = {}
    with torch.inference_mode():
        for n in rows:
            x = torch.randn(1, n, projection.in_features, dtype=engine.dtype)
            out[n] = median_time(partial(projection, x), max(repeats, 5)) * 1000
    return out


def run(args: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(args.threads)
    questions = pick_questions(Path(args.questions), args.sample, set(args.articles))
    engine = Engine.open(args.store)
    timer = PassTimer()
    cache_pass.run_layers = timer  # recompute looks the name up at call time
    settings = {
        "full": AnswerOptions(max_new_tokens=1),
        "reuse": AnswerOptions(max_new_tokens=1),
        "recompute": AnswerOptions(
            max_new_tokens=1, recompute=RecomputeConfig(ratio=args.ratio, selection=args.selection)
        ),
    }
    per_question: list[dict[str, Any]] = []
    try:
        names = list(settings)
        for number, question in enumerate(questions):
            entries = engine.retrieve(question.question, args.top_k)
            ttft: dict[str, list[float]] = defaultdict(list)
            passes: dict[str, list[float]] = defaultdict(list)
            for repeat in range(args.repeats + 1):  # the first round warms up and is dropped
                shift = (number + repeat) % len(names)  # no setting leads every round of every question
                for name in names[shift:] + names[:shift]:
                    options = settings[name]
                    timer.on = name == "recompute"
                    answer = (engine.answer_full if name == "full" else engine.answer_cached)(
                        question.question, entries, options
                    )
                    taken = timer.take()
                    if repeat:
                        ttft[name].append(answer.ttft_s)
                        if name == "recompute":
                            for key, seconds in taken.items():
                                passes[key].append(seconds)
            per_question.append(
                {
                    "id": question.id,
                    "prompt_tokens": len(engine.full_prompt_ids(question.question, entries)),
                    "rows": dict(timer.rows),
                    **{f"ttft_{k}_s": statistics.median(v) for k, v in ttft.items()},
                    **{f"{k}_s": statistics.median(v) for k, v in passes.items()},
                }
            )
    finally:
        cache_pass.run_layers = timer.original
        timer.on = False

    def med(key: str) -> float:
        return statistics.median(q[key] for q in per_question)

    summary = {key: med(key) for key in per_question[0] if key.endswith("_s")}
    summary["speedup_reuse"] = summary["ttft_full_s"] / summary["ttft_reuse_s"]
    summary["speedup_recompute"] = summary["ttft_full_s"] / summary["ttft_recompute_s"]
    summary["recompute_minus_reuse_s"] = summary["ttft_recompute_s"] - summary["ttft_reuse_s"]
    rows_seen = {name: int(statistics.median(q["rows"].get(name, 0) for q in per_question)) for name in PASSES}
    prompt = int(med("prompt_tokens"))
    projection = up_proj_ms(
        engine, sorted({1, rows_seen["question_below_check"], rows_seen["fused"], prompt}), args.repeats
    )
    engine.close()
    return {
        "what": "TTFT of full prefill, plain reuse and selective recompute over one store, and the recompute's passes "
        "(check, question below the check layer, fused selected + question), medians over questions of per-question "
        "medians; up_proj_ms: one MLP projection at the passes' row counts",
        "script": "benchmarks/recompute_cost.py",
        "model": engine.lm.ref,
        "store": str(args.store),
        "setting": {"ratio": args.ratio, "selection": args.selection, "top_k": args.top_k},
        "meta": results_meta({**vars(args), "questions": len(questions), "model": engine.lm.ref}),
        "summary": summary,
        "median_rows": {**rows_seen, "prompt": prompt},
        "up_proj_ms": {str(n): ms for n, ms in projection.items()},
        "per_question": per_question,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--store", required=True, type=Path)
    parser.add_argument("--questions", default=str(SQUAD / "questions.jsonl"))
    parser.add_argument("--sample", type=int, default=20)
    parser.add_argument("--articles", action="append", default=[])
    parser.add_argument("--top-k", type=int, default=3)
    parser.add_argument("--ratio", type=float, default=0.05)
    parser.add_argument("--selection", default="mixed")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    result = run(args)
    s = result["summary"]
    print(
        f"TTFT full {s['ttft_full_s'] * 1000:.0f} ms | reuse {s['ttft_reuse_s'] * 1000:.0f} ms "
        f"({s['speedup_reuse']:.1f}x) | recompute {s['ttft_recompute_s'] * 1000:.0f} ms ({s['speedup_recompute']:.1f}x)"
    )
    print("recompute passes (ms): " + ", ".join(f"{p} {s[p + '_s'] * 1000:.0f}" for p in PASSES))
    print(
        "rows: "
        + json.dumps(result["median_rows"])
        + " | up_proj ms: "
        + json.dumps({k: round(v, 2) for k, v in result["up_proj_ms"].items()})
    )
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
