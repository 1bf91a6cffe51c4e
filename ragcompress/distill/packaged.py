"""The adaptors that ship with ragcompress, and which one a store is encoded through.

A packaged adaptor is a folder under ``distill/adaptors/`` (``adaptor.safetensors`` +
``adaptor.json``), trained for one model and one store layout (``TrainedStore``: method, ratio,
quantization, low-rank projection). ``--adaptor default`` takes the model's general one (trained
on uncompressed caches), ``--adaptor matching`` the one trained for exactly the store being built
(the general one for an int8 store), and a store refuses caches encoded through another adaptor
(:func:`check_store_adaptor`).
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

from ragcompress.distill.adaptor import CONFIG, Adaptor
from ragcompress.errors import InputError, RagCompressWarning, StoreMismatchError
from ragcompress.kv.quant import QuantConfig

PACKAGED = Path(__file__).resolve().parent / "adaptors"

MATCHING = "matching"  # the packaged adaptor trained for the store being built, if there is one


def packaged_configs() -> Iterator[tuple[Path, dict[str, Any]]]:
    """Every packaged adaptor's folder and its JSON config, in name order."""
    if not PACKAGED.is_dir():
        return
    for directory in sorted(p for p in PACKAGED.iterdir() if (p / CONFIG).is_file()):
        yield directory, json.loads((directory / CONFIG).read_text())


class TrainedStore(NamedTuple):
    """The store compression an adaptor is trained for (``train --method --ratio --quant --kv-rank
    --value-norm``), compared whole with a store's (``indexing.indexer.store_of``)."""

    method: str = "none"
    ratio: float | None = 1.0  # None: a ``--budget`` store, which no adaptor is trained for
    quant: str | None = "none"  # a ``QuantConfig.name``: "int4" or "int4/int2"; None: unrecorded
    lowrank: dict[str, Any] | None = None  # ``RankSpec.as_dict``; None: full rows
    value_norm: bool = False  # scores weighted by each row's value norm


GENERAL = TrainedStore()  # an adaptor trained on uncompressed caches


def trained_store(meta: dict[str, Any]) -> TrainedStore:
    """The store an adaptor was trained for, from its JSON config (an adaptor from before
    ``--kv-rank`` was trained on full rows, one from before ``--value-norm`` on plain scores)."""
    return TrainedStore(
        meta.get("method", "none"),
        float(meta.get("ratio", 1.0)),
        meta.get("quant"),
        meta.get("lowrank"),
        bool(meta.get("value_norm", False)),
    )


def packaged_model(model_ref: str, fingerprint: str | None = None) -> str:
    """The name packaged adaptors know ``model_ref`` by: its folder's name, or, for a copy of a
    packaged model kept under another name (a local folder of the same weights), the packaged
    model whose base fingerprint it has (``--adaptor default`` and ``matching`` found none for
    it, and ``matching`` encoded with the base model)."""
    name = Path(model_ref).name
    if fingerprint is None:
        return name
    configs = [meta for _, meta in packaged_configs()]  # one read of the packaged JSON files
    if any(meta.get("base_model") == name for meta in configs):
        return name
    same = (
        meta["base_model"] for meta in configs if meta.get("base_fingerprint") == fingerprint and meta.get("base_model")
    )
    return str(next(same, name))


def packaged_for_store(model_ref: str, store: TrainedStore, fingerprint: str | None = None) -> Path | None:
    """The folder of the adaptor packaged for ``model_ref`` (:func:`packaged_model`) and trained
    for exactly ``store``, if one is."""
    models = {model_ref, Path(model_ref).name, packaged_model(model_ref, fingerprint)}
    store = store._replace(ratio=None if store.ratio is None else float(store.ratio))
    for directory, meta in packaged_configs():
        if meta.get("base_model") in models and trained_store(meta) == store:
            return directory
    if store == GENERAL._replace(quant="int8"):
        # int8 rows answer as unquantized ones do (docs/recompute.md, the oracle row: agreement
        # 0.99, KL 0.0000), so an int8 store takes the general adaptor, trained on unquantized caches
        return packaged_for_store(model_ref, GENERAL, fingerprint)
    return None


def matching_adaptor(model_ref: str, store: TrainedStore, fingerprint: str | None = None) -> Adaptor | None:
    """``--adaptor matching`` (what the ``smallest`` preset asks for): the adaptor packaged for
    this model and trained for exactly this store's compression (a ``--budget`` store matches
    none), or -- said with a warning, and recorded as no adaptor in the manifest -- the base model
    when none is packaged (an adaptor trained for another compression can be further from full
    prefill than none)."""
    directory = packaged_for_store(model_ref, store, fingerprint)
    if directory is not None:
        return Adaptor.load(directory)
    kept = "a token budget" if store.ratio is None else f"{store.ratio:g}"
    train_flags = ""
    if store.lowrank is not None:
        kept += f" with low-rank latents {store.lowrank}"
        train_flags = f" --kv-rank {store.lowrank.get('rank') or 'R'}" + (
            "" if store.lowrank.get("values") else " --no-kv-rank-values"
        )
    if store.value_norm:
        kept += " with value-weighted scores"
        train_flags += " --value-norm"
    train_ratio = "R" if store.ratio is None else f"{store.ratio:g}"
    store_quant = QuantConfig.from_name(store.quant or "none")
    train_quant = f"--quant {store_quant.scheme}" + (
        f" --value-quant {store_quant.value_scheme}" if store_quant.value_scheme else ""
    )
    warnings.warn(
        f"no adaptor is packaged for {model_ref} trained for a store of {store.method} {kept} {store.quant}; "
        "encoding with the base model (answers from such a store lose more; train one with "
        f"`ragcompress train --method {store.method} --ratio {train_ratio} {train_quant}{train_flags}` and pass "
        "--adaptor FOLDER)",
        RagCompressWarning,
        stacklevel=3,
    )
    return None


def _packaged_names() -> list[str]:
    """The packaged adaptors' folder names, for messages."""
    return sorted(p.name for p in PACKAGED.iterdir() if p.is_dir()) if PACKAGED.is_dir() else []


def resolve_adaptor(spec: str | Path, model_ref: str, fingerprint: str | None = None) -> Adaptor:
    """``default`` (the adaptor packaged for ``model_ref``, :func:`packaged_model`), a packaged
    adaptor's name, or a path."""
    if str(spec) == "default":
        directory = PACKAGED / packaged_model(model_ref, fingerprint)
        if not directory.is_dir():
            raise InputError(
                f"no adaptor is packaged for {model_ref}; packaged: {', '.join(_packaged_names()) or 'none'}; "
                "train one with `ragcompress train` and pass its folder"
            )
        return Adaptor.load(directory)
    path = Path(spec)
    if not path.exists() and (PACKAGED / str(spec)).is_dir():
        path = PACKAGED / str(spec)
    if (path / "adaptor" / CONFIG).is_file() and not (path / CONFIG).is_file():
        raise InputError(f"{path} is a `ragcompress train` output folder; its adaptor is {path / 'adaptor'}")
    if not path.exists():
        raise InputError(
            f"adaptor {spec} is neither a folder nor a packaged adaptor (default, or one of: "
            f"{', '.join(_packaged_names())})"
        )
    return Adaptor.load(path)


def packaged_adaptor_dir(adaptor_hash: str) -> Path | None:
    """The folder of the packaged adaptor whose hash is ``adaptor_hash``, if one is."""
    return next((directory for directory, meta in packaged_configs() if meta.get("hash") == adaptor_hash), None)


def packaged_adaptor(adaptor_hash: str | None) -> Adaptor | None:
    """The packaged adaptor whose hash is ``adaptor_hash``, if one is (a store records only the
    hash, :attr:`Manifest.adaptor_hash <ragcompress.store.manifest.Manifest.adaptor_hash>`;
    adding to it later finds a packaged adaptor again without being told its name); None for
    None, a store of the base model."""
    if adaptor_hash is None:
        return None
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
