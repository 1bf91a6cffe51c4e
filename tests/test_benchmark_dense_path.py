"""``benchmarks/needle.py`` and ``benchmarks/distill_eval.py`` answer over caches compressed in
memory, never stored. They rebuilt the dense query path by hand (the prefix placed as
``QueryContext`` places it, ``assemble``, ``greedy_decode``), skipping ``DenseStrategy``'s checks
and already drifting from it (distill_eval left the prefix on the CPU). They now enter the
library's path (``PrefixContext.from_prefix``, ``DenseStrategy.prepare_segments``,
``TokenStream``): every logit they read is bit for bit the hand-built copy's (kept below as the
reference), and the path's refusals apply to them.
"""

from __future__ import annotations

import importlib
from dataclasses import replace

import pytest
import torch

from ragcompress.compressors import CompressionContext, make_compressor
from ragcompress.distill.objective import Example
from ragcompress.errors import InputError
from ragcompress.indexing.encoder import PassageEncoder
from ragcompress.kv.quant import QuantConfig
from ragcompress.models import load_model
from ragcompress.prompt import PromptTemplate
from ragcompress.runtime.assemble import assemble
from ragcompress.runtime.generate import forward_logits, greedy_decode, kl_per_position
from ragcompress.runtime.prepare import PrefixContext
from ragcompress.store.codec import decode, encode

needle = importlib.import_module("needle")
distill_eval = importlib.import_module("distill_eval")

TEXTS = (
    "Melbourne is the sporting capital of Australia, home of the Australian Open and the MCG.",
    "Apollo 11 landed on the Moon in 1969; Neil Armstrong stepped out first, Buzz Aldrin after him.",
    "The special magic number is 4821. The Amazon river carries more water than any other river.",
)
QUESTION = "What is the special magic number?"
MAX_NEW = 12
# (method, ratio, quant): whole passages; heads keeping different rows (per-head row masks);
# layers keeping different amounts (one buffer per layer)
WHOLE = [("none", None, "none"), ("none", None, "int4")]
EVICTED = [("adaptive:knorm", 0.5, "int8"), ("global:knorm", 0.4, "int4")]
# a sliding window the prompt outruns (its layers drop rows); evicted caches are refused there
# (test_needle_is_refused_what_the_dense_path_refuses)
MODELS = {"llama": {}, "mistral": {"sliding_window": 48}}
CASES = [("llama", *s) for s in WHOLE + EVICTED] + [("mistral", *s) for s in WHOLE]


def old_needle_answer(encoder, segments, suffix, quant, max_new_tokens, stops) -> list[int]:
    """``needle.py``'s ``cached_answer`` before it called the library (its prefix placement, then
    the body), kept as the reference."""
    lm = encoder.lm
    device = lm.model.device
    rotary, prefix = encoder.rotary, encoder.prefix_kv
    prefix_keys = rotary.rotate_layers(prefix.keys, prefix.positions).to(device)
    prefix = replace(prefix, values=prefix.values.to(device))
    segments = [decode(encode(kv, quant), lm.model.dtype) for kv in segments]
    built = assemble(lm.config, rotary, prefix_keys, prefix, segments, lm.model.dtype)
    gen = greedy_decode(
        lm.model, suffix, built.cache, built.next_position, max_new_tokens, stops, **built.attention_kwargs()
    )
    return gen.token_ids


@torch.inference_mode()
def old_measure(encoder, example, segs, stop_ids) -> tuple[float, list[int]]:
    """``distill_eval.py``'s ``measure`` before it called the library, kept as the reference."""
    lm = encoder.lm
    prefix = encoder.prefix_kv
    prefix_keys = encoder.rotary.rotate_layers(prefix.keys, prefix.positions)

    def cache():
        return assemble(lm.config, encoder.rotary, prefix_keys, prefix, segs, lm.model.dtype, spare_rows=64)

    forced = cache()
    ids = example.suffix + example.answer
    logits = forward_logits(
        lm.model,
        torch.tensor([ids]),
        forced.cache,
        forced.next_position,
        len(example.answer) + 1,
        **forced.attention_kwargs(),
    )
    student = logits.float().log_softmax(-1)
    kl = float(kl_per_position(example.qa_full, student).mean())
    greedy = cache()
    generation = greedy_decode(
        lm.model,
        example.suffix,
        greedy.cache,
        greedy.next_position,
        distill_eval.MAX_NEW_TOKENS,
        stop_ids,
        **greedy.attention_kwargs(),
    )
    return kl, generation.token_ids


@pytest.fixture(scope="module")
def encoders(tiny_model_dir):
    """Factory: a base encoder of the tiny model ``MODELS[name]`` (built once)."""
    made: dict[str, PassageEncoder] = {}

    def make(name: str) -> PassageEncoder:
        if name not in made:
            lm = load_model(str(tiny_model_dir(name, **MODELS[name])))
            made[name] = PassageEncoder(lm, PromptTemplate.from_tokenizer(lm.tokenizer))
        return made[name]

    return make


def compressed(encoder, method, ratio):
    """The passages' caches, compressed as the benchmarks compress them; and their token ids."""
    ids = [encoder.tokens.passage(text) for text in TEXTS]
    caches = encoder.encode(ids)
    if ratio is None:
        return caches, ids
    compressor = make_compressor(method, ratio=ratio)
    return [compressor.compress(kv, CompressionContext(encoder, i)) for kv, i in zip(caches, ids, strict=True)], ids


def recorded_logits(model, run):
    """``run()``'s result and the logits of every forward it made, in order."""
    logits: list[torch.Tensor] = []
    handle = model.register_forward_hook(lambda module, args, out: logits.append(out.logits.clone()))
    try:
        return run(), logits
    finally:
        handle.remove()


def assert_same_forwards(got: list[torch.Tensor], want: list[torch.Tensor]) -> None:
    assert len(got) == len(want)
    for step, (g, w) in enumerate(zip(got, want, strict=True)):
        assert torch.equal(g, w), f"forward {step} differs from the hand-built path's"


@pytest.mark.parametrize(("model", "method", "ratio", "quant"), CASES)
def test_needle_answers_bit_for_bit_as_its_hand_built_path(encoders, model, method, ratio, quant):
    """Same logits at every step (the question's prefill and each decoding step), so the same
    answer; no stop id, so every step is compared."""
    encoder = encoders(model)
    lm = encoder.lm
    caches, _ = compressed(encoder, method, ratio)
    suffix = encoder.tokens.suffix(QUESTION)
    context = PrefixContext.from_prefix(lm, encoder.tokens, encoder.prefix_kv)
    config = QuantConfig(quant)
    want, want_logits = recorded_logits(
        lm.model, lambda: old_needle_answer(encoder, caches, suffix, config, MAX_NEW, set())
    )
    got, got_logits = recorded_logits(
        lm.model, lambda: needle.answer_from_caches(context, caches, suffix, config, MAX_NEW, set()).token_ids
    )
    assert len(want) == MAX_NEW and got == want
    assert_same_forwards(got_logits, want_logits)


@pytest.mark.parametrize(("model", "method", "ratio", "quant"), CASES)
def test_distill_eval_measures_bit_for_bit_as_its_hand_built_path(encoders, model, method, ratio, quant):
    """The same KL along the teacher's answer and the same greedy answer, from the same logits
    of every forward (the teacher-forced pass, the question's prefill, each decoding step)."""
    encoder = encoders(model)
    lm = encoder.lm
    _, ids = compressed(encoder, "none", None)
    segs = distill_eval.segments(encoder, ids, method, ratio, quant)
    answer = [17, 203, 5, 88]
    vocab = lm.model.config.vocab_size
    teacher = torch.randn(len(answer) + 1, vocab, generator=torch.Generator().manual_seed(0)).log_softmax(-1)
    empty = torch.empty(0)
    suffix = encoder.tokens.suffix(QUESTION)
    example = Example("q", ids, suffix, answer, empty, empty, [], [], empty, empty, qa_full=teacher)
    (kl_want, answer_want), want_logits = recorded_logits(lm.model, lambda: old_measure(encoder, example, segs, set()))
    (kl, answer_got), got_logits = recorded_logits(
        lm.model, lambda: distill_eval.measure(encoder, example, segs, set())
    )
    assert kl == kl_want and answer_got == answer_want and len(answer_got) == distill_eval.MAX_NEW_TOKENS
    assert_same_forwards(got_logits, want_logits)


def test_needle_is_refused_what_the_dense_path_refuses(encoders):
    """Heads keeping different rows cannot be read past a sliding window (its layers keep the last
    rows, which the per-head masks do not follow): the dense path refuses such a request, and
    now the benchmark's too, with the reason and what to do (its hand-built copy stopped in the
    model's attention with a RuntimeError about mask sizes)."""
    encoder = encoders("mistral")
    lm = encoder.lm
    caches, _ = compressed(encoder, "adaptive:knorm", 0.5)
    context = PrefixContext.from_prefix(lm, encoder.tokens, encoder.prefix_kv)
    suffix = encoder.tokens.suffix(QUESTION)
    with pytest.raises(InputError, match=r"rows per head.*sliding window \(48 tokens\).*--method none"):
        needle.answer_from_caches(context, caches, suffix, QuantConfig("int8"), MAX_NEW, set())


@pytest.mark.gpu
def test_distill_eval_measures_with_the_model_on_cuda(tiny_model_dir):
    """The encoder hands its prefix back on the CPU; the hand-built copy assembled the cache on
    that prefix's device, so with the model on a GPU it built it on the CPU. The library's path
    places the prefix on the model's device: the same KL and answer as on the CPU."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    path = str(tiny_model_dir("llama"))
    measured = []
    for device in ("cpu", "cuda"):
        lm = load_model(path, device=device)
        encoder = PassageEncoder(lm, PromptTemplate.from_tokenizer(lm.tokenizer))
        ids = [encoder.tokens.passage(text) for text in TEXTS]
        segs = distill_eval.segments(encoder, ids, "global:knorm", 0.4, "int4")
        teacher = torch.randn(5, lm.model.config.vocab_size, generator=torch.Generator().manual_seed(0))
        empty = torch.empty(0)
        suffix = encoder.tokens.suffix(QUESTION)
        example = Example(
            "q", ids, suffix, [17, 203, 5, 88], empty, empty, [], [], empty, empty, teacher.log_softmax(-1)
        )
        measured.append(distill_eval.measure(encoder, example, segs, set()))
    (kl_cpu, answer_cpu), (kl, answer) = measured
    assert answer == answer_cpu
    assert kl == pytest.approx(kl_cpu, rel=1e-4, abs=1e-5)
