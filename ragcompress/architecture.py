"""What ragcompress needs of a causal LM, checked on the loaded model rather than by its name.

ragcompress stores a passage's keys *before* RoPE and rotates them to new positions at query
time, and its scorers (KVzip, SnapKV, ...) and selective recompute read a layer's own query and
key projections. So a Hugging Face decoder qualifies when:

1. **Its layers have the usual parts**: ``model.model.layers[i].self_attn`` with ``q_proj``,
   ``k_proj`` and ``v_proj``, or one fused ``qkv_proj`` (Phi-3: :func:`projection_module`), and
   either a pre-attention ``input_layernorm`` or post-norm layers (OLMo-2, EXAONE-4), whose
   attention reads the residual stream as it is (:func:`attention_input_norm`). Query/key norms
   may act per head (Qwen3, Gemma-3, Phi) or over the whole projection (OLMo-2):
   :func:`head_states`.
2. **Its RoPE is a module**: ``model.model.rotary_emb``, whose tables cover a head's channels or
   its first ``rot`` (partial rotary: StableLM, Phi-2, Phi-4-mini; :mod:`ragcompress.kv.rope`
   turns those and leaves the rest).
3. **Its attention is what ragcompress runs** (:func:`attention_problem`): every layer hands
   the model's keyword arguments on to attention (the per-head masks of evicted caches and the
   packed segments travel that way to :mod:`ragcompress.runtime.attention`; StableLM's and
   Nemotron's layers drop them), and the model's eager attention gives the logits ragcompress's
   SDPA-based function gives (GPT-OSS's learned sinks do not).
4. **Moving a cache moves nothing else** (:func:`shift_error`): the cache of 16 tokens computed
   at positions 0.., its keys un-rotated and rotated to 37.., must equal the cache the same
   tokens get when they run at 37.. (keys and values, every layer); by RoPE's relative property
   it does. How keys move is fitted first (:func:`fit_rope`), since no config says it: RoPE in
   ``rotate_half``'s halves or in adjacent channel pairs (Cohere, Helium, GLM), and the layers
   without RoPE, whose keys the move leaves as they are (EXAONE-4's global layers; SmolLM3's
   say ``use_rope = 0`` themselves); :class:`~ragcompress.kv.rope.Rotary` follows the fit.
   Anything else that reads positions (absolute embeddings, ALiBi, another rotation) fails the
   probe, and would otherwise answer wrongly without an error.

The families in :data:`VERIFIED_MODEL_TYPES` are tested end to end in the suite (tiny random
models of each) and skip the probes; any other model that passes all four is accepted.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import torch

from ragcompress.errors import ModelError
from ragcompress.kv.rope import PAIRED_MARK

VERIFIED_MODEL_TYPES = ("llama", "qwen2", "qwen3", "mistral", "gemma", "gemma2", "gemma3_text")
PROJECTIONS = ("q_proj", "k_proj", "v_proj")

SHIFT = 37  # positions the probe moves its cached keys by (odd, so no rotation period lines up)
# relative error allowed by the probes: rounding of the model's dtype; a wrong move is off by
# about 1 (1.2 to 2.1 for tiny Cohere, Helium and EXAONE-4 models moved as rotate_half RoPE in
# every layer, before the fit), a right one in half precision by < 0.05
SHIFT_TOLERANCE = {torch.float32: 1e-3, torch.float64: 1e-6}
HALF_PRECISION_TOLERANCE = 0.2


def tolerance_for(model: Any) -> float:
    """The relative error the probes allow a model: rounding of its weights' dtype."""
    return SHIFT_TOLERANCE.get(next(model.parameters()).dtype, HALF_PRECISION_TOLERANCE)


def check_model(model: Any) -> RopeFit | None:
    """Refuse a model ragcompress would run wrongly, naming what it lacks (``ModelError``).
    Families outside :data:`VERIFIED_MODEL_TYPES` are also probed (:func:`probe_problem`); a
    layout so far from the usual one that a check itself fails is refused with that failure.
    Returns what the probes fitted and marked on the model (:func:`fit_rope`), ``None`` for the
    tested families."""
    model_type = getattr(model.config, "model_type", "?")
    fit: RopeFit | None = None
    try:
        problem = structure_problem(model)
        if problem is None and model_type not in VERIFIED_MODEL_TYPES:
            problem, fit = probe_problem(model)
    except Exception as exc:  # a hybrid or otherwise unusual model the checks cannot even run on
        problem = f"running it as ragcompress does failed ({type(exc).__name__}: {exc})"
    if problem is not None:
        raise ModelError(
            f"model type {model_type!r} cannot be used with ragcompress: {problem}. Tested families: "
            f"{', '.join(VERIFIED_MODEL_TYPES)}; see ragcompress/architecture.py for what a model needs"
        )
    return fit


def probe_problem(model: Any) -> tuple[str | None, RopeFit | None]:
    """What running the model shows ragcompress would get wrong (``None`` if nothing), and the
    fit of how its keys move: keyword arguments that do not reach attention, an attention
    function that does not compute the model's own, or a cache that does not move as fitted (the
    fit's marks are set on the model here, for :class:`~ragcompress.kv.rope.Rotary`)."""
    problem = attention_problem(model)
    if problem is not None:
        return problem, None
    tolerance = tolerance_for(model)
    runs = caches_at_two_positions(model)  # one pair of forwards for the fit and the shift probe
    fit = fit_rope(model, tolerance, runs)
    if fit.paired:
        setattr(model.model.rotary_emb, PAIRED_MARK, True)  # read by Rotary
    for layer in fit.without_rope:
        model.model.layers[layer].self_attn.use_rope = False  # read by Rotary, as SmolLM3 sets it
    error = shift_error(model, runs)
    if not error <= tolerance:
        return (
            f"its cache changes when it is moved to other positions (relative error {error:.2g} > "
            f"{tolerance:g}): it reads positions other than through RoPE in rotate_half's or the paired convention"
        ), fit
    return None, fit


def structure_problem(model: Any) -> str | None:
    """The first part ragcompress reads that the model does not have, or ``None``."""
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if getattr(inner, "language_model", None) is not None and layers is None:
        # Gemma-3 4B-27B (model type gemma3), Mistral-Small-3.1, ...: AutoModelForCausalLM gives the
        # image-text model, whose decoder is model.model.language_model
        return (
            "it is a multimodal (image-text) model whose text decoder sits at model.model.language_model, "
            "which ragcompress does not read; a text-only checkpoint of the family (such as gemma-3-1b, model "
            "type gemma3_text) can be used"
        )
    if inner is None or layers is None or len(layers) == 0:
        return "no decoder layers at model.model.layers"
    if getattr(inner, "rotary_emb", None) is None:
        return "no rotary embedding module at model.model.rotary_emb (ragcompress re-positions caches with RoPE)"
    plain = [i for i, layer in enumerate(layers) if getattr(layer, "self_attn", None) is None]
    if plain:
        return f"layers {plain} have no self-attention (a hybrid of attention and linear or recurrent layers)"
    attn = layers[0].self_attn
    if getattr(attn, "qkv_proj", None) is None and any(getattr(attn, part, None) is None for part in PROJECTIONS):
        return "no query, key and value projections (self_attn.q_proj, k_proj, v_proj or a fused qkv_proj)"
    if final_norm(model) is None:
        return "no final norm before the LM head (model.model.norm or final_layernorm)"
    if attention_input_norm(layers[0]) is None:
        return "no input_layernorm (or attention_layernorm) before attention, and not post-norm either"
    from ragcompress.kv.rope import Rotary

    rot, head_dim = Rotary(model).rotary_dim, _head_dim(model)
    if rot > head_dim or rot % 2:
        return f"RoPE tables {rot} wide for heads of {head_dim} channels"
    return None


def attention_input_norm(layer: Any) -> Any:
    """What a decoder layer applies to its input before attention: ``input_layernorm``
    (``attention_layernorm``: Apertus), or the identity in a post-norm layer (OLMo-2, EXAONE-4:
    normed after attention and after the MLP, ``post_feedforward_layernorm``); ``None`` when it
    is neither (a layout not known here)."""
    for name in ("input_layernorm", "attention_layernorm"):
        norm = getattr(layer, name, None)
        if norm is not None:
            return norm
    return torch.nn.Identity() if getattr(layer, "post_feedforward_layernorm", None) is not None else None


def projection_module(attn: Any, part: str) -> tuple[Any, slice]:
    """The linear layer whose output holds ``part`` (``"q_proj"``, ``"k_proj"`` or ``"v_proj"``)
    of attention ``attn``, and the slice of that output it is: the whole of its own projection,
    or its columns of a fused ``qkv_proj`` (Phi-3: queries, then keys, then values)."""
    own = getattr(attn, part, None)
    if own is not None:
        return own, slice(None)
    config = attn.config
    q_width = config.num_attention_heads * attn.head_dim
    kv_width = config.num_key_value_heads * attn.head_dim
    start = {"q_proj": 0, "k_proj": q_width, "v_proj": q_width + kv_width}[part]
    return attn.qkv_proj, slice(start, start + (q_width if part == "q_proj" else kv_width))


def project(attn: Any, part: str, hidden: torch.Tensor) -> torch.Tensor:
    """``part`` of ``attn``'s projections of ``hidden`` (:func:`projection_module`)."""
    module, columns = projection_module(attn, part)
    return module(hidden)[..., columns]


def qk_norm(attn: Any, part: str) -> Any:
    """The norm ``attn`` applies to its queries (``part="q"``) or keys (``"k"``) after projecting
    them, or ``None``: ``q_norm``/``k_norm`` (Qwen3, Gemma-3, OLMo-2) or ``q_layernorm``/
    ``k_layernorm`` (StableLM and Phi with ``qk_layernorm``)."""
    own = getattr(attn, f"{part}_norm", None)
    return own if own is not None else getattr(attn, f"{part}_layernorm", None)


def head_states(attn: Any, projected: torch.Tensor, part: str, heads: int) -> torch.Tensor:
    """``[batch, heads, m, head_dim]`` queries (``part="q"``) or keys (``"k"``) from a
    projection's output ``[batch, m, heads * head_dim]``, through the layer's norm where it has
    one (:func:`qk_norm`): per head (Qwen3, Gemma-3, StableLM, Phi) or over the whole projection
    (OLMo-2), as the model applies it."""
    batch, m, width = projected.shape
    head_dim = width // heads
    norm: Any = qk_norm(attn, part)
    if norm is None:
        return projected.view(batch, m, heads, head_dim).transpose(1, 2)
    weight = getattr(norm, "weight", None)
    if weight is not None and weight.numel() != head_dim:  # over the whole projection
        return norm(projected).view(batch, m, heads, head_dim).transpose(1, 2)
    return norm(projected.view(batch, m, heads, head_dim).transpose(1, 2))


def output_logits(model: Any, hidden: torch.Tensor) -> torch.Tensor:
    """Logits of the last decoder layer's output ``hidden [..., D]`` as the model's own forward
    makes them: final norm (:func:`final_norm`), LM head, then the output scaling some families
    apply (Cohere's ``logit_scale`` multiplies, Granite's ``logits_scaling`` divides, Gemma-2/3 cap
    with ``final_logit_softcapping``)."""
    logits = model.lm_head(final_norm(model)(hidden))
    scale = getattr(model, "logit_scale", None)
    if scale is not None:
        logits = logits * scale
    divisor = getattr(model.config, "logits_scaling", None)
    if divisor:
        logits = logits / divisor
    cap = getattr(model.config, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits


def attention_window(attn: Any) -> int | None:
    """The sliding window attention module ``attn`` applies, ``None`` for full attention: its
    ``sliding_window``, except where the module keeps the config's window on every layer and
    applies it only where ``is_sliding`` (EXAONE-4's global layers)."""
    if getattr(attn, "is_sliding", True) is False:
        return None
    return getattr(attn, "sliding_window", None)


def final_norm(model: Any) -> Any:
    """The norm between the last decoder layer and the LM head: ``model.model.norm``, or
    ``final_layernorm`` (Phi); ``None`` when neither is there."""
    inner = model.model
    own = getattr(inner, "norm", None)
    return own if own is not None else getattr(inner, "final_layernorm", None)


@torch.inference_mode()
def attention_problem(model: Any, tokens: int = 16) -> str | None:
    """What the model's attention calls show ragcompress would get wrong, or ``None``. The same
    ``tokens`` run through ragcompress's attention function and through the model's eager one:

    - every layer's attention call must receive the keyword argument given to the model's forward,
      since the per-head masks of evicted caches and the packed segments ride on such keywords
      (:mod:`ragcompress.runtime.attention`); a decoder layer that drops them (StableLM's,
      Nemotron's) would attend over evicted caches' padding rows without an error;
    - the logits must agree: the function is SDPA plus those masks, and a model that attends in a
      way it leaves out (GPT-OSS's learned attention sinks) would answer otherwise."""
    from ragcompress.runtime.attention import REACHED_KWARG, register_attention

    ids = torch.randint(0, model.config.vocab_size, (1, tokens), generator=torch.Generator().manual_seed(1))
    reached: set[int] = set()
    ours = model(input_ids=ids.to(model.device), **{REACHED_KWARG: reached}).logits.float()
    missing = [i for i in range(len(model.model.layers)) if i not in reached]
    if missing:
        return (
            f"its decoder layers do not hand keyword arguments on to attention (layers {missing}), and "
            "ragcompress's masks for evicted caches ride on them"
        )
    model.set_attn_implementation("eager")
    try:
        eager = model(input_ids=ids.to(model.device)).logits.float()
    finally:
        model.set_attn_implementation(register_attention())
    tolerance = tolerance_for(model)
    error = _relative(ours, eager)
    if error <= tolerance:
        return None
    return (
        f"its own (eager) attention computes something ragcompress's attention does not (logits differ "
        f"by {error:.2g} relative, > {tolerance:g})"
    )


CachePair = tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


@torch.inference_mode()
def caches_at_two_positions(model: Any, tokens: int = 16) -> list[CachePair]:
    """Per layer ``((keys, values) at 0.., (keys, values) at SHIFT..)`` of the same random
    ``tokens``: what the probes below compare."""
    from transformers import DynamicCache

    from ragcompress.kv.cache import cache_layers
    from ragcompress.runtime.generate import forward_logits

    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (1, tokens), generator=generator)
    at_zero, shifted = DynamicCache(), DynamicCache()
    forward_logits(model, ids, at_zero, 0, 1)
    forward_logits(model, ids, shifted, SHIFT, 1)
    return list(zip(cache_layers(at_zero), cache_layers(shifted), strict=True))


@dataclass(frozen=True)
class RopeFit:
    """How a model's keys move with position, as :func:`fit_rope` found it: ``paired`` when its
    RoPE turns adjacent channels together (Cohere, Helium, GLM), else ``rotate_half``'s channel
    ``i`` with ``i + rot/2``; ``without_rope``: the layers whose keys do not move at all."""

    paired: bool
    without_rope: list[int]

    @property
    def fingerprint_part(self) -> str:
        """What the fit adds to the model's fingerprint (:func:`ragcompress.models.load_model`):
        stored keys are un-rotated in the fitted convention, so a store must not be read under
        another one (a later fit of the same weights). Empty for plain ``rotate_half`` RoPE in
        every layer, so those fingerprints stay as they were."""
        if not self.paired and not self.without_rope:
            return ""
        return json.dumps({"rope_paired": self.paired, "rope_fitted_without": self.without_rope}, sort_keys=True)


def fit_rope(model: Any, tolerance: float, runs: list[CachePair] | None = None) -> RopeFit:
    """Which rotation explains how the model's cached keys move: the same tokens run at ``0..``
    and at ``SHIFT..`` (``runs``, :func:`caches_at_two_positions` when not given), each layer's
    first keys moved by ``SHIFT`` in ``rotate_half``'s convention, in the paired one, or not at
    all. The convention is the one whose worst layer is closest (``rotate_half`` on a tie): a
    model's config does not say which it uses. A layer counts as one without RoPE only when
    "not moved" fits within ``tolerance`` and strictly better than the convention does: a RoPE
    layer whose keys sit mostly in slowly turning channels moves little, and must not be taken
    for one. EXAONE-4's global layers have no RoPE and do not say so (SmolLM3's say
    ``use_rope = 0``); :func:`check_model` marks what this finds, and
    :class:`~ragcompress.kv.rope.Rotary` reads the marks."""
    from ragcompress.kv.rope import Rotary

    runs = runs or caches_at_two_positions(model)
    fits = []
    for paired in (False, True):
        rotary = Rotary(model, paired=paired)
        errors = [
            (_relative(_moved(rotary, keys[0], layer), want[0]), _relative(keys[0], want[0]))
            for layer, ((keys, _), (want, _)) in enumerate(runs)
        ]
        without = [layer for layer, (moved, unmoved) in enumerate(errors) if unmoved <= tolerance and unmoved < moved]
        worst = max(
            (min(moved, unmoved) if layer in without else moved) for layer, (moved, unmoved) in enumerate(errors)
        )
        fits.append((worst, RopeFit(paired, without)))
    return min(fits, key=lambda fit: fit[0])[1]


def shift_error(model: Any, runs: list[CachePair] | None = None) -> float:
    """How far moving a cache is from computing it at the new positions: the same tokens run at
    positions ``0..`` and at ``SHIFT..`` (``runs``, :func:`caches_at_two_positions` when not
    given); the first run's keys, un-rotated and rotated by ``SHIFT``, must equal the second
    run's, and its values the second run's values, in every layer (largest difference over the
    largest entry, the worst layer). Zero up to rounding for a model that sees positions only
    through rotate_half RoPE, since then every hidden state is the same in both runs; a layer it
    would move wrongly is off by its keys' size."""
    from ragcompress.kv.rope import Rotary

    rotary = Rotary(model)
    worst = 0.0
    for layer, ((keys, values), (want_keys, want_values)) in enumerate(runs or caches_at_two_positions(model)):
        worst = max(worst, _relative(_moved(rotary, keys[0], layer), want_keys[0]), _relative(values, want_values))
    return worst


def _moved(rotary: Any, keys: torch.Tensor, layer: int) -> torch.Tensor:
    """``keys [heads, n, d]`` cached at ``0..n-1``, moved by ``SHIFT`` as ragcompress moves them."""
    positions = torch.arange(keys.shape[-2]).expand(keys.shape[0], -1)
    return rotary.rotate(rotary.unrotate(keys, positions, layer), positions + SHIFT, layer)


def _relative(got: torch.Tensor, want: torch.Tensor) -> float:
    want = want.float()
    return float((got.float() - want).abs().max() / want.abs().max().clamp_min(1e-6))


def _head_dim(model: Any) -> int:
    config = model.config
    return int(getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads)
