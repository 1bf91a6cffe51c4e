"""Streaming greedy decoding: the loop of ``ragcompress.runtime.generate.greedy_decode``, yielding
text as it is produced (used by the streaming synthesizer and the streaming baseline LLM)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any


def stream_greedy(
    model: Any,
    tokenizer: Any,
    input_ids: list[int],
    cache: Any,
    start_position: int,
    max_new_tokens: int,
    stop_ids: set[int],
    t0: float,
    timings: dict[str, float],
    **attention_kwargs: Any,
) -> Iterator[str]:
    """Yield text deltas whose concatenation equals the stripped decoded answer.

    ``timings`` receives ``ttft_s`` after the first token and ``total_s`` at the end. Whitespace
    at either end is held back, and so is an incomplete multi-byte character, so the stream and
    the non-streaming answer match exactly.
    """
    import torch

    from ragcompress.runtime.generate import forward_step

    generated: list[int] = []
    emitted = ""
    position = start_position
    step = torch.tensor([input_ids])
    while len(generated) < max_new_tokens:
        with torch.inference_mode():
            logits = forward_step(model, step, cache, position, **attention_kwargs)
        position += step.shape[1]
        token = int(logits.argmax())
        if not generated:
            timings["ttft_s"] = time.perf_counter() - t0
        if token in stop_ids:
            break
        generated.append(token)
        text = tokenizer.decode(generated, skip_special_tokens=True).strip()
        if text.startswith(emitted) and not text.endswith("\ufffd") and len(text) > len(emitted):
            yield text[len(emitted) :]
            emitted = text
        step = torch.tensor([[token]])
    final = tokenizer.decode(generated, skip_special_tokens=True).strip()
    if final.startswith(emitted) and len(final) > len(emitted):
        yield final[len(emitted) :]
    timings["total_s"] = time.perf_counter() - t0
