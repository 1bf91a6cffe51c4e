"""Which models ragcompress accepts is decided by what it needs of them
(:mod:`ragcompress.architecture`), not by a list of names: families outside the tested list that
have the parts and pass the shift probe load (and answer as full prefill, tests/test_runtime.py),
and the ones it would run wrongly are refused, each naming why."""

from __future__ import annotations

import pytest
import torch

from ragcompress.architecture import (
    HALF_PRECISION_TOLERANCE,
    VERIFIED_MODEL_TYPES,
    RopeFit,
    caches_at_two_positions,
    fit_rope,
    head_states,
    shift_error,
)
from ragcompress.errors import ModelError
from ragcompress.models import load_model


@pytest.mark.parametrize(
    ("arch", "config"),
    [(arch, {}) for arch in (*VERIFIED_MODEL_TYPES, "qwen3_moe", "ministral", "granite", "starcoder2", "olmo2", "phi3")]
    + [(arch, {}) for arch in ("mixtral", "olmoe", "glm4_moe", "ernie4_5", "hunyuan_v1_dense", "apertus", "olmo3")]
    + [("smollm3", {"layers": 4})]  # its fourth layer has no RoPE (use_rope = 0): keys stay where they are
    # partial rotary: RoPE turns a head's first 8 or 12 of 16 channels (Phi-4-mini's factor 0.75)
    + [("phi", {}), ("phi3", {"partial_rotary_factor": 0.75})]
    + [("exaone4", {"layers": 4})],  # its fourth (global) layer has no RoPE and does not say so
)
def test_the_shift_probe_passes_the_models_it_accepts(arch, config, tiny_model_dir):
    """Rounding only, for the tested families too (they skip the probe when they load)."""
    lm = load_model(str(tiny_model_dir(arch, **config)))
    assert shift_error(lm.model) < 1e-4


@pytest.mark.parametrize(
    ("arch", "config", "paired", "nope"),
    [
        ("exaone4", {"layers": 4}, False, [3]),  # a global layer without RoPE
        ("phi", {}, False, []),
        ("cohere", {}, True, []),  # tables laid out in pairs
        ("helium", {}, True, []),  # tables laid out in halves, paired by its attention
        ("glm", {}, True, []),  # paired and partial
        ("cohere2", {"layers": 4}, True, [3]),  # paired, and a global layer without RoPE
    ],
)
def test_how_keys_move_is_fitted_at_load(arch, config, paired, nope, tiny_model_dir):
    """No config says whether RoPE turns halves or adjacent pairs, nor (EXAONE-4, Cohere-2) which
    layers skip it: the load fits both from how the cache moves, marks what it found, and only
    that; before, the shift probe refused these models (relative error 1.2 to 2.1)."""
    from ragcompress.kv.rope import PAIRED_MARK, Rotary

    lm = load_model(str(tiny_model_dir(arch, **config)))
    rotary = Rotary(lm.model)
    assert rotary.paired is paired
    assert [i for i in range(len(lm.model.model.layers)) if not rotary.rotates(i)] == nope
    for layer in nope:  # unmarked again, as the model came
        del lm.model.model.layers[layer].self_attn.use_rope
    if paired:
        delattr(lm.model.model.rotary_emb, PAIRED_MARK)
    assert fit_rope(lm.model, 1e-3) == RopeFit(paired, nope)


@pytest.mark.parametrize(
    ("arch", "config", "reason"),
    [
        # partial rotary, which is supported, but its decoder layer calls attention without **kwargs
        ("stablelm", {}, r"its decoder layers do not hand keyword arguments on to attention \(layers \[0, 1\]\)"),
        ("nemotron", {}, "its decoder layers do not hand keyword arguments on to attention"),
        # learned attention sinks, which SDPA (ragcompress's attention) leaves out
        ("gpt_oss", {}, r"its own \(eager\) attention computes something ragcompress's attention does not"),
        ("qwen3_next", {}, r"layers \[0, 1\] have no self-attention \(a hybrid"),  # linear attention
        ("jamba", {}, "no rotary embedding module"),
        ("deepseek_v3", {}, "no query, key and value projections"),  # latent attention (MLA)
        # a rotary module of complex frequencies: the check cannot run on it, and says so
        ("llama4_text", {}, r"running it as ragcompress does failed \(ValueError: "),
    ],
)
def test_models_it_would_run_wrongly_are_refused_by_reason(arch, config, reason, tiny_model_dir):
    with pytest.raises(ModelError, match=f"model type '{arch}' cannot be used with ragcompress: {reason}"):
        load_model(str(tiny_model_dir(arch, **config)))


def test_a_multimodal_wrapper_is_refused_naming_its_text_decoder(tmp_path):
    """Gemma-3 4B-27B checkpoints (model type gemma3) load as an image-text model whose decoder
    sits at model.model.language_model; the refusal said only "no decoder layers"."""
    from transformers import AutoTokenizer, Gemma3Config, Gemma3ForConditionalGeneration

    from ragcompress.models import DEFAULT_MODEL, resolve_model_dir

    tokenizer = AutoTokenizer.from_pretrained(resolve_model_dir(DEFAULT_MODEL))
    size = len(tokenizer)
    text = dict(
        vocab_size=size + 300,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=4096,
        layer_types=["sliding_attention", "full_attention"],
    )
    vision = dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=28, patch_size=14
    )
    config = Gemma3Config(
        text_config=text,
        vision_config=vision,
        mm_tokens_per_image=4,
        image_token_index=size + 10,
        boi_token_index=size + 11,
        eoi_token_index=size + 12,
    )
    torch.manual_seed(0)
    Gemma3ForConditionalGeneration(config).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    with pytest.raises(
        ModelError, match=r"model type 'gemma3' cannot be used .*multimodal .*language_model.*gemma3_text"
    ):
        load_model(str(tmp_path))


def test_the_attention_probe_leaves_ragcompresss_attention_in_place(tiny_model_dir):
    """The probe runs the model's eager attention once to compare; answering must then go
    through ragcompress's attention function again (the masks of evicted caches need it)."""
    from ragcompress.runtime.attention import ATTENTION_NAME

    lm = load_model(str(tiny_model_dir("phi")))
    assert lm.model.config._attn_implementation == ATTENTION_NAME
    assert all(layer.self_attn.config._attn_implementation == ATTENTION_NAME for layer in lm.model.model.layers)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_model_whose_cache_moves_otherwise_is_refused(dtype, tiny_model_dir, monkeypatch):
    """Keys turned at twice the angle of the queries' (a stand-in for any position scheme neither
    RoPE convention describes): the fit finds no convention that moves the cache, and the shift
    probe refuses the model instead of letting it answer wrongly. bf16 rounds a correctly moved
    key by a few percent (Granite's multipliers most of these: it loads unpatched); a wrong move
    is off by about its size, so the half-precision tolerance still refuses it."""
    assert load_model(str(tiny_model_dir("granite")), dtype=dtype).config.model_type == "granite"
    from transformers.models.granite import modeling_granite

    plain = modeling_granite.apply_rotary_pos_emb

    def keys_at_double_angle(q, k, cos, sin, *args, **kwargs):
        q_embed, _ = plain(q, k, cos, sin, *args, **kwargs)
        _, k_embed = plain(q, k, cos * cos - sin * sin, 2 * sin * cos, *args, **kwargs)
        return q_embed, k_embed

    monkeypatch.setattr(modeling_granite, "apply_rotary_pos_emb", keys_at_double_angle)
    with pytest.raises(ModelError, match="model type 'granite' cannot be used with ragcompress: its cache changes"):
        load_model(str(tiny_model_dir("granite")), dtype=dtype)


class _Attention(torch.nn.Module):
    def __init__(self, norm: torch.nn.Module | None) -> None:
        super().__init__()
        self.q_norm = norm


def test_head_states_applies_a_norm_per_head_or_over_the_projection():
    torch.manual_seed(0)
    projected = torch.randn(1, 5, 3 * 4)  # 3 heads of 4 channels
    per_head, whole = torch.nn.RMSNorm(4), torch.nn.RMSNorm(12)
    plain = projected.view(1, 5, 3, 4).transpose(1, 2)
    torch.testing.assert_close(head_states(_Attention(None), projected, "q", 3), plain)
    torch.testing.assert_close(head_states(_Attention(per_head), projected, "q", 3), per_head(plain))
    expected = whole(projected).view(1, 5, 3, 4).transpose(1, 2)
    torch.testing.assert_close(head_states(_Attention(whole), projected, "q", 3), expected)
    assert not torch.allclose(expected, per_head(plain))


@pytest.mark.parametrize(
    ("arch", "config"),
    [
        ("llama", {}),
        ("smollm3", {"no_rope_layers": [0]}),
        ("olmo2", {}),
        ("phi", {}),
        ("exaone4", {"layer_types": ["full_attention"]}),
        ("cohere", {}),  # RoPE over adjacent channel pairs
        ("glm", {}),  # over adjacent pairs of the first half of each head
    ],
)
def test_one_layer_models_answer_three_moved_passages_exactly(arch, config, tiny_model_dir, tmp_path, embedder):
    """In a one-layer model a passage's keys and values do not depend on what precedes it, so
    caches encoded alone and moved behind other passages must give full prefill's logits: the
    re-positioning itself checked exactly, with RoPE, over part of each head (Phi: its first
    half turns, the rest must stay), over adjacent channel pairs (Cohere; GLM, partial too) and (SmolLM3 with ``no_rope_layers=[0]``) without
    it, where moving a key must leave it as it is."""
    from ragcompress.data import SAMPLE_PASSAGES
    from ragcompress.indexing import index
    from ragcompress.runtime.assemble import assemble
    from ragcompress.runtime.engine import Engine
    from ragcompress.runtime.generate import forward_step
    from ragcompress.store import KVStore

    lm = load_model(str(tiny_model_dir(arch, layers=1, **config)))
    if arch in ("smollm3", "exaone4"):  # a layer without RoPE (EXAONE-4's found at load)
        assert not lm.model.model.layers[0].self_attn.use_rope
    passages = tmp_path / "passages.jsonl"
    passages.write_text("\n".join(SAMPLE_PASSAGES.read_text().splitlines()[:6]) + "\n")
    index(passages, tmp_path / "store", lm=lm, embedder=embedder)
    engine = Engine(KVStore.open(tmp_path / "store"), lm, embedder)
    question = "Where is the university?"
    entries = engine.retrieve(question, 3)
    segments = [engine.store.load_kv(e) for e in entries]
    built = assemble(engine.lm.config, engine.rotary, engine.prefix_keys, engine.prefix, segments, engine.dtype)
    suffix = engine.tokens.suffix(question)
    from transformers import DynamicCache

    with torch.inference_mode():
        cached = forward_step(lm.model, torch.tensor([suffix]), built.cache, built.next_position)
        full = forward_step(
            lm.model, torch.tensor([engine.full_prompt_ids(question, entries)]), DynamicCache(config=lm.config), 0
        )
    torch.testing.assert_close(cached, full, atol=1e-4, rtol=1e-4)


def test_a_fused_qkv_projection_is_read_by_its_columns(tiny_model_dir):
    """Phi-3 computes q, k and v in one ``qkv_proj``: the scorers and recompute read their
    columns of it (tests/test_runtime.py, test_compressors.py and test_recompute.py run it end to
    end; test_distill.py trains an adaptor on it)."""
    from ragcompress.architecture import project

    lm = load_model(str(tiny_model_dir("phi3")))
    attn = lm.model.model.layers[0].self_attn
    hidden = torch.randn(1, 3, lm.config.hidden_size)
    with torch.no_grad():
        q, k, v = (project(attn, part, hidden) for part in ("q_proj", "k_proj", "v_proj"))
        assert torch.equal(torch.cat([q, k, v], -1), attn.qkv_proj(hidden))
    assert q.shape[-1] == lm.config.num_attention_heads * attn.head_dim
    assert k.shape[-1] == v.shape[-1] == lm.config.num_key_value_heads * attn.head_dim


def test_a_rope_layer_that_barely_moves_is_not_taken_for_one_without_rope(tiny_model_dir):
    """Keys only in a head's most slowly turning channel pair move by about 1 % over the probe's
    shift: within the half-precision tolerance, yet "rotated" explains them far better than "not
    moved", so no layer is marked (marking one would leave its keys unturned when moved)."""
    from ragcompress.kv.rope import Rotary

    lm = load_model(str(tiny_model_dir("llama")))
    head_dim = lm.config.head_dim
    slowest = torch.zeros(head_dim, dtype=torch.bool)
    slowest[[head_dim // 2 - 1, head_dim - 1]] = True
    with torch.no_grad():
        for layer in lm.model.model.layers:
            weight = layer.self_attn.k_proj.weight.view(-1, head_dim, lm.config.hidden_size)
            weight[:, ~slowest] = 0
    runs = caches_at_two_positions(lm.model)
    (keys, _), (moved, _) = runs[0]
    assert 1e-3 < (keys - moved).abs().max() / moved.abs().max() < HALF_PRECISION_TOLERANCE
    assert Rotary(lm.model).rotary_dim == head_dim
    assert fit_rope(lm.model, HALF_PRECISION_TOLERANCE, runs) == RopeFit(False, [])


@pytest.mark.parametrize(
    ("arch", "config"),
    [
        ("llama", {}),
        ("cohere", {"logit_scale": 0.5}),  # multiplies the head's logits
        ("granite", {"logits_scaling": 4.0}),  # divides them
        ("gemma2", {"final_logit_softcapping": 2.0}),  # caps them
        ("phi", {}),  # final_layernorm, a head with a bias
    ],
)
def test_output_logits_are_the_models_own(arch, config, tiny_model_dir):
    """Selective recompute carries the question through the layers itself and makes its first
    logits from the last hidden state: they must be what the model's forward gives (each
    family's output scaling included), or teacher-forced KL over them is off."""
    from ragcompress.architecture import final_norm, output_logits

    lm = load_model(str(tiny_model_dir(arch, **config)))
    captured = []
    hook = final_norm(lm.model).register_forward_hook(lambda module, args, out: captured.append(args[0]))
    with torch.no_grad():
        want = lm.model(torch.tensor([[5, 17, 42, 9]])).logits
        hook.remove()
        torch.testing.assert_close(output_logits(lm.model, captured[0]), want)


def test_the_fitted_rope_is_part_of_the_fingerprint(tiny_model_dir, monkeypatch):
    """Stored keys are un-rotated in the convention the load fitted, so the fit is part of the
    model's fingerprint, which every store checks: a store cannot be read under another fit of
    the same weights. A model fitted as plain ``rotate_half`` RoPE keeps the fingerprint of its
    config and weights alone."""
    from ragcompress.architecture import RopeFit

    fitted = {arch: load_model(str(tiny_model_dir(arch))).fingerprint for arch in ("cohere", "phi")}
    monkeypatch.setattr(RopeFit, "fingerprint_part", property(lambda self: ""))
    assert load_model(str(tiny_model_dir("cohere"))).fingerprint != fitted["cohere"]
    assert load_model(str(tiny_model_dir("phi"))).fingerprint == fitted["phi"]
