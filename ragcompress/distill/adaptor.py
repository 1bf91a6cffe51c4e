"""A learned passage adaptor (KV-Distill), used only while passages are encoded, and optionally a
learned token-retention scorer; saved as safetensors + a JSON config.

Two kinds, recorded as ``settings["kind"]``:

``forward`` (what ``ragcompress train`` makes): peft LoRA layers on the model's linear
projections (``settings["modules"]``), active only inside the passage forward. A correction in
layer ``l`` changes the passage's hidden states, so it reaches every later layer's keys and
values -- the design the KV-Distill paper uses. The tensors are peft's own adapter state dict
(``model.layers.0.self_attn.q_proj.lora_A.weight`` ...). Indexing folds them into the weights
they adapt (:meth:`Adaptor.merged_weights`) and the encoder swaps those in for the passage
forward only; training injects them as peft layers (:meth:`Adaptor.attach`, switched on by
:func:`lora_active`), which carry the gradients. Everything else the model runs (prefix,
question, decoding, the full-prefill baseline) is the base model.

``cache`` (the first version; adaptors without a ``kind`` are of this kind): LoRA factors of
``k_proj`` and ``v_proj`` added to what is cached, not fed to the next layer::

    K_cache = k_proj(x_l) + (alpha / rank) * B_k[l] @ A_k[l] @ x_l      (likewise V)

``x_l`` being the input of the layer's key/value projections in the base forward. It was chosen
because a backward pass through the passage forward looked unaffordable on these CPUs (a
measurement taken under heavy contention; docs/distill.md has the re-measurement). Kept so that
stores built with it stay readable and extendable.

An adaptor of zeros (``B = 0``, how training starts) leaves every cache bit for bit as the base
model makes it, for both kinds. An adaptor is identified by :attr:`Adaptor.hash`: the sha256 of
its settings and tensors (not of its metrics). A store records that hash in its manifest and
refuses another adaptor's caches.
"""

from __future__ import annotations

import hashlib
import json
import math
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ragcompress.architecture import qk_norm
from ragcompress.errors import InputError, NonFiniteError, StoreMismatchError
from ragcompress.kv import PassageKV
from ragcompress.paths import follow_umask

WEIGHTS = "adaptor.safetensors"
CONFIG = "adaptor.json"
FACTORS = ("k_A", "k_B", "v_A", "v_B")  # kind "cache": A [layers, rank, hidden]; B [layers, kv_heads * head_dim, rank]
# kind "forward": LoRA on every linear projection of the decoder layers (attention and MLP)
# every linear projection of a decoder layer, by the names transformers gives them (fused
# ``qkv_proj`` and ``gate_up_proj``: Phi-3; ``dense``, ``fc1``, ``fc2``: Phi-2; ``c_fc``,
# ``c_proj``: StarCoder2's MLP); a model's adaptor covers those it has
FORWARD_MODULES = (
    "q_proj",
    "k_proj",
    "v_proj",
    "qkv_proj",
    "o_proj",
    "dense",
    "gate_proj",
    "up_proj",
    "gate_up_proj",
    "down_proj",
    "fc1",
    "fc2",
    "c_fc",
    "c_proj",
)
SCORER_WEIGHT = "scorer.weight"  # [layers, kv_heads, 2 * head_dim]: over (un-rotated key, value)
SCORER_BIAS = "scorer.bias"  # [layers, kv_heads]
# Packaged adaptors: ragcompress/distill/adaptors/<model name>/ (``--adaptor default``).


def projection_inputs_supported(model: Any) -> None:
    """Keys must be the key projection's output up to RoPE (no per-head key norm), so that a
    correction of the projection is a correction of the un-rotated cached key."""
    attn = model.model.layers[0].self_attn
    if getattr(attn, "k_proj", None) is None:
        raise InputError(
            f"{type(model).__name__} projects keys in a fused qkv_proj, and adaptors of kind 'cache' need k_proj; "
            "train one of kind 'forward' (--kind forward, the default)"
        )
    if qk_norm(attn, "k") is not None:
        raise InputError(
            f"{type(model).__name__} normalises keys after the projection, which adaptors of kind 'cache' do not "
            "support; train one of kind 'forward' (--kind forward, the default)"
        )


@dataclass
class Adaptor:
    """``settings`` (``rank``, ``alpha``), ``tensors`` (the LoRA factors :data:`FACTORS` and the
    optional scorer) and ``meta`` (base-model fingerprint, training-data hash, ratio, metrics)."""

    settings: dict[str, Any]
    tensors: dict[str, torch.Tensor]
    meta: dict[str, Any] = field(default_factory=dict)

    # -- identity ---------------------------------------------------------------------------------

    @property
    def hash(self) -> str:
        """sha256 of the settings and every tensor (name, dtype, shape, bytes), sorted by name."""
        digest = hashlib.sha256(json.dumps(self.settings, sort_keys=True).encode())
        for name in sorted(self.tensors):
            tensor = self.tensors[name].detach().contiguous().cpu()
            digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}".encode())
            digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
        return digest.hexdigest()

    @property
    def has_scorer(self) -> bool:
        return SCORER_WEIGHT in self.tensors

    @property
    def scaling(self) -> float:
        return float(self.settings["alpha"]) / float(self.settings["rank"])

    def check_model(self, fingerprint: str, ref: str) -> None:
        """Refuse a model other than the one this adaptor was trained on. One made in memory
        (training's own) may record none; a loaded one always does (:meth:`load`)."""
        base = self.meta.get("base_fingerprint")
        if base and base != fingerprint:
            raise StoreMismatchError(
                f"adaptor was trained on model {self.meta.get('base_model', '?')} (fingerprint {base[:16]}), "
                f"not on {ref} ({fingerprint[:16]}); use that model's adaptor"
            )

    # -- creation, saving, loading ----------------------------------------------------------------

    @property
    def kind(self) -> str:
        return str(self.settings.get("kind", "cache"))

    @property
    def lora_tensors(self) -> dict[str, torch.Tensor]:
        """The LoRA factors (the scorer's tensors left out)."""
        return {name: t for name, t in self.tensors.items() if not name.startswith("scorer.")}

    @classmethod
    def initial(
        cls,
        model: Any,
        rank: int = 8,
        alpha: int = 16,
        seed: int = 0,
        kind: str = "forward",
        modules: tuple[str, ...] = FORWARD_MODULES,
    ) -> Adaptor:
        """A fresh adaptor for ``model``: ``A`` as LoRA initialises it (Kaiming-uniform), ``B = 0``,
        so it changes nothing until trained -- the adaptor of zeros training starts from. The
        model is only read (no layers are injected)."""
        gen = torch.Generator().manual_seed(seed)
        if kind == "forward":
            tensors = {}
            for name, module in model.named_modules():
                if name.rsplit(".", 1)[-1] not in modules or ".layers." not in name:
                    continue
                linear = module.get_base_layer() if hasattr(module, "get_base_layer") else module  # peft-injected
                if isinstance(linear, torch.nn.Linear):
                    bound = 1.0 / math.sqrt(linear.in_features)  # kaiming_uniform_(a=sqrt(5)), as peft
                    a = (torch.rand(rank, linear.in_features, generator=gen) * 2 - 1) * bound
                    tensors[f"{name}.lora_A.weight"] = a
                    tensors[f"{name}.lora_B.weight"] = torch.zeros(linear.out_features, rank)
            if not tensors:
                raise InputError(f"{type(model).__name__} has none of the projections {list(modules)}")
            return cls({"kind": "forward", "rank": rank, "alpha": alpha, "modules": list(modules)}, tensors, {})
        if kind != "cache":
            raise InputError(f"unknown adaptor kind {kind!r}; use 'forward' or 'cache'")
        projection_inputs_supported(model)
        config = model.config
        layers, hidden = config.num_hidden_layers, config.hidden_size
        head_dim = getattr(config, "head_dim", None) or hidden // config.num_attention_heads
        width = config.num_key_value_heads * head_dim
        bound = 1.0 / math.sqrt(hidden)  # kaiming_uniform_(a=sqrt(5)) of a [rank, hidden] weight
        tensors = {}
        for which in ("k", "v"):
            tensors[f"{which}_A"] = (torch.rand(layers, rank, hidden, generator=gen) * 2 - 1) * bound
            tensors[f"{which}_B"] = torch.zeros(layers, width, rank)
        return cls({"rank": rank, "alpha": alpha}, tensors, {})

    def half(self) -> Adaptor:
        """A copy with its LoRA factors stored in fp16: half the files (the package carries one
        adaptor per model and store), the same folded weights up to fp16 rounding of the factors
        (they are multiplied in fp32). Another tensor set, so another hash: figures published for
        an adaptor are measured on the one that ships."""
        scorer = {SCORER_WEIGHT, SCORER_BIAS}
        tensors = {k: v.half() if k not in scorer and v.is_floating_point() else v for k, v in self.tensors.items()}
        return Adaptor(dict(self.settings), tensors, dict(self.meta))

    def non_finite(self) -> list[str]:
        """Names of the tensors holding NaN or infinite values (none in a usable adaptor)."""
        return sorted(n for n, t in self.tensors.items() if t.is_floating_point() and not bool(t.isfinite().all()))

    def save(self, directory: str | Path) -> Path:
        """Write the tensors and the JSON config, with the modes the umask gives; an adaptor holding
        NaN or infinite values is refused (:class:`NonFiniteError`), since every cache encoded with
        it would be too."""
        if bad := self.non_finite():
            raise NonFiniteError(
                f"adaptor tensors {bad[:3]} hold NaN or infinite values, so it is not saved to {directory}; train "
                "again with a lower --lr, or with --dtype float32"
            )
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().contiguous().cpu() for k, v in self.tensors.items()}, directory / WEIGHTS)
        follow_umask(directory / WEIGHTS)  # safetensors wrote it 0600, unreadable to those the umask shares with
        config = {"settings": self.settings, "hash": self.hash, **self.meta}
        (directory / CONFIG).write_text(json.dumps(config, indent=1, sort_keys=True))
        return directory

    @classmethod
    def load(cls, directory: str | Path) -> Adaptor:
        directory = Path(directory)
        if not (directory / WEIGHTS).is_file() or not (directory / CONFIG).is_file():
            raise InputError(f"{directory} is not an adaptor (needs {WEIGHTS} and {CONFIG})")
        try:
            config = json.loads((directory / CONFIG).read_text(encoding="utf-8"))
            tensors = load_file(directory / WEIGHTS)
        except (OSError, ValueError, RecursionError, SafetensorError) as exc:  # bad JSON or UTF-8, nested too deep
            raise InputError(f"adaptor {directory} is unreadable ({exc}); train it again or copy it whole") from None
        settings = config.get("settings") if isinstance(config, dict) else None
        if not isinstance(settings, dict) or not all(isinstance(settings.get(k), int) for k in ("rank", "alpha")):
            raise InputError(f"adaptor {directory}: its {CONFIG} records no settings with an integer rank and alpha")
        recorded = config.pop("hash", None)
        del config["settings"]
        adaptor = cls(settings, tensors, config)
        remedy = "the adaptor was damaged or edited: train it again or copy it whole"
        if adaptor.kind not in ("forward", "cache"):
            raise InputError(
                f"adaptor {directory} is of unknown kind {adaptor.kind!r} (not 'forward' or 'cache'); {remedy}"
            )
        if adaptor.kind == "forward" and not isinstance(settings.get("modules"), list):
            raise InputError(f"adaptor {directory}: its {CONFIG} names no adapted modules (settings.modules); {remedy}")
        missing = [name for name in FACTORS if name not in adaptor.tensors] if adaptor.kind == "cache" else []
        if missing:
            raise InputError(f"adaptor {directory} of kind {adaptor.kind!r} lacks tensors {missing}; {remedy}")
        if not recorded:  # Adaptor.save always records it: nothing would tell damaged weights apart
            raise InputError(
                f"adaptor {directory}: its {CONFIG} records no hash, so its weights cannot be checked; it was not "
                "written by `ragcompress train` (Adaptor.save) or was edited: train it again or copy it whole"
            )
        if recorded != adaptor.hash:
            raise InputError(
                f"adaptor {directory}: its weights and settings do not match the hash its {CONFIG} records; {remedy}"
            )
        if bad := adaptor.non_finite():  # written before save refused them: every cache would be NaN
            raise NonFiniteError(
                f"adaptor {directory}: tensors {bad[:3]} hold NaN or infinite values; train it again with a lower "
                "--lr, or with --dtype float32"
            )
        if not isinstance(config.get("base_fingerprint"), str) or not config["base_fingerprint"]:
            # the hash covers settings and tensors only: without this, an edited file skipped check_model
            raise InputError(
                f"adaptor {directory}: its {CONFIG} records no base_fingerprint, so it cannot be checked against the "
                "model it is used with; it was edited or not written by `ragcompress train`: train it again or copy "
                "it whole"
            )
        return adaptor

    # -- kind "forward": LoRA inside the passage forward -------------------------------------------

    def attach(self, model: Any, name: str | None = None) -> str:
        """Inject this adaptor's LoRA layers into ``model`` (once per name; default: from the hash),
        switched off; returns the peft adapter name. Training attaches under a fixed name and
        trains the injected parameters."""
        if self.kind != "forward":
            raise ValueError("only a 'forward' adaptor is injected into the model")
        name = name or f"ragcompress-{self.hash[:16]}"
        with torch.inference_mode(False):  # layers made under inference mode could never be trained
            self._inject(model, name)
        return name

    def _inject(self, model: Any, name: str) -> None:
        from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model, set_peft_model_state_dict
        from peft.tuners.tuners_utils import cast_adapter_dtype

        if name not in _adapter_names(model):
            config = LoraConfig(
                r=int(self.settings["rank"]),
                lora_alpha=int(self.settings["alpha"]),
                target_modules=list(self.settings["modules"]),
                lora_dropout=0.0,
            )
            with warnings.catch_warnings():  # "multiple adapters in the model": by design, one per hash
                warnings.simplefilter("ignore", UserWarning)
                inject_adapter_in_model(config, model, adapter_name=name)
            # the factors trained are float32 whatever the model's dtype (peft casts each layer's
            # input to them and its output back): AdamW on float16 ones overflowed to NaN, and on
            # bfloat16 ones dropped most small updates
            cast_adapter_dtype(model, adapter_name=name)
            for layer in _lora_layers(model):  # off unless encoding (injection switches it on)
                layer.enable_adapters(False)
            set_peft_model_state_dict(model, self.lora_tensors, adapter_name=name)
            injected = set(get_peft_model_state_dict(model, adapter_name=name))
            if injected != set(self.lora_tensors):
                for layer in _lora_layers(model):
                    layer.delete_adapter(name)
                odd = sorted(injected ^ set(self.lora_tensors))[:3]
                raise InputError(
                    f"adaptor tensors do not fit {type(model).__name__} (e.g. {odd}); use its model's adaptor"
                )

    def merged_weights(self, model: Any, root: Any) -> dict[str, torch.Tensor]:
        """This ``forward`` adaptor folded into the weights it adapts: ``{name relative to root:
        W + scaling * B @ A}`` for every adapted projection of ``model`` (``root`` one of its
        submodules). Encoding with them (``torch.func.functional_call``) is a plain forward:
        peft's unmerged layers add two small matmuls per projection and token (1.4x a forward at
        rank 8), and the shared model itself is never modified. Training keeps peft's unmerged
        layers, which carry the gradients."""
        from peft.tuners.tuners_utils import BaseTunerLayer

        if self.kind != "forward":
            raise ValueError("only a 'forward' adaptor is folded into the model's weights")
        names = {id(module): name for name, module in root.named_modules()}
        merged: dict[str, torch.Tensor] = {}
        for key, a in self.lora_tensors.items():
            if not key.endswith(".lora_A.weight"):
                continue
            path = key.removesuffix(".lora_A.weight")
            b = self.tensors.get(f"{path}.lora_B.weight")
            try:
                module = model.get_submodule(path)
            except AttributeError:
                module = None
            if isinstance(module, BaseTunerLayer):  # LoRA layers injected by training: their base
                module = module.get_base_layer()
            weight = getattr(module, "weight", None)
            if b is None or weight is None or id(module) not in names or weight.shape != (b.shape[0], a.shape[1]):
                raise InputError(f"adaptor tensor {key} does not fit {type(model).__name__}; use its model's adaptor")
            delta = (b.float() @ a.float()).to(weight.device) * self.scaling
            prefix = names[id(module)]
            merged[f"{prefix}.weight" if prefix else "weight"] = (weight.float() + delta).to(weight.dtype)
        return merged

    # -- kind "cache": the correction of the cached keys and values ---------------------------------

    def delta(self, which: str, x: torch.Tensor, heads: int) -> torch.Tensor:
        """Correction of the ``which`` (``k`` | ``v``) cache for projection inputs
        ``x [layers, n, hidden]``: ``[layers, heads, n, head_dim]`` (differentiable)."""
        a, b = self.tensors[f"{which}_A"], self.tensors[f"{which}_B"]
        out = torch.bmm(torch.bmm(x.to(a.dtype), a.transpose(1, 2)), b.transpose(1, 2)) * self.scaling
        return out.unflatten(-1, (heads, -1)).transpose(1, 2)

    def apply(self, kv: PassageKV, x: torch.Tensor) -> PassageKV:
        """The full cache ``kv`` (keys un-rotated) corrected by this adaptor, ``x [layers, n,
        hidden]`` being its tokens' projection inputs."""
        heads = kv.keys.shape[1]
        keys = kv.keys + self.delta("k", x, heads).to(kv.keys.dtype)
        values = kv.values + self.delta("v", x, heads).to(kv.values.dtype)
        return PassageKV.full(keys, values)


def _lora_layers(model: Any) -> list[Any]:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [m for m in model.modules() if isinstance(m, BaseTunerLayer)]


def _adapter_names(model: Any) -> set[str]:
    return {name for layer in _lora_layers(model) for name in layer.lora_A}


def remove_adapter(model: Any, name: str) -> None:
    """Take peft adapter ``name`` out of ``model`` (if it is there): training starts its own
    LoRA layers afresh under a fixed name, whatever an earlier run in this process left."""
    if name not in _adapter_names(model):
        return
    with warnings.catch_warnings():  # "adapter was active which is now deleted": all are off here
        warnings.simplefilter("ignore", UserWarning)
        for layer in _lora_layers(model):
            if name in layer.lora_A:
                layer.delete_adapter(name)
    getattr(model, "peft_config", {}).pop(name, None)


@contextmanager
def lora_active(model: Any, name: str) -> Iterator[None]:
    """peft adapter ``name`` on for the duration (every adapter off after). peft's switches also
    set ``requires_grad`` of the adapters' weights; the flags are put back as they were, so that
    weights being trained still receive gradients when the backward pass runs after the forward."""
    layers = _lora_layers(model)
    flags = [(p, p.requires_grad) for layer in layers for n, p in layer.named_parameters() if "lora_" in n]
    try:
        with torch.inference_mode(False):
            for layer in layers:
                layer.set_adapter(name)
                layer.enable_adapters(True)
        yield
    finally:
        with torch.inference_mode(False):
            for layer in layers:
                layer.enable_adapters(False)
            for param, flag in flags:
                param.requires_grad_(flag)


class ProjectionInputs:
    """Captures the input of every layer's ``k_proj`` during a forward (the ``x_l`` above)."""

    def __init__(self, model: Any) -> None:
        self.inputs: list[torch.Tensor | None] = [None] * len(model.model.layers)
        self._handles = [
            layer.self_attn.k_proj.register_forward_pre_hook(self._hook(i))
            for i, layer in enumerate(model.model.layers)
        ]

    def _hook(self, index: int) -> Any:
        def hook(module: Any, args: tuple[Any, ...]) -> None:
            self.inputs[index] = args[0]

        return hook

    def __enter__(self) -> ProjectionInputs:
        return self

    def __exit__(self, *exc: Any) -> None:
        for handle in self._handles:
            handle.remove()
