"""Tiny randomly initialised models for tests: any supported architecture, no downloads.

The tokenizer (and its chat template) is the embedded SmolLM2's, so prompts split exactly as
they would for a real model; the weights are random, so outputs are meaningless but deterministic.
``tokenizer="chars"`` gives one token per printable ASCII character instead, for machines without
the embedded model's package (the GPU check's bare CUDA image).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ragcompress.store.manifest import Manifest

TINY_ARCHS = ("llama", "qwen2", "mistral", "gemma")


def make_tiny_model(
    arch: str,
    directory: str | Path,
    *,
    seed: int = 0,
    head_dim: int = 16,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    tokenizer: str = "smollm2",
    **overrides: Any,
) -> Path:
    """Save a random ``arch`` causal LM with the SmolLM2 tokenizer (or ``tokenizer="chars"``:
    :func:`char_tokenizer`) to ``directory`` (``overrides``: further config values, e.g.
    ``sliding_window``, or ``max_position_embeddings`` in place of 4096)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from ragcompress.models import DEFAULT_MODEL, resolve_model_dir

    directory = Path(directory)
    if (directory / "config.json").is_file():
        return directory
    if tokenizer not in ("smollm2", "chars"):
        raise ValueError(f"tokenizer must be 'smollm2' or 'chars', got {tokenizer!r}")
    tok = char_tokenizer() if tokenizer == "chars" else AutoTokenizer.from_pretrained(resolve_model_dir(DEFAULT_MODEL))
    config = AutoConfig.for_model(
        arch,
        vocab_size=len(tok),
        hidden_size=heads * head_dim,
        intermediate_size=2 * heads * head_dim,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=True,
        initializer_range=0.2,
        **{"max_position_embeddings": 4096, **overrides},
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(directory)
    tok.save_pretrained(directory)
    return directory


def char_tokenizer() -> Any:
    """A fast tokenizer of one token per printable ASCII character, newline and tab (anything
    else is ``<unk>``), with BOS/EOS/PAD and no chat template (the plain-text prompt): built in
    memory from ``tokenizers``, so a tiny model needs no downloaded or packaged tokenizer."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>", "<pad>"]
    chars = [chr(c) for c in range(32, 127)] + ["\n", "\t"]
    backend = Tokenizer(models.WordLevel({t: i for i, t in enumerate(specials + chars)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )


class HashEmbedder:
    """A deterministic bag-of-words embedder with no model: each word a seeded random vector
    (from its sha256), a text the normalised sum of its words' vectors. Texts sharing words are
    near each other, as with a real embedder, so approximate indexes are tested on vectors with
    structure rather than on uniform noise. Picklable (Ray actors build their own copy).
    """

    def __init__(self, dim: int = 32) -> None:
        self.dim = dim
        self.name = f"hash-bow-{dim}"
        self._vectors: dict = {}

    def _word(self, word: str):
        import hashlib

        import numpy as np

        if word in self._vectors:
            return self._vectors[word]
        seed = int.from_bytes(hashlib.sha256(word.encode("utf-8")).digest()[:8], "little")
        vector = np.random.default_rng(seed).standard_normal(self.dim).astype(np.float32)
        if len(self._vectors) < 1 << 16:
            self._vectors[word] = vector
        return vector

    def embed(self, texts: list[str]):
        import numpy as np

        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for i, text in enumerate(texts):
            for word in text.lower().split():
                out[i] += self._word(word)
        norms = np.linalg.norm(out, axis=1, keepdims=True)
        return np.ascontiguousarray(out / np.maximum(norms, 1e-12), dtype=np.float32)


def noisy_adaptor(model: Any, seed: int, scorer: bool = False, kind: str = "forward") -> Any:
    """A passage adaptor of ``kind`` with small random non-zero factors (what training produces),
    optionally with a learned retention scorer: changes every cache, deterministically for ``seed``.

    ``model``: a :class:`~ragcompress.models.LoadedModel`, which the adaptor records as its base
    model as a trained one does (its saved folder loads: ``Adaptor.load`` refuses one that
    records no base model), or a bare torch model (an adaptor used in memory only)."""
    import torch

    from ragcompress.distill.adaptor import SCORER_BIAS, SCORER_WEIGHT, Adaptor

    lm = model if hasattr(model, "fingerprint") else None
    model = lm.model if lm is not None else model
    adaptor = Adaptor.initial(model, rank=4, alpha=8, seed=seed, kind=kind)
    if lm is not None:
        adaptor.meta = {"base_model": lm.ref, "base_fingerprint": lm.fingerprint}
    gen = torch.Generator().manual_seed(seed)
    for name in sorted(adaptor.tensors):
        adaptor.tensors[name] = torch.randn(adaptor.tensors[name].shape, generator=gen) * 0.05
    if scorer:
        config = model.config
        layers, heads = config.num_hidden_layers, config.num_key_value_heads
        head_dim = config.hidden_size // config.num_attention_heads
        adaptor.tensors[SCORER_WEIGHT] = torch.randn(layers, heads, 2 * head_dim, generator=gen)
        adaptor.tensors[SCORER_BIAS] = torch.randn(layers, heads, generator=gen)
    return adaptor


def made_up_manifest(encoding: dict[str, Any]) -> Manifest:
    """The sealed :class:`~ragcompress.store.manifest.Manifest` of a made-up store whose passages
    were encoded as ``encoding`` says (e.g. ``{"adaptor": HASH}``), for code that reads no more
    than a store's manifest (which adaptor a store was built with)."""
    from ragcompress.store.manifest import Manifest

    return Manifest(
        model_ref="made-up",
        model_fingerprint="f",
        tokenizer_hash="t",
        template={"prefix": "", "passage_format": "{text}", "suffix_format": "{question}"},
        compression={"method": "none", "quant": "none", "group_size": 32},
        embedder="e",
        model_shape={"layers": 1, "kv_heads": 1, "head_dim": 8},
        encoding=encoding,
    ).sealed()


def manifest_only_store(directory: str | Path, encoding: dict[str, Any]) -> Path:
    """A folder holding only :func:`made_up_manifest` (the benchmarks' adaptor checks read no more)."""
    directory = Path(directory)
    directory.mkdir(parents=True)
    made_up_manifest(encoding).write(directory)
    return directory


class PlainRotary:
    """Standard RoPE tables from ``inv_freq`` (what a Llama's rotary_emb computes), one RoPE for
    every layer: the :class:`~ragcompress.kv.rope.Rotary` interface the packed runtime reads,
    without a model (the kernel tests' random segments). ``rotary_dim`` below ``head_dim`` turns
    only a head's first channels (partial rotary); ``paired`` turns adjacent channels together."""

    def __init__(self, head_dim: int, base: float = 10000.0, rotary_dim: int | None = None, paired: bool = False):
        import torch

        self.rotary_dim = head_dim if rotary_dim is None else rotary_dim
        self.paired = paired
        self.inv_freq = 1.0 / base ** (torch.arange(0, self.rotary_dim, 2).float() / self.rotary_dim)

    def cos_sin(self, positions: Any, layer_idx: int) -> tuple[Any, Any]:
        import torch

        freqs = positions.float().unsqueeze(-1) * self.inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos(), emb.sin()

    def rotation_tables(self, cos: Any, sin: Any) -> tuple[Any, Any]:
        from ragcompress.kv.rope import pair_tables

        return pair_tables(cos, sin) if self.paired else (cos, sin)

    def layer_key(self, layer_idx: int) -> None:
        return None


def sigterm_once_marked(command: list[str], store: Path, settle_s: float) -> tuple[int, str]:
    """Run ``command`` (an indexing run into ``store``) in a fresh interpreter that imports what
    this one does, send it SIGTERM ``settle_s`` seconds after its run marker appears (the run is
    then past its setup and writing), and return its exit status and stderr. The run must still
    be going when the signal is due: a run that ended first is an assertion error (the input was
    too short to be stopped)."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from ragcompress.store.files import RUN

    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240
        while not (store / RUN).exists() and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert process.poll() is None, "the run ended before it could be stopped"
        time.sleep(settle_s)
        process.send_signal(signal.SIGTERM)
        _, err = process.communicate(timeout=120)
    finally:
        process.kill()
    return process.returncode, err


def point_row_at_appended_blob(store: Path, passage_id: str, shard: str, blob: bytes, **columns: int) -> None:
    """Append ``blob`` to the shard ``shard`` of ``store`` and point ``passage_id``'s catalogue row
    at it, with its checksum: how a test plants a blob that only the codec's or ``verify``'s own
    checks (not the checksum) can refuse. ``columns``: other values of the row to set with it."""
    import sqlite3

    from ragcompress.store.catalogue import CATALOGUE
    from ragcompress.store.shards import SHARD_DIR, checksum

    path = Path(store) / SHARD_DIR / shard
    offset = path.stat().st_size
    with open(path, "ab") as handle:
        handle.write(blob)
    values = {"shard": shard, "offset": offset, "length": len(blob), "checksum": checksum(blob), **columns}
    db = sqlite3.connect(Path(store) / CATALOGUE)
    try:
        with db:
            assignments = ", ".join(f"{name} = ?" for name in values)
            db.execute(f"UPDATE passages SET {assignments} WHERE id = ?", (*values.values(), passage_id))
    finally:
        db.close()


def rewritten_blob(blob: bytes, tensors: dict[str, Any], **meta: object) -> bytes:
    """``blob`` (a passage cache as :func:`ragcompress.store.codec.encode` writes it) with
    tensors replaced (``None`` drops one) and header fields overridden, as a damaged or forged
    blob would arrive: its own checksum is the caller's to fake (:func:`point_row_at_appended_blob`)."""
    from safetensors.torch import load, save

    from ragcompress.store.codec import _metadata

    kept = {**load(blob), **tensors}
    return save(
        {name: t for name, t in kept.items() if t is not None},
        metadata={**_metadata(blob), **{k: str(v) for k, v in meta.items()}},
    )
