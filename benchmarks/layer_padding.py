"""What per-layer padding buys the dense runtime path on a ``global:`` store (issue 16's leftover).

A ``global:`` eviction spends its budget unevenly across layers, and a passage's rows are padded
per head. ``runtime.assemble`` pads each layer only to its own longest head
(``segment_rows``); the layout it replaced padded every layer to the passage's longest layer.
For the first ``--questions`` evenly spaced SQuAD-dev questions (top-3 over a store of the
first ``--passages`` passages, built here once with ``global:kvzip`` at ``--ratio`` + int4),
measured side by side in one process, the two layouts alternating first per question:

* rows each layer's attention reads over the passages, summed over layers (what the dense
  path's attention work and the assembled cache's memory scale with), against the rows a head
  keeps on average;
* TTFT of ``Engine.answer_cached`` (dense backend, one new token: load, dequantize, assemble,
  prefill the question), medians; and whether both layouts chose the same first token.

The replaced layout is reproduced by swapping ``segment_rows`` for one that gives every layer
the passage's padded width (its rows are the same tensors, only the extra padding differs).

    python benchmarks/layer_padding.py --model smollm2-135m --out docs/results/layer_padding_smollm2.json
"""

from __future__ import annotations

import argparse
import json
import statistics
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

import ragcompress.runtime.assemble as assemble_module
import ragcompress.runtime.cache_pass as cache_pass_module
from ragcompress.indexing import IndexConfig, index
from ragcompress.kv import PassageKV
from ragcompress.runtime.engine import Engine
from ragcompress.runtime.options import AnswerOptions

from common import SQUAD, pick_questions, results_meta

PER_LAYER = assemble_module.segment_rows


def padded_to_longest_layer(prefix: PassageKV, segments: list[PassageKV]) -> torch.Tensor:
    """The replaced layout: every layer of a passage as wide as its padded tensor (its longest
    layer's longest head)."""
    layers, prefix_rows = prefix.keys.shape[0], prefix.keys.shape[2]
    starts = torch.full((len(segments) + 1, layers), prefix_rows, dtype=torch.long)
    for j, kv in enumerate(segments):
        starts[j + 1] = starts[j] + kv.keys.shape[2]
    return starts


@contextmanager
def layout(rows: Any):
    assemble_module.segment_rows, cache_pass_module.segment_rows = rows, rows
    try:
        yield
    finally:
        assemble_module.segment_rows, cache_pass_module.segment_rows = PER_LAYER, PER_LAYER


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--passages", type=int, default=40)
    parser.add_argument("--questions", type=int, default=20)
    parser.add_argument("--ratio", type=float, default=0.25)
    parser.add_argument("--work", type=Path, default=Path("runs/layer_padding"))
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    store = args.work / f"{Path(args.model).name}-global-kvzip-{args.ratio}-int4"
    if not (store / "manifest.json").is_file():
        sample = args.work / f"passages-{args.passages}.jsonl"
        sample.parent.mkdir(parents=True, exist_ok=True)
        sample.write_text("".join((SQUAD / "passages.jsonl").read_text().splitlines(True)[: args.passages]))
        config = IndexConfig(method="global:kvzip", ratio=args.ratio, quant="int4", keep_first=1, keep_last=0)
        index(sample, store, model=args.model, config=config, progress=True)

    options = AnswerOptions(max_new_tokens=1, backend="dense")
    layouts = {"per_layer": PER_LAYER, "longest_layer": padded_to_longest_layer}
    ttft: dict[str, list[float]] = {name: [] for name in layouts}
    rows: dict[str, int] = dict.fromkeys(layouts, 0)
    kept = same = 0
    with Engine.open(store, options=options) as engine:
        engine.warm_up()
        questions = pick_questions(SQUAD / "questions.jsonl", args.questions)
        for i, question in enumerate(questions):
            entries = engine.retrieve(question.question, 3)
            segments = [engine.store.load_kv(e) for e in entries]
            kept += sum(int(kv.lengths.sum()) for kv in segments) // engine.prefix.lengths.shape[1]
            first = {}
            for name in list(layouts)[:: 1 if i % 2 == 0 else -1]:
                with layout(layouts[name]):
                    starts = layouts[name](engine.prefix, segments)
                    rows[name] += int((starts[-1] - starts[0]).sum())
                    answer = engine.answer_cached(question.question, entries, options)
                ttft[name].append(answer.ttft_s)
                first[name] = answer.token_ids[:1]
            same += first["per_layer"] == first["longest_layer"]

    result = {
        "meta": results_meta({**vars(args), "questions": len(questions), "repeats": 1}),
        "store": str(store),
        "method": f"global:kvzip@{args.ratio}/int4",
        "rows_per_layer_layout": rows["per_layer"],
        "rows_longest_layer_layout": rows["longest_layer"],
        "rows_kept_mean_per_head": kept,
        "rows_ratio": rows["per_layer"] / rows["longest_layer"],
        "ttft_median_s": {name: statistics.median(v) for name, v in ttft.items()},
        "ttft_ratio": statistics.median(ttft["per_layer"]) / statistics.median(ttft["longest_layer"]),
        "same_first_token": same,
    }
    print(json.dumps(result, indent=1))
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
