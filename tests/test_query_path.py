"""One query path: every caller decodes the same tokens for the same question and entries, and the
two preparation strategies (dense assembled cache, packed quantized segments) agree."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from ragcompress.bench import bench
from ragcompress.errors import InputError, StoreError
from ragcompress.evaluation import Question, iter_eval
from ragcompress.indexing import IndexConfig, index
from ragcompress.runtime.engine import Engine
from ragcompress.runtime.options import AnswerOptions
from ragcompress.runtime.recompute import RecomputeConfig

QUESTIONS = [
    "What city in Victoria is called the sporting capital of Australia?",
    "Who won the game?",
    "Where was the event held?",
]


@pytest.fixture(scope="module")
def store_of(tiny_model_dir, tmp_path_factory):
    """Factory: a store of the bundled sample built with a tiny ``arch`` model and ``quant``."""
    from ragcompress.data import SAMPLE_PASSAGES

    built: dict = {}

    def make(arch: str = "llama", quant: str = "int8") -> str:
        if (arch, quant) not in built:
            root = tmp_path_factory.mktemp(f"{arch}-{quant}")
            source = root / "passages.jsonl"
            source.write_text("\n".join(SAMPLE_PASSAGES.read_text().splitlines()[:8]) + "\n")
            index(source, root / "store", model=str(tiny_model_dir(arch)), config=IndexConfig(quant=quant))
            built[arch, quant] = str(root / "store")
        return built[arch, quant]

    return make


def test_every_caller_decodes_the_same_tokens(store_of, monkeypatch):
    pytest.importorskip("llama_index.core")
    from llama_index.core.schema import NodeWithScore, TextNode

    from llama_index.postprocessor.ragcompress import KVCacheSynthesizer

    store = store_of("llama", "int8")
    engine = Engine.open(store, options=AnswerOptions(max_new_tokens=10))
    question = QUESTIONS[0]
    entries = engine.retrieve(question, 3)
    cached = engine.answer_cached(question, entries)
    full = engine.answer_full(question, entries)
    assert cached.token_ids and cached.backend == "dense"

    streamed = engine.stream_cached(question, entries)
    assert list(streamed) == cached.token_ids and streamed.ttft_s is not None

    (result,) = iter_eval(engine, [Question("q", question, ["Geelong"])], top_k=3)
    assert result.cached.token_ids == cached.token_ids and result.full.token_ids == full.token_ids

    seen: list = []
    answer_cached = engine.answer_cached
    monkeypatch.setattr(engine, "answer_cached", lambda *a: seen.append(answer_cached(*a)) or seen[-1])
    bench(engine, [Question("q", question, ["Geelong"])], [3], repeats=2)
    # one untimed warm-up run and 2 timed ones; bench decodes one token
    assert len(seen) == 3 and all(a.token_ids == cached.token_ids[:1] for a in seen)
    engine.close()

    nodes = [NodeWithScore(node=TextNode(id_=e.id, text=e.text)) for e in entries]
    for streaming in (False, True):
        synthesizer = KVCacheSynthesizer(store, max_new_tokens=10, streaming=streaming)
        response = synthesizer.synthesize(question, nodes)
        text = "".join(response.response_gen) if streaming else response.response
        assert text == cached.answer
        assert response.metadata["ragcompress"]["backend"] == "dense"
        synthesizer.close()


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("quant", ["int8", "int4"])
def test_packed_strategy_decodes_like_the_dense_one(store_of, arch, quant):
    engine = Engine.open(store_of(arch, quant), options=AnswerOptions(max_new_tokens=12))
    for question in QUESTIONS:
        entries = engine.retrieve(question, 3)
        dense = engine.answer_cached(question, entries, engine.options.replace(backend="dense"))
        packed = engine.answer_cached(question, entries, engine.options.replace(backend="packed-torch"))
        assert (dense.backend, packed.backend) == ("dense", "packed-torch")
        assert packed.token_ids == dense.token_ids
    engine.close()


def test_backends_that_cannot_run_are_refused_not_swapped(store_of):
    engine = Engine.open(store_of("llama", "none"))
    entries = engine.retrieve(QUESTIONS[0], 2)
    with pytest.raises(InputError, match="quantized store"):
        engine.answer_cached(QUESTIONS[0], entries, AnswerOptions(backend="packed-torch"))
    assert engine.answer_cached(QUESTIONS[0], entries).backend == "dense"  # auto on the CPU
    engine.close()
    engine = Engine.open(store_of("llama", "int8"))
    with pytest.raises(InputError, match="recompute"):
        engine.answer_cached(QUESTIONS[0], entries, AnswerOptions(backend="packed-torch", recompute=0.5))
    engine.close()


def test_answer_options_are_validated():
    with pytest.raises(ValueError, match="backend"):
        AnswerOptions(backend="fast")
    with pytest.raises(ValueError, match="max_new_tokens"):
        AnswerOptions(max_new_tokens=0)
    assert AnswerOptions(recompute=0.25).recompute.ratio == 0.25
    for margin in (-0.1, 1.0):
        with pytest.raises(ValueError, match="fallback_margin"):
            AnswerOptions(fallback_margin=margin)


def test_option_types_are_named_not_failed_deep_inside():
    """A string, a bool or a NaN where a number goes is refused by the config, naming the field
    (``float("0.5")`` would have taken a string, and NaN compared false everywhere)."""
    for make, field in (
        (lambda: AnswerOptions(fallback_margin="0.1"), "fallback_margin"),
        (lambda: AnswerOptions(calibrate="no"), "calibrate"),
        (lambda: AnswerOptions(recompute="0.5"), "recompute"),
        (lambda: RecomputeConfig(ratio="0.5"), "ratio"),
        (lambda: RecomputeConfig(temperature=float("nan")), "temperature"),
        (lambda: RecomputeConfig(temperature=float("inf")), "temperature"),
        (lambda: RecomputeConfig(sink_tokens=1.5), "sink_tokens"),
        (lambda: RecomputeConfig(ratio_by_passages="3:0.1"), "ratio_by_passages"),
        (lambda: RecomputeConfig().with_ratio("0.5"), "ratio_by_passages"),
    ):
        with pytest.raises(ValueError, match=field):
            make()
    assert RecomputeConfig().with_ratio([(3, 0.05), (5, 0.1)]).ratio_for(5) == 0.1


def test_engine_inputs_are_checked_before_use(store_of):
    """What the query path is given is checked where it enters: the question's type and text,
    top_k's type, the options' type, the entries (none, or not entries); a foreign entry's
    error says it may come from another store."""
    engine = Engine.open(store_of())
    entries = engine.retrieve(QUESTIONS[0], 2)
    for question in ("   ", None, ["a", "b"], "Paris\ud800?"):
        with pytest.raises(InputError, match="question"):
            engine.retrieve(question, 2)
        with pytest.raises(InputError, match="question"):
            engine.answer_cached(question, entries)
    for top_k in ("2", None, 2.5, True):
        with pytest.raises(InputError, match="top_k must be an integer"):
            engine.retrieve(QUESTIONS[0], top_k)
    assert engine.retrieve(QUESTIONS[0], np.int64(2)) == entries
    for bad in ([], None, "p1", [entries[0].id]):
        with pytest.raises(InputError, match="entries must be a non-empty list"):
            engine.answer_cached(QUESTIONS[0], bad)
        with pytest.raises(InputError, match="entries must be a non-empty list"):
            engine.answer_full(QUESTIONS[0], bad)
    with pytest.raises(TypeError, match="options must be an AnswerOptions"):
        engine.answer_cached(QUESTIONS[0], entries, {"max_new_tokens": 4})
    with pytest.raises(TypeError, match="options must be an AnswerOptions"):
        Engine.open(store_of(), options={"max_new_tokens": 4})
    foreign = dataclasses.replace(entries[0], id="not-here", offset=entries[0].offset + 1)
    with pytest.raises(StoreError, match="another store"):
        engine.answer_cached(QUESTIONS[0], [foreign])
    engine.close()


def test_first_token_margin_is_the_lead_of_the_greedy_token():
    import torch

    from ragcompress.runtime.generate import first_token_margin

    probs = torch.tensor([0.1, 0.6, 0.3])
    assert first_token_margin(probs.log()) == pytest.approx(0.3)
    assert first_token_margin(probs.log() + 5.0) == pytest.approx(0.3)  # logits: any offset
    assert first_token_margin(torch.zeros(4)) == 0.0


@pytest.mark.parametrize("recompute", [0.0, 0.5])
@pytest.mark.parametrize("quant", ["none", "int4"])
def test_a_near_tie_falls_back_to_full_prefill_and_a_clear_lead_does_not(store_of, recompute, quant):
    """``fallback_margin`` below a question's first-token margin changes nothing (the same tokens
    as without it, on plain reuse and after a recompute pass); above it the answer is full
    prefill's, token for token, and says so: reusing the first passage's stored cache where it is
    exact (``none``: float32 rows encoded after the prefix), the prefix cache alone where it is not
    (``int4``: then token for token the prefix-cached prefill's)."""
    from ragcompress.runtime.generate import first_token_margin

    engine = Engine.open(store_of("llama", quant), options=AnswerOptions(max_new_tokens=10, recompute=recompute))
    for question in QUESTIONS:
        entries = engine.retrieve(question, 3)
        cached = engine.answer_cached(question, entries)
        prepared = engine.prepare(question, entries).prefilled(engine.lm.model)
        assert prepared.first_logits is not None
        margin = first_token_margin(prepared.first_logits)
        assert 0.0 < margin < 0.5  # a tiny random model: near ties everywhere
        kept = engine.answer_cached(question, entries, engine.options.replace(fallback_margin=margin / 2))
        assert (kept.token_ids, kept.backend) == (cached.token_ids, "dense")
        fell = engine.answer_cached(question, entries, engine.options.replace(fallback_margin=2 * margin))
        assert fell.backend == "fallback"
        assert fell.token_ids == engine.answer_full(question, entries).token_ids
        if quant == "int4":
            assert fell.token_ids == engine.answer_prefix_cached(question, entries).token_ids
    engine.close()


@pytest.mark.parametrize("quant", ["none", "int8", "int4"])
def test_the_fallback_prefills_only_what_is_not_exact_already(store_of, quant):
    """Where the store's passages are exact after the prefix (``none``, ``int8``), the fallback
    prefills the passages after the first and the question, and its next-token logits are full
    prefill's (float32 rows: to rounding; int8: close); elsewhere it prefills everything after the
    prefix, as the prefix-cached baseline does."""
    from ragcompress.runtime.generate import prefill
    from ragcompress.runtime.prepare import fallback_prefill, full_prefill

    engine = Engine.open(store_of("llama", quant), options=AnswerOptions(max_new_tokens=4))
    for question in QUESTIONS:
        entries = engine.retrieve(question, 3)
        ids = engine.full_prompt_ids(question, entries)
        fallback = fallback_prefill(engine.context, entries[0], ids, 4)
        after = engine.prefix.num_tokens + (entries[0].num_tokens if quant != "int4" else 0)
        assert (fallback.backend, fallback.input_ids, fallback.position) == ("fallback", ids[after:], after)
        logits = prefill(engine.lm.model, fallback.input_ids, fallback.cache, fallback.position)
        full = full_prefill(engine.context, ids, 4)
        reference = prefill(engine.lm.model, full.input_ids, full.cache, full.position)
        error = (logits.log_softmax(-1) - reference.log_softmax(-1)).abs().max().item()
        cached = engine.prepare(question, entries).prefilled(engine.lm.model).first_logits
        assert cached is not None
        reuse_error = (cached.log_softmax(-1) - reference.log_softmax(-1)).abs().max().item()
        if quant == "int8":  # 8-bit rounding of one passage, against passages that never saw each other
            assert error < 0.15 and error < reuse_error / 4
        else:
            assert error < 1e-4
    engine.close()


@pytest.mark.slow
def test_packed_strategy_decodes_like_the_dense_one_on_smollm2(tmp_path):
    """SmolLM2-135M (GQA 3, head_dim 64), int8 store of the bundled sample, greedy answers."""
    from ragcompress.data import SAMPLE_PASSAGES, SAMPLE_QUESTIONS
    from ragcompress.evaluation import read_questions

    index(SAMPLE_PASSAGES, tmp_path / "store", config=IndexConfig(quant="int8"))
    engine = Engine.open(tmp_path / "store", options=AnswerOptions(max_new_tokens=16))
    for item in read_questions(SAMPLE_QUESTIONS, limit=3):
        entries = engine.retrieve(item.question, 3)
        dense = engine.answer_cached(item.question, entries, engine.options.replace(backend="dense"))
        packed = engine.answer_cached(item.question, entries, engine.options.replace(backend="packed-torch"))
        assert packed.token_ids == dense.token_ids
    engine.close()


@pytest.mark.parametrize("quant", ["none", "int8"])
def test_the_fallback_reads_the_first_passages_blob_once(store_of, monkeypatch, quant):
    """A near tie answered by the fallback read the first passage's blob from disk twice: for the
    cached request, then again for the fallback's exact first passage. It now reuses the cache
    the request read, and answers what it answered before (full prefill's tokens)."""
    import ragcompress.store.kvstore as kvstore

    engine = Engine.open(store_of("llama", quant), options=AnswerOptions(max_new_tokens=4))
    read = kvstore.read_blob
    reads: list[str] = []

    def counted(*args, **kwargs):
        reads.append(args[-1])  # the passage id
        return read(*args, **kwargs)

    monkeypatch.setattr(kvstore, "read_blob", counted)
    question = QUESTIONS[0]
    entries = engine.retrieve(question, 3)
    fell = engine.answer_cached(
        question, entries, engine.options.replace(fallback_margin=0.99)
    )  # a tiny random model: near ties everywhere
    assert fell.backend == "fallback"
    assert sorted(reads) == sorted(e.id for e in entries)
    assert fell.token_ids == engine.answer_full(question, entries).token_ids
    engine.close()
