"""Batched greedy decoding: several prepared requests share every forward pass.

Why: on a CPU one decoding step of a small model costs about the same for 1 row as for 8, because
it is bound by reading the weights, not by arithmetic; so concurrent questions decoded together
raise throughput (``ragcompress serve``, docs/serve.md). The unbatched path
(:class:`~ragcompress.runtime.generate.TokenStream`) stays the reference: a batched request must
produce the same greedy tokens (tests/test_batch.py).

Layout, per layer, of the batch cache ``[B, kv_heads, columns, head_dim]``:

* columns ``0 .. C-1``: request ``i``'s prepared cache (prefix and passages, ``L_i`` rows) copied
  to the left, its columns ``L_i .. C-1`` padding (``C`` is the longest ``L_i``);
* columns ``C .. C+Q-1``: the questions' suffixes, prefilled together in one forward, each
  *right-aligned* (left-padded to the longest, ``Q``) so every request's last suffix token sits in
  the last column and one row of logits per request is all the prefill computes;
* then one column per decoding step for every request.

A 2-D attention mask ``[B, columns]`` (transformers' padding mask) hides the padding columns and
positions are passed per request, so each request attends to exactly its own tokens at its own
RoPE positions, as in the unbatched path; only the float summation order differs. A request that
has finished (stop token or its ``max_new_tokens``) keeps a row until the batch ends (its tokens
are discarded): shrinking the batch would copy every remaining cache, which costs more than the
spare row does on this hardware.

Only plain assembled caches batch (:func:`batchable`): per-head eviction masks, packed segments
and a recompute pass that already prefilled the question run through the unbatched path.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from ragcompress.kv.cache import build_preallocated_cache
from ragcompress.runtime.attention import sliding_window
from ragcompress.runtime.generate import Prepared, finished


def batchable(prepared: Prepared, window: int | None = None, max_new_tokens: int = 0) -> bool:
    """Whether ``prepared`` can share a batch: a dense cache and no extra attention inputs, and
    on a model with sliding-window layers (``window``: ``runtime.attention.sliding_window``) a
    prompt and answer the window covers (the batch lays every layer out like the first, which a
    sliding layer that dropped rows would break)."""
    plain = prepared.backend == "dense" and not prepared.attention_kwargs and prepared.first_logits is None
    span = prepared.position + len(prepared.input_ids) + max_new_tokens
    return plain and (window is None or span < window)


def fits_one_batch(requests: list[Prepared], max_new_tokens: list[int], window: int | None) -> bool:
    """Whether ``requests`` can share one batch on a model whose sliding layers reach ``window``
    columns back (any, without a window). The batch lays request ``i``'s cache in columns
    ``0..L_i-1`` and every question and answer after the longest cache and the longest question,
    and transformers applies the window by column: a short request beside a long one would lose
    its prefix and passages once its answer's columns passed the window, though alone it never
    does (each request passing :func:`batchable` is not enough)."""
    if window is None or not requests:
        return True
    rows = max(p.cache.layers[0].keys.shape[-2] for p in requests)
    return rows + max(len(p.input_ids) for p in requests) + max(max_new_tokens) < window


@dataclass
class _Row:
    """One request's state inside the batch."""

    max_new_tokens: int
    position: int  # RoPE position of its next input token
    token: int = -1  # the token to feed next (greedy choice of the last step)
    generated: int = 0
    done: bool = False
    ttft_s: float | None = None


class BatchStream:
    """Greedy tokens of several prepared requests, decoded in one batch.

    Iterating yields ``(i, token)`` as tokens are chosen, and ``(i, None)`` once request ``i``
    has finished (stop id or ``max_new_tokens``); a request :meth:`drop` ends gets no ``(i, None)``,
    even when dropped at its last token (its caller, which dropped it, has finished it). ``ttft_s[i]`` counts from
    ``started`` (when the caller began preparing the batch) to request ``i``'s first token.
    """

    def __init__(
        self,
        model: Any,
        requests: list[Prepared],
        max_new_tokens: list[int],
        stop_ids: set[int],
        started: float | None = None,
    ) -> None:
        if not requests or len(requests) != len(max_new_tokens):
            raise ValueError("a batch needs requests, each with its max_new_tokens")
        window = sliding_window(model.config)
        for prepared, steps in zip(requests, max_new_tokens, strict=True):
            if not batchable(prepared, window, steps):
                raise ValueError(
                    f"a {prepared.backend} request with extra attention inputs, or longer than the model's "
                    "sliding window, cannot be batched"
                )
        if not fits_one_batch(requests, max_new_tokens, window):
            raise ValueError(
                f"these requests' longest cache, question and answer together outgrow the model's sliding window "
                f"({window}): batched, the shorter ones would lose their context; decode them apart"
            )
        self.model = model
        self.requests = requests
        self.stop_ids = stop_ids
        self.started = time.perf_counter() if started is None else started
        self.rows = [_Row(n, p.position) for p, n in zip(requests, max_new_tokens, strict=True)]

    @property
    def ttft_s(self) -> list[float | None]:
        return [row.ttft_s for row in self.rows]

    def drop(self, i: int) -> None:
        """Stop generating for request ``i`` (its client went away)."""
        self.rows[i].done = True

    def __iter__(self) -> Iterator[tuple[int, int | None]]:
        with torch.inference_mode():
            yield from self._run()

    def _run(self) -> Iterator[tuple[int, int | None]]:
        device = self.model.device
        batch = len(self.requests)
        caches = [p.cache.layers for p in self.requests]
        context = [layers[0].keys.shape[-2] for layers in caches]
        suffixes = [p.input_ids for p in self.requests]
        if any(not ids for ids in suffixes):
            raise ValueError("every batched request needs tokens to prefill")
        width, longest = max(context), max(len(ids) for ids in suffixes)
        steps = max(row.max_new_tokens for row in self.rows)
        capacity = width + longest + steps

        # The batch cache: every request's rows copied to the left of its own batch row.
        key_buffers, value_buffers = [], []
        for layer in range(len(caches[0])):
            first = caches[0][layer].keys
            shape = (batch, first.shape[1], capacity, first.shape[3])
            keys = torch.zeros(shape, dtype=first.dtype, device=device)
            values = torch.zeros(shape, dtype=first.dtype, device=device)
            for i, layers in enumerate(caches):
                keys[i, :, : context[i]] = layers[layer].keys[0]
                values[i, :, : context[i]] = layers[layer].values[0]
            key_buffers.append(keys)
            value_buffers.append(values)
        cache = build_preallocated_cache(self.model.config, key_buffers, value_buffers, width)
        self.requests = []  # the per-request caches are copied; let them go

        mask = torch.zeros((batch, capacity), dtype=torch.long, device=device)
        input_ids = torch.zeros((batch, longest), dtype=torch.long, device=device)
        positions = torch.zeros((batch, longest), dtype=torch.long, device=device)
        for i, ids in enumerate(suffixes):
            pad = longest - len(ids)
            mask[i, : context[i]] = 1
            mask[i, width + pad : width + longest] = 1
            input_ids[i, pad:] = torch.tensor(ids)
            start = self.rows[i].position
            # padding query rows sit at the request's first suffix position; nothing attends to them
            positions[i] = start
            positions[i, pad:] = torch.arange(start, start + len(ids))
            self.rows[i].position = start + len(ids)
        logits = finished(self._forward(input_ids, positions, cache, mask[:, : width + longest]))
        column = width + longest
        first = time.perf_counter() - self.started
        for row in self.rows:
            row.ttft_s = first

        while True:
            choices = logits.argmax(dim=-1).tolist()
            for i, row in enumerate(self.rows):
                if row.done:
                    continue
                token = int(choices[i])
                if token in self.stop_ids:
                    row.done = True
                    yield i, None
                    continue
                row.generated += 1
                row.token = token
                yield i, token
                if row.done:  # dropped while its caller handled the token: the caller has finished it
                    continue
                if row.generated >= row.max_new_tokens:
                    row.done = True
                    yield i, None
            if all(row.done for row in self.rows) or column >= capacity:
                return
            step_ids = torch.tensor([[max(row.token, 0)] for row in self.rows], device=device)
            step_positions = torch.tensor([[row.position] for row in self.rows], device=device)
            for row in self.rows:
                row.position += 1
            mask[:, column] = 1
            column += 1
            logits = self._forward(step_ids, step_positions, cache, mask[:, :column])

    def _forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, cache: Any, mask: torch.Tensor
    ) -> torch.Tensor:
        """Logits ``[B, vocab]`` of each row's last input token."""
        out = self.model(
            input_ids=input_ids,
            position_ids=positions,
            cache=cache,
            attention_mask=mask,
            use_cache=True,
            logits_to_keep=1,
        )
        logits: torch.Tensor = out.logits[:, -1]
        return logits
