"""Greedy decoding with explicit positions, shared by the cached path and the full-prefill baseline.

The model's own ``generate`` infers positions from the cache length; with evicted tokens the
cache is shorter than the positions it covers, so positions are passed explicitly here
(gpt-fast style: ``prefill`` then ``decode_one_token`` in a loop).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class Generation:
    """Generated token ids and timings measured from the request's start ``t0``."""

    token_ids: list[int]
    ttft_s: float
    total_s: float


def stop_token_ids(tokenizer: Any, model: Any) -> set[int]:
    """EOS ids from the tokenizer and generation config, plus chat end-of-turn markers."""
    ids: set[int] = set()
    for source in (tokenizer.eos_token_id, getattr(model.generation_config, "eos_token_id", None)):
        if isinstance(source, int):
            ids.add(source)
        elif source:
            ids.update(source)
    for marker in ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|endoftext|>"):
        token = tokenizer.convert_tokens_to_ids(marker)
        if isinstance(token, int) and token != tokenizer.unk_token_id and token is not None:
            ids.add(token)
    return ids


def forward_step(
    model: Any, input_ids: torch.Tensor, cache: Any, start_position: int, **attention_kwargs: Any
) -> torch.Tensor:
    """Run ``input_ids [1, q]`` at positions ``start_position…``; returns last logits ``[vocab]``."""
    q = input_ids.shape[1]
    position_ids = torch.arange(start_position, start_position + q, device=model.device).unsqueeze(0)
    out = model(
        input_ids=input_ids.to(model.device),
        position_ids=position_ids,
        cache=cache,
        use_cache=True,
        logits_to_keep=1,
        **attention_kwargs,
    )
    return out.logits[0, -1]


@torch.inference_mode()
def greedy_decode(
    model: Any,
    input_ids: list[int],
    cache: Any,
    start_position: int,
    max_new_tokens: int,
    stop_ids: set[int],
    t0: float,
    **attention_kwargs: Any,
) -> Generation:
    """Prefill ``input_ids`` on top of ``cache`` and decode greedily until a stop id."""
    logits = forward_step(model, torch.tensor([input_ids]), cache, start_position, **attention_kwargs)
    return continue_greedy(
        model, logits, cache, start_position + len(input_ids), max_new_tokens, stop_ids, t0, **attention_kwargs
    )


@torch.inference_mode()
def continue_greedy(
    model: Any,
    logits: torch.Tensor,
    cache: Any,
    position: int,
    max_new_tokens: int,
    stop_ids: set[int],
    t0: float,
    **attention_kwargs: Any,
) -> Generation:
    """Greedy decoding from already computed first logits (the prefill's, or a recompute pass
    that carried the question); TTFT is taken when the first token is known."""
    token = int(logits.argmax())
    ttft = time.perf_counter() - t0
    generated = [token]
    while token not in stop_ids and len(generated) < max_new_tokens:
        logits = forward_step(model, torch.tensor([[token]]), cache, position, **attention_kwargs)
        token = int(logits.argmax())
        generated.append(token)
        position += 1
    if generated[-1] in stop_ids:
        generated.pop()
    return Generation(generated, ttft, time.perf_counter() - t0)
