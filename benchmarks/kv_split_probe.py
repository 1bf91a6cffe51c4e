"""Would int4 keys with int2 values (or the reverse) beat int2 for both at the same bytes?

A probe run before the store format gave values their own width (``index --value-quant``): each
passage's cache is evicted by ``global:kvzip`` as the frontier evicts it, its keys rounded through
the store's rank-32 latents at ``KBITS`` and its values through the store's value quantizer at
``VBITS`` (``LowRankBasis.round_trip``, ``quantize_dequantize``: the codec's own functions), and
the result is stored fp16 without a basis, so answers and KL are what a split-width store gives,
up to fp16 rounding. Bytes are modelled (codes + fp16 scale/min per group of 32, positions not
counted), enough to compare rows at equal bytes; the real stores' figures come from
``lowrank_frontier.py`` rows such as ``global:kvzip@0.21/int4v2/r32k``. Row names:
``RATIO:KBITS:VBITS``. ``0.25:2:2`` must reproduce the real int2 store's KL (it does, exactly).

    python benchmarks/kv_split_probe.py --rows 0.25:2:2 0.205:4:2 0.173:2:4 0.25:4:2 \\
        --out docs/results/kv_split_probe_qwen.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path
from typing import Any

import lowrank_frontier as lf
import torch

from ragcompress.compressors.adaptive import GlobalBudget
from ragcompress.kv import ModelShape, PassageKV
from ragcompress.kv.lowrank import LowRankBasis, RankSpec
from ragcompress.kv.quant import QuantConfig, quantize_dequantize

from common import model_slug, row_run

# bytes per kept row and head at head_dim 64: rank-32 key latents, values whole; groups of 32
BYTES = {("k", 2): 32 * 2 / 8 + 32 * 4 / 32, ("k", 4): 32 * 4 / 8 + 32 * 4 / 32}
BYTES |= {("v", 2): 64 * 2 / 8 + 2 * 4, ("v", 4): 64 * 4 / 8 + 2 * 4}


def rounded_caches(
    frontier: lf.Frontier, basis: LowRankBasis, ratio: float, key_bits: int, value_bits: int
) -> dict[str, PassageKV]:
    """Every needed passage's cache evicted at ``ratio`` and rounded at the given widths."""
    scores = frontier.scores("kvzip")
    compressor = lf.RowSpec.parse(f"global:kvzip@{ratio}/fp16/-").index_config().compressor()
    assert isinstance(compressor, GlobalBudget)
    out = {}
    for pid, kv in frontier.full().items():
        kept = compressor.select(kv, scores[pid])
        keys = basis.round_trip("k", kept.keys, kept.lengths, QuantConfig(f"int{key_bits}"))
        values = quantize_dequantize("v", kept.values, kept.lengths, QuantConfig(f"int{value_bits}"))
        out[pid] = dataclasses.replace(kept, keys=keys, values=values)
    return out


class ProbeFrontier(lf.Frontier):
    """A frontier whose "full" caches are given ones (already evicted and rounded), so that its
    ``none@1/fp16/-`` row stores them as they are."""

    given: dict[str, PassageKV] | None = None

    def full(self, adapted: bool = False) -> dict[str, PassageKV]:
        return self.given if self.given is not None else super().full(adapted)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="qwen2.5-coder-0.5b")
    parser.add_argument("--split", default="dev", choices=("dev", "eval"))
    parser.add_argument("--questions", type=int, default=24)
    parser.add_argument("--kl-questions", type=int, default=12)
    parser.add_argument("--rows", nargs="+", required=True, help="RATIO:KBITS:VBITS")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    frontier = ProbeFrontier(
        argparse.Namespace(
            model=args.model,
            split=args.split,
            questions=args.questions,
            top_k=3,
            kl_questions=args.kl_questions,
            calibration_articles=["Yuan_dynasty", "Genghis_Khan"],
            calibration_passages=64,
            eval_articles=None,
            outside=0,
            workdir=Path("runs/lowrank") / model_slug(args.model),
            adaptor=None,
        )
    )
    basis = frontier.basis(RankSpec(rank=32, values=False))
    path = frontier.workdir / "full.pt"  # written by a lowrank_frontier.py run of the split
    reference = lf.checked_reference(torch.load(path), frontier, path)
    fp16 = float(ModelShape.from_config(frontier.lm.config).fp16_bytes_per_token)
    results: dict[str, Any] = json.loads(args.out.read_text()) if args.out.is_file() else {}
    for name in args.rows:
        if name in results:
            continue
        ratio, key_bits, value_bits = float(name.split(":")[0]), *map(int, name.split(":")[1:])
        frontier.given = rounded_caches(frontier, basis, ratio, key_bits, value_bits)
        result, _ = lf.measure(frontier, lf.RowSpec.parse("none@1/fp16/-"), reference)
        caches = list(frontier.given.values())
        frontier.given = None
        kept = sum(int(c.lengths.sum()) for c in caches)
        tokens = sum(c.num_tokens for c in caches)
        modelled = kept * (BYTES["k", key_bits] + BYTES["v", value_bits]) / tokens
        results[name] = {k: result[k] for k in ("sub_em", "agreement", "kl_full_answer", "kl_questions", "answers")}
        results[name] |= {"modelled_bytes_per_token": modelled, "compression_modelled": fp16 / modelled}
        results[name]["run"] = row_run()  # rows kept across runs
        print(name, {k: v for k, v in results[name].items() if k != "answers"}, flush=True)
        args.out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
