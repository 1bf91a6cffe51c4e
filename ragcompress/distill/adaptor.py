"""A learned passage adaptor (KV-Distill): low-rank corrections of the key and value
projections, applied only to the caches of passages, and optionally a learned token-retention
scorer; saved as safetensors + a JSON config.

For every layer ``l`` the adaptor holds LoRA factors of ``k_proj`` and ``v_proj``::

    K_cache = k_proj(x_l) + (alpha / rank) * B_k[l] @ A_k[l] @ x_l      (likewise V)

where ``x_l`` is the input of the layer's key/value projections in the *base* model's forward
over the passage. The forward itself is the base model's: the correction is added to what is
cached, not fed to the next layer. Two reasons: the answering model reads only the cache, so the
cache is the only thing worth changing; and the base forward over a passage can then be computed
once and reused by every training step (on two shared CPU cores a backward pass through the
whole passage forward at every step does not fit the training budget; measured in docs/distill.md).
Indexing costs the base forward plus two ``rank``-wide matrix products per layer.

The answering model stays the base model: the prefix, the question, decoding and the
full-prefill baseline never see the adaptor. An adaptor of zeros (``B = 0``, how training
starts) leaves every cache bit for bit as the base model makes it.

An adaptor is identified by :attr:`Adaptor.hash`: the sha256 of its settings and tensors (not
of its metrics). A store records that hash in its manifest and refuses another adaptor's caches.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from ragcompress.errors import InputError, StoreMismatchError
from ragcompress.kv import PassageKV

WEIGHTS = "adaptor.safetensors"
CONFIG = "adaptor.json"
FACTORS = ("k_A", "k_B", "v_A", "v_B")  # A: [layers, rank, hidden]; B: [layers, kv_heads * head_dim, rank]
SCORER_WEIGHT = "scorer.weight"  # [layers, kv_heads, 2 * head_dim]: over (un-rotated key, value)
SCORER_BIAS = "scorer.bias"  # [layers, kv_heads]
# Packaged adaptors: ragcompress/distill/adaptors/<model name>/ (``--adaptor default``).
PACKAGED = Path(__file__).resolve().parent / "adaptors"


def projection_inputs_supported(model: Any) -> None:
    """Keys must be the key projection's output up to RoPE (no per-head key norm), so that a
    correction of the projection is a correction of the un-rotated cached key."""
    attn = model.model.layers[0].self_attn
    if getattr(attn, "k_norm", None) is not None:
        raise InputError(f"{type(model).__name__} normalises keys after the projection; adaptors do not support it")


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
        """Refuse a model other than the one this adaptor was trained on."""
        base = self.meta.get("base_fingerprint")
        if base and base != fingerprint:
            raise StoreMismatchError(
                f"adaptor was trained on model {self.meta.get('base_model', '?')} (fingerprint {base[:16]}), "
                f"not on {ref} ({fingerprint[:16]}); use that model's adaptor"
            )

    # -- creation, saving, loading ----------------------------------------------------------------

    @classmethod
    def initial(cls, model: Any, rank: int = 8, alpha: int = 16, seed: int = 0) -> Adaptor:
        """A fresh adaptor for ``model``: ``A`` as LoRA initialises it (Kaiming-uniform), ``B = 0``,
        so it changes nothing until trained -- the adaptor of zeros training starts from."""
        projection_inputs_supported(model)
        config = model.config
        layers, hidden = config.num_hidden_layers, config.hidden_size
        head_dim = getattr(config, "head_dim", None) or hidden // config.num_attention_heads
        width = config.num_key_value_heads * head_dim
        gen = torch.Generator().manual_seed(seed)
        bound = 1.0 / math.sqrt(hidden)  # kaiming_uniform_(a=sqrt(5)) of a [rank, hidden] weight
        tensors = {}
        for which in ("k", "v"):
            tensors[f"{which}_A"] = (torch.rand(layers, rank, hidden, generator=gen) * 2 - 1) * bound
            tensors[f"{which}_B"] = torch.zeros(layers, width, rank)
        return cls({"rank": rank, "alpha": alpha}, tensors, {})

    def save(self, directory: str | Path) -> Path:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().contiguous().cpu() for k, v in self.tensors.items()}, directory / WEIGHTS)
        config = {"settings": self.settings, "hash": self.hash, **self.meta}
        (directory / CONFIG).write_text(json.dumps(config, indent=1, sort_keys=True))
        return directory

    @classmethod
    def load(cls, directory: str | Path) -> Adaptor:
        directory = Path(directory)
        if not (directory / WEIGHTS).is_file() or not (directory / CONFIG).is_file():
            raise InputError(f"{directory} is not an adaptor (needs {WEIGHTS} and {CONFIG})")
        config = json.loads((directory / CONFIG).read_text())
        recorded = config.pop("hash", None)
        adaptor = cls(config.pop("settings"), load_file(directory / WEIGHTS), config)
        missing = [name for name in FACTORS if name not in adaptor.tensors]
        if missing:
            raise InputError(f"adaptor {directory} lacks tensors {missing}")
        if recorded and recorded != adaptor.hash:
            raise InputError(f"adaptor {directory}: weights do not match the hash its {CONFIG} records")
        return adaptor

    # -- the correction -----------------------------------------------------------------------------

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


def resolve_adaptor(spec: str | Path, model_ref: str) -> Adaptor:
    """``default`` (the adaptor packaged for ``model_ref``), a packaged model name, or a path."""
    if str(spec) == "default":
        directory = PACKAGED / Path(model_ref).name
        if not directory.is_dir():
            packaged = sorted(p.name for p in PACKAGED.iterdir() if p.is_dir()) if PACKAGED.is_dir() else []
            raise InputError(
                f"no adaptor is packaged for {model_ref}; packaged: {', '.join(packaged) or 'none'}; "
                "train one with `ragcompress train` and pass its folder"
            )
        return Adaptor.load(directory)
    path = Path(spec)
    if not path.exists() and (PACKAGED / str(spec)).is_dir():
        path = PACKAGED / str(spec)
    return Adaptor.load(path)


def packaged_adaptor_dir(adaptor_hash: str) -> Path | None:
    """The folder of the packaged adaptor whose hash is ``adaptor_hash``, if one is."""
    if not PACKAGED.is_dir():
        return None
    for directory in sorted(p for p in PACKAGED.iterdir() if (p / CONFIG).is_file()):
        if json.loads((directory / CONFIG).read_text()).get("hash") == adaptor_hash:
            return directory
    return None


def packaged_adaptor(adaptor_hash: str) -> Adaptor | None:
    """The packaged adaptor whose hash is ``adaptor_hash``, if one is (a store records only the
    hash; adding to it later finds a packaged adaptor again without being told its name)."""
    directory = packaged_adaptor_dir(adaptor_hash)
    return Adaptor.load(directory) if directory is not None else None


def check_store_adaptor(recorded: str | None, used: str | None) -> None:
    """Refuse to add caches made with adaptor ``used`` (hash, None: the base model) to a store
    built with adaptor ``recorded``: their caches would not be interchangeable."""
    if recorded == used:
        return

    def name(h: str | None) -> str:
        return f"adaptor {h[:16]}" if h else "no adaptor (the base model)"

    raise StoreMismatchError(
        f"store was built with {name(recorded)}, this run uses {name(used)}; "
        "pass the store's adaptor (--adaptor), another --store, or --overwrite"
    )
