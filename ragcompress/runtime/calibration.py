"""Attention calibration of independently encoded passages, without recompute (APE).

Passages encoded in parallel and read side by side spread the question's attention over more
keys than any passage saw when it was encoded, and the attention distribution grows flatter
(higher entropy: "Attention Entropy is a Key Factor", Zhang et al. 2025). APE (Yang et al.
2025, §4) counters this with a temperature ``T`` on the logits of the context tokens: the
question's and the answer's logits against passage keys are divided by ``T`` (``T < 1``
sharpens). A logit is ``q · k / sqrt(d)``, so scaling the rotated passage keys by ``1/T`` in
the assembled cache applies the temperature to every later query, at no cost per step, and
leaves the prefix (the shared attention sink) and the question's own tokens untouched.
APE's second knob, a scale factor on the context's total attention mass, needs an additive
logit bias per key, which the SDPA path used here does not carry; it is not offered.
"""

from __future__ import annotations

from typing import Any

import torch


@torch.inference_mode()
def scale_context_keys(cache: Any, start_row: int, stop_row: int, temperature: float) -> None:
    """Divide the logits against cache rows ``[start_row, stop_row)`` by ``temperature``.

    cache: a transformers cache whose layers hold ``keys [1, kv_heads, T, head_dim]`` (modified
    in place). ``temperature == 1`` leaves it untouched.
    """
    if temperature <= 0.0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if temperature == 1.0 or stop_row <= start_row:
        return
    for layer in cache.layers:
        layer.keys[:, :, start_row:stop_row].mul_(1.0 / temperature)
