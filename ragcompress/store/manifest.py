"""The store manifest: what a store was built with, checked before anything in it is used."""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from ragcompress.errors import StoreError, StoreMismatchError
from ragcompress.kv import ModelShape
from ragcompress.kv.quant import QuantConfig
from ragcompress.retrieval import embedder_name
from ragcompress.store.jsontext import loads_json

# 2: segment checksums are xxh3-128 (were sha256); a version-1 store is refused and rebuilt.
FORMAT_VERSION = 2
MANIFEST = "manifest.json"
MAX_MANIFEST_BYTES = 1 << 20
# what a rebuild of a store whose manifest cannot be read must be given: the manifest held them
SETTINGS = "the settings it was built with (e.g. --preset, or --method/--ratio/--quant, and --model)"
# what a store whose manifest is damaged or lost needs
REBUILD_COMMAND = f"rebuild it with `ragcompress index --input INPUT --store DIR --overwrite` and {SETTINGS}"
REBUILD = f"the store cannot be read without it: {REBUILD_COMMAND}"
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
# the fields fixed when a store is created (what its caches were computed with): their sha256 is
# recorded then (``build_sha256``), so a manifest edited afterwards is refused when it is read
BUILD_FIELDS = (
    "format_version",
    "model_ref",
    "model_fingerprint",
    "tokenizer_hash",
    "template",
    "compression",
    "embedder",
    "model_shape",
    "encoding",
)


def build_digest(data: dict[str, Any]) -> str:
    """sha256 of a manifest's :data:`BUILD_FIELDS` (``data``: its JSON object)."""
    fields = {key: data.get(key) for key in BUILD_FIELDS}
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()


def _attention_digest(attention: dict[str, Any]) -> str:
    """sha256 of an ``attention`` entry without its own ``sha256``."""
    fields = {key: value for key, value in attention.items() if key != "sha256"}
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()


def sealed_attention(attention: dict[str, Any]) -> dict[str, Any]:
    """``attention`` with its ``sha256``: ``calibrate`` rewrites this entry after the store is
    built, so it cannot sit under ``build_sha256``; its own digest makes an edited temperature
    (which changes every answer, and which range checks pass anywhere in [0.1, 10]) refused
    instead of applied."""
    return {**attention, "sha256": _attention_digest(attention)}


_SHAPE_KEYS = ("layers", "kv_heads", "head_dim")


def _check_values(data: dict[str, Any], where: Path) -> None:
    """Validate the values code later relies on (shapes, template, quantization, checksums)."""

    def bad(key: str, why: str) -> StoreError:
        return StoreError(f"{where}: field {key!r} {why}; {REBUILD}")

    for key in ("model_ref", "model_fingerprint", "tokenizer_hash", "embedder"):
        if not data[key] or "\x00" in data[key]:
            raise bad(key, "is empty or holds a NUL character")
    shape = data["model_shape"]
    for key in _SHAPE_KEYS:
        value = shape.get(key)
        if type(value) is not int or not 0 < value < 1 << 16:
            raise bad("model_shape", f"needs {key!r} as a positive integer, got {value!r}")
    template = data["template"]
    for key, marker in (("prefix", None), ("passage_format", "{text}"), ("suffix_format", "{question}")):
        value = template.get(key)
        if not isinstance(value, str) or (marker and marker not in value):
            raise bad("template", f"needs {key!r} as a string" + (f" containing {marker}" if marker else ""))
    comp = data["compression"]
    try:
        QuantConfig(comp.get("quant", "none"), comp.get("group_size", 32), comp.get("value_quant"))
    except (TypeError, ValueError) as exc:
        raise bad("compression", f"is invalid ({exc})") from None
    if "lowrank" in comp:  # a low-rank store names the basis its latents are projected with
        lowrank = comp["lowrank"]
        if not isinstance(lowrank, dict) or not _SHA256.match(str(lowrank.get("basis_sha256", ""))):
            raise bad("compression", "has a 'lowrank' entry without a sha256 'basis_sha256'")
    attention = data.get("attention", {})
    temperature = attention.get("temperature", 1.0) if isinstance(attention, dict) else None
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not 0.1 <= temperature <= 10.0:
        raise bad("attention", "needs 'temperature' as a number in [0.1, 10]")
    if "sha256" in attention and attention["sha256"] != _attention_digest(attention):  # none: written before 2026-12-07
        raise StoreError(
            f"{where}: field 'attention' was edited after `ragcompress calibrate` wrote it (it no longer matches "
            "its sha256), so the temperature every answer applies is not the one calibration chose; re-run "
            "`ragcompress calibrate --store DIR`, or restore the manifest"
        )
    encoding = data.get("encoding", {})
    neighbours = encoding.get("context_neighbors", 0) if isinstance(encoding, dict) else None
    if type(neighbours) is not int or not 0 <= neighbours < 1 << 10:
        raise bad("encoding", "needs 'context_neighbors' as a small non-negative integer")
    if encoding.get("dtype", "bfloat16") not in ("bfloat16", "float16"):  # absent: float32
        raise bad("encoding", "has a 'dtype' other than bfloat16 or float16")
    if not isinstance(encoding.get("base_copy", False), bool) or (
        encoding.get("base_copy") and not encoding.get("adaptor")
    ):
        raise bad("encoding", "has a 'base_copy' that is not true or false, or one without an 'adaptor'")
    if not isinstance(data.get("index", {}), dict):
        raise bad("index", "is not an object")
    prefix_sha = data.get("prefix_sha256", "")
    if not isinstance(prefix_sha, str) or (prefix_sha and not _SHA256.match(prefix_sha)):
        raise bad("prefix_sha256", "is not a sha256 hex digest")
    build_sha = data.get("build_sha256", "")
    if not isinstance(build_sha, str) or (build_sha and not _SHA256.match(build_sha)):
        raise bad("build_sha256", "is not a sha256 hex digest")
    if build_sha and build_sha != build_digest(data):
        raise StoreError(
            f"{where} was edited after the store was built: its build fields ({', '.join(BUILD_FIELDS)}) no longer "
            "match the build_sha256 recorded when the store was created, so it no longer says what the caches were "
            f"computed with; restore the manifest (from a backup or version control), or {REBUILD_COMMAND}"
        )


@dataclass(frozen=True)
class Manifest:
    """Identity of a store. Two stores can share caches only if every field but ``created`` matches.

    ``model_ref`` finds the model again (embedded name or directory); ``model_fingerprint`` hashes
    its config and weights; ``tokenizer_hash`` its vocabulary and chat template; ``template`` the
    split prompt (prefix / passage / suffix); ``compression`` the method and quantization;
    ``embedder`` the retrieval model; ``model_shape`` the cache shape every segment must have;
    ``prefix_sha256`` the checksum of ``prefix.safetensors`` (set by ``create_store``);
    ``encoding`` how passages were encoded beyond "alone, after the prefix" (``context_neighbors``:
    :mod:`ragcompress.indexing.neighbours`; ``adaptor``, its hash; ``base_copy``, the base model's
    cache kept beside the adaptor's; ``dtype``; empty for plain encoding); ``index`` the FAISS index's
    type, parameters and measured recall (:mod:`ragcompress.store.ann`; written with the index);
    ``attention`` the APE temperature ``ragcompress calibrate`` chose for the store
    (:mod:`ragcompress.runtime.calibration`; applied to every stored-cache answer; sealed by its
    own ``sha256``, :func:`sealed_attention`, as it is written after the build);
    ``build_sha256`` the sha256 of the :data:`BUILD_FIELDS` (set by ``create_store``; empty in
    stores created before 2026-12-06, which are read unchecked).
    Every value is validated when a manifest is read, before anything uses it, and a manifest
    whose build fields no longer match its ``build_sha256`` is refused.
    """

    model_ref: str
    model_fingerprint: str
    tokenizer_hash: str
    template: dict[str, str]
    compression: dict[str, Any]
    embedder: str
    model_shape: dict[str, int]
    format_version: int = FORMAT_VERSION
    created: str = field(default="", compare=False)
    prefix_sha256: str = field(default="", compare=False)
    encoding: dict[str, Any] = field(default_factory=dict)
    index: dict[str, Any] = field(default_factory=dict, compare=False)
    attention: dict[str, Any] = field(default_factory=dict, compare=False)
    build_sha256: str = field(default="", compare=False)

    @property
    def shape(self) -> ModelShape:
        """The cache shape every segment of the store must have."""
        return ModelShape.from_dict(self.model_shape)

    @property
    def quant(self) -> QuantConfig:
        """How the store's segments are quantized."""
        comp = self.compression
        return QuantConfig(comp.get("quant", "none"), int(comp.get("group_size", 32)), comp.get("value_quant"))

    @property
    def adaptor_hash(self) -> str | None:
        """The hash of the KV-Distill adaptor the passages were encoded through
        (``IndexConfig.adaptor``), None for the base model: a store records the hash only, so
        its adaptor is found among the packaged ones
        (:func:`ragcompress.distill.packaged.packaged_adaptor`) or given."""
        value = self.encoding.get("adaptor")
        return str(value) if value else None

    @property
    def base_copy(self) -> bool:
        """Each passage's blob also holds its base-model cache (a store encoded through an adaptor,
        ``IndexConfig(base_copy=True)``), which the first retrieved passage is read from."""
        return bool(self.encoding.get("base_copy", False))

    @property
    def passages_exact(self) -> bool:
        """Whether a passage read first holds what full prefill computes for it when it directly
        follows the prefix, up to rounding to 8 bits or more: encoded alone by the base model in
        float32 (no neighbours before it; no adaptor, or its base copy read), no low-rank
        projection, keys and values kept in float32, fp16 or int8. Selective recompute then
        leaves the first retrieved passage alone when it kept every row (``blend`` reads a passage
        with evicted rows as a candidate all the same): the ``oracle`` rows of docs/recompute.md
        read the exact cross-passage cache rounded to int8 and answer as full prefill, so those
        tokens need no repair, and the check pass skips them. Narrower integers (int4, int2)
        leave them candidates."""
        return (
            (self.quant.bits or 16) >= 8
            and (self.quant.value_bits or 16) >= 8
            and "lowrank" not in self.compression
            and not self.encoding.get("context_neighbors")
            and (not self.encoding.get("adaptor") or self.base_copy)
            and not self.encoding.get("dtype")
        )

    @property
    def dtype(self) -> str | None:
        """The model dtype the passages were encoded in, when not float32 (``--dtype``): what
        answering loads the model in unless told otherwise."""
        value = self.encoding.get("dtype")
        return str(value) if value else None

    def to_json(self) -> str:
        """The manifest's JSON; an empty ``build_sha256`` (a store created before the field) is left
        out, so that a later write does not add a field the version that built it refuses."""
        data = asdict(self)
        if not data["build_sha256"]:
            del data["build_sha256"]
        return json.dumps(data, indent=2, sort_keys=True)

    def sealed(self) -> Manifest:
        """This manifest with its ``build_sha256`` (what :func:`create_store` writes)."""
        return replace(self, build_sha256=build_digest(asdict(self)))

    @classmethod
    def from_json(cls, text: str, where: Path) -> Manifest:
        try:
            data = loads_json(text)
        except ValueError as exc:
            raise StoreError(f"{where} is not valid JSON ({exc}); {REBUILD}") from exc
        if not isinstance(data, dict):
            raise StoreError(f"{where} does not hold a JSON object; {REBUILD}")
        version = data.get("format_version")
        if version is None and not set(data) & set(BUILD_FIELDS):
            raise StoreError(
                f"{where} is not a ragcompress manifest (it has none of a store's fields), so {where.parent} is "
                "not a ragcompress store: give the --store of one, or an empty or new folder to create one"
            )
        if type(version) is not int or version != FORMAT_VERSION:
            raise StoreMismatchError(
                f"store format version {version!r} in {where}, this ragcompress reads version "
                f"{FORMAT_VERSION}; rebuild the store with `ragcompress index --overwrite` and {SETTINGS}"
            )
        expected = {
            "model_ref": str,
            "model_fingerprint": str,
            "tokenizer_hash": str,
            "template": dict,
            "compression": dict,
            "embedder": str,
            "model_shape": dict,
            "created": str,
        }
        for key, kind in expected.items():
            if not isinstance(data.get(key), kind):
                raise StoreError(f"{where}: field {key!r} is missing or not a {kind.__name__}; {REBUILD}")
        optional = {"format_version", "prefix_sha256", "encoding", "index", "attention", "build_sha256"}
        if set(data) - set(expected) - optional:
            raise StoreMismatchError(
                f"{where}: unknown fields {sorted(set(data) - set(expected) - optional)}: written by a newer "
                "ragcompress, or edited; upgrade ragcompress (`pip install -U ragcompress-kv`) to read it, or, "
                f"if the fields were added by hand, remove them"
            )
        _check_values(data, where)
        return cls(**data)

    def write(self, directory: Path) -> None:
        """Atomic: write a temp file, fsync, rename over the old manifest."""
        tmp = directory / f".{MANIFEST}.{os.getpid()}.tmp"
        with open(tmp, "w", encoding="utf-8") as handle:
            handle.write(self.to_json())
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, directory / MANIFEST)
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    @classmethod
    def read(cls, directory: Path) -> Manifest:
        path = directory / MANIFEST
        if not path.is_file():
            if directory.is_file():
                raise StoreError(f"{directory} is a file; a store is the folder `ragcompress index --store` built")
            if any((directory / name).exists() for name in ("catalogue.sqlite", "shards", "prefix.safetensors")):
                raise StoreError(f"{directory} lost its {MANIFEST}; {REBUILD}")
            raise StoreError(
                f"{directory} is not a ragcompress store (no {MANIFEST}); "
                "create one with `ragcompress index --input FILE --store DIR`"
            )
        with open(path, "rb") as handle:
            raw = handle.read(MAX_MANIFEST_BYTES + 1)
        if len(raw) > MAX_MANIFEST_BYTES:
            raise StoreError(f"{path} is larger than {MAX_MANIFEST_BYTES} bytes; {REBUILD}")
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise StoreError(f"{path} is not UTF-8 text; {REBUILD}") from None
        return cls.from_json(text, path)

    def check_same_build(self, other: Manifest) -> None:
        """Raise naming both sides when ``other`` (a run about to add to this store) was built
        differently from this store."""
        if self.model_ref == other.model_ref and self.model_fingerprint != other.model_fingerprint:
            raise StoreMismatchError(
                f"the model {self.model_ref} has changed since the store was built (fingerprint "
                f"{self.model_fingerprint[:16]}, now {other.model_fingerprint[:16]}); rebuild the store for it "
                "with --overwrite (it keeps the store's settings), or use another --store"
            )
        difference = self.build_difference(other)
        if difference is not None:
            what, ours, theirs = difference
            raise StoreMismatchError(
                f"store was built with {what} {ours}, this run uses {theirs}; "
                "use the store's settings (give none to reuse them), another --store, or --overwrite"
            )

    def build_difference(self, other: Manifest) -> tuple[str, str, str] | None:
        """The first setting that ``other`` was built with differently, as ``(what, ours,
        theirs)`` for a message; None when both are the same build."""
        pairs = [
            ("model", self.model_fingerprint, other.model_fingerprint, self.model_ref, other.model_ref),
            ("tokenizer", self.tokenizer_hash, other.tokenizer_hash, None, None),
            ("prompt template", self.template, other.template, None, None),
            ("compression", self.compression, other.compression, None, None),
            ("embedder", self.embedder, other.embedder, None, None),
            ("passage encoding", self.encoding, other.encoding, None, None),
        ]
        for what, ours, theirs, our_name, their_name in pairs:
            if ours != theirs:
                if our_name:
                    return what, f"{our_name} ({str(ours)[:16]})", f"{their_name} ({str(theirs)[:16]})"
                return what, *_shown_difference(ours, theirs)
        return None

    def check_lm(self, lm: Any) -> None:
        """Refuse a loaded model (``models.LoadedModel``) other than the store's, or its model
        with another tokenizer: the store's caches and token ids are that model's."""
        self.check_model(lm.fingerprint, lm.ref)
        if lm.tokenizer_hash != self.tokenizer_hash:
            raise StoreMismatchError(
                f"store was built with another tokenizer than {lm.ref}'s; rebuild it for this model"
            )

    def check_model(self, fingerprint: str, ref: str) -> None:
        if fingerprint != self.model_fingerprint:
            raise StoreMismatchError(
                f"store was built with model {self.model_ref} (fingerprint "
                f"{self.model_fingerprint[:16]}), but {ref} has fingerprint {fingerprint[:16]}; "
                "rebuild the store for this model"
            )

    def check_embedder(self, name: str) -> None:
        """Refuse an embedder other than the store's: its vectors retrieve other passages (a store
        written before local embedder folders were recorded absolute may hold a relative one)."""
        if embedder_name(name) != embedder_name(self.embedder):
            raise StoreMismatchError(
                f"store was built with embedder {self.embedder!r}, this run uses {name!r}; use the store's embedder"
            )


def _shown_difference(ours: Any, theirs: Any, width: int = 80) -> tuple[str, str]:
    """Two settings for a message: of two dicts only the keys whose values differ, each string
    value cut to ``width`` characters with a marked ellipsis, so what differs is what is shown
    (a long system prompt would otherwise bury a one-word change)."""

    def short(value: Any) -> Any:
        if isinstance(value, str) and len(value) > width:
            return value[:width] + f"... ({len(value)} characters)"
        if isinstance(value, dict):
            return {key: short(item) for key, item in value.items()}
        return value

    if isinstance(ours, dict) and isinstance(theirs, dict):
        keys = sorted(key for key in ours.keys() | theirs.keys() if ours.get(key) != theirs.get(key))
        ours = {key: ours.get(key) for key in keys}
        theirs = {key: theirs.get(key) for key in keys}
    return json.dumps(short(ours), sort_keys=True), json.dumps(short(theirs), sort_keys=True)
