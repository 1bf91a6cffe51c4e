"""Every compression method through one table on tiny models, plus registry and probe checks.

Exact expectations: each head keeps exactly its budget (uniform methods) or each layer keeps
exactly ``kv_heads x budget`` (``adaptive:*``) or the whole cache keeps ``layers x kv_heads x budget``
(``global:*``), kept rows are the original rows at their original
positions, sorted, and the protected first/last tokens are always there.
"""

from __future__ import annotations

import inspect

import pytest
import torch

import ragcompress.compressors as compressors
from ragcompress.compressors import (
    METHODS,
    AdaptiveBudget,
    CompressionContext,
    Compressor,
    GlobalBudget,
    ScorerCompressor,
    make_compressor,
    method_names,
)
from ragcompress.compressors.probe import run_probe
from ragcompress.compressors.scorer import keep_budget
from ragcompress.indexing import IndexConfig
from ragcompress.indexing.encoder import PassageEncoder
from ragcompress.prompt import PromptTemplate
from ragcompress.runtime.options import AnswerOptions

TEXT = (
    "The Normans were the people who in the 10th and 11th centuries gave their name to "
    "Normandy, a region in France. They were descended from Norse raiders and pirates from "
    "Denmark, Iceland and Norway who, under their leader Rollo, agreed to swear fealty to "
    "King Charles III of West Francia."
)

# ``learned`` scores with a trained adaptor's scorer (tests/test_distill.py checks its budgets).
EVICTING = [name for name in method_names() if name != "none" and "learned" not in name]


@pytest.fixture(scope="module")
def encoded(tiny_lm):
    encoder = PassageEncoder(tiny_lm, PromptTemplate.from_tokenizer(tiny_lm.tokenizer))
    ids = encoder.tokens.passage(TEXT)
    return encoder, ids, encoder.encode([ids])[0]


def check_kept(kv, out, ids) -> None:
    """Kept rows are original rows at their original positions, sorted; padding is zero."""
    n = len(ids)
    assert out.num_tokens == n
    valid = out.valid_mask()
    layers, heads = out.lengths.shape
    for layer in range(layers):
        for head in range(heads):
            length = int(out.lengths[layer, head])
            pos = out.positions[layer, head, :length]
            assert torch.all(pos[1:] > pos[:-1]), "positions not strictly increasing"
            assert 0 <= int(pos.min()) and int(pos.max()) < n
            torch.testing.assert_close(out.keys[layer, head, :length], kv.keys[layer, head, pos], rtol=0, atol=0)
            torch.testing.assert_close(out.values[layer, head, :length], kv.values[layer, head, pos], rtol=0, atol=0)
    assert not out.keys[~valid].any() and not out.values[~valid].any()


@pytest.mark.parametrize("ratio", [0.5, 0.25, 0.125])
@pytest.mark.parametrize("method", EVICTING)
def test_method_keeps_exactly_its_budget(method, ratio, encoded):
    encoder, ids, kv = encoded
    compressor = make_compressor(method, ratio=ratio)
    out = compressor.compress(kv, CompressionContext(encoder, ids))
    n = len(ids)
    budget = keep_budget(n, ratio, None)
    layers, heads = out.lengths.shape
    if isinstance(compressor, GlobalBudget):
        assert int(out.lengths.sum()) == layers * heads * budget
        assert int(out.lengths.min()) >= 8
    elif isinstance(compressor, AdaptiveBudget):
        assert out.lengths.sum(-1).tolist() == [heads * budget] * layers
        assert int(out.lengths.min()) >= max(int(compressor.floor * budget), 8)
    else:
        assert out.lengths.tolist() == [[budget] * heads] * layers
        assert out.keys.shape[2] == budget
    check_kept(kv, out, ids)
    # first and last 4 tokens are always kept
    for layer in range(layers):
        for head in range(heads):
            kept = set(out.positions[layer, head, : int(out.lengths[layer, head])].tolist())
            assert {0, 1, 2, 3, n - 4, n - 3, n - 2, n - 1} <= kept


@pytest.mark.parametrize("method", EVICTING)
def test_token_budget_and_full_ratio(method, encoded):
    encoder, ids, kv = encoded
    context = CompressionContext(encoder, ids)
    out = make_compressor(method, budget=10).compress(kv, context)
    assert out.kept_tokens == 10 * out.lengths.numel()
    assert make_compressor(method, ratio=1.0).compress(kv, context) is kv
    assert make_compressor(method, budget=len(ids) + 5).compress(kv, context) is kv


def test_streaming_keeps_sinks_and_recent(encoded):
    encoder, ids, kv = encoded
    n = len(ids)
    out = make_compressor("streaming", budget=12).compress(kv, CompressionContext(encoder, ids))
    expected = [0, 1, 2, 3] + list(range(n - 8, n))
    assert (out.positions == torch.tensor(expected)).all()


def test_a_budget_below_the_protection_keeps_the_first_tokens_then_the_last():
    """``keep_first + keep_last`` above the budget: the first tokens (sinks) are protected first
    and the boundary gets what is left, counted from the passage's end. Without the trim all eight
    were protected, and the one boundary row went to the earliest of the last four (token 26),
    not to the last token."""
    from ragcompress.kv import PassageKV

    n = 30
    kv = PassageKV.full(torch.randn(1, 1, n, 4), torch.randn(1, 1, n, 4))
    kept = make_compressor("kvzip", budget=5, keep_first=4, keep_last=4).select(kv, torch.zeros(1, 1, n))
    assert kept.positions[0, 0, : kept.lengths[0, 0]].tolist() == [0, 1, 2, 3, n - 1]


def test_global_budget_follows_scores_across_layers_and_adaptive_does_not():
    """``global:`` spends the whole cache's budget where the scores are highest, even if one layer
    takes (almost) everything; ``adaptive:`` keeps every layer at ``kv_heads x budget``."""
    from ragcompress.kv import PassageKV

    layers, heads, n, budget = 3, 2, 40, 10
    kv = PassageKV.full(torch.randn(layers, heads, n, 4), torch.randn(layers, heads, n, 4))
    scores = torch.rand(layers, heads, n)
    scores[1] += 10.0  # layer 1 attends everywhere: every one of its tokens outranks the others
    # kvzip's scores are attention probabilities, comparable across layers (no standardisation)
    kept_global = make_compressor("global:kvzip", budget=budget).select(kv, scores)
    kept_adaptive = make_compressor("adaptive:kvzip", budget=budget).select(kv, scores)
    assert int(kept_global.lengths.sum()) == int(kept_adaptive.lengths.sum()) == layers * heads * budget
    # the other layers keep only their 8 protected tokens (first and last 4), layer 1 the rest
    assert kept_global.lengths[0].tolist() == kept_global.lengths[2].tolist() == [8, 8]
    assert int(kept_global.lengths[1].sum()) == layers * heads * budget - 4 * 8
    assert kept_adaptive.lengths.sum(-1).tolist() == [heads * budget] * layers
    # a floor guarantees every head that share of its budget (here above its 8 protected tokens);
    # the pool, same total, pays for it
    kept_floor = make_compressor("global:kvzip", budget=2 * budget, floor=0.5).select(kv, scores)
    assert int(kept_floor.lengths.sum()) == layers * heads * 2 * budget
    assert kept_floor.lengths[0].tolist() == kept_floor.lengths[2].tolist() == [budget] * heads
    assert kept_floor.lengths[1].tolist() == [n] * heads


@pytest.mark.parametrize("method", ["kvzip", "adaptive:kvzip", "global:kvzip"])
def test_equal_scores_keep_the_earliest_tokens(method):
    """Ties go to the earlier token, whatever the budget: ``topk`` broke them by its algorithm
    (of 300 equal scores it kept tokens 197-201), so a store depended on how ties fell."""
    from ragcompress.kv import PassageKV

    layers, heads, n, budget = 2, 2, 300, 10
    kv = PassageKV.full(torch.randn(layers, heads, n, 4), torch.randn(layers, heads, n, 4))
    kept = make_compressor(method, budget=budget, keep_first=0, keep_last=0).select(kv, torch.zeros(layers, heads, n))
    assert int(kept.lengths.sum()) == layers * heads * budget
    # every head keeps its earliest tokens (pooled methods: the pool fills in layer, head, token order)
    for layer in range(layers):
        for head in range(heads):
            count = int(kept.lengths[layer, head])
            assert kept.positions[layer, head, :count].tolist() == list(range(count))
    if method == "kvzip":
        assert kept.lengths.tolist() == [[budget] * heads] * layers


@pytest.mark.parametrize("method", ["kvzip", "adaptive:kvzip", "global:kvzip"])
def test_nan_scores_rank_last_below_real_scores_and_protected_tokens(method):
    """A descending sort puts NaN above ``+inf``, which marks the protected tokens: four NaN scores
    on one head were kept, ahead of its first tokens and its boundary. NaN ranks last now: the
    selection is the one where those tokens score below every real score."""
    from ragcompress.kv import PassageKV

    gen = torch.Generator().manual_seed(0)
    n = 16
    kv = PassageKV.full(torch.randn(2, 2, n, 8, generator=gen), torch.randn(2, 2, n, 8, generator=gen))
    scores = torch.rand(2, 2, n, generator=gen)
    nan, lowest = scores.clone(), scores.clone()
    nan[0, 0, 6:10] = float("nan")
    lowest[0, 0, 6:10] = -1.0
    compressor = make_compressor(method, budget=6, keep_first=2, keep_last=2)
    kept, expected = compressor.select(kv, nan), compressor.select(kv, lowest)
    assert torch.equal(kept.lengths, expected.lengths) and torch.equal(kept.positions, expected.positions)
    head = kept.positions[0, 0, : kept.lengths[0, 0]].tolist()
    assert {0, 1, 14, 15} <= set(head) and not {6, 7, 8, 9} & set(head)


def test_an_inf_key_does_not_give_its_layer_the_global_pool():
    """One overflowed key made ``global:knorm``'s standardised scores of its whole layer NaN, and
    that layer took the pool (every row, the inf one included) while the others kept only their
    protected rows. Its scores rank last now: the layer keeps its protected rows, the inf row is
    evicted, and the pool goes to the layers with real scores."""
    from ragcompress.kv import PassageKV

    gen = torch.Generator().manual_seed(0)
    keys, values = torch.randn(3, 2, 64, 16, generator=gen), torch.randn(3, 2, 64, 16, generator=gen)
    keys[1, 0, 10, 3] = float("inf")
    kept = make_compressor("global:knorm", ratio=0.25).compress(PassageKV.full(keys, values), None)  # type: ignore[arg-type]
    per_layer = kept.lengths.sum(-1).tolist()
    assert per_layer[1] == 2 * (4 + 4) and sum(per_layer) == 3 * 2 * 16
    assert bool(kept.keys[kept.valid_mask()].isfinite().all())


def test_value_norm_weights_scores_by_each_rows_value_relative_to_its_head():
    """With equal scores, ``value_norm`` keeps the rows whose values are largest relative to their
    head; the budget is kept exactly; the weights average 1 over a head's valid rows; the setting
    is recorded only when on (manifests of stores built without it do not change)."""
    from ragcompress.compressors.adaptive import relative_value_norm
    from ragcompress.kv import PassageKV

    layers, heads, n, budget = 2, 2, 24, 10
    values = torch.randn(layers, heads, n, 4)
    values[1] *= 50.0  # one layer's values are larger throughout: relative norms ignore that
    kv = PassageKV.full(torch.randn(layers, heads, n, 4), values)
    weights = relative_value_norm(kv)
    assert torch.allclose(weights.mean(-1), torch.ones(layers, heads))
    scores = torch.ones(layers, heads, n)
    kept = make_compressor("global:kvzip", budget=budget, keep_first=0, keep_last=0, value_norm=True).select(kv, scores)
    assert int(kept.lengths.sum()) == layers * heads * budget
    largest = weights.flatten().topk(layers * heads * budget).values.min()
    for layer in range(layers):
        for head in range(heads):
            rows = kept.positions[layer, head, : kept.lengths[layer, head]]
            assert bool((weights[layer, head, rows] >= largest).all())
    assert "value_norm" not in IndexConfig(method="global:kvzip", ratio=0.2).compressor().config()
    assert IndexConfig(method="global:kvzip", ratio=0.2, value_norm=True).compressor().config()["value_norm"] is True
    with pytest.raises(ValueError, match="value_norm"):
        IndexConfig(method="kvzip", ratio=0.2, value_norm=True)


def test_floor_is_an_index_setting_only_of_the_pooling_wrappers():
    assert IndexConfig(method="global:kvzip", ratio=0.2, floor=0.2).compressor().config()["floor"] == 0.2
    with pytest.raises(ValueError, match="floor"):
        IndexConfig(method="kvzip", ratio=0.2, floor=0.2)


def test_knorm_keeps_lowest_norm_keys(encoded):
    encoder, ids, kv = encoded
    out = make_compressor("knorm", budget=12, keep_first=0, keep_last=0).compress(kv, CompressionContext(encoder, ids))
    # a token's layer-0 key depends on the token alone: a repeated token ties, and the earlier one is kept
    expected = kv.keys.norm(dim=-1).sort(dim=-1, stable=True).indices[..., :12].sort(-1).values
    assert (out.positions == expected).all()


@pytest.mark.parametrize(
    "arch, config",
    [
        ("llama", {}),
        ("qwen2", {}),
        ("gemma", {}),
        ("gemma2", {"attn_logit_softcapping": 1.0}),  # capped logits, and a cap that bites
        ("gemma3_text", {"sliding_window": 16}),  # shorter than prefix + passage
        ("qwen3", {}),  # q_norm per head
        ("olmo2", {}),  # q_norm over the whole projection, post-norm layers
        ("granite", {"attention_multiplier": 0.5}),  # its own attention scaling
        ("phi3", {}),  # q, k and v from one fused projection
        ("smollm3", {"layers": 4}),  # its fourth layer has no RoPE
        ("phi", {"qk_layernorm": True}),  # partial rotary, q_layernorm per head
        ("phi3", {"partial_rotary_factor": 0.75}),  # Phi-4-mini's partial rotary
        ("exaone4", {"layers": 4, "sliding_window": 16}),  # a global layer without RoPE, found at load
        ("cohere", {}),  # RoPE over adjacent channel pairs, found at load
        ("glm", {}),  # paired and partial RoPE, tables laid out in halves
    ],
)
def test_probe_attention_equals_model_attention(arch, config, tiny_model_dir):
    """The probe's queries (the module's own q_proj output, then q_norm and RoPE) give the model's own
    (eager) attention weights."""
    from transformers import AutoModelForCausalLM

    from ragcompress.models import load_model

    path = str(tiny_model_dir(arch, **config))
    lm = load_model(path)
    encoder = PassageEncoder(lm, PromptTemplate.from_tokenizer(lm.tokenizer))
    ids = encoder.tokens.passage(TEXT)
    kv = encoder.encode([ids])[0]
    n, p, window = len(ids), encoder.prefix_len, 8
    probe = run_probe(
        encoder,
        kv,
        ids[n - window :],
        context_len=n - window,
        score_len=n,
        query_reduce="mean",
        group_reduce="mean",
        chunk=3,
    )
    eager = AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager")
    with torch.inference_mode():
        out = eager(torch.tensor([encoder.prefix_ids + ids]), output_attentions=True)
    kv_heads = lm.config.num_key_value_heads
    for layer, attn in enumerate(out.attentions):
        rows = attn[0, :, p + n - window :, p : p + n]  # [Hq, window, n]
        expected = rows.mean(1).view(kv_heads, -1, n).mean(1)
        torch.testing.assert_close(probe.attention[layer], expected, atol=1e-5, rtol=1e-4)


def test_kvzip_scores_a_token_by_the_most_attention_any_reconstruction_query_gives_it(encoded, tiny_model_dir):
    """KVzip's score (Kim et al., 2025) is a *maximum*, over the reconstruction's queries and the
    query heads of each KV group, of the model's own attention: a token needed to reproduce one
    word of the passage is kept even if the rest of the reconstruction ignores it. Without this
    a mean in either reduction (the probe's default) ranked the tokens otherwise unnoticed."""
    from transformers import AutoModelForCausalLM

    encoder, ids, kv = encoded
    kvzip = make_compressor("kvzip", ratio=0.5, chunk=5)  # several chunks, the last one short
    probe_ids = kvzip.probe_ids(encoder, ids)
    scores = kvzip.score(kv, CompressionContext(encoder, ids))
    eager = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir("llama")), attn_implementation="eager")
    with torch.inference_mode():
        out = eager(torch.tensor([encoder.prefix_ids + ids + probe_ids]), output_attentions=True)
    n, p, kv_heads = len(ids), encoder.prefix_len, kv.keys.shape[1]
    for layer, attn in enumerate(out.attentions):
        rows = attn[0, :, p + n :, p : p + n]  # [Hq, probe, n]: the reconstruction's queries on the passage
        expected = rows.amax(1).view(kv_heads, -1, n).amax(1)
        torch.testing.assert_close(scores[layer], expected, atol=1e-5, rtol=1e-4)


def test_a_probe_past_the_models_positions_is_refused_by_name(tiny_model_dir):
    """kvzip's probe (the repeat prompt, then the passage again) runs to ``prefix + 2n + prompt``
    positions: past ``max_position_embeddings`` it is refused, naming the passage's length and the
    limit; at the limit, and for the methods whose probe stays inside the passage, it runs.
    ``fits`` (what ``train`` chooses its scorer passages by, and checks a KVzip-evicted student's
    passages by) says so beforehand, for kvzip in a budget wrapper too."""
    from ragcompress.errors import InputError
    from ragcompress.models import load_model

    lm = load_model(str(tiny_model_dir("llama")))  # its own config object: the limit is set below
    encoder = PassageEncoder(lm, PromptTemplate.from_tokenizer(lm.tokenizer))
    ids = encoder.tokens.passage(TEXT)
    kv = encoder.encode([ids])[0]
    n, p = len(ids), encoder.prefix_len
    kvzip = make_compressor("kvzip", ratio=0.5)
    end = p + 2 * n + len(encoder.tokens.suffix(kvzip.prompt))  # positions 0 .. end - 1
    context = CompressionContext(encoder, ids)
    lm.config.max_position_embeddings = end
    assert kvzip.fits(encoder, ids) and kvzip.compress(kv, context).num_tokens == n
    lm.config.max_position_embeddings = end - 1
    assert not kvzip.fits(encoder, ids) and not make_compressor("global:kvzip", ratio=0.5).fits(encoder, ids)
    message = (
        rf"a passage of {n} tokens .* reaches position {end - 1}, past the model's max_position_embeddings of {end - 1}"
    )
    with pytest.raises(InputError, match=message):
        kvzip.compress(kv, context)
    lm.config.max_position_embeddings = p + n
    for method in ("snapkv", "expected-attention", "adaptive:snapkv"):
        compressor = make_compressor(method, ratio=0.5)
        assert compressor.fits(encoder, ids) and compressor.compress(kv, context).num_tokens == n


@pytest.mark.parametrize("method", ["kvzip", "global:kvzip"])
@pytest.mark.parametrize("keep", [{"ratio": 1.0}, {"budget": 10_000}], ids=["ratio-1", "budget-past-the-passage"])
def test_a_passage_kept_whole_fits_whatever_its_probe_would_reach(tiny_model_dir, monkeypatch, method, keep):
    """At ``--ratio 1`` (or a budget of the passage's length or more) nothing is evicted, so
    nothing is scored (:meth:`ScorerCompressor.compress` returns the cache before the probe): such
    a passage fits at any length. ``fits`` said no by the probe's reach alone, so ``train --method
    kvzip`` (ratio 1 by default) refused a long passage it would never score."""
    from ragcompress.models import load_model

    lm = load_model(str(tiny_model_dir("llama")))
    encoder = PassageEncoder(lm, PromptTemplate.from_tokenizer(lm.tokenizer))
    ids = encoder.tokens.passage(TEXT)
    kv = encoder.encode([ids])[0]
    lm.config.max_position_embeddings = encoder.prefix_len + len(ids)  # the passage fits, its probe does not
    assert not make_compressor(method, ratio=0.5).fits(encoder, ids)

    def refused(*args, **kwargs):
        raise AssertionError("the probe ran")

    monkeypatch.setattr(compressors.kvzip, "run_probe", refused)
    compressor = make_compressor(method, **keep)
    assert compressor.fits(encoder, ids)
    kept = compressor.compress(kv, CompressionContext(encoder, ids))
    assert kept.num_tokens == len(ids) and int(kept.lengths.min()) == len(ids)


@pytest.mark.parametrize("method", ["kvzip", "global:kvzip"])
def test_index_refuses_a_passage_past_the_probe_before_encoding_any(
    method, tiny_model_dir, tmp_path, embedder, monkeypatch
):
    """KVzip's probe repeats the passage after it (about prefix + 2n positions): a passage within
    the model's positions but past its probe's stopped ``index`` when it was scored, after the
    passages before it were encoded and committed, leaving a store marked unfinished. Refused
    before any passage is encoded (the check ``train`` makes of a student's passages), by the
    passage's id, its length and the model's limit, with the remedy; at ratio 1 nothing is scored,
    so the same input is indexed."""
    from ragcompress.errors import InputError
    from ragcompress.indexing import index

    from conftest import write_jsonl

    model = str(tiny_model_dir("llama", max_position_embeddings=400))
    path = write_jsonl(
        tmp_path / "in.jsonl", [{"id": "fits", "text": "a short passage"}, {"id": "long", "text": "word " * 250}]
    )
    encoded: list[int] = []
    encode = PassageEncoder.encode

    def counting(self, batch, contexts=None):
        encoded.append(len(batch))
        return encode(self, batch, contexts)

    monkeypatch.setattr(PassageEncoder, "encode", counting)
    store = tmp_path / "store"
    with pytest.raises(
        InputError,
        match=rf"^--method {method} scores passage long \(251 tokens\) with a probe past the model's positions "
        r"\(.* handles 400\); split it into shorter passages or index with a --method that does not probe past it "
        r"\(snapkv, expected-attention, knorm\) \(nothing was written\)$",
    ):
        index(path, store, model=model, embedder=embedder, config=IndexConfig(method=method, ratio=0.5), batch_size=1)
    assert encoded == [] and not store.exists()
    report = index(path, store, model=model, embedder=embedder, config=IndexConfig(method=method, ratio=1.0))
    assert report.indexed == 2


def test_every_compressor_is_registered_and_exported():
    def subclasses(cls):
        for sub in cls.__subclasses__():
            yield sub
            yield from subclasses(sub)

    concrete = {
        cls
        for cls in subclasses(Compressor)
        if not inspect.isabstract(cls) and cls.__module__.startswith("ragcompress.")
    }
    assert concrete <= set(METHODS.values()), f"not registered: {concrete - set(METHODS.values())}"
    for name, cls in METHODS.items():
        assert cls.name == name
        assert cls.__name__ in compressors.__all__, f"{cls.__name__} not exported"
        assert getattr(compressors, cls.__name__) is cls
    scorers = [n for n, c in METHODS.items() if issubclass(c, ScorerCompressor)]
    assert set(method_names()) == {"none", *scorers, *(f"{w}:{n}" for w in ("adaptive", "global") for n in scorers)}


@pytest.mark.parametrize(
    "method,params",
    [
        ("bogus", {}),
        ("adaptive:bogus", {}),
        ("adaptive:none", {}),
        ("adaptive", {}),
        ("global:global", {}),
    ],
)
def test_unknown_method_lists_allowed_values(method, params):
    with pytest.raises(ValueError) as info:
        make_compressor(method, **params)
    for name in ("none", "streaming", "knorm", "snapkv", "expected-attention", "kvzip", "adaptive:<"):
        assert name in str(info.value)


@pytest.mark.parametrize(
    "params", [{"ratio": 0.0}, {"ratio": 1.5}, {"ratio": -0.25}, {"budget": 0}, {"keep_first": -1}, {"colour": "red"}]
)
@pytest.mark.parametrize("method", ["knorm", "adaptive:snapkv"])
def test_bad_parameters_raise_value_error(method, params):
    with pytest.raises(ValueError, match="ratio|budget|keep_first|colour"):
        make_compressor(method, **params)


def test_index_config_rejects_bad_method_and_ratio():
    from ragcompress.indexing import IndexConfig

    with pytest.raises(ValueError, match="choose one of: none, streaming"):
        IndexConfig(method="bogus", ratio=0.5)
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        IndexConfig(method="knorm", ratio=2.0)
    with pytest.raises(ValueError, match="not both"):
        IndexConfig(method="knorm", ratio=0.5, budget=10)
    assert IndexConfig(method="adaptive:kvzip", budget=16).compressor().inner.budget == 16
    inner = IndexConfig(method="global:kvzip", ratio=0.25, keep_first=1, keep_last=0).compressor().inner
    assert (inner.keep_first, inner.keep_last, inner.ratio) == (1, 0, 0.25)


QUESTION = "Who were the Normans descended from?"


def first_logits(engine, entries) -> torch.Tensor:
    from ragcompress.runtime.assemble import assemble
    from ragcompress.runtime.generate import forward_step

    segments = [engine.store.load_kv(e) for e in entries]
    built = assemble(engine.lm.config, engine.rotary, engine.prefix_keys, engine.prefix, segments, engine.dtype)
    extra = built.attention_kwargs()
    with torch.inference_mode():
        logits = forward_step(
            engine.lm.model, torch.tensor([engine.tokens.suffix(QUESTION)]), built.cache, built.next_position, **extra
        )
    return logits, built.kv_mask


@pytest.fixture(scope="module")
def none_store(tiny_model_dir, tmp_path_factory, embedder):
    from ragcompress.data import SAMPLE_PASSAGES
    from ragcompress.indexing import index
    from ragcompress.runtime.engine import Engine

    root = tmp_path_factory.mktemp("e2e")
    passages = root / "passages.jsonl"
    passages.write_text("\n".join(SAMPLE_PASSAGES.read_text().splitlines()[:4]) + "\n")
    index(passages, root / "none", model=str(tiny_model_dir("llama")), embedder=embedder)
    engine = Engine.open(root / "none", options=AnswerOptions(max_new_tokens=4))
    entries = engine.retrieve(QUESTION, 3)
    return passages, engine, entries


# Relative error ||kept - full[positions]|| / ||full[positions]|| of an int4 store's kept rows
# (0.063 to 0.076 on the tiny llama; keys dequantized with another head's group scales were off
# by 0.6, with logits still finite).
INT4_ROW_ERROR = 0.15


def _kept_rows_error(kept, full, name: str) -> float:
    """How far ``kept``'s rows (``keys`` or ``values``) are from ``full``'s rows at the positions
    ``kept`` records for them, relative to those rows, over every layer and head."""
    mask = kept.valid_mask()
    layer, head, _ = mask.nonzero(as_tuple=True)
    expected = getattr(full, name)[layer, head, kept.positions[mask]]  # [kept rows, head_dim]
    return float((getattr(kept, name)[mask] - expected).norm() / expected.norm())


@pytest.mark.parametrize("method", EVICTING)
def test_index_and_answer_end_to_end(method, none_store, tmp_path, embedder):
    """Each method through ``index`` and ``Engine.answer_cached``; ratio 1.0 equals ``none``, and
    at ratio 0.25 (int4) every kept row is the uncompressed store's row at the position it records,
    within int4's rounding (counts and finite logits alone passed caches decoded wrong)."""
    from ragcompress.indexing import IndexConfig, index
    from ragcompress.runtime.engine import Engine
    from ragcompress.store import KVStore

    passages, base, entries = none_store
    ids = [e.id for e in entries]
    base_logits, _ = first_logits(base, entries)
    base_answer = base.answer_cached(QUESTION, entries)
    for ratio, quant in [(0.25, "int4"), (1.0, "none")]:
        store = tmp_path / f"{ratio}-{quant}"
        index(
            passages, store, config=IndexConfig(method=method, ratio=ratio, quant=quant), lm=base.lm, embedder=embedder
        )
        engine = Engine(KVStore.open(store), base.lm, embedder, AnswerOptions(max_new_tokens=4))
        mine = [engine.store.entry(i) for i in ids]
        logits, kv_mask = first_logits(engine, mine)
        answer = engine.answer_cached(QUESTION, mine)
        if ratio == 1.0:
            torch.testing.assert_close(logits, base_logits, rtol=0, atol=0)
            assert answer.token_ids == base_answer.token_ids
            assert kv_mask is None
        else:
            n = sum(e.num_tokens for e in mine)
            assert (
                sum(e.kept for e in mine)
                < 0.3 * n * base.lm.config.num_hidden_layers * base.lm.config.num_key_value_heads
            )
            # per-head budgets take the ragged (masked) path; streaming's scores tie across heads
            # (and, for global:streaming, across layers, where the tie-break decides the shape)
            if method != "global:streaming":
                assert (kv_mask is not None) == (":" in method and method != "adaptive:streaming")
            assert torch.isfinite(logits).all() and len(answer.token_ids) >= 1
            for entry in mine:  # each kept row is the full cache's row at its position, up to int4's rounding
                kept, full = engine.store.load_kv(entry), base.store.load_kv(base.store.entry(entry.id))
                for name in ("keys", "values"):
                    error = _kept_rows_error(kept, full, name)
                    assert error < INT4_ROW_ERROR, f"{method} {entry.id} {name}: relative error {error:.3f}"
        engine.close()


@pytest.mark.parametrize(
    "args,expected",
    [
        (
            ["--method", "bogus", "--ratio", "0.5"],
            "choose one of: none, streaming, knorm, snapkv, expected-attention, kvzip, learned, adaptive:<",
        ),
        (["--method", "knorm", "--ratio", "1.5"], "ratio must be in (0, 1]"),
        (["--method", "none", "--ratio", "0.5"], "method 'none' takes no parameter ratio"),
        (["--method", "knorm", "--ratio", "0.5", "--budget", "8"], "not both"),
        (["--method", "none", "--keep-first", "1"], "method 'none' takes no parameter keep_first"),
        (["--method", "knorm", "--ratio", "0.5", "--keep-last", "-1"], "keep_last must be a non-negative int"),
    ],
)
def test_cli_rejects_bad_method_and_ratio(args, expected, tmp_path, monkeypatch, capfd):
    from ragcompress.cli import main

    passages = tmp_path / "p.jsonl"
    passages.write_text('{"id": "a", "text": "hello"}\n')
    monkeypatch.setattr(
        "sys.argv", ["ragcompress", "index", "--input", str(passages), "--store", str(tmp_path / "store"), *args]
    )
    with pytest.raises(SystemExit) as info:
        main()
    err = capfd.readouterr().err
    assert info.value.code != 0 and expected in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "store").exists()


@pytest.mark.parametrize(
    ("arch", "config"), [("llama", {}), ("phi3", {"partial_rotary_factor": 0.75}), ("glm", {}), ("cohere", {})]
)
def test_mean_rotation_is_the_average_of_rope(arch, config, tiny_model_dir):
    """Over whole heads, with partial rotary (whose last channels the mean leaves as they are),
    and with paired RoPE, its tables laid out in halves (GLM) or in pairs (Cohere)."""
    from ragcompress.compressors.expected_attention import mean_rotation
    from ragcompress.kv.rope import Rotary
    from ragcompress.models import load_model

    lm = load_model(str(tiny_model_dir(arch, **config)))
    rotary, head_dim = Rotary(lm.model), lm.model.model.layers[0].self_attn.head_dim
    positions = torch.arange(40, 72)
    x = torch.randn(3, head_dim)
    expected = torch.stack([rotary.rotate(x, torch.full((3,), int(p)), 0) for p in positions]).mean(0)
    rotation = mean_rotation(rotary, positions, 0, head_dim)
    torch.testing.assert_close(x @ rotation.T, expected, atol=1e-5, rtol=1e-5)
    if rotary.rotary_dim < head_dim:
        assert torch.equal(rotation[rotary.rotary_dim :, rotary.rotary_dim :], torch.eye(head_dim - rotary.rotary_dim))


@pytest.mark.parametrize("arch,method", [("qwen2", "knorm"), ("qwen2", "adaptive:knorm"), ("llama", "snapkv")])
def test_evicted_cache_equals_full_prefill_with_evicted_keys_masked(
    arch, method, tiny_model_dir, passages_file, tmp_path, embedder
):
    """With one passage, answering from an evicted cache must equal a full prefill whose question
    tokens cannot see the evicted passage tokens (per layer and KV head). The reference keeps the
    model's own post-RoPE cache at the original positions and only masks, so it checks what the
    store and runtime add: compaction, recorded positions, re-rotation, padding and the ragged mask.
    """
    from transformers import DynamicCache

    from ragcompress.indexing import IndexConfig, index
    from ragcompress.models import load_model
    from ragcompress.runtime.attention import KV_MASK_KWARG
    from ragcompress.runtime.engine import Engine
    from ragcompress.runtime.generate import forward_step
    from ragcompress.store import KVStore

    lm = load_model(str(tiny_model_dir(arch)))
    index(passages_file, tmp_path / "store", lm=lm, embedder=embedder, config=IndexConfig(method=method, ratio=0.5))
    engine = Engine(KVStore.open(tmp_path / "store"), lm, embedder)
    entries = engine.retrieve(QUESTION, 1)
    cached, kv_mask = first_logits(engine, entries)

    suffix = engine.tokens.suffix(QUESTION)
    context = engine.full_prompt_ids(QUESTION, entries)[: -len(suffix)]
    kv = engine.store.load_kv(entries[0])
    p, n = engine.prefix.num_tokens, kv.num_tokens
    assert len(context) == p + n
    layers, heads = kv.lengths.shape
    visible = torch.zeros((layers, heads, p + n), dtype=torch.bool)
    visible[:, :, :p] = True
    for layer in range(layers):
        for head in range(heads):
            kept = kv.positions[layer, head, : kv.lengths[layer, head]]
            visible[layer, head, p + kept] = True
    assert not bool(visible.all())  # something was evicted
    cache = DynamicCache(config=lm.config)
    with torch.inference_mode():
        forward_step(lm.model, torch.tensor([context]), cache, 0)
        reference = forward_step(lm.model, torch.tensor([suffix]), cache, p + n, **{KV_MASK_KWARG: visible})
    torch.testing.assert_close(cached, reference, atol=1e-4, rtol=1e-4)
    engine.close()


def test_a_ratio_keeps_what_it_says_despite_floating_point():
    from ragcompress.compressors.scorer import keep_budget

    assert keep_budget(100, 0.29, None) == 29  # 100 * 0.29 == 28.999999999999996
    assert keep_budget(300, 0.21, None) == 63
    assert keep_budget(10, 0.25, None) == 2 and keep_budget(3, 0.01, None) == 1


def test_value_norm_is_refused_for_scores_it_would_reverse():
    with pytest.raises(ValueError, match="reverses the order of negative or log scores such as knorm's"):
        make_compressor("global:knorm", ratio=0.5, value_norm=True)
    make_compressor("global:kvzip", ratio=0.5, value_norm=True)


def test_store_of_names_the_methods_default_ratio():
    from ragcompress.indexing import IndexConfig
    from ragcompress.indexing.indexer import store_of

    assert store_of(IndexConfig(method="global:kvzip", quant="int4")).ratio == 0.5
    assert store_of(IndexConfig()).ratio == 1.0
