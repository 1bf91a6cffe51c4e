"""Selective recompute (CacheBlend/EPIC) and APE calibration of the assembled cache.

Exact anchors: recompute at 100 % *is* a full prefill of the passages; at 0 % it leaves the cache
untouched (plain reuse, bit for bit); the selection is a deterministic function of the inputs.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import DynamicCache

from ragcompress.indexing import IndexConfig, index
from ragcompress.kv import PassageKV
from ragcompress.runtime.assemble import assemble
from ragcompress.runtime.calibration import scale_context_keys
from ragcompress.runtime.engine import Engine
from ragcompress.runtime.generate import forward_step
from ragcompress.runtime.options import AnswerOptions
from ragcompress.runtime.recompute import RecomputeConfig, blend, repair, select_tokens

QUESTION = "What city is the sporting capital of Australia?"


@pytest.fixture(scope="module")
def stores(tmp_path_factory, tiny_model_dir, embedder):
    """Factory: a store of the first 8 sample passages for (arch, quant, layers), built once."""
    from ragcompress.data import SAMPLE_PASSAGES

    root = tmp_path_factory.mktemp("recompute")
    passages = root / "passages.jsonl"
    passages.write_text("\n".join(SAMPLE_PASSAGES.read_text().splitlines()[:8]) + "\n")
    built: dict[tuple[str, str, int], Engine] = {}

    def make(arch: str = "qwen2", quant: str = "none", layers: int = 2) -> Engine:
        if (arch, quant, layers) not in built:
            store = root / f"{arch}-{quant}-{layers}"
            model = tiny_model_dir(arch) if layers == 2 else tiny_model_dir(arch, layers=layers)
            index(passages, store, model=str(model), config=IndexConfig(quant=quant), embedder=embedder)
            built[arch, quant, layers] = Engine.open(store)
        return built[arch, quant, layers]

    return make


def blend_only(engine: Engine, built, segments, entries, recompute):
    """The recompute alone (question not fused), returning its report; None if nothing to do."""
    config = RecomputeConfig.coerce(recompute)
    if not config.recomputes:
        return None
    ids = [engine.tokens.passage(e.text) for e in entries]
    return blend(
        engine.lm.model,
        engine.rotary,
        built,
        engine.prefix,
        segments,
        ids,
        config,
        first_exact=engine.store.manifest.passages_exact,
        score_question=engine.tokens.suffix(QUESTION),
    )


def fused(engine: Engine, built, segments, entries, config: RecomputeConfig):
    """The recompute with the question riding along (CacheBlend's fused pass), on a lossless
    store (the first passage exact), returning its report with the question's logits."""
    ids = [engine.tokens.passage(e.text) for e in entries]
    suffix = engine.tokens.suffix(QUESTION)
    return blend(
        engine.lm.model, engine.rotary, built, engine.prefix, segments, ids, config, first_exact=True, suffix=suffix
    )


def assembled(engine: Engine, segments):
    """The dense path's assembled cache of ``segments`` after the engine's prefix."""
    return assemble(engine.lm.config, engine.rotary, engine.prefix_keys, engine.prefix, segments, engine.dtype)


def cached_logits(engine: Engine, entries, recompute, segments=None) -> tuple[torch.Tensor, object]:
    """First-token logits of the cached path after ``repair`` (optionally on given segments)."""
    suffix = engine.tokens.suffix(QUESTION)
    segments = segments or [engine.store.load_kv(e) for e in entries]
    built = assembled(engine, segments)
    report = blend_only(engine, built, segments, entries, recompute)
    extra = built.attention_kwargs()
    with torch.inference_mode():
        logits = forward_step(engine.lm.model, torch.tensor([suffix]), built.cache, built.next_position, **extra)
    return logits, report


def full_logits(engine: Engine, entries) -> torch.Tensor:
    ids = engine.full_prompt_ids(QUESTION, entries)
    with torch.inference_mode():
        return forward_step(engine.lm.model, torch.tensor([ids]), DynamicCache(config=engine.lm.config), 0)


def full_prefill_attentions(engine: Engine, entries) -> tuple[torch.Tensor, ...]:
    """Full prefill's attention weights, per layer ``[1, Hq, T, T]``, from eager attention:
    computed independently of the selection code, which reads them from its own projections."""
    model = engine.lm.model
    previous = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        with torch.inference_mode():
            out = model(torch.tensor([engine.full_prompt_ids(QUESTION, entries)]), output_attentions=True)
    finally:
        model.set_attn_implementation(previous)
    return out.attentions


def padded(kv: PassageKV) -> PassageKV:
    """The same cache with one padding row: takes the per-head (non-uniform) code path."""
    layers, heads, _, dim = kv.keys.shape
    zeros = torch.zeros(layers, heads, 1, dim)
    return PassageKV(
        torch.cat([kv.keys, zeros], 2),
        torch.cat([kv.values, zeros], 2),
        torch.cat([kv.positions, torch.zeros(layers, heads, 1, dtype=torch.long)], 2),
        kv.lengths.clone(),
        kv.num_tokens,
    )


def evicted(kv: PassageKV, seed: int) -> PassageKV:
    """Each (layer, head) keeps a different random ~2/3 of the tokens, in position order; deeper
    layers keep fewer, so each layer's cache is padded to a different length."""
    generator = torch.Generator().manual_seed(seed)
    layers, heads, n, _ = kv.keys.shape
    keys, values = torch.zeros_like(kv.keys), torch.zeros_like(kv.values)
    positions, lengths = torch.zeros_like(kv.positions), torch.zeros(layers, heads, dtype=torch.long)
    for layer in range(layers):
        for head in range(heads):
            keep = torch.sort(torch.randperm(n, generator=generator)[: max(1, 2 * n // 3 - head - 5 * layer)]).values
            count = keep.numel()
            keys[layer, head, :count] = kv.keys[layer, head, keep]
            values[layer, head, :count] = kv.values[layer, head, keep]
            positions[layer, head, :count] = keep
            lengths[layer, head] = count
    return PassageKV(keys, values, positions, lengths, n)


@pytest.mark.parametrize(
    "arch",
    [
        "llama",
        "qwen2",
        "mistral",
        "gemma",
        "gemma2",
        "granite",
        "olmo2",
        "qwen3_moe",
        "phi3",
        "phi",
        "exaone4",
        "cohere",
        "glm",
    ],
)
def test_full_recompute_reproduces_full_prefill(arch, stores):
    engine = stores(arch)
    entries = engine.retrieve(QUESTION, 3)
    reused, _ = cached_logits(engine, entries, 0.0)
    full = full_logits(engine, entries)
    assert (reused - full).abs().max() > 1e-2  # there is a gap to close
    recomputed, report = cached_logits(engine, entries, 1.0)
    torch.testing.assert_close(recomputed, full, atol=1e-4, rtol=1e-4)
    first = entries[0].num_tokens
    assert report.selected.tolist() == list(range(first, sum(e.num_tokens for e in entries)))
    assert (
        engine.answer_cached(QUESTION, entries, AnswerOptions(recompute=1.0)).token_ids
        == engine.answer_full(QUESTION, entries).token_ids
    )


@pytest.mark.parametrize(
    "config",
    [
        RecomputeConfig(0.3),
        RecomputeConfig(0.3, sink_tokens=2, check_layer=2),
        RecomputeConfig(0.0, sink_tokens=3),
        RecomputeConfig(1.0),
        RecomputeConfig(0.3, selection="question"),
        RecomputeConfig(0.3, sink_tokens=2, selection="mixed"),
        RecomputeConfig(0.3, sink_tokens=2, final_ratio=0.05),
    ],
)
@pytest.mark.parametrize("layout", ["uniform", "per-head"])
def test_question_riding_in_the_recompute_pass_changes_nothing(stores, config, layout):
    """Fused (selected tokens + question in one pass) == recompute, then prefill the question.
    Gradual filtering narrows only above the check layer: it runs on a four-layer model."""
    engine = stores("qwen2", layers=2 if config.final_ratio is None else 4)
    entries = engine.retrieve(QUESTION, 3)
    loaded = [engine.store.load_kv(e) for e in entries]
    segments = loaded if layout == "uniform" else [padded(kv) for kv in loaded]
    separate, report = cached_logits(engine, entries, config, segments)
    built = assembled(engine, segments)
    together = fused(engine, built, segments, entries, config)
    assert torch.equal(together.selected, report.selected)
    torch.testing.assert_close(together.logits, separate, atol=1e-4, rtol=1e-4)
    assert [layer.keys.shape[2] for layer in built.cache.layers] == [
        int(rows) + len(engine.tokens.suffix(QUESTION)) for rows in built.context_rows
    ]


def test_zero_recompute_is_plain_reuse_bit_for_bit(stores):
    """Ratio 0 (the question passed, so a recompute could have fused it) touches no row of the
    assembled cache, returns no logits (the caller prefills the question as in plain reuse), and
    ``blend`` itself selects nothing; the question's logits then equal plain reuse's bit for bit."""
    engine = stores("llama")
    entries = engine.retrieve(QUESTION, 3)
    segments = [engine.store.load_kv(e) for e in entries]
    ids = [engine.tokens.passage(e.text) for e in entries]
    suffix = engine.tokens.suffix(QUESTION)
    args = (engine.lm.model, engine.rotary)
    for config in (RecomputeConfig(0.0), RecomputeConfig(ratio=0.0, temperature=1.0)):
        built = assembled(engine, segments)
        before = [(layer.keys.clone(), layer.values.clone()) for layer in built.cache.layers]
        assert repair(*args, built, engine.prefix, segments, ids, config, first_exact=True, suffix=suffix) is None
        report = blend(*args, built, engine.prefix, segments, ids, config, first_exact=True, suffix=suffix)
        assert report.selected.numel() == 0 and report.logits is None
        for layer, (keys, values) in zip(built.cache.layers, before, strict=True):
            assert torch.equal(layer.keys, keys) and torch.equal(layer.values, values)
        with torch.inference_mode():
            zero = forward_step(engine.lm.model, torch.tensor([suffix]), built.cache, built.next_position)
        assert torch.equal(zero, cached_logits(engine, entries, None)[0])


def test_selection_is_deterministic_and_sized(stores):
    engine = stores("qwen2")
    entries = engine.retrieve(QUESTION, 3)
    total = sum(e.num_tokens for e in entries)
    config = RecomputeConfig(ratio=0.2, sink_tokens=3)
    runs = [cached_logits(engine, entries, config) for _ in range(3)]
    assert all(torch.equal(r[1].selected, runs[0][1].selected) for r in runs)
    assert all(torch.equal(r[0], runs[0][0]) for r in runs)
    selected = runs[0][1].selected
    assert selected.numel() == round(0.2 * total)
    assert torch.equal(selected, torch.sort(selected).values)
    first, second = entries[0].num_tokens, entries[0].num_tokens + entries[1].num_tokens
    assert bool((selected >= first).all())  # the first passage is exact on a lossless store
    for start in (first, second):  # every later passage's sinks are in
        assert set(range(start, start + 3)) <= set(selected.tolist())


@pytest.mark.parametrize("selection", ["deviation", "mixed"])
def test_gradual_filtering_narrows_the_carried_tokens_layer_by_layer(stores, selection):
    """``final_ratio`` at the request's ratio is the plain recompute bit for bit; below it, the
    selection at the check layer is the same, the result deterministic, and at 0 no passage row
    of the last layer is rewritten (every token has been dropped by then), while the check
    layer's selected rows still are. Four layers: the check layer (1), then two to narrow over."""
    engine = stores("qwen2", layers=4)
    entries = engine.retrieve(QUESTION, 3)
    plain = RecomputeConfig(ratio=0.4, selection=selection)
    same, same_report = cached_logits(engine, entries, RecomputeConfig(0.4, selection=selection, final_ratio=0.4))
    reference, report = cached_logits(engine, entries, plain)
    assert torch.equal(same, reference) and torch.equal(same_report.selected, report.selected)

    segments = [engine.store.load_kv(e) for e in entries]
    stored = assembled(engine, segments)
    tapered = RecomputeConfig(0.4, selection=selection, final_ratio=0.0)
    built = assembled(engine, segments)
    first = fused(engine, built, segments, entries, tapered)
    second = fused(engine, assembled(engine, segments), segments, entries, tapered)
    assert torch.equal(first.selected, report.selected)  # chosen at the check layer as before
    assert torch.equal(first.logits, second.logits)
    assert not torch.allclose(first.logits, reference, atol=1e-4)  # dropping tokens changed the answer's logits
    rows = built.context_rows
    prefix = engine.prefix.num_tokens
    last, check = built.cache.layers[-1], built.cache.layers[1]
    assert torch.equal(last.keys[:, :, : int(rows[-1])], stored.cache.layers[-1].keys)
    picked = prefix + first.selected
    assert not torch.equal(check.values[:, :, picked], stored.cache.layers[1].values[:, :, picked])


@pytest.mark.parametrize("final_ratio", [0.0, 0.0005])
def test_gradual_filtering_to_nothing_without_the_question_riding_along(stores, final_ratio):
    """A temperature other than 1 keeps the question out of the recompute pass (it must act
    before the question is read): with nothing left to carry on the last layers, the pass ran a
    layer over zero rows and failed inside the model ("cannot reshape tensor of 0 elements").
    The layers above keep their stored rows instead, as with the question riding along."""
    engine = stores("qwen2", layers=4)
    entries = engine.retrieve(QUESTION, 3)
    config = RecomputeConfig(0.4, final_ratio=final_ratio, temperature=1.1)
    answer = engine.answer_cached(QUESTION, entries, engine.options.replace(recompute=config, max_new_tokens=3))
    assert len(answer.token_ids) == 3


def test_gradual_filtering_carries_the_sinks_through_every_layer(stores):
    """EPIC's sinks are recomputed through every layer however far the recompute narrows: at
    ``final_ratio=0`` the last layer's rows of every later passage's first tokens are rewritten,
    and no other passage row of that layer is."""
    engine = stores("qwen2", layers=4)
    entries = engine.retrieve(QUESTION, 3)
    segments = [engine.store.load_kv(e) for e in entries]
    stored = assembled(engine, segments)
    built = assembled(engine, segments)
    report = fused(engine, built, segments, entries, RecomputeConfig(0.4, sink_tokens=2, final_ratio=0.0))
    first, second = entries[0].num_tokens, entries[0].num_tokens + entries[1].num_tokens
    sinks = [first, first + 1, second, second + 1]  # the first passage is exact on a lossless store
    assert set(sinks) < set(report.selected.tolist())
    prefix, rows = engine.prefix.num_tokens, int(built.context_rows[-1])
    last, before = built.cache.layers[-1].values[:, :, :rows], stored.cache.layers[-1].values
    changed = [t for t in range(rows - prefix) if not torch.equal(last[:, :, prefix + t], before[:, :, prefix + t])]
    assert changed == sinks


@pytest.mark.parametrize("selection", ["question", "mixed", "question-deep"])
def test_question_aware_selection_is_deterministic_and_sized(stores, selection):
    engine = stores("qwen2")
    entries = engine.retrieve(QUESTION, 3)
    config = RecomputeConfig(ratio=0.2, selection=selection)
    runs = [cached_logits(engine, entries, config) for _ in range(2)]
    assert torch.equal(runs[0][1].selected, runs[1][1].selected)
    assert torch.equal(runs[0][0], runs[1][0])
    assert runs[0][1].selected.numel() == round(0.2 * sum(e.num_tokens for e in entries))
    deviation = cached_logits(engine, entries, RecomputeConfig(ratio=0.2))[1].selected
    assert not torch.equal(runs[0][1].selected, deviation)  # the ranking is not the deviation's


def test_question_selection_picks_what_the_question_attends_to_in_full_prefill(stores):
    """On a lossless store with check layer 1, the question's layer-1 attention over the passage
    tokens is full prefill's: the selection must be its top tokens (eager attention, computed
    independently from the model's own attention weights)."""
    engine = stores("qwen2")
    entries = engine.retrieve(QUESTION, 3)
    attentions = full_prefill_attentions(engine, entries)
    prefix, first = engine.prefix.num_tokens, entries[0].num_tokens
    total = sum(e.num_tokens for e in entries)
    question = len(engine.tokens.suffix(QUESTION))
    weights = attentions[1][0, :, -question:, prefix + first : prefix + total]  # [Hq, Q, candidates]
    relevance = (weights / weights.sum(-1, keepdim=True)).mean(dim=(0, 1))
    budget = round(0.2 * total)
    expected = torch.sort(torch.topk(relevance, budget).indices + first).values
    _, report = cached_logits(engine, entries, RecomputeConfig(ratio=0.2, selection="question"))
    assert report.selected.tolist() == expected.tolist()


@pytest.mark.parametrize("pad", [False, True])
def test_question_reading_is_the_questions_attention_over_every_layer_and_leaves_the_cache(stores, pad):
    """``question-deep`` ranks tokens by the attention the question pays them over every layer
    while it reads the cache as stored. With one passage the stored cache is full prefill's, so
    the scores must equal full prefill's own attention (eager weights, renormalized over the
    passage, averaged over heads, question tokens and layers); the padded (per-head) layout gives
    the same; and the cache is left as it was, row for row."""
    from ragcompress.runtime.cache_pass import CacheLayout
    from ragcompress.runtime.token_selection import question_reading

    engine = stores("qwen2")
    entries = engine.retrieve(QUESTION, 1)
    model = engine.lm.model
    attentions = full_prefill_attentions(engine, entries)
    prefix, passage = engine.prefix.num_tokens, entries[0].num_tokens
    suffix = engine.tokens.suffix(QUESTION)
    per_layer = []
    for weights in attentions:
        weights = weights[0, :, -len(suffix) :, prefix : prefix + passage]  # [Hq, Q, passage]
        per_layer.append((weights / weights.sum(-1, keepdim=True)).mean(dim=(0, 1)))
    expected = torch.stack(per_layer).mean(0)

    segments = [engine.store.load_kv(e) for e in entries]
    if pad:
        segments = [padded(seg) for seg in segments]
    built = assembled(engine, segments)
    before = [(layer.keys.clone(), layer.values.clone()) for layer in built.cache.layers]
    with torch.inference_mode():
        question = model.model.embed_tokens(torch.tensor([suffix]))
        new_pos = torch.arange(built.next_position, built.next_position + len(suffix))
        layout = CacheLayout(engine.prefix, segments)
        reading = question_reading(model, engine.rotary, layout, built.cache, torch.arange(passage), question, new_pos)
    assert torch.allclose(reading, expected, atol=1e-5), (reading - expected).abs().max()
    for (keys, values), layer in zip(before, built.cache.layers, strict=True):
        assert torch.equal(keys, layer.keys) and torch.equal(values, layer.values)


def test_question_aware_selection_needs_the_question(stores):
    engine = stores("qwen2")
    entries = engine.retrieve(QUESTION, 3)
    segments = [engine.store.load_kv(e) for e in entries]
    built = assembled(engine, segments)
    ids = [engine.tokens.passage(e.text) for e in entries]
    with pytest.raises(ValueError, match="question"):
        blend(
            engine.lm.model,
            engine.rotary,
            built,
            engine.prefix,
            segments,
            ids,
            RecomputeConfig(0.2, selection="question"),
        )


def test_select_tokens_ranks_by_deviation_and_breaks_ties_by_position():
    candidates = torch.arange(10, 20)
    deviation = torch.tensor([0.0, 5.0, 1.0, 5.0, 0.0, 3.0, 5.0, 0.0, 0.0, 2.0])
    sinks = torch.tensor([10, 15])
    picked = select_tokens(deviation, candidates, sinks, budget=5)
    assert picked.tolist() == [10, 11, 13, 15, 16]
    assert select_tokens(deviation, candidates, torch.zeros(0, dtype=torch.long), 2).tolist() == [11, 13]


def test_select_tokens_ranks_a_nan_deviation_last_and_takes_no_token_twice():
    """A NaN deviation sorted first (ahead of every real one), and a candidate ranked as low as
    the sinks could let a sink be taken a second time in its place."""
    candidates = torch.arange(10, 20)
    deviation = torch.tensor([0.0, float("nan"), 1.0, 5.0, float("-inf"), 3.0, 5.0, 0.0, float("nan"), 2.0])
    sinks = torch.tensor([10, 15])
    assert select_tokens(deviation, candidates, sinks, budget=5).tolist() == [10, 13, 15, 16, 19]
    every = select_tokens(deviation, candidates, sinks, budget=10)
    assert every.tolist() == list(range(10, 20))


def test_epic_sinks_only(stores):
    engine = stores("llama")
    entries = engine.retrieve(QUESTION, 3)
    _, report = cached_logits(engine, entries, RecomputeConfig(ratio=0.0, sink_tokens=2))
    first, second = entries[0].num_tokens, entries[0].num_tokens + entries[1].num_tokens
    assert report.selected.tolist() == [first, first + 1, second, second + 1]


def test_per_head_path_reproduces_full_prefill(stores):
    """A padded layout goes through the per-layer, per-head masks and row maps."""
    engine = stores("qwen2")
    entries = engine.retrieve(QUESTION, 3)
    segments = [padded(engine.store.load_kv(e)) for e in entries]
    recomputed, report = cached_logits(engine, entries, 1.0, segments)
    torch.testing.assert_close(recomputed, full_logits(engine, entries), atol=1e-4, rtol=1e-4)
    assert report.candidates == sum(e.num_tokens for e in entries)  # padded: first not assumed exact
    uniform, uniform_report = cached_logits(engine, entries, 0.3)
    per_head, per_head_report = cached_logits(engine, entries, 0.3, segments)
    # the padded first passage is a candidate, but exact: it deviates least, so the same tokens are
    # chosen and the per-head masks and row maps must give the uniform path's answer
    assert torch.equal(per_head_report.selected, uniform_report.selected)
    torch.testing.assert_close(per_head, uniform, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(
    "config",
    [
        RecomputeConfig(0.3, sink_tokens=2, selection="mixed"),  # the question rides in the pass
        RecomputeConfig(0.3, selection="question", check_layer=2),  # ranked by the question
        RecomputeConfig(0.3, selection="question-deep"),  # read over every layer, then taken out
    ],
)
def test_recompute_keeps_the_preallocated_buffers_so_decoding_writes_in_place(stores, monkeypatch, config):
    """A recompute that appends the question to the assembled cache (fused, or only to score the
    tokens) used to concatenate it, leaving every ``PreallocatedLayer`` without its buffer, and
    every later decoding step then copied the whole context. The layers still own their buffers
    after the request's prefill and its decoding steps, and the logits are the concatenating
    path's bit for bit."""
    from ragcompress.kv.cache import PreallocatedLayer
    from ragcompress.runtime import cache_pass
    from ragcompress.runtime.generate import decode_one_token

    engine = stores("qwen2", layers=4)
    entries = engine.retrieve(QUESTION, 3)
    options = AnswerOptions(recompute=config, max_new_tokens=4)

    def run() -> tuple[list[torch.Tensor], list]:
        prepared = engine.prepare(QUESTION, entries, options).prefilled(engine.lm.model)
        logits, position = [prepared.first_logits], prepared.position + len(prepared.input_ids)
        with torch.inference_mode():
            for step in range(3):
                token = int(logits[-1].argmax())
                logits.append(
                    decode_one_token(
                        engine.lm.model, token, prepared.cache, position + step, **prepared.attention_kwargs
                    )
                )
        return logits, list(prepared.cache.layers)

    logits, layers = run()
    assert all(isinstance(layer, PreallocatedLayer) for layer in layers)
    assert all(layer._own_buffers() is not None for layer in layers)  # still writing in place
    monkeypatch.setattr(cache_pass, "PreallocatedLayer", type("NoLayerIsOne", (), {}))  # the concatenation
    previous, previous_layers = run()
    assert not any(layer._own_buffers() is not None for layer in previous_layers)
    for new, old in zip(logits, previous, strict=True):
        assert torch.equal(new.reshape(-1), old.reshape(-1))


def test_recompute_on_evicted_caches_only_writes_kept_rows(stores):
    engine = stores("llama")
    entries = engine.retrieve(QUESTION, 3)
    segments = [evicted(engine.store.load_kv(e), i) for i, e in enumerate(entries)]
    plain, _ = cached_logits(engine, entries, 0.0, segments)
    built = assembled(engine, segments)
    before = [layer.keys.clone() for layer in built.cache.layers]
    report = blend_only(engine, built, segments, entries, RecomputeConfig(ratio=1.0))
    assert report.selected.numel() == sum(e.num_tokens for e in entries)
    for layer, old in zip(built.cache.layers, before, strict=True):
        assert layer.keys.shape == old.shape
        changed = (layer.keys != old).any(-1)[0]  # [kv_heads, T]
        assert not bool(changed[:, : engine.prefix.num_tokens].any())  # prefix untouched
    for layer_idx, layer in enumerate(built.cache.layers):
        padding = ~built.kv_mask[layer_idx]
        assert bool((layer.keys[0][padding] == 0).all())  # padding rows stay padding
    recomputed, _ = cached_logits(engine, entries, 1.0, segments)
    assert not torch.equal(recomputed, plain)


@pytest.mark.parametrize("longest_layer", [0, 1])
def test_layers_padded_separately_read_like_the_masked_uniform_cache(stores, longest_layer):
    """Per-layer padding: each layer's cache holds the prefix and, per passage, as many rows as
    that layer's longest head keeps. Every suffix token must read exactly what it reads from the
    un-evicted cache with the evicted rows masked out (same stored rows, the uniform layout),
    which checks the per-layer offsets, the per-layer RoPE and the alignment of transformers'
    mask (sized by layer 0) with longer and shorter layers."""
    from ragcompress.runtime.attention import KV_MASK_KWARG
    from ragcompress.runtime.generate import forward_logits

    engine = stores("llama")
    entries = engine.retrieve(QUESTION, 3)
    full = [engine.store.load_kv(e) for e in entries]
    segments = [evicted(kv, i) for i, kv in enumerate(full)]
    for kv, whole in zip(segments, full, strict=True):  # one head of this layer keeps everything
        kv.lengths[longest_layer, 0] = kv.num_tokens
        kv.positions[longest_layer, 0] = torch.arange(kv.num_tokens)
        kv.keys[longest_layer, 0], kv.values[longest_layer, 0] = (
            whole.keys[longest_layer, 0],
            whole.values[longest_layer, 0],
        )
    built = assembled(engine, segments)
    p = engine.prefix.keys.shape[2]
    widths = torch.stack([kv.layer_rows() for kv in segments]).sum(0)
    assert [layer.keys.shape[2] for layer in built.cache.layers] == (p + widths).tolist()
    assert int(widths.argmax()) == longest_layer and int(widths.min()) < int(widths.max())

    reference = assembled(engine, full)
    layers, heads = full[0].lengths.shape
    visible = [torch.ones(heads, p, dtype=torch.bool)]
    for kv in segments:
        seen = torch.zeros(layers, heads, kv.num_tokens, dtype=torch.bool)
        for layer in range(layers):
            for head in range(heads):
                seen[layer, head, kv.positions[layer, head, : kv.lengths[layer, head]]] = True
        visible.append(seen)
    mask = torch.cat([visible[0].expand(layers, -1, -1)] + visible[1:], dim=2)
    suffix = torch.tensor([engine.tokens.suffix(QUESTION)])
    with torch.inference_mode():
        ragged = forward_logits(
            engine.lm.model, suffix, built.cache, built.next_position, 0, **built.attention_kwargs()
        )
        masked = forward_logits(
            engine.lm.model, suffix, reference.cache, reference.next_position, 0, **{KV_MASK_KWARG: mask}
        )
    torch.testing.assert_close(ragged, masked, atol=1e-4, rtol=1e-4)


def test_int8_store_leaves_the_first_passage_alone(stores):
    """Rounded to int8, the passage read first is full prefill's cache up to that rounding: it is
    not a candidate (the check pass skips it), so even ``R=1`` keeps its rows and repairs the rest."""
    engine = stores("llama", "int8")
    entries = engine.retrieve(QUESTION, 2)
    assert engine.store.manifest.passages_exact
    segments = [engine.store.load_kv(e) for e in entries]
    built = assembled(engine, segments)
    start, first = engine.prefix.num_tokens, entries[0].num_tokens
    first_rows = [layer.keys[:, :, start : start + first].clone() for layer in built.cache.layers]
    report = blend_only(engine, built, segments, entries, 1.0)
    assert report.candidates == entries[1].num_tokens
    assert report.selected.tolist() == list(range(first, first + entries[1].num_tokens))
    for layer, before in zip(built.cache.layers, first_rows, strict=True):
        assert torch.equal(layer.keys[:, :, start : start + first], before)
    reused, _ = cached_logits(engine, entries, 0.0)
    recomputed, _ = cached_logits(engine, entries, 1.0)
    full = full_logits(engine, entries)
    assert (recomputed - full).abs().max() < 0.2 * (reused - full).abs().max()


def test_quantized_store_recomputes_the_first_passage_too(stores):
    engine = stores("llama", "int4")
    entries = engine.retrieve(QUESTION, 2)
    _, report = cached_logits(engine, entries, 1.0)
    assert report.candidates == sum(e.num_tokens for e in entries)
    reused, _ = cached_logits(engine, entries, 0.0)
    recomputed, _ = cached_logits(engine, entries, 1.0)
    full = full_logits(engine, entries)
    torch.testing.assert_close(recomputed, full, atol=1e-4, rtol=1e-4)
    assert (reused - full).abs().max() > 1e-3


def test_temperature_scales_only_passage_keys(stores):
    engine = stores("llama")
    entries = engine.retrieve(QUESTION, 2)
    segments = [engine.store.load_kv(e) for e in entries]
    built = assembled(engine, segments)
    before = [layer.keys.clone() for layer in built.cache.layers]
    repair(engine.lm.model, engine.rotary, built, engine.prefix, segments, [], RecomputeConfig(temperature=0.5))
    p = engine.prefix.num_tokens
    for layer, old in zip(built.cache.layers, before, strict=True):
        assert torch.equal(layer.keys[:, :, :p], old[:, :, :p])
        torch.testing.assert_close(layer.keys[:, :, p:], 2.0 * old[:, :, p:])
    with pytest.raises(ValueError, match="temperature"):
        scale_context_keys(built.cache, 0, 1, 0.0)


@pytest.mark.parametrize(
    "fields",
    [
        {"ratio": -0.1},
        {"ratio": 1.5},
        {"sink_tokens": -1},
        {"check_layer": 0},
        {"temperature": 0.0},
        {"selection": "x"},
        {"ratio_by_passages": ((0, 0.0),)},
        {"ratio_by_passages": ((5, 0.0), (3, 0.1))},
        {"ratio_by_passages": ((3, 0.0), (3, 0.1))},
        {"ratio_by_passages": ((3, 0.0), (5, 1.5))},
        {"ratio_by_passages": ((3, 0.05),)},  # ratio 0 is not the first point's
        {"final_ratio": 1.5},
    ],
)
def test_config_rejects_bad_values(fields):
    with pytest.raises(ValueError, match=next(iter(fields))):
        RecomputeConfig(**fields)


def test_a_check_layer_beyond_the_model_is_refused(stores):
    """It used to be clamped to the last layer without a word: another setting than asked. At
    the last layer itself the check pass runs every candidate through every layer, so all of
    them are recomputed, and the report says so (it named a budget's worth, chosen by nothing)."""
    engine = stores("llama")
    entries = engine.retrieve(QUESTION, 2)
    layers = engine.lm.config.num_hidden_layers
    _, report = cached_logits(engine, entries, RecomputeConfig(0.3, check_layer=layers))  # the last layer: allowed
    assert report.selected.numel() == report.candidates
    with pytest.raises(ValueError, match=f"check_layer {layers + 1} is beyond the model's {layers} layers"):
        cached_logits(engine, entries, RecomputeConfig(0.3, check_layer=layers + 1))


def test_ratio_by_passages_interpolates_between_its_points_and_holds_outside():
    config = RecomputeConfig(ratio=0.05, ratio_by_passages=[(3, 0.05), (5, 0.1)])
    assert config.ratio_by_passages == ((3, 0.05), (5, 0.1))  # stored as tuples: hashable
    assert [config.ratio_for(k) for k in (1, 2, 3)] == [0.05, 0.05, 0.05]
    assert config.ratio_for(4) == pytest.approx(0.075)
    assert [config.ratio_for(k) for k in (5, 8, 20)] == [pytest.approx(0.1)] * 3
    assert RecomputeConfig(ratio=0.2).ratio_for(7) == 0.2  # no points: one fraction
    fixed = config.with_ratio(0.3)  # an explicit --recompute: every top-k, the selection kept
    assert (fixed.ratio, fixed.ratio_by_passages, fixed.ratio_for(5)) == (0.3, (), 0.3)
    zero_first = RecomputeConfig(ratio_by_passages=((3, 0.0), (5, 0.1)))
    assert zero_first.recomputes and not zero_first.with_ratio(0.0).recomputes


def test_blend_recomputes_the_fraction_for_the_number_of_passages(stores):
    """A request reads the schedule at its own passage count: the same tokens as a fixed ratio of
    that value, so 3 and 5 passages recompute different fractions of their tokens."""
    engine = stores("qwen2")
    schedule = RecomputeConfig(ratio=0.1, ratio_by_passages=((3, 0.1), (5, 0.3)), selection="mixed")
    for k, fixed in ((3, 0.1), (4, 0.2), (5, 0.3)):
        entries = engine.retrieve(QUESTION, k)
        segments = [engine.store.load_kv(e) for e in entries]
        reports = [
            blend_only(engine, assembled(engine, segments), segments, entries, config)
            for config in (schedule, schedule.with_ratio(fixed))
        ]
        assert reports[0].selected.numel() == round(fixed * sum(e.num_tokens for e in entries))
        assert torch.equal(reports[0].selected, reports[1].selected)


def test_blend_rejects_token_ids_of_the_wrong_length(stores):
    engine = stores("llama")
    entries = engine.retrieve(QUESTION, 2)
    segments = [engine.store.load_kv(e) for e in entries]
    built = assembled(engine, segments)
    ids = [engine.tokens.passage(e.text) for e in entries]
    ids[1] = ids[1][:-1]
    with pytest.raises(ValueError, match="tokens"):
        blend(engine.lm.model, engine.rotary, built, engine.prefix, segments, ids, RecomputeConfig(0.5))


@pytest.mark.slow
def test_full_recompute_agrees_with_full_prefill_on_real_questions(tmp_path, embedder):
    """SmolLM2 on the bundled SQuAD sample, top-3: recompute 100 % answers like full prefill."""
    import json

    from ragcompress.data import SAMPLE_PASSAGES, SAMPLE_QUESTIONS

    index(SAMPLE_PASSAGES, tmp_path / "store", embedder=embedder)
    engine = Engine.open(tmp_path / "store")
    questions = [json.loads(line)["question"] for line in SAMPLE_QUESTIONS.read_text().splitlines()[:5]]
    agree = []
    for question in questions:
        entries = engine.retrieve(question, 3)
        full = engine.answer_full(question, entries)
        agree.append(engine.answer_cached(question, entries, AnswerOptions(recompute=1.0)).answer == full.answer)
    assert sum(agree) / len(agree) >= 0.98


def test_cli_recompute_one_answers_like_full_prefill(stores, monkeypatch, capfd):
    import json
    import sys

    from ragcompress.cli import main

    engine = stores("qwen2")
    monkeypatch.setattr(
        sys,
        "argv",
        [
            "ragcompress",
            "ask",
            "--store",
            str(engine.store.path),
            "--question",
            QUESTION,
            "--top-k",
            "3",
            "--max-new-tokens",
            "6",
            "--recompute",
            "1",
            "--compare-full",
            "--json",
        ],
    )
    try:
        main()
    except SystemExit as exc:
        assert not exc.code
    data = json.loads(capfd.readouterr().out)
    assert data["answer"] == data["full"]["answer"]


def test_reversed_setting_is_full_prefill_of_the_passages_in_the_opposite_order(stores):
    """benchmarks/recompute_quality.py's ``reversed`` row (the answer stability bound of
    docs/recompute.md): one passage reversed is the same prompt (same answer, KL 0); three passages
    reversed is another prompt, whose KL to the retrieved order's full prefill is not 0."""
    from types import SimpleNamespace

    import recompute_quality as quality  # benchmarks/ is on pytest's pythonpath

    built = stores("qwen2", "none")
    engine = Engine(built.store, built.lm, built.embedder, AnswerOptions(max_new_tokens=4, backend="dense"))
    item = SimpleNamespace(id="q", question=QUESTION, answers=["Melbourne"])
    variants = quality.Variants(engine, {})
    one = quality.question_record(variants, item, 1, ["reversed"])
    assert one["reversed"]["answer"] == one["full"]["answer"] and one["reversed"]["kl"] == 0.0
    three = quality.question_record(variants, item, 3, ["reversed"])
    assert len(set(three["passages"])) == 3 and three["reversed"]["kl"] > 1e-6


def test_oracle_setting_is_full_prefill_on_an_unquantized_store(stores):
    """benchmarks/recompute_quality.py's ``oracle`` row (every passage's exact KV, through the
    dense path's own assembly): on a store that does not quantize, it is full prefill's answer
    with KL 0 up to float rounding, for one passage and for three."""
    from types import SimpleNamespace

    import recompute_quality as quality

    built = stores("qwen2", "none")
    engine = Engine(built.store, built.lm, built.embedder, AnswerOptions(max_new_tokens=4, backend="dense"))
    item = SimpleNamespace(id="q", question=QUESTION, answers=["Melbourne"])
    variants = quality.Variants(engine, {})
    for top_k in (1, 3):
        record = quality.question_record(variants, item, top_k, ["oracle"])
        assert record["oracle"]["answer"] == record["full"]["answer"] and record["oracle"]["kl"] < 1e-6


def test_quality_benchmark_rotates_which_timed_path_runs_first(stores, monkeypatch):
    """recompute_quality.py times full prefill, prefix-cached prefill and each setting once per
    question; the untimed reference prefill comes first, then the timed paths start one place on
    per question, so over consecutive questions each path is the first to run once."""
    from types import SimpleNamespace

    import recompute_quality as quality

    built = stores("qwen2", "none")
    engine = Engine(built.store, built.lm, built.embedder, AnswerOptions(max_new_tokens=2, backend="dense"))
    calls: list[str] = []
    for method, name in (
        ("stream_full", "full"),
        ("stream_prefix_cached", "prefix-cached"),
        ("stream_cached", "reuse"),
    ):
        original = getattr(engine, method)
        monkeypatch.setattr(engine, method, lambda *a, _o=original, _n=name, **k: (calls.append(_n), _o(*a, **k))[1])
    item = SimpleNamespace(id="q", question=QUESTION, answers=["Melbourne"])
    variants = quality.Variants(engine, {})
    firsts = []
    for rotation in range(3):
        calls.clear()
        record = quality.question_record(variants, item, 2, ["reuse"], rotation=rotation)
        assert calls[0] == "full" and sorted(calls[1:]) == ["full", "prefix-cached", "reuse"]
        firsts.append(calls[1])
        assert record["full"]["ttft"] > 0 and record["prefix_cached_ttft"] > 0 and record["reuse"]["ttft"] > 0
    assert firsts == ["full", "prefix-cached", "reuse"]


@pytest.mark.parametrize("selection", ["mixed", "question-deep"])
def test_recompute_cost_benchmark_names_every_pass_with_its_rows(stores, selection):
    """benchmarks/recompute_cost.py times recompute's passes by wrapping ``cache_pass.run_layers``: each call
    is named for the pass it is, with the rows it carries, and the answer does not change."""
    import importlib

    import ragcompress.runtime.cache_pass as cache_pass

    recompute_cost = importlib.import_module("recompute_cost")
    engine = stores("qwen2")
    entries = engine.retrieve(QUESTION, 3)
    options = AnswerOptions(max_new_tokens=4, recompute=RecomputeConfig(ratio=0.2, selection=selection))
    plain = engine.answer_cached(QUESTION, entries, options)
    timer = recompute_cost.PassTimer()
    cache_pass.run_layers, timer.on = timer, True
    try:
        timed = engine.answer_cached(QUESTION, entries, options)
    finally:
        cache_pass.run_layers = timer.original
    total = sum(e.num_tokens for e in entries)
    question = len(engine.tokens.suffix(QUESTION))
    assert timed.token_ids == plain.token_ids
    if selection == "mixed":
        expected = {
            "check": total - entries[0].num_tokens,  # lossless store: the first passage is exact
            "question_below_check": question,
            "fused": round(0.2 * total) + question,
        }
    else:  # the question over every layer of the stored cache ranks the tokens: no check pass
        expected = {"question_reading": question, "fused": round(0.2 * total) + question}
    assert timer.rows == expected
    taken = timer.take()
    assert set(taken) == set(recompute_cost.PASSES) and not timer.seconds
    assert all((seconds > 0) == (name in expected) for name, seconds in taken.items())


# --- the model on CUDA (benchmarks/gpu_check.sh) --------------------------------------------------


def blend_on(device: str, layout: str, config: RecomputeConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """``(selected, logits)`` of a fused recompute with a tiny random Qwen2 on ``device``: random
    prefix and passage caches (per head: each head keeps its own rows), read from the CPU as the
    store gives them. No tokenizer, store or embedder: the check needs only torch and transformers."""
    from dataclasses import replace

    from transformers import AutoConfig, AutoModelForCausalLM

    from ragcompress.kv.rope import Rotary
    from ragcompress.runtime.attention import register_attention

    model_config = AutoConfig.for_model(
        "qwen2",
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        initializer_range=0.2,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(model_config, attn_implementation=register_attention()).eval()
    model.to(device)
    gen = torch.Generator().manual_seed(1)
    prefix = PassageKV.full(torch.randn(3, 2, 6, 8, generator=gen), torch.randn(3, 2, 6, 8, generator=gen))
    segments = [
        PassageKV.full(torch.randn(3, 2, n, 8, generator=gen), torch.randn(3, 2, n, 8, generator=gen))
        for n in (9, 14, 11)
    ]
    if layout == "per-head":
        segments = [evicted(kv, seed) for seed, kv in enumerate(segments)]
    token_ids = [torch.randint(64, (kv.num_tokens,), generator=gen).tolist() for kv in segments]
    rotary = Rotary(model)
    prefix_keys = rotary.rotate_layers(prefix.keys, prefix.positions).to(device)  # as QueryContext places it
    prefix = replace(prefix, values=prefix.values.to(device))
    built = assemble(model.config, rotary, prefix_keys, prefix, segments, torch.float32, spare_rows=4)
    suffix = [5, 17, 3, 40]
    report = blend(model, rotary, built, prefix, segments, token_ids, config, suffix=suffix)
    assert report.logits is not None and report.logits.device.type == torch.device(device).type
    return report.selected, report.logits.cpu()


@pytest.mark.gpu
@pytest.mark.parametrize("config", [RecomputeConfig(0.3, sink_tokens=2, selection="mixed"), RecomputeConfig(1.0)])
@pytest.mark.parametrize("layout", ["uniform", "per-head"])
def test_recompute_on_cuda_matches_the_cpu(layout, config):
    """Every tensor that indexes the model's (token ids, cache rows, masks, kept hidden states) is
    on the model's device: the recompute runs on CUDA and selects and computes what it does on
    the CPU."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    cpu_selected, cpu_logits = blend_on("cpu", layout, config)
    selected, logits = blend_on("cuda", layout, config)
    assert torch.equal(selected, cpu_selected)
    torch.testing.assert_close(logits, cpu_logits, atol=1e-4, rtol=1e-4)


def test_quality_benchmark_keeps_records_of_each_dtype_apart(tmp_path):
    """recompute_quality.py --dtype: a checkpoint resumes and reports only the records of the run's
    own dtype (those written before the option are float32's), and --reference-full counts how
    often an answer is another run's float32 full-prefill answer, over the questions both hold."""
    import argparse
    import json
    from types import SimpleNamespace

    import recompute_quality as quality

    def record(qid: str, dtype: str | None, full: str, reuse: str) -> dict:
        row = {"top_k": 3, "id": qid, "full": {"answer": full}, "reuse": {"answer": reuse}}
        return row if dtype is None else {**row, "dtype": dtype}

    ours = tmp_path / "bf16.jsonl"
    ours.write_text(
        "\n".join(
            json.dumps(r)
            for r in (
                record("a", "bfloat16", "x", "x"),
                record("b", "bfloat16", "y", "z"),
                record("c", "float32", "w", "w"),  # another dtype in the same file: not ours
            )
        )
    )
    reference = tmp_path / "fp32.jsonl"
    reference.write_text(
        "\n".join(
            json.dumps(r)
            for r in (record("a", None, "x", "q"), record("b", None, "z", "q"), record("d", None, "v", "v"))
        )
    )
    assert set(quality.checkpointed(ours, 3, ["reuse"], "bfloat16")) == {"a", "b"}
    assert set(quality.checkpointed(ours, 3, ["reuse"], "float32")) == {"c"}
    assert set(quality.checkpointed(reference, 3, [], "float32")) == {"a", "b", "d"}  # no dtype: float32
    assert quality.checkpointed(reference, 3, [], "bfloat16") == {}
    args = argparse.Namespace(top_k=[3], checkpoint=ours, settings=["reuse"], reference_full=reference)
    questions = [SimpleNamespace(id=i) for i in "abcd"]
    out = quality.reference_full(args, questions, "bfloat16")
    assert out["top3 full"]["n"] == 2 and out["top3 full"]["agreement"] == 0.5  # a: x = x; b: y != z
    assert out["top3 reuse"]["agreement"] == 1.0  # a: x = x; b: z = z


def test_dtype_ttft_benchmark_times_every_dtype_and_path_on_the_same_passages(stores):
    """benchmarks/dtype_ttft.py: each question's passages are answered by full prefill and by the
    cached path in every dtype (a bf16 engine really runs bf16 weights), the first of the runs
    rotating one place per question; the first dtype is the reference of the ratios."""
    from types import SimpleNamespace

    import dtype_ttft

    built = stores("qwen2", "none")
    options = AnswerOptions(max_new_tokens=1, backend="dense")
    engines = {d: Engine.open(built.store.path, options=options, dtype=d) for d in ("float32", "bfloat16")}
    assert engines["bfloat16"].lm.model.dtype == torch.bfloat16
    order: list[str] = []
    for dtype, engine in engines.items():
        for path, method in (("full", "answer_full"), ("cached", "answer_cached")):
            original = getattr(engine, method)
            setattr(
                engine, method, lambda *a, _o=original, _n=f"{dtype}/{path}", **k: (order.append(_n), _o(*a, **k))[1]
            )
    questions = [
        SimpleNamespace(id=f"q{i}", question=q) for i, q in enumerate([QUESTION, "Who won?", "When?", "Where?"])
    ]
    records = dtype_ttft.measure(engines, questions, 2)
    firsts = order[::4]
    assert firsts == ["float32/full", "float32/cached", "bfloat16/full", "bfloat16/cached"]
    assert all(len(r["passages"]) == 2 and all(r[k]["ttft"] > 0 for k in firsts) for r in records)
    summary = dtype_ttft.summarize(records, ["float32", "bfloat16"])
    reference = summary["rows"]["float32"]
    assert (
        reference["full_speedup_vs_first_dtype"] == 1.0 and reference["first_token_as_first_dtype_full"]["full"] == 1.0
    )
    assert summary["n"] == 4 and reference["cached_vs_own_full"] == reference["cached_vs_first_dtype_full"]
    for engine in engines.values():
        engine.close()


def test_benchmarks_refuse_questions_from_an_adaptors_training_articles(tmp_path):
    """common.store_adaptors (recompute_quality.py, dtype_ttft.py): a store encoded through a
    packaged adaptor may be measured on articles the adaptor never saw, and is refused on one it
    was trained on; a store without an adaptor has nothing to check."""
    from pathlib import Path

    import ragcompress.distill as distill
    from ragcompress.distill.adaptor import Adaptor
    from ragcompress.testing import manifest_only_store

    import common

    adaptor = Adaptor.load(Path(distill.__file__).parent / "adaptors" / "smollm2-135m")
    store = manifest_only_store(tmp_path / "store", {"adaptor": adaptor.hash})
    plain = manifest_only_store(tmp_path / "plain", {})
    trained = set(adaptor.meta["train_articles"])
    unseen = set(adaptor.meta["val_articles"])
    assert common.store_adaptors({"s": str(store)}, unseen)["s"]["hash"] == adaptor.hash
    with pytest.raises(SystemExit, match="was trained on"):
        common.store_adaptors({"s": str(store)}, unseen | {sorted(trained)[0]})
    assert common.store_adaptors({"p": str(plain)}, trained) == {}


def test_benchmarks_read_a_stores_manifest_as_the_library_does(tmp_path):
    """common.store_adaptors parsed manifest.json by hand: a folder that is not a store gave a
    FileNotFoundError traceback, and a manifest whose adaptor was edited away after the build
    passed as a store of the base model, its training articles unchecked. Both are the store's
    own errors now (``Manifest.read``), ending the script (recompute_quality.py, dtype_ttft.py) as
    its one line naming the store, as the scripts' other refusals do: the StoreError was a
    traceback. An ``--adaptor-dir`` that holds no adaptor likewise."""
    import json
    import re

    from ragcompress.errors import StoreError
    from ragcompress.store.manifest import Manifest
    from ragcompress.testing import manifest_only_store

    import common

    with pytest.raises(SystemExit) as caught:
        common.store_adaptors({"s": str(tmp_path)}, set())
    assert str(caught.value).startswith(f"store s: {tmp_path} is not a ragcompress store (no manifest.json); ")
    store = manifest_only_store(tmp_path / "store", {"adaptor": "0" * 64})
    data = json.loads((store / "manifest.json").read_text())
    (store / "manifest.json").write_text(json.dumps({**data, "encoding": {}}))
    with pytest.raises(SystemExit) as caught:
        common.store_adaptors({"s": str(store)}, set())
    with pytest.raises(StoreError) as library:
        Manifest.read(store)
    assert str(caught.value) == f"store s: {library.value}" and "was edited after the store was built" in str(
        caught.value
    )
    assert "\n" not in str(caught.value)
    with pytest.raises(SystemExit, match=rf"^--adaptor-dir: {re.escape(str(tmp_path))} is not an adaptor \(needs "):
        common.store_adaptors({}, set(), [tmp_path])


def test_dtype_ttft_names_its_store_by_its_folder(tmp_path, monkeypatch):
    """benchmarks/dtype_ttft.py gave common.store_adaptors its one store as ``store``, so its
    refusals began "store store: ..."; the store is named by its folder now."""
    import sys

    import dtype_ttft

    from conftest import require_squad

    require_squad()  # the questions are picked before the store is read
    folder = tmp_path / "faithful-bc"
    folder.mkdir()
    monkeypatch.setattr(sys, "argv", ["dtype_ttft.py", "--store", str(folder), "--sample", "1"])
    with pytest.raises(SystemExit) as caught:
        dtype_ttft.main()
    assert str(caught.value).startswith(f"store faithful-bc: {folder} is not a ragcompress store")


def test_neighbour_overlap_counts_a_context_exact_only_when_it_is_the_encoding_context():
    """benchmarks/neighbour_overlap.py: a passage retrieved second after its one nearest
    neighbour has an exact context when it was encoded after that neighbour alone (N = 1), not
    when it was encoded after two passages (N = 2) whose last is that neighbour."""
    import neighbour_overlap as bench

    passages = np.array([[1.0, 0.0, 0.0], [0.8, 0.6, 0.0], [0.0, 0.6, 0.8]])
    question = np.array([[1.0, 0.1, 0.0]]) / np.linalg.norm([1.0, 0.1, 0.0])  # retrieves 0, then 1
    one, two = (bench.overlap(passages, question, n, top_k=2) for n in (1, 2))
    assert one["all_predecessors_among_neighbours"] == 1.0 and one["exact_context"] == 1.0
    assert two["all_predecessors_among_neighbours"] == 1.0 and two["exact_context"] == 0.0


def test_quality_benchmark_refuses_to_mix_runs_in_one_checkpoint(tmp_path, monkeypatch):
    """recompute_quality.py: each record carries its run (store, variants, answer length, code
    revision, threads); resuming or reporting with another store or answer length stops with the
    question and the setting named, records from before the field are taken as they are, and a
    report names every revision that measured its records."""
    import argparse
    import json

    import recompute_quality as quality

    args = argparse.Namespace(store=str(tmp_path / "store"), variant=[], max_new_tokens=12)
    built = ["2026-12-06T10:00:00Z"]  # the store's manifest's ``created``
    monkeypatch.setattr(quality, "store_created", lambda path: built[0])
    run = quality.run_identity(args, 1)
    record = {"top_k": 3, "dtype": "float32", "full": {}, "reuse": {}}
    checkpoint = tmp_path / "c.jsonl"
    checkpoint.write_text(
        "\n".join(
            json.dumps(r)
            for r in (
                {**record, "id": "a", "run": {**run, "git": "abc1234"}},
                {**record, "id": "b"},  # written before records named their run
            )
        )
    )
    done = quality.checkpointed(checkpoint, 3, ["reuse"], "float32", run)
    assert set(done) == {"a", "b"}
    assert quality.measured_by(r.get("run") or {} for r in done.values()) == {
        "git": ["abc1234", "not recorded"],
        "threads": ["1", "not recorded"],
    }
    for changed in ({"max_new_tokens": 32}, {"store": str(tmp_path / "other")}):
        other = quality.run_identity(argparse.Namespace(**{**vars(args), **changed}), 1)
        with pytest.raises(SystemExit, match="question a was answered with"):
            quality.checkpointed(checkpoint, 3, ["reuse"], "float32", other)
    # TTFT ratios move with the threads; a store rebuilt at the same path is another store
    with pytest.raises(SystemExit, match="answered with threads 1"):
        quality.checkpointed(checkpoint, 3, ["reuse"], "float32", quality.run_identity(args, 2))
    assert set(quality.checkpointed(checkpoint, 3, ["reuse"], "float32", quality.run_identity(args, None))) == {
        "a",
        "b",
    }  # a report not told the threads does not check them
    # a checkpoint resumed across the change that added threads and stores_created is one run
    older = {k: v for k, v in run.items() if k not in ("threads", "stores_created")}
    assert quality.one_run([{"run": older}, {"run": run}], checkpoint) == older
    with pytest.raises(SystemExit, match="answered by 2 runs"):
        quality.one_run([{"run": older}, {"run": {**run, "max_new_tokens": 32}}], checkpoint)
    built[0] = "2026-12-07T10:00:00Z"
    with pytest.raises(SystemExit, match="answered with stores_created"):
        quality.checkpointed(checkpoint, 3, ["reuse"], "float32", quality.run_identity(args, 1))


def test_quality_benchmark_records_name_their_run(stores, tmp_path):
    """recompute_quality.evaluate writes each record with its dtype and run (store, variants,
    answer length, code revision, threads), and a rerun resumes from them without answering again."""
    import argparse
    import json
    from types import SimpleNamespace

    import recompute_quality as quality

    built = stores("qwen2", "none")
    engine = Engine(built.store, built.lm, built.embedder, AnswerOptions(max_new_tokens=2, backend="dense"))
    args = argparse.Namespace(store=str(built.store.path), variant=[], max_new_tokens=2)
    run = quality.run_identity(args, torch.get_num_threads())
    checkpoint = tmp_path / "c.jsonl"
    questions = [SimpleNamespace(id="q", question=QUESTION, answers=["Melbourne"])]
    variants = quality.Variants(engine, {})
    quality.evaluate(variants, questions, 1, ["reuse"], False, checkpoint, run)
    record = json.loads(checkpoint.read_text())
    assert record["dtype"] == "float32" and {k: record["run"][k] for k in run} == run
    assert record["run"]["git"] and record["run"]["threads"] == torch.get_num_threads()
    again = quality.evaluate(variants, questions, 1, ["reuse"], False, checkpoint, run)
    assert again == [record] and len(checkpoint.read_text().splitlines()) == 1


def test_training_article_retrieval_counts_questions_and_slots_from_training_articles():
    """benchmarks/training_article_retrieval.py: a question whose top-k holds a training
    article's passage counts once, each such retrieved slot once."""
    import training_article_retrieval as bench

    passages = np.eye(3)
    articles = ["Train", "Held", "Held"]
    questions = np.array([[1.0, 0.5, 0.0], [0.0, 1.0, 0.5]])  # the first retrieves Train first
    counts = bench.reach(passages, articles, questions, {"Train"}, top_k=2)
    assert counts == {
        "questions": 2,
        "questions_reaching_training_articles": 1,
        "slots": 4,
        "slots_from_training_articles": 1,
    }
