"""Cached answering must compute what a full prefill of the same tokens computes.

With one passage there is no cross-passage attention to lose, so the first-token logits from the
stored cache must match a plain prefill (up to float rounding); any gap is a bug in positions,
RoPE re-rotation, masks or the template split.
"""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from ragcompress.indexing import IndexConfig, index
from ragcompress.kv.rope import Rotary
from ragcompress.models import load_model
from ragcompress.prompt import PromptTemplate, PromptTokens
from ragcompress.runtime.assemble import assemble
from ragcompress.runtime.engine import Engine
from ragcompress.runtime.generate import forward_step
from ragcompress.store import KVStore

QUESTION = "What city is the sporting capital of Australia?"


def first_logits(engine: Engine, entries, cached: bool) -> torch.Tensor:
    suffix = engine.tokens.suffix(QUESTION)
    with torch.inference_mode():
        if cached:
            segments = [engine.store.load_kv(e) for e in entries]
            built = assemble(engine.lm.config, engine.rotary, engine.prefix_keys, engine.prefix, segments, engine.dtype)
            return forward_step(engine.lm.model, torch.tensor([suffix]), built.cache, built.next_position)
        ids = engine.full_prompt_ids(QUESTION, entries)
        return forward_step(engine.lm.model, torch.tensor([ids]), DynamicCache(config=engine.lm.config), 0)


def test_the_engine_takes_any_text_embedder():
    """The engine reads only an embedder's ``name`` and ``embed``
    (:class:`~ragcompress.retrieval.TextEmbedder`); its parameter named the model-loading
    ``Embedder`` class, so a type checker refused the stand-ins (``HashEmbedder``) it answers with
    in tests, as indexing takes them."""
    import typing

    from ragcompress.retrieval import TextEmbedder

    assert typing.get_type_hints(Engine.__init__)["embedder"] is TextEmbedder


# the tested families, and families accepted by ragcompress.architecture's checks alone
ARCHS = [
    "llama",
    "qwen2",
    "mistral",
    "gemma",
    "gemma2",
    "qwen3",
    "qwen3_moe",
    "ministral",
    "granite",
    "starcoder2",
    "olmo2",
    "phi3",
    "smollm3",
    "phi",  # partial rotary, parallel attention and MLP, final_layernorm
    "exaone4",  # post-norm, q/k norms (its layers without RoPE: tests/test_architecture.py)
    "cohere",  # RoPE over adjacent channel pairs, tables laid out in pairs; logit scale
    "helium",  # RoPE over adjacent channel pairs, tables laid out in halves
    "glm",  # paired and partial RoPE
    "glm4",
    "mixtral",  # mixture of experts
    "apertus",  # attention_layernorm, q/k norms
]


@pytest.mark.parametrize("arch", ARCHS)
def test_cached_equals_full_prefill_with_one_passage(arch, tiny_model_dir, passages_file, tmp_path, embedder):
    store = tmp_path / "store"
    lm = load_model(str(tiny_model_dir(arch)))
    index(passages_file, store, lm=lm, embedder=embedder)
    engine = Engine(KVStore.open(store), lm, embedder)
    entries = engine.retrieve(QUESTION, 1)
    cached, full = first_logits(engine, entries, True), first_logits(engine, entries, False)
    torch.testing.assert_close(cached, full, atol=1e-4, rtol=1e-4)
    assert engine.answer_cached(QUESTION, entries).token_ids == engine.answer_full(QUESTION, entries).token_ids


@pytest.mark.parametrize("rope", [{"rope_type": "yarn", "factor": 4.0}, {"rope_type": "linear", "factor": 2.0}])
def test_gemma3_with_scaled_global_rope_answers_as_full_prefill(rope, passages_file, tmp_path, embedder):
    """Gemma-3's global layers take ``rope_scaling`` (YaRN scales cos/sin by ~1.14), its sliding
    layers their own base and no scaling: keys are un-rotated and re-rotated per layer type."""
    from ragcompress.testing import make_tiny_model

    layer_types = ["sliding_attention", "full_attention"]
    model_dir = make_tiny_model("gemma3_text", tmp_path / "model", layer_types=layer_types, rope_scaling=rope)
    lm = load_model(str(model_dir))
    assert lm.config.rope_parameters["full_attention"]["rope_type"] == rope["rope_type"]
    index(passages_file, tmp_path / "store", lm=lm, embedder=embedder)
    with Engine(KVStore.open(tmp_path / "store"), lm, embedder) as engine:
        entries = engine.retrieve(QUESTION, 1)
        cached, full = first_logits(engine, entries, True), first_logits(engine, entries, False)
    torch.testing.assert_close(cached, full, atol=1e-4, rtol=1e-4)


def _longrope_phi3(tmp_path, original: int):
    """A tiny Phi-3 with LongRoPE (as Phi-3-mini-128k, Phi-3.5 and Phi-4-mini ship it): short
    factors up to ``original`` positions, long ones (far from them) past it."""
    from ragcompress.testing import make_tiny_model

    half = 8  # head_dim 16: eight frequencies
    rope = {
        "rope_type": "longrope",
        "short_factor": [1.0] * half,
        "long_factor": [4.0 + i for i in range(half)],
        "original_max_position_embeddings": original,
    }
    model_dir = make_tiny_model(
        "phi3", tmp_path / "model", rope_scaling=rope, original_max_position_embeddings=original
    )
    lm = load_model(str(model_dir))
    assert lm.config.max_position_embeddings == 4096
    return lm


def test_longrope_prompts_stay_within_the_original_length(passages_file, tmp_path, embedder):
    """LongRoPE picks its factors from how far each call reaches: a prompt past
    ``original_max_position_embeddings`` was fully prefilled with the long factors but assembled
    from a prefix and passages rotated (and encoded) with the short ones (logits 65 % off).
    ragcompress uses no position past the original length: such a prompt is refused by name,
    and one within it answers as a full prefill does."""
    from ragcompress.errors import InputError, PromptTooLongError

    from conftest import write_jsonl

    lm = _longrope_phi3(tmp_path, original=384)
    index(passages_file, tmp_path / "store", lm=lm, embedder=embedder)
    with Engine(KVStore.open(tmp_path / "store"), lm, embedder) as engine:
        entries = engine.retrieve(QUESTION, 1)
        cached, full = first_logits(engine, entries, True), first_logits(engine, entries, False)
        torch.testing.assert_close(cached, full, atol=1e-4, rtol=1e-4)
        assert engine.answer_cached(QUESTION, entries).token_ids == engine.answer_full(QUESTION, entries).token_ids
        with pytest.raises(PromptTooLongError, match="the model handles 384"):
            engine.answer_cached(QUESTION, engine.retrieve(QUESTION, 4))
    long_passage = write_jsonl(tmp_path / "long.jsonl", [{"id": "long", "text": "word " * 400}])
    with pytest.raises(InputError, match=r"passage 'long' has \d+ tokens, more than .* can attend to \(285\)"):
        index(long_passage, tmp_path / "store", lm=lm, embedder=embedder)


def test_position_limit_reads_longrope_wherever_the_config_keeps_it():
    from types import SimpleNamespace

    from ragcompress.kv.rope import position_limit

    long = {"rope_type": "longrope", "original_max_position_embeddings": 100}
    assert position_limit(SimpleNamespace(max_position_embeddings=400, rope_parameters=long)) == 100
    nested = {"full_attention": long, "sliding_attention": {"rope_type": "default"}}
    assert position_limit(SimpleNamespace(max_position_embeddings=400, rope_parameters=nested)) == 100
    legacy = SimpleNamespace(
        max_position_embeddings=400, rope_scaling={"type": "longrope"}, original_max_position_embeddings=50
    )
    assert position_limit(legacy) == 50
    yarn = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 100}
    assert position_limit(SimpleNamespace(max_position_embeddings=400, rope_parameters=yarn)) == 400


def test_positions_continue_after_every_passage(tiny_model_dir, passages_file, tmp_path, embedder):
    """Three passages: segment j starts where segment j-1 ended, every token of it at its own
    position; the suffix follows the last.

    Layer 0's keys are each token's projection rotated to its position, whatever precedes it, so
    a full prefill of the same tokens gives every row's key at the position the assembled cache
    must have rotated it to (checking only where the suffix starts passed with every segment
    placed right after the prefix)."""
    store = tmp_path / "store"
    lm = load_model(str(tiny_model_dir("qwen2")))
    index(passages_file, store, lm=lm, embedder=embedder)
    engine = Engine(KVStore.open(store), lm, embedder)
    entries = engine.retrieve(QUESTION, 3)
    segments = [engine.store.load_kv(e) for e in entries]
    built = assemble(engine.lm.config, engine.rotary, engine.prefix_keys, engine.prefix, segments, engine.dtype)
    assert built.next_position == engine.prefix.num_tokens + sum(e.num_tokens for e in entries)
    assert built.cache.get_seq_length() == built.next_position
    assert built.kv_mask is None
    context = engine.full_prompt_ids(QUESTION, entries)[: built.next_position]  # prefix and passages
    full = DynamicCache(config=lm.config)
    with torch.inference_mode():
        forward_step(lm.model, torch.tensor([context]), full, 0)
    assembled = built.cache.layers[0].keys[:, :, : built.next_position]  # [1, kv_heads, rows, head_dim]
    assert full.layers[0].keys.shape == assembled.shape
    torch.testing.assert_close(assembled, full.layers[0].keys, atol=1e-4, rtol=1e-4)


def _gemma3_text():
    """A tiny random Gemma-3 text model: local and global layers with different RoPE bases."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(
        "gemma3_text",
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        sliding_window=8,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"],
    )
    return AutoModelForCausalLM.from_config(config)


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_rotate_each_layer_equals_rotating_layer_by_layer(arch, tiny_lm):
    """Per-layer widths (runtime.assemble's per-layer padding) with one cos/sin table per RoPE:
    each layer's first rows equal :meth:`Rotary.rotate` of that layer, ragged positions and
    one row of positions shared by every head alike, fp32 and fp16 outputs."""
    model = tiny_lm.model if arch == "llama" else _gemma3_text()
    rotary = Rotary(model)
    layers = model.config.num_hidden_layers
    heads, n, d = 2, 12, model.config.head_dim
    keys = torch.randn(layers, heads, n, d)
    ragged = torch.stack([torch.randperm(40)[:n].sort().values for _ in range(layers * heads)]).view(layers, heads, n)
    shared = (torch.arange(n) + 7).expand(layers, heads, n)
    widths = [n - 3 * (i % 3) for i in range(layers)]
    for positions in (ragged, shared):
        for dtype in (torch.float32, torch.float16):
            buffer = torch.zeros(layers, heads, n + 4, d, dtype=dtype)
            rotary.rotate_each_layer(keys, positions, [buffer[i, :, 2 : 2 + w] for i, w in enumerate(widths)])
            for i, w in enumerate(widths):
                expected = rotary.rotate(keys[i, :, :w], positions[i, :, :w], i).to(dtype)
                torch.testing.assert_close(buffer[i, :, 2 : 2 + w], expected, atol=1e-3, rtol=1e-3)
                assert not bool(buffer[i, :, 2 + w :].any())  # rows past the layer's width untouched


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_rotary_tables_gathered_by_index_select_equal_indexing_the_table(arch, tiny_lm):
    """:meth:`Rotary.table_cos_sin` gathers its table's rows with ``index_select`` (six times
    faster than advanced indexing on the CPU); the tables are the indexed ones bit for bit, for
    ragged per-head positions, one row shared by every head, a single head and a single token."""
    model = tiny_lm.model if arch == "llama" else _gemma3_text()
    rotary = Rotary(model)
    layers, heads, n = model.config.num_hidden_layers, 2, 12
    ragged = torch.stack([torch.randperm(40)[:n].sort().values for _ in range(layers * heads)]).view(layers, heads, n)
    shared = (torch.arange(n) + 7).expand(layers, heads, n)
    for positions in (ragged, shared, ragged[0], ragged[0, 0], torch.tensor([5])):
        for layer in range(layers):
            low, high = int(positions.min()), int(positions.max())
            table = rotary.rotation_tables(*rotary.cos_sin(torch.arange(low, high + 1), layer))
            index = positions - low
            cos, sin = rotary.table_cos_sin(positions, layer)
            first = positions.reshape(-1, positions.shape[-1])[0]
            if bool((positions == first).all()):  # broadcast over layers and heads, as before
                index = first - low
            assert torch.equal(cos, table[0][index]) and torch.equal(sin, table[1][index])


def test_rotate_then_unrotate_is_identity(tiny_lm):
    rotary = Rotary(tiny_lm.model)
    keys = torch.randn(2, 5, 16)
    positions = torch.tensor([[0, 3, 7, 100, 2000]] * 2)
    back = rotary.unrotate(rotary.rotate(keys, positions, 0), positions, 0)
    torch.testing.assert_close(back, keys, atol=1e-5, rtol=1e-5)


def _rope_by_complex_multiplication(keys: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """``keys [..., n, d]`` turned to ``positions [..., n]`` as RoPE defines it (Su et al., 2021),
    in the half layout Llama uses: channel pair ``(i, i + d/2)`` is the complex number
    ``x_i + j x_{i+d/2}``, multiplied by ``exp(j * position * theta^(-2i/d))``. Built from the
    definition, with nothing of ``ragcompress.kv.rope``."""
    half = keys.shape[-1] // 2
    frequencies = theta ** (-torch.arange(half, dtype=torch.float64) * 2 / keys.shape[-1])  # [d/2]
    angles = positions.to(torch.float64).unsqueeze(-1) * frequencies  # [..., n, d/2]
    turned = torch.complex(keys[..., :half].double(), keys[..., half:].double()) * torch.polar(
        torch.ones_like(angles), angles
    )
    return torch.cat((turned.real, turned.imag), dim=-1).to(keys.dtype)


def test_rotation_composes_like_rope(tiny_lm):
    """Rotating to p then by q equals rotating to p + q: re-placement is exact. The expectation is
    RoPE's definition (:func:`_rope_by_complex_multiplication`), not the module's own
    ``rotate_half``: built with it, a rotation turning the wrong way composed just as well."""
    rotary = Rotary(tiny_lm.model)
    theta = tiny_lm.model.config.rope_parameters["rope_theta"]
    keys = torch.randn(2, 4, 16)
    p = torch.tensor([[1, 5, 9, 40]] * 2)
    once = rotary.rotate(keys, p + 17, 0)
    torch.testing.assert_close(once, _rope_by_complex_multiplication(keys, p + 17, theta), atol=1e-5, rtol=1e-5)
    twice = _rope_by_complex_multiplication(rotary.rotate(keys, p, 0), torch.full_like(p, 17), theta)
    torch.testing.assert_close(once, twice, atol=1e-5, rtol=1e-5)


def test_template_pieces_render_the_whole_chat_prompt(tiny_lm):
    template = PromptTemplate.from_tokenizer(tiny_lm.tokenizer)
    text = (
        template.prefix
        + template.passage_format.replace("{text}", "P1")
        + template.passage_format.replace("{text}", "P2")
        + template.suffix_format.replace("{question}", "Q?")
    )
    assert text.startswith("<|im_start|>system\n")
    assert "P1\n\nP2\n\nQuestion: Q?<|im_end|>\n<|im_start|>assistant\n" in text
    tokens = PromptTokens(template, tiny_lm.tokenizer)
    pieces = tokens.prefix() + tokens.passage("P1") + tokens.passage("P2") + tokens.suffix("Q?")
    # tokenized piece by piece (each passage's cache is computed alone), the pieces spell the prompt
    assert tokens.prefix() and tiny_lm.tokenizer.decode(pieces) == text


# Relative first-token logit error ||a - b|| / ||a - mean(a)|| an int8 store may have against the
# uncompressed one (measured 0.013 on the tiny llama); a codec one quantization step off on the
# values measured 0.068, unrelated passages 1.3. (The tiny model's softmax is nearly flat, top
# probability ~0.004, so probabilities alone cannot tell a right codec from a wrong one.)
INT8_LOGIT_BOUND = 0.03


def relative_error(reference: torch.Tensor, other: torch.Tensor) -> float:
    return float((reference - other).norm() / (reference - reference.mean()).norm())


def test_int8_store_stays_close_to_none(tiny_lm, passages_file, tmp_path, embedder, monkeypatch):
    index(passages_file, tmp_path / "none", lm=tiny_lm, embedder=embedder)
    index(passages_file, tmp_path / "int8", lm=tiny_lm, config=IndexConfig(quant="int8"), embedder=embedder)
    exact = Engine(KVStore.open(tmp_path / "none"), tiny_lm, embedder)
    quant = Engine(KVStore.open(tmp_path / "int8"), tiny_lm, embedder)
    entries = exact.retrieve(QUESTION, 2)
    quant_entries = [quant.store.entry(e.id) for e in entries]
    reference = first_logits(exact, entries, True)
    int8 = first_logits(quant, quant_entries, True)
    assert (reference.softmax(-1) - int8.softmax(-1)).abs().max() < 0.02
    assert relative_error(reference, int8) < INT8_LOGIT_BOUND

    # The bound discriminates: deliberately broken codecs exceed it.
    from ragcompress.store import codec

    dequantize = codec.dequantize_values_per_token
    broken = {
        "values one code off": lambda c, s, lo: dequantize(c.clamp(max=254) + 1, s, lo),
        "values without their minimum": lambda c, s, lo: dequantize(c, s, torch.zeros_like(lo)),
    }
    for name, wrong in broken.items():
        monkeypatch.setattr(codec, "dequantize_values_per_token", wrong)
        assert relative_error(reference, first_logits(quant, quant_entries, True)) > INT8_LOGIT_BOUND, name


# --- models with sliding-window layers or capped logits -------------------------------------------

WINDOW = 40  # shorter than the prefix plus any sample passage


@pytest.fixture(scope="module")
def sliding_engines(tiny_model_dir, tmp_path_factory, embedder):
    """A tiny Gemma-3 text model whose layers all slide over 40 tokens: unquantized and int8 stores."""
    from ragcompress.data import SAMPLE_PASSAGES

    root = tmp_path_factory.mktemp("sliding")
    passages_file = root / "passages.jsonl"
    passages_file.write_text("\n".join(SAMPLE_PASSAGES.read_text().splitlines()[:8]) + "\n")
    lm = load_model(str(tiny_model_dir("gemma3_text", sliding_window=WINDOW)))
    engines = {}
    for quant in ("none", "int8"):
        index(passages_file, root / quant, lm=lm, embedder=embedder, config=IndexConfig(quant=quant))
        engines[quant] = Engine(KVStore.open(root / quant), lm, embedder)
    ragged = IndexConfig(method="global:kvzip", ratio=0.5, quant="int8")  # heads keep different rows
    index(passages_file, root / "ragged", lm=lm, embedder=embedder, config=ragged)
    engines["ragged"] = Engine(KVStore.open(root / "ragged"), lm, embedder)
    yield engines
    for engine in engines.values():
        engine.close()


def test_a_passage_longer_than_the_sliding_window_is_stored_whole(sliding_engines):
    """The encoder keeps every row of a sliding layer (the model's masks still apply the window),
    so one stored passage answers exactly as full prefill does, though prefix + passage > window."""
    engine = sliding_engines["none"]
    entries = engine.retrieve(QUESTION, 1)
    assert engine.prefix.num_tokens + entries[0].num_tokens > WINDOW
    assert engine.store.load_kv(entries[0]).keys.shape[2] == entries[0].num_tokens
    torch.testing.assert_close(
        first_logits(engine, entries, True), first_logits(engine, entries, False), atol=1e-4, rtol=1e-4
    )


def test_what_does_not_apply_a_sliding_window_refuses_or_answers_alone(sliding_engines):
    from ragcompress.errors import InputError
    from ragcompress.runtime.batch import BatchStream, batchable
    from ragcompress.runtime.options import AnswerOptions

    engine = sliding_engines["int8"]
    entries = engine.retrieve(QUESTION, 2)
    with pytest.raises(InputError, match=rf"recompute does not apply the model's sliding window \({WINDOW} tokens\)"):
        engine.answer_cached(QUESTION, entries, AnswerOptions(recompute=0.2))
    with pytest.raises(InputError, match="beyond the model's sliding window of 40"):
        engine.answer_cached(QUESTION, entries, AnswerOptions(backend="packed-torch"))
    prepared = engine.prepare(QUESTION, entries)
    assert batchable(prepared) and not batchable(prepared, WINDOW, 4)  # serve answers it alone
    with pytest.raises(ValueError, match="sliding window, cannot be batched"):
        BatchStream(engine.lm.model, [prepared], [4], engine.stop_ids)
    engine.answer_cached(QUESTION, entries)  # plain reuse over the window works
    # per-head row masks cover the whole context, the sliding layers keep its last rows: the dense
    # path failed inside attention with a shape error; refused by name now
    ragged = sliding_engines["ragged"]
    with pytest.raises(InputError, match=rf"different number of rows per head.*sliding window \({WINDOW} tokens\)"):
        ragged.answer_cached(QUESTION, ragged.retrieve(QUESTION, 2))


@pytest.mark.parametrize("rank", [None, 8])
@pytest.mark.parametrize("arch", ["phi", "cohere", "helium", "glm", "exaone4"])
def test_the_packed_backends_turn_keys_as_the_model_does(arch, rank, tiny_model_dir, passages_file, tmp_path, embedder):
    """The packed path rotates stored keys inside attention in the model's RoPE layout: part of
    each head (Phi), adjacent channel pairs with tables in pairs (Cohere) or in halves (Helium),
    both (GLM), layers without RoPE (EXAONE-4). Its answers are the dense path's, token for token
    (int8 stores, one of rank-8 latents; both paths dequantize the same codes)."""
    from ragcompress.runtime.options import AnswerOptions

    store = tmp_path / "store"
    lm = load_model(str(tiny_model_dir(arch)))
    config = IndexConfig(quant="int8", rank=rank, **({"calibration_passages": 4} if rank else {}))
    index(passages_file, store, lm=lm, embedder=embedder, config=config)
    with Engine(KVStore.open(store), lm, embedder) as engine:
        for question in (QUESTION, "Which river runs through the city?"):
            entries = engine.retrieve(question, 3)
            dense = engine.answer_cached(question, entries, AnswerOptions(max_new_tokens=8))
            packed = engine.answer_cached(question, entries, AnswerOptions(max_new_tokens=8, backend="packed-torch"))
            assert (dense.backend, packed.backend) == ("dense", "packed-torch")
            assert packed.token_ids == dense.token_ids and len(dense.token_ids) == 8


def test_what_the_packed_backends_cannot_do_answers_through_the_dense_path(
    tiny_model_dir, passages_file, tmp_path, embedder
):
    """Gemma-2 caps attention logits, which SDPA and the packed backends do not: ``auto`` answers
    through the dense path, an explicit packed backend is refused by name."""
    from ragcompress.errors import InputError
    from ragcompress.runtime.options import AnswerOptions

    store = tmp_path / "store"
    lm = load_model(str(tiny_model_dir("gemma2")))
    index(passages_file, store, lm=lm, embedder=embedder, config=IndexConfig(quant="int8"))
    with Engine(KVStore.open(store), lm, embedder) as engine:
        entries = engine.retrieve(QUESTION, 2)
        assert engine.answer_cached(QUESTION, entries).backend == "dense"
        with pytest.raises(InputError, match=r"attention logit softcap \(50.0\); use backend dense"):
            engine.answer_cached(QUESTION, entries, AnswerOptions(backend="packed-torch"))


def test_a_packed_backend_names_the_temperature_it_cannot_apply(sliding_engines):
    from ragcompress.errors import InputError
    from ragcompress.runtime.options import AnswerOptions
    from ragcompress.runtime.recompute import RecomputeConfig

    engine = sliding_engines["int8"]
    options = AnswerOptions(backend="packed-torch", recompute=RecomputeConfig(temperature=0.95))
    with pytest.raises(InputError, match=r"attention temperature 0.95 .* use backend dense, not packed-torch"):
        engine.answer_cached(QUESTION, engine.retrieve(QUESTION, 1), options)
