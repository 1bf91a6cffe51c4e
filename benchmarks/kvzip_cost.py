"""KVzip's indexing cost against a plain forward (issue 16: "at <= 2x a plain forward or the
reason it cannot be, measured").

For a few SQuAD-dev passages, side by side in one process, rounds alternating the order:
``plain``: the indexing forward (``PassageEncoder.encode``, one passage, the prefix cached);
``kvzip``: that forward plus KVzip's scoring (``KVzipCompressor.score``: the reconstruction
prompt and the passage teacher-forced over the cache, attention read by hooks). Reported: median
seconds per passage of each, the median over passages and rounds of their ratio (each pair timed
back to back), and the ratio of tokens each pass reads, which bounds
what any implementation can reach: scoring re-reads the passage (``n`` tokens) plus the repeat
prompt over a context of prefix + passage, so it costs at least one more forward of ``n`` tokens
that also attends over ``n`` cached rows.

    python benchmarks/kvzip_cost.py --model qwen2.5-coder-0.5b --passages 4 --repeats 3 \\
        --out docs/results/kvzip_cost_qwen.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch

from ragcompress.compressors import CompressionContext
from ragcompress.compressors.kvzip import REPEAT_PROMPT, KVzipCompressor
from ragcompress.indexing.encoder import PassageEncoder
from ragcompress.indexing.inputs import iter_passages
from ragcompress.models import load_model
from ragcompress.prompt import PromptTemplate

from common import SQUAD, results_meta


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--passages", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    lm = load_model(args.model)
    encoder = PassageEncoder(lm, PromptTemplate.from_tokenizer(lm.tokenizer))
    corpus = list(iter_passages(SQUAD / "passages.jsonl"))
    step = max(1, len(corpus) // args.passages)
    sample = [encoder.tokens.passage(p.text) for p in corpus[::step][: args.passages]]
    kvzip = KVzipCompressor()
    times: dict[str, list[float]] = {"plain": [], "kvzip": []}
    pairs: list[float] = []  # each passage and round: scored over plain, timed side by side

    def plain(ids: list[int]) -> None:
        encoder.encode([ids])

    def scored(ids: list[int]) -> None:
        kv = encoder.encode([ids])[0]
        kvzip.score(kv, CompressionContext(encoder, ids))

    runs = {"plain": plain, "kvzip": scored}
    for run in runs.values():  # warm-up of both sides: the first scoring call is not timed
        run(sample[0])
    for round_ in range(args.repeats):
        for i, ids in enumerate(sample):
            order = list(runs) if (round_ + i) % 2 == 0 else list(reversed(runs))
            for name in order:
                t0 = time.perf_counter()
                runs[name](ids)
                times[name].append(time.perf_counter() - t0)
            pairs.append(times["kvzip"][-1] / times["plain"][-1])
    prompt = len(encoder.tokens.suffix(REPEAT_PROMPT))
    tokens = statistics.mean(len(ids) for ids in sample)
    result = {
        "model": lm.ref,
        "passages": len(sample),
        "mean_passage_tokens": tokens,
        "plain_s_median": statistics.median(times["plain"]),
        "kvzip_s_median": statistics.median(times["kvzip"]),
        # the median of each (passage, round)'s ratio: a ratio of medians pooled over passages of
        # different lengths could pair one passage's time with another's
        "ratio": statistics.median(pairs),
        "ratio_of_medians": statistics.median(times["kvzip"]) / statistics.median(times["plain"]),
        "tokens_read_ratio": (2 * tokens + prompt) / tokens,
        "repeat_prompt_tokens": prompt,
        "chunk": kvzip.chunk,
        "meta": {
            **results_meta({**vars(args), "questions": None}),
            "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "load": os.getloadavg(),
        },
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(
        f"{lm.ref}: plain {result['plain_s_median']:.3f} s, plain + kvzip {result['kvzip_s_median']:.3f} s per passage "
        f"-> {result['ratio']:.2f}x (tokens read {result['tokens_read_ratio']:.2f}x)"
    )


if __name__ == "__main__":
    main()
