"""The teacher and the student of KV-Distill over one loaded model (:class:`Distiller`).

The teacher is the base model's full prefill of prefix + retrieved passages + question. The
student is what ragcompress serves: every passage encoded *alone* after the prefix (with the
adaptor's LoRA layers on, kind ``forward``; or its base cache corrected, kind ``cache``), its
cache moved to the position it takes in the prompt, and the frozen base model reading the
question over those caches. For a ``forward`` adaptor the backward pass runs through the
passages' forward (the LoRA parameters are peft's, injected into the model and on only while
passages are encoded). A compressed student reads its passages as the store will give them
back: evicted, quantized and projected straight-through.
"""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np
import torch
from transformers import DynamicCache

from ragcompress.compressors.base import CompressionContext, Compressor
from ragcompress.compressors.kvzip import REPEAT_PROMPT
from ragcompress.distill.adaptor import FACTORS, Adaptor, lora_active, remove_adapter
from ragcompress.distill.config import CONTINUATION
from ragcompress.distill.objective import Example, Losses, binned_kl
from ragcompress.errors import InputError
from ragcompress.indexing.encoder import PassageEncoder
from ragcompress.kv.cache import build_dynamic_cache
from ragcompress.kv.lowrank import LowRankBasis
from ragcompress.kv.quant import QuantConfig, quantize_dequantize
from ragcompress.models import LoadedModel
from ragcompress.prompt import PromptTemplate
from ragcompress.runtime.attention import KV_MASK_KWARG, per_head_window_problem, sliding_window
from ragcompress.runtime.generate import forward_logits, stop_token_ids

MAX_ANSWER = 10  # teacher's greedy answer length cap
TRAINING_ADAPTER = "ragcompress-training"  # peft adapter name of the LoRA layers being trained


def check_student_eviction(model_config: Any, compressor: Compressor | None) -> None:
    """Refuse to train for a store evicted per head on a sliding-window model: the runtime serves
    such a store only while a request's cache stays inside the window (``runtime.prepare``), and
    a student whose context outgrew it would have its row masks misaligned with its sliding
    layers' rows (:meth:`Distiller.student_logprobs` refuses such a context). ``train`` calls it
    before any work: which contexts training reads is known only once the teacher pass runs."""
    window = sliding_window(model_config)
    if compressor is not None and compressor.name != "none" and window is not None:
        raise InputError(
            f"--method {compressor.config()['method']}: {per_head_window_problem(window)} (a training context may); "
            "train this model's adaptor for a store of whole passages (--method none; --quant and --kv-rank apply)"
        )


def passage_key(ids: list[int]) -> str:
    """A passage's token ids as a short stable key (sha256)."""
    return hashlib.sha256(np.asarray(ids, dtype=np.int64).tobytes()).hexdigest()


class Distiller:
    """The teacher (base model, full prefill) and the student (adaptor-encoded, independently
    cached passages, base model reading the question) over one loaded model."""

    def __init__(
        self,
        lm: LoadedModel,
        adaptor: Adaptor,
        teacher_top: int = 64,
        continuation: int = CONTINUATION,
        compressor: Compressor | None = None,
        quant: QuantConfig | None = None,
    ) -> None:
        self.lm = lm
        self.model = lm.model
        self.template = PromptTemplate.from_tokenizer(lm.tokenizer)
        # the encoder corrects a cache adaptor's caches; a forward adaptor's LoRA layers are the
        # ones trained here (lora_name), not the encoder's copy of the initial ones
        self.encoder = PassageEncoder(lm, self.template, adaptor if adaptor.kind == "cache" else None)
        self.tokens = self.encoder.tokens
        self.rotary = self.encoder.rotary
        self.prefix_ids = self.encoder.prefix_ids
        self.prefix_layers = self.encoder._prefix_rotated
        self.adaptor = adaptor
        # kind "forward": the LoRA layers trained, injected under their own name; kind "cache":
        # the factors as parameters, shared with the adaptor's tensors
        self.lora_name = None
        if adaptor.kind == "forward":
            remove_adapter(self.model, TRAINING_ADAPTER)
            self.lora_name = adaptor.attach(self.model, TRAINING_ADAPTER)
        self._factors: dict[str, torch.nn.Parameter] = {}
        if self.lora_name is None:
            self._factors = {name: torch.nn.Parameter(adaptor.tensors[name].clone()) for name in FACTORS}
            adaptor.tensors.update(self._factors)
        # the student's compression (kind "forward"): which rows the store keeps, how it quantizes
        self.compressor = compressor if compressor is not None and compressor.name != "none" else None
        self.quant = quant if quant is not None and quant.scheme != "none" else None
        # a low-rank store's basis (train --kv-rank): fitted on this encoder's caches, so set after
        # construction (student_basis); TrainConfig refuses --kv-rank for kind "cache"
        self.basis: LowRankBasis | None = None
        if self.compressed and self.lora_name is None:
            raise InputError(
                f"a compressed student (--method / --quant / --kv-rank) is trained with a 'forward' adaptor, not one "
                f"of kind {adaptor.kind!r}; train it with --kind forward in another --out folder"
            )
        self._kept: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # passage_key -> kept_rows
        self.stop_ids = stop_token_ids(lm.tokenizer, lm.model)
        self.teacher_top = teacher_top
        self.continuation = continuation
        self._passages: dict[tuple[int, ...], tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    @property
    def compressed(self) -> bool:
        """Whether the student reads its passages as a compressed store gives them back."""
        return self.compressor is not None or self.quant is not None or self.basis is not None

    # the parameters trained -------------------------------------------------------------------

    def trainable(self) -> list[torch.nn.Parameter]:
        """What the optimizer updates (every base-model weight is frozen)."""
        for param in self.model.parameters():
            param.requires_grad_(False)
        if self.lora_name is None:
            params = list(self._factors.values())
        else:
            params = [p for n, p in self.model.named_parameters() if f".{self.lora_name}." in n]
        for param in params:
            param.requires_grad_(True)
        return params

    def factors(self) -> dict[str, torch.Tensor]:
        """The adaptor's current LoRA tensors (detached copies, adaptor naming)."""
        if self.lora_name is None:
            return {name: p.detach().clone() for name, p in self._factors.items()}
        from peft import get_peft_model_state_dict

        state = get_peft_model_state_dict(self.model, adapter_name=self.lora_name)
        return {name: t.detach().clone() for name, t in state.items()}

    def load_factors(self, tensors: dict[str, torch.Tensor]) -> None:
        """Set the trained tensors (resuming from a checkpoint)."""
        with torch.no_grad():
            if self.lora_name is None:
                for name, value in tensors.items():
                    self._factors[name].copy_(value)
                return
            from peft import set_peft_model_state_dict

            set_peft_model_state_dict(self.model, tensors, adapter_name=self.lora_name)

    # teacher ---------------------------------------------------------------------------------

    def _top(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        lp = logits.float().log_softmax(-1)
        values, idx = lp.topk(self.teacher_top, dim=-1)
        return idx, values

    def teacher_positions(self, passages: list[list[int]], suffix: list[int]) -> int:
        """The positions :meth:`teacher` (and the student, reading the same prompts) reaches with
        ``passages`` and the question ``suffix``: the prefix, the passages, then the longer of the
        question with up to ``MAX_ANSWER`` answer tokens (counted in full, as the runtime counts
        ``max_new_tokens``) and the reconstruction prompt with its continuation. What a run
        checks against the model's positions before any teacher pass (``teacher.check_positions``)."""
        context = len(self.prefix_ids) + sum(len(ids) for ids in passages)
        continuation = len(self.tokens.suffix(REPEAT_PROMPT)) + min(self.continuation, len(passages[-1]))
        return context + max(len(suffix) + MAX_ANSWER, continuation)

    @torch.no_grad()
    def teacher(self, qid: str, passages: list[list[int]], question: str, keep_full: bool = False) -> Example:
        """The base model's full prefill of prefix + passages, read once (its cache is cropped
        back to the passages for the second objective): greedy answer and top tokens. The prompt
        is not checked here: every example a run or a benchmark computes comes from
        ``teacher.plan_examples``, which checks them all before the first of these passes."""
        context = list(self.prefix_ids) + [t for ids in passages for t in ids]
        # every layer keeps every row (the model's masks still apply a sliding window): a sliding
        # layer past its window drops the rows the crop below goes back to
        cache = DynamicCache()
        self.model(input_ids=torch.tensor([context]), cache=cache, use_cache=True, logits_to_keep=1)
        suffix = self.tokens.suffix(question)
        rows = [forward_logits(self.model, torch.tensor([suffix]), cache, len(context), 1)[-1]]
        answer: list[int] = []
        while int(rows[-1].argmax()) not in self.stop_ids and len(answer) < MAX_ANSWER:
            answer.append(int(rows[-1].argmax()))  # each step's row is the teacher-forced row
            rows.append(
                forward_logits(
                    self.model, torch.tensor([answer[-1:]]), cache, len(context) + len(suffix) + len(answer) - 1, 1
                )[-1]
            )
        qa_idx, qa_lp = self._top(torch.stack(rows))
        cache.crop(len(context) - cache.get_seq_length())
        cont_suffix = self.tokens.suffix(REPEAT_PROMPT)
        cont = passages[-1][: self.continuation]
        logits = forward_logits(self.model, torch.tensor([cont_suffix + cont]), cache, len(context), len(cont) + 1)
        cont_idx, cont_lp = self._top(logits[:-1])
        full = torch.stack(rows).float().log_softmax(-1) if keep_full else None
        return Example(qid, passages, suffix, answer, qa_idx, qa_lp, cont_suffix, cont, cont_idx, cont_lp, full)

    # student ---------------------------------------------------------------------------------

    def base_passage(self, ids: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The base model's cache of one passage after the prefix (keys un-rotated,
        ``[layers, kv_heads, n, d]``) and its projection inputs ``[layers, n, hidden]``:
        computed once per passage, reused by every step (plain tensors, no graph)."""
        layers, inputs = self.encoder.forward_capturing([ids])
        kv = self.encoder._unrotate_full(layers, start=len(self.prefix_ids), batch_index=0, length=len(ids))
        assert inputs is not None
        return kv.keys.clone(), kv.values.clone(), inputs[:, 0].clone()

    def student_cache_tensors(
        self, passages: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
    ) -> tuple[list[torch.Tensor], list[torch.Tensor], int]:
        """Per layer ``[1, kv_heads, T, d]`` keys and values of the prefix and the adaptor's caches
        of ``passages`` (each encoded alone, placed one after another as the runtime places
        them), differentiable in the adaptor's factors; ``T``."""
        adaptor = self.encoder.adaptor
        assert adaptor is not None
        start = len(self.prefix_ids)
        keys = [[k] for k, _ in self.prefix_layers]
        values = [[v] for _, v in self.prefix_layers]
        for base_k, base_v, x in passages:
            heads, n = base_k.shape[1], base_k.shape[2]
            k = base_k + adaptor.delta("k", x, heads)
            v = base_v + adaptor.delta("v", x, heads)
            at = torch.arange(start, start + n).expand(heads, n)
            for layer in range(k.shape[0]):  # each layer's own RoPE (Gemma-3's types, NoPE layers)
                keys[layer].append(self.rotary.rotate_with_grad(k[layer], at, layer).unsqueeze(0))
                values[layer].append(v[layer].unsqueeze(0))
            start += n
        return [torch.cat(k, dim=2) for k in keys], [torch.cat(v, dim=2) for v in values], start

    def student_logprobs(
        self,
        keys: list[torch.Tensor],
        values: list[torch.Tensor],
        total: int,
        ids: list[int],
        rows: int,
        kv_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Log-probabilities of the last ``rows`` positions of ``ids`` read over the cache (at
        positions ``total…``; ``kv_mask``: the per-head row mask of a compressed one). The cache
        is built as the runtime builds a served one: a sliding layer keeps its window's rows, so a
        row mask (per-head eviction) is refused once the cache outgrows the window, as the runtime
        refuses it (``runtime.prepare``)."""
        window = sliding_window(self.lm.config)
        if kv_mask is not None and window is not None and kv_mask.shape[-1] + len(ids) >= window:
            raise InputError(
                f"{per_head_window_problem(window)}: this example needs {kv_mask.shape[-1] + len(ids)} rows; train "
                "for a store of whole passages (--method none) for this model"
            )
        cache = build_dynamic_cache(self.lm.config, keys, values)
        attention = {} if kv_mask is None else {KV_MASK_KWARG: kv_mask}
        logits = forward_logits(self.model, torch.tensor([ids]), cache, total, rows, **attention)
        return logits.float().log_softmax(-1)

    def passage(self, ids: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """:meth:`base_passage`, memoised by token ids."""
        key = tuple(ids)
        if key not in self._passages:
            self._passages[key] = self.base_passage(ids)
        return self._passages[key]

    def student_forward_tensors(self, passages: list[list[int]]) -> tuple[list[torch.Tensor], list[torch.Tensor], int]:
        """As :meth:`student_cache_tensors` for a ``forward`` adaptor: the passages encoded alone
        (one right-padded batch) with the LoRA layers being trained on, each moved from the
        position right after the prefix to its place in the prompt (a RoPE rotation by the
        offset), differentiable through the passages' forward."""
        assert self.lora_name is not None
        p = start = len(self.prefix_ids)
        keys = [[k] for k, _ in self.prefix_layers]
        values = [[v] for _, v in self.prefix_layers]
        if self.compressed:
            raise ValueError("a compressed student's cache comes with a row mask: use student_compressed_tensors")
        with lora_active(self.model, self.lora_name):
            layers = self.encoder.forward_with_grad(passages)
        for row, ids in enumerate(passages):
            n = len(ids)
            for layer, (k, v) in enumerate(layers):
                k_row = k[row : row + 1, :, p : p + n]
                if start != p:  # moved from right after the prefix to its place, in this layer's RoPE
                    encoded = torch.arange(p, p + n).expand(k_row.shape[1], n)
                    plain = self.rotary.unrotate(k_row[0], encoded, layer)
                    k_row = self.rotary.rotate_with_grad(plain, encoded + (start - p), layer).unsqueeze(0)
                keys[layer].append(k_row)
                values[layer].append(v[row : row + 1, :, p : p + n])
            start += n
        return [torch.cat(k, dim=2) for k in keys], [torch.cat(v, dim=2) for v in values], start

    def kept_rows(self, ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """The rows the store keeps of passage ``ids``: the compressor's ``positions [L, H,
        n_max]`` and ``lengths [L, H]``, scored on the base model's cache once per passage (the
        adaptor's own cache changes every step, and KVzip's scoring pass costs more than a step;
        at indexing the scores come from the adaptor's cache, so the student approximates them)."""
        key = passage_key(ids)
        if key not in self._kept:
            assert self.compressor is not None
            with torch.inference_mode():
                kv = self.encoder.encode([ids])[0]
                kept = self.compressor.compress(kv, CompressionContext(self.encoder, ids))
            self._kept[key] = (kept.positions.clone(), kept.lengths.clone())
        return self._kept[key]

    def kept_rows_state(self, settings: str) -> dict[str, Any]:
        """:meth:`kept_rows` so far, to save beside a checkpoint: KVzip's pass over every new
        passage made the evaluation model's first epoch several times slower than the rest, work
        a resumed run need not redo."""
        return {"settings": settings, "rows": {k: list(v) for k, v in self._kept.items()}}

    def restore_kept_rows(self, state: dict[str, Any], settings: str) -> bool:
        """Take saved kept rows if they were chosen under the same ``settings`` (model,
        compressor); returns whether they were taken."""
        if state.get("settings") != settings:
            return False
        self._kept.update({k: (v[0], v[1]) for k, v in state["rows"].items()})
        return True

    def student_compressed_tensors(
        self, passages: list[list[int]]
    ) -> tuple[list[torch.Tensor], list[torch.Tensor], int, torch.Tensor | None]:
        """:meth:`student_forward_tensors` for a compressed store: each passage's rows evicted as
        :meth:`kept_rows` says (padded per head as the runtime's assembled cache is), quantized
        straight-through as the store codec will, each kept key rotated to its token's place in
        the prompt; also the per-head row mask ``[layers, kv_heads, T]`` the runtime's attention
        reads (``ragcompress.runtime.attention``), or None when every head keeps every row (a
        store quantized or projected, not evicted): the runtime's assembled cache has no mask then
        (``runtime.assemble``), and a sliding-window layer keeps only its window's rows, which a
        mask over every row would not line up with."""
        assert self.lora_name is not None
        p = start = len(self.prefix_ids)
        keys = [[k] for k, _ in self.prefix_layers]
        values = [[v] for _, v in self.prefix_layers]
        layer_count, heads = len(self.prefix_layers), self.prefix_layers[0][0].shape[1]
        masks = [torch.ones((layer_count, heads, p), dtype=torch.bool)]
        with lora_active(self.model, self.lora_name):
            layers = self.encoder.forward_with_grad(passages)
        for row, ids in enumerate(passages):
            n = len(ids)
            k = torch.stack([lk[row, :, p : p + n] for lk, _ in layers])  # [L, H, n, d] at p..p+n-1
            v = torch.stack([lv[row, :, p : p + n] for _, lv in layers])
            encoded = torch.arange(p, p + n).expand(heads, n)
            k = torch.stack([self.rotary.unrotate(k[layer], encoded, layer) for layer in range(layer_count)])
            if self.compressor is not None:
                positions, lengths = self.kept_rows(ids)
            else:
                positions = torch.arange(n).expand(layer_count, heads, n)
                lengths = torch.full((layer_count, heads), n, dtype=torch.long)
            index = positions.unsqueeze(-1).expand(-1, -1, -1, k.shape[-1])
            k, v = torch.gather(k, 2, index), torch.gather(v, 2, index)
            if self.quant is not None or self.basis is not None:
                k, v = self.store_round_trip(k, v, lengths)
            for layer in range(layer_count):  # each layer's own RoPE (Gemma-3's types, NoPE layers)
                keys[layer].append(self.rotary.rotate_with_grad(k[layer], positions[layer] + start, layer).unsqueeze(0))
                values[layer].append(v[layer].unsqueeze(0))
            masks.append(torch.arange(positions.shape[-1]) < lengths.unsqueeze(-1))
            start += n
        mask = torch.cat(masks, 2)
        return (
            [torch.cat(k, dim=2) for k in keys],
            [torch.cat(v, dim=2) for v in values],
            start,
            (None if bool(mask.all()) else mask),
        )

    def store_round_trip(
        self, keys: torch.Tensor, values: torch.Tensor, lengths: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Kept rows (keys un-rotated) as the store gives them back: quantized, or projected on
        the basis with quantized latents, straight-through (``quantize_dequantize``,
        ``LowRankBasis.round_trip``)."""
        quant = self.quant or QuantConfig("none")

        def round_trip(kind: str, rows: torch.Tensor) -> torch.Tensor:
            if self.basis is not None and self.basis.ranks(kind) is not None:
                return self.basis.round_trip(kind, rows, lengths, quant)
            return quantize_dequantize(kind, rows, lengths, quant)

        return round_trip("k", keys), round_trip("v", values)

    def losses(self, example: Example) -> Losses:
        """Mean per-token binned KL over the answer rows and over the continuation rows, and the
        answer rows' cross-entropy of (and argmax agreement with) the teacher's greedy tokens."""
        kv_mask = None
        if self.compressed:
            keys, values, total, kv_mask = self.student_compressed_tensors(example.passages)
        elif self.lora_name is not None:
            keys, values, total = self.student_forward_tensors(example.passages)
        else:
            keys, values, total = self.student_cache_tensors([self.passage(ids) for ids in example.passages])
        ids = example.suffix + example.answer
        qa = self.student_logprobs(keys, values, total, ids, len(example.answer) + 1, kv_mask)
        cont_ids = example.cont_suffix + example.cont
        cont = self.student_logprobs(keys, values, total, cont_ids, len(example.cont) + 1, kv_mask)[:-1]
        greedy = example.qa_idx[:, :1]  # the teacher's argmax of each answer row (topk is sorted)
        return Losses(
            binned_kl(example.qa_idx, example.qa_lp, qa).mean(),
            binned_kl(example.cont_idx, example.cont_lp, cont).mean(),
            -qa.gather(-1, greedy).mean(),
            float((qa.detach().argmax(-1, keepdim=True) == greedy).float().mean()),
        )
