"""The one token generator: every answer the library serves (cached, full prefill, streaming,
eval, bench, serve, LlamaIndex) and the benchmarks' answers are decoded here, greedily, with
explicit positions. The one exception is ``serve``'s batched decoding (``runtime.batch``), which
steps several requests' caches together in one padded forward and so keeps its own copy of the stop
and budget rule (greedy, stop ids, ``max_new_tokens``); ``tests/test_batch.py`` holds its answers
equal to :class:`TokenStream`'s. Training's teacher and the synthetic questions it writes
(``ragcompress.distill``) decode with the model's own ``generate`` or argmax: they are inputs to
training, not answers.

The model's own ``generate`` infers positions from the cache length; with evicted tokens the
cache is shorter than the positions it covers, so positions are passed explicitly (gpt-fast's
shape: :func:`prefill`, :func:`decode_one_token`, :func:`decode_n_tokens`). A request is a
:class:`Prepared` (a cache, the tokens still to prefill and where they go, the attention
keywords), built by ``runtime.prepare``; :class:`TokenStream` runs it and times it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import torch
from transformers import DynamicCache

from ragcompress.errors import InputError

if TYPE_CHECKING:
    from ragcompress.kv import PassageKV


@dataclass
class Prepared:
    """What attention needs to answer one question.

    cache:             transformers cache holding everything before ``input_ids``
    input_ids:         tokens still to prefill (the question's suffix; the whole prompt for a full
                       prefill), at RoPE positions ``position …``
    attention_kwargs:  extra keywords for the registered ``"ragcompress"`` attention (per-head
                       masks, packed segments); passed on every forward step
    first_logits:      ``[vocab]`` when ``input_ids`` were already prefilled (a selective
                       recompute carried the question in its pass, or the fallback check read
                       it); their KV are in ``cache``
    backend:           which path built it: ``full``, ``dense``, ``packed-torch``, ``packed-triton``,
                       ``fallback`` (a full prefill standing in for a near tie: ``Engine.stream_cached``)
    first_passage:     the first passage's cache as the request read it, kept only where the
                       near-tie fallback may reuse it (``DenseStrategy.keep_first``) instead of
                       reading its blob again; dropped before decoding
    """

    cache: Any
    input_ids: list[int]
    position: int
    attention_kwargs: dict[str, Any] = field(default_factory=dict)
    first_logits: torch.Tensor | None = None
    backend: str = "dense"
    first_passage: PassageKV | None = None

    def prefilled(self, model: Any) -> Prepared:
        """This request with ``input_ids`` prefilled into ``cache`` and ``first_logits`` set (itself
        when they already were): the one place a request's prompt is read."""
        if self.first_logits is not None:
            return self
        logits = prefill(model, self.input_ids, self.cache, self.position, **self.attention_kwargs)
        return replace(self, first_logits=logits)


@dataclass(frozen=True)
class Generation:
    """Generated token ids and timings measured from the request's start."""

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


def first_token_margin(logits: torch.Tensor) -> float:
    """How far the greedy next token leads: its probability minus the runner-up's, from logits
    ``[vocab]`` (log-probabilities too: softmax leaves them as they are). Near 0 the choice is a
    toss-up that a small change of the cache can flip (``AnswerOptions.fallback_margin``)."""
    top = torch.softmax(logits.float(), dim=-1).topk(2).values
    return float(top[0] - top[1])


def forward_logits(
    model: Any, input_ids: torch.Tensor, cache: Any, start_position: int, logits_to_keep: int, **attention_kwargs: Any
) -> torch.Tensor:
    """Run ``input_ids [1, q]`` at positions ``start_position…``; logits ``[keep, vocab]`` of the
    last ``logits_to_keep`` positions (0: all of them, as teacher-forced measurements need)."""
    q = input_ids.shape[1]
    position_ids = torch.arange(start_position, start_position + q, device=model.device).unsqueeze(0)
    out = model(
        input_ids=input_ids.to(model.device),
        position_ids=position_ids,
        cache=cache,
        use_cache=True,
        logits_to_keep=logits_to_keep,
        **attention_kwargs,
    )
    return out.logits[0]


def forward_step(
    model: Any, input_ids: torch.Tensor, cache: Any, start_position: int, **attention_kwargs: Any
) -> torch.Tensor:
    """Run ``input_ids [1, q]`` at positions ``start_position…``; returns last logits ``[vocab]``."""
    return forward_logits(model, input_ids, cache, start_position, 1, **attention_kwargs)[-1]


@torch.inference_mode()
def prefill(model: Any, input_ids: list[int], cache: Any, position: int, **attention_kwargs: Any) -> torch.Tensor:
    """Prefill ``input_ids`` on top of ``cache`` at ``position…``; next-token logits ``[vocab]``."""
    return forward_step(model, torch.tensor([input_ids]), cache, position, **attention_kwargs)


@torch.inference_mode()
def decode_one_token(model: Any, token: int, cache: Any, position: int, **attention_kwargs: Any) -> torch.Tensor:
    """One decoding step: ``token`` at ``position``; next-token logits ``[vocab]``."""
    return forward_step(model, torch.tensor([[token]]), cache, position, **attention_kwargs)


def decode_n_tokens(
    model: Any,
    logits: torch.Tensor,
    cache: Any,
    position: int,
    max_new_tokens: int,
    stop_ids: set[int],
    **attention_kwargs: Any,
) -> Iterator[int]:
    """Greedy tokens from the first ``logits`` on (the prefill's); the next step runs only when
    the caller asks for the next token. Stops after ``max_new_tokens`` or before a stop id."""
    token = int(logits.argmax())
    for generated in range(1, max_new_tokens + 1):
        if token in stop_ids:
            return
        yield token
        if generated == max_new_tokens:
            return
        token = int(decode_one_token(model, token, cache, position, **attention_kwargs).argmax())
        position += 1


def finished(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` once its device has run the work queued before it: CUDA launches kernels
    asynchronously, so a clock read right after a forward would time its launch, not the work
    (a no-op on the CPU)."""
    if tensor.device.type == "cuda":
        torch.cuda.synchronize(tensor.device)
    return tensor


class TokenStream:
    """Iterates the greedy tokens of one request and times it.

    ``prepare`` builds the :class:`Prepared` request; it runs when iteration starts, so the clock
    (``ttft_s``, ``total_s``) counts loading and assembling the cache as well as the prefill.
    Tokenizing is done before the clock on every path (the ids are checked against the model's
    positions when the stream is made), so full prefill and stored caches are timed alike.
    ``backend`` is known once iteration has started. ``prompt_tokens``: the prompt's length in
    tokens (prefix, passages and question), as its maker counted it when it tokenized the question
    (0 when not given), so that a report of the request's usage need not tokenize it again.
    ``stop``: once it is set (from any thread), iteration ends before the next decoding step, with
    the tokens so far, as when the answer is complete. A caller that has gone away (a client
    disconnected, an awaiting task cancelled) stops the work so: a thread decoding for nobody
    cannot be killed, and went on to ``max_new_tokens``.
    """

    def __init__(
        self,
        model: Any,
        prepare: Callable[[], Prepared],
        max_new_tokens: int,
        stop_ids: set[int],
        prompt_tokens: int = 0,
        stop: threading.Event | None = None,
    ) -> None:
        self.model = model
        self.prompt_tokens = prompt_tokens
        self.stop = stop
        self.prepare = prepare
        self.max_new_tokens = max_new_tokens
        self.stop_ids = stop_ids
        self.token_ids: list[int] = []
        self.ttft_s: float | None = None
        self.total_s: float | None = None
        self.backend: str | None = None

    def __iter__(self) -> Iterator[int]:
        t0 = time.perf_counter()
        prepared = self.prepare().prefilled(self.model)
        self.backend = prepared.backend
        kwargs = prepared.attention_kwargs
        logits = prepared.first_logits
        assert logits is not None
        finished(logits)
        self.ttft_s = time.perf_counter() - t0
        position = prepared.position + len(prepared.input_ids)
        tokens = decode_n_tokens(
            self.model, logits, prepared.cache, position, self.max_new_tokens, self.stop_ids, **kwargs
        )
        for token in tokens:
            self.token_ids.append(token)
            yield token
            if self.stop is not None and self.stop.is_set():
                break
        self.total_s = time.perf_counter() - t0

    def run(self) -> Generation:
        """Decode to the end; the token ids and timings."""
        for _ in self:
            pass
        assert self.ttft_s is not None and self.total_s is not None
        return Generation(self.token_ids, self.ttft_s, self.total_s)


def greedy_decode(
    model: Any,
    input_ids: list[int],
    cache: Any,
    start_position: int,
    max_new_tokens: int,
    stop_ids: set[int],
    **attention_kwargs: Any,
) -> Generation:
    """Prefill ``input_ids`` on top of ``cache`` and decode greedily (a :class:`TokenStream`)."""
    prepared = Prepared(cache, input_ids, start_position, attention_kwargs)
    return TokenStream(model, lambda: prepared, max_new_tokens, stop_ids).run()


class TextDeltas:
    """Text pieces as tokens arrive, pushed one at a time (a batch interleaves several answers);
    their concatenation equals the stripped decoded answer.

    Whitespace at either end is held back, and so is an incomplete multi-byte character, so a
    stream and the non-streaming answer match exactly.
    """

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.generated: list[int] = []
        self.emitted = ""

    def push(self, token: int) -> str | None:
        """The new text piece after ``token``, if there is one yet."""
        self.generated.append(token)
        return self._piece(lambda text: not text.endswith("\ufffd"))

    def finish(self) -> str | None:
        """What was held back, once the answer is complete."""
        return self._piece(lambda text: True)

    def _piece(self, ready: Callable[[str], bool]) -> str | None:
        text = self.tokenizer.decode(self.generated, skip_special_tokens=True).strip()
        if text.startswith(self.emitted) and ready(text) and len(text) > len(self.emitted):
            piece = text[len(self.emitted) :]
            self.emitted = text
            return piece
        return None


def text_deltas(tokenizer: Any, tokens: Iterable[int]) -> Iterator[str]:
    """The :class:`TextDeltas` pieces of ``tokens``, as they are decoded."""
    deltas = TextDeltas(tokenizer)
    for token in tokens:
        piece = deltas.push(token)
        if piece is not None:
            yield piece
    piece = deltas.finish()
    if piece is not None:
        yield piece


def kl_per_position(reference: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """``KL(reference || other)`` in nats at each position, from log-probabilities ``[..., vocab]``:
    how far a path's next-token distributions are from the reference's (full prefill's): the
    measure calibration and the benchmarks report (training's objective bins its own,
    ``distill.objective``)."""
    return torch.nn.functional.kl_div(other, reference, reduction="none", log_target=True).sum(-1)


@torch.inference_mode()
def teacher_forced_logprobs(
    model: Any, prepared: Prepared, continuation: list[int], keep: int | None = None
) -> torch.Tensor:
    """Log-probabilities ``[n, vocab]`` of the next token after every token of
    ``prepared.input_ids + continuation``, read in one pass over ``prepared.cache`` from
    ``prepared.position`` on with ``prepared.attention_kwargs`` (the request's own prefill, keeping
    every position's logits instead of the last one); ``keep``: only the last ``keep`` rows.

    When the request's ``input_ids`` were already prefilled (``prepared.first_logits``: a selective
    recompute carried the question in its pass), ``first_logits`` is the row of their last token
    and only ``continuation`` is read, so at most ``len(continuation) + 1`` rows exist.
    """
    rows: list[torch.Tensor] = []
    ids, start = prepared.input_ids + continuation, prepared.position
    if prepared.first_logits is not None:
        ids, start = continuation, prepared.position + len(prepared.input_ids)
        rows.append(prepared.first_logits.float().unsqueeze(0))
        if keep is None or keep > len(ids) + 1:
            raise ValueError("the prompt was prefilled by the recompute pass: only its last row is known")
    if ids:
        keep_rows = 0 if keep is None else min(keep, len(ids))
        logits = forward_logits(
            model, torch.tensor([ids]), prepared.cache, start, keep_rows, **prepared.attention_kwargs
        )
        rows.append(logits.float())
    logits = torch.cat(rows)
    return (logits if keep is None else logits[-keep:]).log_softmax(-1)


def run_keeping_request(stream: TokenStream) -> tuple[Generation, Prepared, int]:
    """Decode ``stream`` to the end (timed as always) and keep the request it prepared, with the
    number of rows its cache held then (for :func:`rewind`)."""
    build = stream.prepare
    kept: list[tuple[Prepared, int]] = []

    def prepare() -> Prepared:
        prepared = build()
        kept.append((prepared, prepared.cache.get_seq_length()))
        return prepared

    stream.prepare = prepare
    generation = stream.run()
    prepared, rows = kept[0]
    return generation, prepared, rows


def rewind(prepared: Prepared, rows: int) -> Prepared:
    """The request as it stood before its prompt's last token was read, after a stream decoded
    from it: the cache (``rows`` long when prepared) is cropped back and only that token remains to
    read, so :func:`teacher_forced_logprobs` along an answer costs ``len(answer) + 1`` tokens. A
    prompt prefilled by the recompute pass is kept whole (its last row is ``first_logits``). A full
    prefill on a sliding-window model whose prompt outran the window cannot be cropped back
    (transformers keeps only the window's rows of those layers): it is read again from the start."""
    cache = prepared.cache
    try:
        if prepared.first_logits is not None:
            cache.crop(rows - cache.get_seq_length())
            return prepared
        n = len(prepared.input_ids)
        cache.crop(rows + n - 1 - cache.get_seq_length())
    except RuntimeError:  # transformers: a sliding-window layer past its window dropped the rows to go back to
        if prepared.backend != "full" or rows:
            raise InputError(
                "this request's cache cannot be rewound: a sliding-window layer has dropped the rows it would "
                "go back to (a prompt longer than the model's window); only a full prefill is read again instead"
            ) from None
        # A full prefill read its whole prompt: reading it again, into a cache whose every layer keeps
        # every row (the model's masks still apply each window), costs one prefill more, on these models only.
        return replace(prepared, cache=DynamicCache())
    return replace(prepared, input_ids=prepared.input_ids[-1:], position=prepared.position + n - 1)
