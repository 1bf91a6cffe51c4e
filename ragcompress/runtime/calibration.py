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

:func:`calibrate_temperature` chooses ``T`` per store without labels (minimum KL to full
prefill on the store's own passages under a generic probe question); ``ragcompress calibrate``
records it in the manifest and every stored-cache answer applies it unless told otherwise
(``AnswerOptions(calibrate=False)``, or a recompute config that sets its own temperature).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


@torch.inference_mode()
def scale_context_keys(cache: Any, start_row: int, stop_row: int | list[int], temperature: float) -> None:
    """Divide the logits against cache rows ``[start_row, stop_row)`` by ``temperature``.

    cache: a transformers cache whose layers hold ``keys [1, kv_heads, T, head_dim]`` (modified
    in place); ``stop_row`` is one row for every layer or one per layer (layers padded to
    different lengths, ``runtime.assemble``). ``temperature == 1`` leaves it untouched.
    """
    if temperature <= 0.0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if temperature == 1.0:
        return
    stops = stop_row if isinstance(stop_row, list) else [stop_row] * len(cache.layers)
    for layer, stop in zip(cache.layers, stops, strict=True):
        if stop > start_row:
            layer.keys[:, :, start_row:stop].mul_(1.0 / temperature)


# A generic, label-free probe: calibration must not see the questions it will be judged on.
PROBE_QUESTION = "What are these passages about?"
TEMPERATURE_GRID = (0.9, 0.95, 0.98, 1.0, 1.02, 1.05, 1.1)


@dataclass(frozen=True)
class TemperatureCalibration:
    """The APE temperature that brings stored-cache answers closest to full prefill on a store.

    temperature: the chosen value (lowest mean KL; 1.0 when nothing beats identity)
    kl:          mean KL(full || cached) per candidate temperature, nats per token
    samples:     how many passage groups it was measured on
    """

    temperature: float
    kl: dict[str, float]
    samples: int

    def as_dict(self) -> dict[str, Any]:
        return {"temperature": self.temperature, "kl": self.kl, "samples": self.samples, "probe": PROBE_QUESTION}


def calibrate_temperature(
    engine: Any,
    *,
    samples: int = 16,
    top_k: int = 3,
    grid: tuple[float, ...] = TEMPERATURE_GRID,
    answer_tokens: int = 8,
    progress: bool = False,
) -> TemperatureCalibration:
    """Choose the temperature by KL to full prefill, without labels (APE's follow-ups).

    For ``samples`` evenly spaced passages of the store, the ``top_k`` passages nearest its own
    text (as retrieval would group them) are read with a generic probe question: full prefill
    gives the reference continuation (``answer_tokens`` greedy tokens) and its next-token
    distributions; every candidate temperature is then scored by the KL of the stored-cache
    distributions along that continuation. No question or answer of any dataset is used.
    """
    from ragcompress.errors import InputError
    from ragcompress.evaluation import evenly_spaced
    from ragcompress.runtime.generate import kl_per_position, rewind, run_keeping_request, teacher_forced_logprobs
    from ragcompress.runtime.recompute import RecomputeConfig

    if 1.0 not in grid:
        grid = (*grid, 1.0)
    entries = sorted(engine.store.catalogue.entries(), key=lambda e: e.id)
    if not entries:
        raise InputError(f"store {engine.store.path} holds no passages to calibrate on; index some first")
    # spread over the whole store (entries[::len // samples][:samples] left the tail out: the last
    # 22 of 173 SQuAD passages, and every passage past the first `samples` of a store under twice that)
    anchors = evenly_spaced(entries, samples)
    totals = {t: 0.0 for t in grid}
    options = engine.options.replace(max_new_tokens=answer_tokens, backend="dense")
    iterator: Any = anchors
    if progress:
        from tqdm import tqdm

        iterator = tqdm(anchors, desc="calibrating", unit="group")
    for anchor in iterator:
        group = engine.retrieve(anchor.text, top_k)
        # One full prefill: decode the reference answer, then rewind its cache to read the answer
        # back with every position's logits (not a second prefill of the whole prompt).
        generation, prepared, rows = run_keeping_request(engine.stream_full(PROBE_QUESTION, group, options))
        answer = generation.token_ids
        full = teacher_forced_logprobs(engine.lm.model, rewind(prepared, rows), answer, keep=len(answer) + 1)
        for t in grid:
            config = RecomputeConfig(temperature=t)
            prepared = engine.prepare(PROBE_QUESTION, group, options.replace(recompute=config, calibrate=False))
            logp = teacher_forced_logprobs(engine.lm.model, prepared, answer, keep=len(answer) + 1)
            totals[t] += float(kl_per_position(full, logp).mean())
    kl = {f"{t:g}": totals[t] / len(anchors) for t in grid}
    best = min(grid, key=lambda t: (totals[t], abs(t - 1.0)))
    return TemperatureCalibration(best, kl, len(anchors))
