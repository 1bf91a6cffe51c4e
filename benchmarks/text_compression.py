"""Text compression side by side on squad-dev (top-3 retrieval), answered by SmolLM2 full prefill.

Methods, each applied to the same three retrieved passages per question:

* ``uncompressed``: the passages as retrieved (the baseline every ratio is against);
* ``selfinfo``: ragcompress's ``TextCompressionPostprocessor(method="selfinfo")`` (word units,
  self-information under SmolLM2) at rates 0.5 and 0.33; ``selfinfo-token``: the same with
  ``unit="token"`` (LLMLingua's granularity);
* ``extractive``: ``TextCompressionPostprocessor(method="extractive")`` (RECOMP-style sentences
  by MiniLM similarity to the question) at rates 0.5 and 0.33;
* ``sentence-optimizer``: LlamaIndex core's ``SentenceEmbeddingOptimizer`` with the same MiniLM
  embedder, ``percentile_cutoff`` 0.5 and 0.33;
* ``llmlingua``: Microsoft's ``llmlingua.PromptCompressor`` with SmolLM2 as its scorer, one call
  per passage, ``rate`` 0.5 and 0.33 (needs ``TIKTOKEN_CACHE_DIR``: it counts GPT tokens with
  tiktoken, whose ``cl100k_base`` file LlamaIndex core ships; set here automatically).

Every compressed context is placed in ragcompress's RAG prompt (the store prompt: prefix,
passages, question) and answered by greedy decoding with a plain full prefill, so only the
passage text differs between methods. Reported: sub-EM (SQuAD normalisation), passage tokens
sent to the reader (SmolLM2 tokenizer) and their ratio to uncompressed, agreement with the
uncompressed answer, and compression latency per question (median). Query-agnostic methods
(selfinfo, llmlingua) compress each passage once; their latency per question is the sum of the
measured times of its three passages, i.e. what compressing at query time would cost.

    .venv/bin/python benchmarks/text_compression.py --limit 40 --log tc.log
    .venv/bin/python benchmarks/text_compression.py --from-log tc.log   # summary of a (partial) log
    .venv/bin/python benchmarks/text_compression.py --from-log tc.log --run ID   # one of several runs in it
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "squad-dev"
RATES = (0.5, 0.33)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="folder with passages.jsonl, questions.jsonl")
    parser.add_argument("--limit", type=int, default=40, help="number of questions (first N)")
    parser.add_argument("--top-k", type=int, default=3)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a shared CPU)")
    parser.add_argument("--no-llmlingua", action="store_true", help="skip llmlingua even if installed")
    parser.add_argument(
        "--methods", default=None, help="comma-separated method names to run besides uncompressed (default: all)"
    )
    parser.add_argument("--out", type=Path, default=None, help="write the summary JSON here")
    parser.add_argument("--log", type=Path, default=None, help="append one JSON line per question and method here")
    parser.add_argument("--from-log", type=Path, default=None, help="only summarize an existing --log file")
    parser.add_argument("--run", default=None, help="with --from-log: the run of the log to summarize (its id)")
    return parser.parse_args()


UNRECORDED = "unrecorded"  # the run of log lines written before lines named their run


def rows_of_log(path: Path, run: str | None) -> tuple[dict[str, list[dict]], dict]:
    """The rows of one run of a ``--log`` file by method, and that run's settings. Runs append
    to the same log: one of several must be named (``--run``), never summarized together."""
    runs: dict[str, dict] = {}
    rows: dict[str, dict[str, list[dict]]] = {}
    for line in path.read_text().splitlines():
        row = json.loads(line)
        settings = row.get("run") or {"id": UNRECORDED}
        runs.setdefault(settings["id"], settings)
        rows.setdefault(settings["id"], {}).setdefault(row["method"], []).append(row)
    if run is None and len(runs) > 1:
        counts = ", ".join(f"{r} ({sum(len(v) for v in rows[r].values())} lines)" for r in runs)
        raise SystemExit(f"{path} holds {len(runs)} runs: {counts}; choose one with --run")
    chosen = run if run is not None else next(iter(runs), None)
    if chosen not in runs:
        raise SystemExit(f"{path} holds no run {chosen!r}; its runs: {', '.join(runs) or 'none'}")
    return rows[chosen], runs[chosen]


def main() -> int:
    args = parse_args()
    if args.from_log:
        rows, settings = rows_of_log(args.from_log, args.run)
        for name in ("top_k", "max_new_tokens", "data"):  # what the run used, not this invocation's defaults
            if name in settings:
                setattr(args, name, settings[name])
        summarize(rows, args, "smollm2-135m", "")
        return 0
    import torch

    torch.set_num_threads(args.threads)
    from common import results_meta

    # recorded at the start: the code that runs is the tree now, not after a commit during the run
    args.meta = {
        **results_meta({**vars(args), "questions": args.limit, "model": "smollm2-135m"}),
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "load_at_start": os.getloadavg(),
    }
    from llama_index.core.postprocessor import SentenceEmbeddingOptimizer
    from llama_index.core.postprocessor.types import BaseNodePostprocessor
    from llama_index.core.schema import MetadataMode, NodeWithScore, QueryBundle, TextNode
    from llama_index.embeddings.huggingface import HuggingFaceEmbedding

    from llama_index.postprocessor.ragcompress import TextCompressionPostprocessor
    from llama_index.postprocessor.ragcompress._shared import shared_embedder, shared_model
    from ragcompress.evaluation import question_quality, read_questions
    from ragcompress.indexing.inputs import iter_passages
    from ragcompress.prompt import PromptTemplate, PromptTokens
    from ragcompress.retrieval import DEFAULT_EMBEDDER, VectorIndex, _embedder_path
    from ragcompress.runtime.generate import TokenStream, stop_token_ids
    from ragcompress.runtime.prepare import plain_prefill

    lm = shared_model(None)
    tokens = PromptTokens(PromptTemplate.from_tokenizer(lm.tokenizer), lm.tokenizer)
    stops = stop_token_ids(lm.tokenizer, lm.model)
    embedder = shared_embedder(DEFAULT_EMBEDDER)
    passages = list(iter_passages(args.data / "passages.jsonl"))
    questions = read_questions(args.data / "questions.jsonl", args.limit)
    vectors = embedder.embed([p.text for p in passages])
    index = VectorIndex(__import__("numpy").arange(len(passages), dtype="int64"), vectors)

    # None: the passages as they are; a pair: llmlingua's compressor and its rate
    methods: dict[str, BaseNodePostprocessor | tuple[Any, float] | None] = {"uncompressed": None}
    for rate in RATES:
        methods[f"selfinfo@{rate}"] = TextCompressionPostprocessor(method="selfinfo", rate=rate)
        methods[f"extractive@{rate}"] = TextCompressionPostprocessor(method="extractive", rate=rate)
        methods[f"selfinfo-token@{rate}"] = TextCompressionPostprocessor(method="selfinfo", unit="token", rate=rate)
    hf_embed = HuggingFaceEmbedding(model_name=_embedder_path(DEFAULT_EMBEDDER), device="cpu")
    for rate in RATES:
        # context_before/after=0: only the selected sentences (the default 1 adds both neighbours
        # of every selected sentence, which can return more text than it was given).
        methods[f"sentence-optimizer@{rate}"] = SentenceEmbeddingOptimizer(
            embed_model=hf_embed, percentile_cutoff=rate, context_before=0, context_after=0
        )
    llmlingua_note = ""
    if not args.no_llmlingua and (not args.methods or "llmlingua" in args.methods):
        os.environ.setdefault(
            "TIKTOKEN_CACHE_DIR",
            str(Path(__import__("llama_index.core").core.__file__).parent / "_static" / "tiktoken_cache"),
        )
        try:
            from llmlingua import PromptCompressor

            from ragcompress.models import resolve_model_dir

            lingua = PromptCompressor(model_name=str(resolve_model_dir("smollm2-135m")), device_map="cpu")
            for rate in RATES:
                methods[f"llmlingua@{rate}"] = (lingua, rate)
        except Exception as exc:  # report why it cannot run, keep the rest of the table
            llmlingua_note = f"llmlingua not run: {type(exc).__name__}: {exc}"
            if args.methods:  # asked for by name: a table without it is not what was asked
                raise SystemExit(
                    f"--methods names llmlingua, which cannot run here ({llmlingua_note}); install llmlingua "
                    "or leave it out of --methods"
                ) from None
            print(llmlingua_note, file=sys.stderr)
    if args.methods:
        wanted = set(args.methods.split(",")) | {"uncompressed"}
        methods = {name: method for name, method in methods.items() if name in wanted}
    agnostic_cache: dict[tuple[str, str], tuple[str, float]] = {}

    def compress(
        name: str, method: BaseNodePostprocessor | tuple[Any, float] | None, hits: list, question: str
    ) -> tuple[list[str], float]:
        """Compressed passage texts and the compression latency for this question."""
        if method is None:
            return [p.text for p in hits], 0.0
        if isinstance(method, tuple) or name.startswith("selfinfo"):
            texts, seconds = [], 0.0
            for p in hits:
                key = (name, p.id)
                if key not in agnostic_cache:
                    start = time.perf_counter()
                    if isinstance(method, tuple):
                        out = method[0].compress_prompt([p.text], rate=method[1])["compressed_prompt"]
                    else:
                        node = method.postprocess_nodes([NodeWithScore(node=TextNode(text=p.text))])[0].node
                        out = node.get_content(metadata_mode=MetadataMode.NONE)
                    agnostic_cache[key] = (out, time.perf_counter() - start)
                texts.append(agnostic_cache[key][0])
                seconds += agnostic_cache[key][1]
            return texts, seconds
        nodes = [NodeWithScore(node=TextNode(id_=p.id, text=p.text), score=1.0) for p in hits]
        start = time.perf_counter()
        out = method.postprocess_nodes(nodes, query_bundle=QueryBundle(question))
        seconds = time.perf_counter() - start
        by_id = {n.node.node_id: n.node.get_content() for n in out}
        return [by_id.get(p.id, "") for p in hits], seconds

    def answer(texts: list[str], question: str) -> tuple[str, int, float]:
        context = [t for text in texts if text.strip() for t in tokens.passage(text)]
        ids = tokens.prefix() + context + tokens.suffix(question)
        # full prefill of the (compressed) text on the library's decoder and preallocated cache
        gen = TokenStream(
            lm.model, lambda: plain_prefill(lm, ids, args.max_new_tokens), args.max_new_tokens, stops
        ).run()
        return lm.tokenizer.decode(gen.token_ids, skip_special_tokens=True).strip(), len(context), gen.ttft_s

    rows = {name: [] for name in methods}
    log = open(args.log, "a") if args.log else None
    run = {  # every log line names its run: runs appended to one log are told apart
        "id": f"{args.meta['date']}-{os.getpid()}",
        "git": args.meta.get("git"),
        **{name: getattr(args, name) for name in ("top_k", "max_new_tokens", "limit", "threads")},
        "data": str(args.data),
    }
    for number, q in enumerate(questions, start=1):
        hits = [passages[row] for row, _ in index.search(embedder.embed([q.question])[0], args.top_k)]
        base_answer = ""
        for name, method in methods.items():  # "uncompressed" comes first: the others agree with it or not
            texts, seconds = compress(name, method, hits, q.question)
            text, sent, ttft = answer(texts, q.question)
            if name == "uncompressed":
                base_answer = text
            outcome = question_quality(text, q.answers, base_answer)
            row = {
                "question": q.id,
                "method": name,
                "answer": text,
                "sub_em": outcome["sub_em"],
                "tokens": sent,
                "compress_s": seconds,
                "ttft_s": ttft,
                "agree": outcome["agree"],
                "run": run,
            }
            rows[name].append(row)
            if log:
                log.write(json.dumps(row) + "\n")
                log.flush()
        print(
            f"[{number}/{len(questions)}] "
            + " ".join(f"{n}={statistics.fmean(r['sub_em'] for r in rs):.2f}" for n, rs in rows.items()),
            file=sys.stderr,
        )

    summarize(rows, args, lm.ref, llmlingua_note)
    return 0


def summarize(rows: dict[str, list[dict]], args: argparse.Namespace, reader: str, llmlingua_note: str) -> None:
    """The table and summary JSON over the questions every method answered (a partial log's
    methods stop at different questions)."""
    answered = [{r["question"] for r in rs} for rs in rows.values()]
    common = set.intersection(*answered) if answered else set()
    rows = {name: [r for r in rs if r["question"] in common] for name, rs in rows.items()}
    n = len(common)
    base_tokens = sum(r["tokens"] for r in rows["uncompressed"])
    summary = {
        "n": n,
        "top_k": args.top_k,
        "data": str(args.data),
        "reader": reader,
        "threads": args.threads,
        "llmlingua": llmlingua_note or "run",
        "methods": {},
    }
    if getattr(args, "meta", None):
        summary["meta"] = {**args.meta, "load_at_end": os.getloadavg()}
    print(f"\nsquad-dev, first {n} questions, top-{args.top_k}, reader {reader} (full prefill)\n")
    print(
        "| method | sub-EM | agreement w/ uncompressed | passage tokens / question | tokens vs uncompressed "
        "| compression latency (median s / question) |"
    )
    print("| --- | --- | --- | --- | --- | --- |")
    for name, rs in rows.items():
        tokens_sent = sum(r["tokens"] for r in rs)
        item = {
            "sub_em": statistics.fmean(r["sub_em"] for r in rs),
            "agreement": statistics.fmean(r["agree"] for r in rs),
            "tokens_per_question": tokens_sent / len(rs),
            "token_ratio": tokens_sent / base_tokens,
            "compress_s_median": statistics.median(r["compress_s"] for r in rs),
        }
        summary["methods"][name] = item
        print(
            f"| {name} | {item['sub_em']:.3f} | {item['agreement']:.3f} | {item['tokens_per_question']:.0f} "
            f"| {item['token_ratio']:.3f} | {item['compress_s_median']:.3f} |"
        )
    if llmlingua_note:
        print(f"\n{llmlingua_note}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    sys.exit(main())
