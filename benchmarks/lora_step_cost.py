"""What a peft LoRA adaptor *inside* the passage forward costs per training step on the CPU
(issue 15 asks for peft; docs/distill.md explains why the shipped adaptor corrects the cache
instead, from a measurement taken under heavy contention, which this re-measures).

One step here is the expensive half of a KV-Distill step: ``--passages`` passages of
``--tokens`` tokens encoded by the model with LoRA (rank ``--rank`` on the key and value
projections), then a backward pass from their cached keys and values into the LoRA factors.
The student's question pass over the assembled cache (tens of tokens) comes on top. Prints the
median of ``--repeats`` steps and the load average, and writes nothing.

    pip install -e ".[train]"   # peft
    .venv/bin/python benchmarks/lora_step_cost.py --model smollm2-135m --threads 2
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--passages", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=160)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
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
    times = []
    for _ in range(args.repeats + 1):
        start = time.perf_counter()
        cache = model(ids, use_cache=True).past_key_values
        loss = sum(layer.keys.float().pow(2).mean() + layer.values.float().pow(2).mean() for layer in cache.layers)
        loss.backward()
        model.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    print(
        f"{args.model}: LoRA r{args.rank} on k/v, {args.passages} x {args.tokens} tokens, forward + backward from the "
        f"cache: median {statistics.median(times[1:]):.2f} s over {args.repeats} steps (first {times[0]:.2f} s), "
        f"{args.threads} threads, load average {load:.1f} at start"
    )


if __name__ == "__main__":
    main()
