"""Quality and TTFT of selective recompute / attention calibration against full prefill.

For every question the same retrieved passages are answered by a plain full prefill (the
baseline) and by every setting, interleaved in one process, greedy. Per setting: sub-EM, F1,
agreement with the full-prefill answer, teacher-forced KL(full || setting) of the next-token
distributions along the full-prefill answer (its tokens plus the stop), and the TTFT speed-up
(median full TTFT / median setting TTFT, both measured here).

Settings are written ``reuse`` (plain reuse), ``r0.1`` (recompute 10 %), ``s4`` (first 4 tokens
of every passage), ``t0.9`` (APE temperature), ``c2`` (check layer), joined with ``+``:
``r0.15+s4+t0.9``.

    .venv/bin/python benchmarks/recompute_quality.py --store /tmp/rc4/store-qwen \\
        --questions ../shared/data/squad-dev/questions.jsonl --limit 40 --top-k 3 5 \\
        --settings reuse r0.05 r0.1 r0.15 r0.25 t0.9 r0.15+s4 --out docs/results/recompute_qwen.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

from ragcompress.evaluation import f1, read_questions, sub_em
from ragcompress.runtime.engine import Engine
from ragcompress.runtime.generate import Generation, TokenStream
from ragcompress.runtime.options import AnswerOptions
from ragcompress.runtime.recompute import RecomputeConfig

from common import rewind, run_keeping_request, teacher_forced_logprobs

KEYS = {"r": ("ratio", float), "s": ("sink_tokens", int), "t": ("temperature", float), "c": ("check_layer", int)}


def parse_setting(text: str) -> RecomputeConfig:
    if text == "reuse":
        return RecomputeConfig()
    fields = {}
    for part in text.split("+"):
        name, cast = KEYS[part[0]]
        fields[name] = cast(part[1:])
    return RecomputeConfig(**fields)


def run_forced(model, stream: TokenStream, answer: list[int] | None = None) -> tuple[Generation, torch.Tensor]:
    """Decode ``stream`` (the answer and its TTFT, as ``Engine.answer_*`` measure them), then
    teacher-force ``answer`` (default: the tokens just decoded) over the same request's cache:
    ``[len(answer) + 1, vocab]`` log-probs after the prompt and after each answer token."""
    generation, prepared, rows = run_keeping_request(stream)
    forced = generation.token_ids if answer is None else answer
    return generation, teacher_forced_logprobs(model, rewind(prepared, rows), forced, keep=len(forced) + 1)


def run_full(engine: Engine, question: str, entries):
    """``Engine.answer_full``'s stream, then teacher-forced log-probs along its own answer."""
    return run_forced(engine.lm.model, engine.stream_full(question, entries))


def run_cached(engine: Engine, question: str, entries, config: RecomputeConfig, answer: list[int]):
    """``Engine.answer_cached``'s stream with ``config``, then teacher-forced log-probs along the
    full-prefill answer."""
    stream = engine.stream_cached(question, entries, engine.options.replace(recompute=config))
    return run_forced(engine.lm.model, stream, answer)


def kl(full_logp: torch.Tensor, logp: torch.Tensor) -> float:
    """Mean over positions of KL(full || setting), nats."""
    return float((full_logp.exp() * (full_logp - logp)).sum(-1).mean())


def summarize(rows: dict) -> dict:
    full_ttft = statistics.median(rows["full"]["ttft"])
    table = {}
    for name, r in rows.items():
        ttft = statistics.median(r["ttft"])
        table[name] = {
            "n": len(r["ttft"]),
            "sub_em": statistics.fmean(r["sub_em"]),
            "f1": statistics.fmean(r["f1"]),
            "agreement": statistics.fmean(r["agree"]),
            "kl": statistics.fmean(r["kl"]),
            "ttft_s_median": ttft,
            "ttft_speedup": full_ttft / ttft,
        }
    return table


def evaluate(engine: Engine, questions, top_k: int, settings: list[str], progress: bool, checkpoint=None) -> dict:
    rows = {name: {"sub_em": [], "f1": [], "agree": [], "kl": [], "ttft": []} for name in ["full"] + settings}
    configs = {name: parse_setting(name) for name in settings}
    warm = engine.retrieve(questions[0].question, top_k)
    run_full(engine, questions[0].question, warm)
    run_cached(engine, questions[0].question, warm, RecomputeConfig(ratio=0.1, sink_tokens=1), [])
    for number, item in enumerate(questions, start=1):
        entries = engine.retrieve(item.question, top_k)
        full_gen, full_logp = run_full(engine, item.question, entries)
        full_text = engine.decode(full_gen.token_ids)
        row = rows["full"]
        row["sub_em"].append(sub_em(full_text, item.answers))
        row["f1"].append(f1(full_text, item.answers))
        row["agree"].append(1.0)
        row["kl"].append(0.0)
        row["ttft"].append(full_gen.ttft_s)
        for name in settings:
            gen, logp = run_cached(engine, item.question, entries, configs[name], full_gen.token_ids)
            text = engine.decode(gen.token_ids)
            row = rows[name]
            row["sub_em"].append(sub_em(text, item.answers))
            row["f1"].append(f1(text, item.answers))
            row["agree"].append(float(text == full_text))
            row["kl"].append(kl(full_logp, logp))
            row["ttft"].append(gen.ttft_s)
        if progress:
            print(
                f"[top-{top_k}] {number}/{len(questions)} "
                + " ".join(
                    f"{n}:{statistics.fmean(r['sub_em']):.2f}/{statistics.fmean(r['agree']):.2f}"
                    for n, r in rows.items()
                ),
                file=sys.stderr,
                flush=True,
            )
        if checkpoint is not None:
            checkpoint(summarize(rows))
    return summarize(rows)


def markdown(model: str, n: int, top_k: int, table: dict) -> str:
    """The table as Markdown (also: ``python recompute_quality.py --show OUT.json``)."""
    full = table["full"]["sub_em"]
    lines = [
        f"**{model}, top-{top_k}, {n} questions**",
        "",
        "| setting | sub-EM | % of full | F1 | agreement | KL to full | TTFT (s) | TTFT speed-up |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, r in table.items():
        share = f"{100 * r['sub_em'] / full:.0f}%" if full else "-"
        lines.append(
            f"| {name} | {r['sub_em']:.3f} | {share} | {r['f1']:.3f} | {r['agreement']:.3f} | "
            f"{r['kl']:.4f} | {r['ttft_s_median']:.3f} | {r['ttft_speedup']:.2f}x |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--store")
    parser.add_argument("--questions")
    parser.add_argument("--show", type=Path, help="print the tables of a result JSON and exit")
    parser.add_argument("--limit", type=int, default=40)
    parser.add_argument("--top-k", type=int, nargs="+", default=[3])
    parser.add_argument("--settings", nargs="+", default=["reuse", "r0.05", "r0.1", "r0.15", "r0.25", "t0.9"])
    parser.add_argument("--out", type=Path)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, help="torch threads (1 avoids oversubscription on a busy host)")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args()
    if args.show:
        result = json.loads(args.show.read_text())
        for key, table in result["tables"].items():
            print(markdown(result["model"], table["full"]["n"], int(key[3:]), table), end="\n\n")
        return
    if not (args.store and args.questions):
        parser.error("--store and --questions are required")
    if args.threads:
        torch.set_num_threads(args.threads)
    # dense: selective recompute edits the assembled cache, and every setting (reuse too) is
    # measured on the same path
    engine = Engine.open(args.store, options=AnswerOptions(max_new_tokens=args.max_new_tokens, backend="dense"))
    questions = read_questions(args.questions, args.limit)
    result = {"store": args.store, "model": engine.lm.ref, "n": len(questions), "argv": sys.argv[1:], "tables": {}}
    for top_k in args.top_k:

        def save(table: dict, key: str = f"top{top_k}") -> None:
            """Write the table so far (a long run can be stopped and still report)."""
            result["tables"][key] = table
            if args.out:
                args.out.parent.mkdir(parents=True, exist_ok=True)
                args.out.write_text(json.dumps(result, indent=1))

        table = evaluate(engine, questions, top_k, args.settings, not args.quiet, save)
        save(table)
        print(markdown(engine.lm.ref, table["full"]["n"], top_k, table), flush=True)
        print(flush=True)


if __name__ == "__main__":
    main()
