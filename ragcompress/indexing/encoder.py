"""Offline encoding: the prefix once, then every passage as a continuation of it.

Each passage is run through the model with the shared prefix cache in front of it, at positions
``len(prefix) …``, exactly as it would sit directly after the prefix in a full prompt. Passages
are batched with right padding: causal attention means real tokens never see the padding that
follows them, so a batch computes the same caches as one passage at a time.

With an ``adaptor`` (``ragcompress.distill``, KV-Distill) passages are encoded with its LoRA
factors merged into the weights for the call (kind ``forward``), or their caches are corrected
from the inputs of the key/value projections of the base forward (kind ``cache``); the prefix,
like everything at query time, is the base model's.

Where the model is (``load_model(device=...)``) the forwards run; what they produce,
:class:`~ragcompress.kv.PassageKV` and the projection inputs an adaptor reads, comes back to the
CPU, where compression, quantization and the store's writer work. So on a GPU the model's
forwards (the costly part) run there and everything after them is as on the CPU.
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING

import torch
from transformers import DynamicCache

from ragcompress.kv import PassageKV
from ragcompress.kv.cache import build_dynamic_cache, cache_layers
from ragcompress.kv.rope import Rotary
from ragcompress.models import LoadedModel
from ragcompress.prompt import PromptTemplate, PromptTokens

if TYPE_CHECKING:
    from ragcompress.distill.adaptor import Adaptor


class PassageEncoder:
    """Computes the prefix cache once and passage caches after it (keys un-rotated)."""

    def __init__(self, lm: LoadedModel, template: PromptTemplate, adaptor: Adaptor | None = None) -> None:
        self.lm = lm
        self.adaptor = adaptor
        if adaptor is not None:
            adaptor.check_model(lm.fingerprint, lm.ref)
        # a forward adaptor folded into the projections it adapts, once (forward_capturing runs
        # the model with these weights swapped in for the call)
        self._merged = (
            adaptor.merged_weights(lm.model, lm.model.model)
            if adaptor is not None and adaptor.kind == "forward"
            else None
        )
        self.tokens = PromptTokens(template, lm.tokenizer)
        self.rotary = Rotary(lm.model)
        self.prefix_ids = self.tokens.prefix()
        with torch.inference_mode():
            cache = DynamicCache()  # full layers: a sliding-window layer must keep the prefix whole too
            lm.model(torch.tensor([self.prefix_ids], device=lm.model.device), cache=cache, use_cache=True)
            rotated = cache_layers(cache)
        # plain tensors, not inference tensors: training runs passage forwards with autograd on
        self._prefix_rotated = [(k.clone(), v.clone()) for k, v in rotated]
        self.prefix_kv = self._unrotate_full(self._prefix_rotated, start=0, batch_index=0, length=len(self.prefix_ids))

    @property
    def device(self) -> torch.device:
        """Where the model's forwards run; every :class:`PassageKV` this encoder returns is on the CPU."""
        return self.lm.model.device

    @property
    def prefix_len(self) -> int:
        return len(self.prefix_ids)

    def without_adaptor(self) -> PassageEncoder:
        """This encoder as the base model's. The prefix is the base model's with or without an
        adaptor (an adaptor encodes passages only), so it is shared rather than computed again."""
        if self.adaptor is None:
            return self
        base = copy.copy(self)
        base.adaptor, base._merged = None, None
        return base

    def _unrotate_full(
        self, layers: list[tuple[torch.Tensor, torch.Tensor]], start: int, batch_index: int, length: int
    ) -> PassageKV:
        keys, values = [], []
        positions = torch.arange(start, start + length, device=self.device)
        for layer_idx, (k, v) in enumerate(layers):
            k = k[batch_index, :, start : start + length]
            keys.append(self.rotary.unrotate(k, positions.expand(k.shape[0], -1), layer_idx))
            values.append(v[batch_index, :, start : start + length])
        # to the CPU: a no-op there; from a GPU, the passage's rows only
        return PassageKV.full(torch.stack(keys).cpu().contiguous(), torch.stack(values).cpu().contiguous())

    @torch.inference_mode()
    def encode(self, passages: list[list[int]], contexts: list[list[int]] | None = None) -> list[PassageKV]:
        """Full caches of a batch of tokenized passages, each as if right after the prefix, or,
        with ``contexts``, right after the prefix and its context tokens (neighbour-conditioned
        encoding, :mod:`ragcompress.indexing.neighbours`): only the passage's own rows are kept,
        keys un-rotated from the positions they were computed at."""
        if not passages:
            return []
        if contexts is None or not any(contexts):
            contexts = [[] for _ in passages]
        if len(contexts) != len(passages):
            raise ValueError(f"{len(contexts)} contexts for {len(passages)} passages")
        layers, inputs = self.forward_capturing([ctx + ids for ctx, ids in zip(contexts, passages, strict=True)])
        caches = []
        for row, (ctx, ids) in enumerate(zip(contexts, passages, strict=True)):
            kv = self._unrotate_full(layers, start=self.prefix_len + len(ctx), batch_index=row, length=len(ids))
            if self.adaptor is not None and inputs is not None:
                kv = self.adaptor.apply(kv, inputs[:, row, len(ctx) : len(ctx) + len(ids)])
            caches.append(kv)
        return caches

    @torch.inference_mode()
    def forward_capturing(
        self, passages: list[list[int]]
    ) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], torch.Tensor | None]:
        """:meth:`forward` (with a ``forward`` adaptor's merged weights), and with a ``cache``
        adaptor the inputs of every layer's key/value projections ``[layers, batch, n_max,
        hidden]`` (what that adaptor corrects the cache from)."""
        if self.adaptor is None:
            return self.forward(passages), None
        if self._merged is not None:
            return self.forward_with_grad(passages, self._merged), None
        from ragcompress.distill.adaptor import ProjectionInputs

        with ProjectionInputs(self.lm.model) as captured:
            layers = self.forward(passages)
        return layers, torch.stack([x for x in captured.inputs if x is not None]).cpu()

    @torch.inference_mode()
    def forward(self, passages: list[list[int]]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The model's plain forward over a batch of passages after the cached prefix (right
        padding); per layer the batch's rotated ``(keys, values)`` ``[batch, kv_heads, P + n, d]``."""
        return self.forward_with_grad(passages)

    def forward_with_grad(
        self, passages: list[list[int]], weights: dict[str, torch.Tensor] | None = None
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """:meth:`forward` under the caller's autograd mode (training backpropagates through it);
        ``weights`` replace the decoder's parameters of those names for this call only.

        Not thread-safe with ``weights``: ``torch.func.functional_call`` swaps them into the
        shared module for the duration of the call, so a forward of the same model object from
        another thread at that moment reads adapted weights. Index with an adaptor on a model
        object of its own when queries run concurrently in the same process."""
        batch, n_max, p = len(passages), max(len(ids) for ids in passages), self.prefix_len
        pad_id = self.lm.tokenizer.pad_token_id or 0
        input_ids = torch.full((batch, n_max), pad_id, dtype=torch.long)
        attention = torch.zeros((batch, p + n_max), dtype=torch.long)
        attention[:, :p] = 1
        for row, ids in enumerate(passages):
            input_ids[row, : len(ids)] = torch.tensor(ids)
            attention[row, p : p + len(ids)] = 1
        input_ids, attention = input_ids.to(self.device), attention.to(self.device)
        cache = build_dynamic_cache(
            self.lm.config,
            [k.expand(batch, -1, -1, -1).contiguous() for k, _ in self._prefix_rotated],
            [v.expand(batch, -1, -1, -1).contiguous() for _, v in self._prefix_rotated],
            all_rows=True,  # a sliding-window layer must keep the passage's every row
        )
        position_ids = torch.arange(p, p + n_max, device=self.device).unsqueeze(0).expand(batch, -1)
        inputs = dict(
            input_ids=input_ids, attention_mask=attention, position_ids=position_ids, cache=cache, use_cache=True
        )
        if weights is None:
            self.lm.model.model(**inputs)
        else:
            torch.func.functional_call(self.lm.model.model, weights, args=(), kwargs=inputs, strict=False)
        return cache_layers(cache)
