"""What a peft LoRA adaptor *inside* the passage forward costs per training step on the CPU,
against a plain forward over the same passages measured in the same run (docs/distill.md: the
measurement that showed the forward kind affordable, after an earlier one under heavy
contention had made the cache-correction kind look necessary).

One step here is the expensive half of a KV-Distill step: ``--passages`` passages of
``--tokens`` tokens encoded by the model with LoRA (rank ``--rank`` on the key and value
projections), then a backward pass from their cached keys and values into the LoRA factors.
The student's question pass over the assembled cache (tens of tokens) comes on top. The
baseline (the model's inference forward over the same ids, LoRA off) alternates with the steps;
prints both medians over ``--repeats``, their ratio and the load average, and with ``--out``
writes them (docs/results/lora_step_cost_smollm2.json).

    .venv/bin/python benchmarks/lora_step_cost.py --model smollm2-135m --threads 2 --repeats 7 \
        --out docs/results/lora_step_cost_smollm2.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch

from common import results_meta


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--passages", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=160)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, help="results JSON (the medians, their ratio and the run's metadata)")
    args = parser.parse_args()

    from peft import LoraConfig, get_peft_model

    from ragcompress.models import load_model

    torch.set_num_threads(args.threads)
    lm = load_model(args.model)
    config = LoraConfig(r=args.rank, lora_alpha=2 * args.rank, target_modules=["k_proj", "v_proj"], lora_dropout=0.0)
    model = get_peft_model(lm.model, config)
    ids = torch.randint(
        0, lm.config.vocab_size, (args.passages, args.tokens), generator=torch.Generator().manual_seed(0)
    )
    load = os.getloadavg()[0]
    steps, plain = [], []

    def forward() -> None:
        start = time.perf_counter()
        with torch.inference_mode(), model.disable_adapter():
            model(ids, use_cache=True)
        plain.append(time.perf_counter() - start)

    def step_() -> None:
        start = time.perf_counter()
        out = model(ids, use_cache=True)
        cache = out.cache
        loss = sum(layer.keys.float().pow(2).mean() + layer.values.float().pow(2).mean() for layer in cache.layers)
        loss.backward()
        model.zero_grad(set_to_none=True)
        steps.append(time.perf_counter() - start)

    # alternating which runs first, so contention hits both alike; the first round is warm-up
    for round_ in range(args.repeats + 1):
        for run in (forward, step_) if round_ % 2 == 0 else (step_, forward):
            run()
    step, base = statistics.median(steps[1:]), statistics.median(plain[1:])
    print(
        f"{args.model}: LoRA r{args.rank} on k/v, {args.passages} x {args.tokens} tokens, forward + backward from the "
        f"cache: median {step:.2f} s vs plain inference forward {base:.2f} s = {step / base:.1f}x "
        f"over {args.repeats} rounds, {args.threads} threads, load average {load:.1f} at start"
    )
    if args.out:
        result = {
            "model": lm.ref,
            "rank": args.rank,
            "passages": args.passages,
            "tokens": args.tokens,
            "step_s_median": step,
            "plain_forward_s_median": base,
            "ratio": step / base,
            "meta": {**results_meta({**vars(args), "questions": None}), "load_at_start": load},
        }
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
