"""Needle in a haystack over compressed passage caches (Paul Graham essays, pg-essays-dev).

A context of ``--chunks`` passages of ``--chunk-tokens`` tokens is cut from an essay; a short
fact (the needle, a random 4-digit number) is inserted at a sentence boundary at depth
0, 25, 50, 75 or 100 % of the context; every passage is encoded independently after the shared
prefix (as the store does), compressed by each method (scored once, every ratio kept from the
same scores), serialised and read back through the store codec with ``--quant``, assembled by
the runtime and asked for the number with greedy decoding. The baselines are a plain full
prefill of the same token ids and the uncompressed cached path (``none``).

    python benchmarks/needle.py --chunks 3 --chunk-tokens 160
    python benchmarks/needle.py --chunks 1 --chunk-tokens 160     # the simpler setting

Accuracy = the number occurs in the answer.
"""

from __future__ import annotations

import argparse
import json
import random
import re
from functools import partial
from pathlib import Path

import torch

from ragcompress.compressors import AdaptiveBudget, CompressionContext, ScorerCompressor, make_compressor
from ragcompress.indexing.encoder import PassageEncoder
from ragcompress.kv import PassageKV
from ragcompress.kv.quant import QuantConfig
from ragcompress.models import load_model
from ragcompress.prompt import PromptTemplate
from ragcompress.runtime.generate import Generation, TokenStream, stop_token_ids
from ragcompress.runtime.prepare import DenseStrategy, PrefixContext, plain_prefill
from ragcompress.store.codec import decode, encode

ESSAYS = Path(__file__).resolve().parents[2] / "shared" / "data" / "pg-essays-dev"
METHODS = ["kvzip", "adaptive:kvzip", "global:kvzip", "snapkv", "expected-attention", "knorm", "streaming"]
NEEDLE = " The special magic number is {value}. "
QUESTION = "What is the special magic number?"


def haystack(tokenizer, text: str, chunks: int, chunk_tokens: int, skip: int = 40) -> list[str]:
    """``chunks`` consecutive slices of ``chunk_tokens`` tokens (after ``skip`` header tokens)."""
    ids = tokenizer(" ".join(text.split()), add_special_tokens=False)["input_ids"][skip:]
    return [tokenizer.decode(ids[i * chunk_tokens : (i + 1) * chunk_tokens]).strip() for i in range(chunks)]


def insert_needle(chunks: list[str], depth: float, needle: str) -> list[str]:
    """Put ``needle`` at the sentence boundary nearest ``depth`` of the whole context."""
    out = list(chunks)
    j = min(int(depth * len(chunks)), len(chunks) - 1)
    rel = min(max(depth * len(chunks) - j, 0.0), 1.0)
    text = out[j]
    bounds = [0] + [m.end() for m in re.finditer(r"[.!?]\s", text)] + [len(text)]
    cut = min(bounds, key=lambda b: abs(b - rel * len(text)))
    out[j] = (text[:cut].rstrip() + needle + text[cut:].lstrip()).strip()
    return out


def answer_from_caches(
    context: PrefixContext,
    segments: list[PassageKV],
    suffix: list[int],
    quant: QuantConfig,
    max_new_tokens: int,
    stop_ids: set[int],
) -> Generation:
    """The greedy answer over the passages' caches ``segments`` as a store of ``quant`` would
    serve them (serialised and read back through its codec): the caches are compressed in memory,
    never stored, so they enter the library's dense path after the prefix
    (``DenseStrategy.prepare_segments``), with its checks, and are decoded by its token generator."""
    segments = [decode(encode(kv, quant), context.dtype) for kv in segments]
    prepare = partial(DenseStrategy().prepare_segments, context, segments, suffix, max_new_tokens, [])
    return TokenStream(context.lm.model, prepare, max_new_tokens, stop_ids).run()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None)
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (1 avoids oversubscription on shared CPUs)"
    )
    parser.add_argument("--essays", type=int, default=3)
    parser.add_argument("--chunks", type=int, default=3)
    parser.add_argument("--chunk-tokens", type=int, default=160)
    parser.add_argument("--depths", nargs="+", type=float, default=[0.0, 0.25, 0.5, 0.75, 1.0])
    parser.add_argument("--methods", nargs="+", default=METHODS)
    parser.add_argument("--ratios", nargs="+", type=float, default=[0.25])
    parser.add_argument("--quant", default="int4")
    parser.add_argument("--max-new-tokens", type=int, default=10)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    lm = load_model(args.model)
    tok = lm.tokenizer
    encoder = PassageEncoder(lm, PromptTemplate.from_tokenizer(tok))
    context = PrefixContext.from_prefix(lm, encoder.tokens, encoder.prefix_kv)
    stops = stop_token_ids(tok, lm.model)
    quant = QuantConfig(args.quant)
    rng = random.Random(0)

    def cached_answer(segments: list[PassageKV], suffix: list[int]) -> str:
        gen = answer_from_caches(context, segments, suffix, quant, args.max_new_tokens, stops)
        return tok.decode(gen.token_ids, skip_special_tokens=True)

    rows = ["full prefill", "none", *[f"{m}@{r}" for m in args.methods for r in args.ratios]]
    hits: dict[str, dict[float, list[int]]] = {row: {d: [] for d in args.depths} for row in rows}
    essays = sorted(ESSAYS.glob("*.txt"))[: args.essays]
    suffix = encoder.tokens.suffix(QUESTION)
    for essay in essays:
        chunks = haystack(tok, essay.read_text(), args.chunks, args.chunk_tokens)
        for depth in args.depths:
            value = str(rng.randint(1000, 9999))
            texts = insert_needle(chunks, depth, NEEDLE.format(value=value))
            ids = [encoder.tokens.passage(t) for t in texts]
            full = encoder.encode(ids)
            prompt = encoder.prefix_ids + sum(ids, []) + suffix
            n = args.max_new_tokens
            gen = TokenStream(lm.model, partial(plain_prefill, lm, prompt, n), n, stops).run()
            hits["full prefill"][depth].append(int(value in tok.decode(gen.token_ids, skip_special_tokens=True)))
            hits["none"][depth].append(int(value in cached_answer(full, suffix)))
            scored: dict[str, list[torch.Tensor]] = {}  # one scoring pass per scorer, shared by its wrappers
            for method in args.methods:
                name = method.split(":")[-1]
                if name not in scored:
                    scorer = make_compressor(name)
                    assert isinstance(scorer, ScorerCompressor), f"{name} scores no tokens"
                    scored[name] = [
                        scorer.score(kv, CompressionContext(encoder, i)) for kv, i in zip(full, ids, strict=False)
                    ]
                scores = scored[name]
                for ratio in args.ratios:
                    compressor = make_compressor(method, ratio=ratio)
                    assert isinstance(compressor, (AdaptiveBudget, ScorerCompressor)), f"{method} evicts by no score"
                    kept = [compressor.select(kv, s) for kv, s in zip(full, scores, strict=False)]
                    hits[f"{method}@{ratio}"][depth].append(int(value in cached_answer(kept, suffix)))
            print(f"{essay.stem} depth {depth:.2f}: " + " ".join(f"{r}={hits[r][depth][-1]}" for r in rows), flush=True)

    print(
        f"\n{lm.ref}: needle accuracy, {len(essays)} essays x {len(args.depths)} depths, context "
        f"{args.chunks} passage(s) x {args.chunk_tokens} tokens, cached rows stored as {args.quant}\n"
    )
    print("| setting | " + " | ".join(f"depth {int(d * 100)}%" for d in args.depths) + " | mean |")
    print("|---|" + "---|" * (len(args.depths) + 1))
    summary = {}
    for row in rows:
        accs = [sum(hits[row][d]) / len(hits[row][d]) for d in args.depths]
        summary[row] = {"by_depth": dict(zip(map(str, args.depths), accs, strict=False)), "mean": sum(accs) / len(accs)}
        print(f"| {row} | " + " | ".join(f"{a:.2f}" for a in accs) + f" | {summary[row]['mean']:.2f} |")
    if args.out:
        args.out.write_text(
            json.dumps({"model": lm.ref, "args": {k: str(v) for k, v in vars(args).items()}, "rows": summary}, indent=1)
        )


if __name__ == "__main__":
    main()
