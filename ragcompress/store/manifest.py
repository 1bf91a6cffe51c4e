"""The store manifest: what a store was built with, checked before anything in it is used."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ragcompress.errors import StoreError, StoreMismatchError

FORMAT_VERSION = 1
MANIFEST = "manifest.json"


@dataclass(frozen=True)
class Manifest:
    """Identity of a store. Two stores can share caches only if every field but ``created`` matches.

    ``model_ref`` finds the model again (embedded name or directory); ``model_fingerprint`` hashes
    its config and weights; ``tokenizer_hash`` its vocabulary and chat template; ``template`` the
    split prompt (prefix / passage / suffix); ``compression`` the method and quantization;
    ``embedder`` the retrieval model.
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

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str, where: Path) -> "Manifest":
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise StoreError(f"{where} is not valid JSON ({exc}); the store is corrupt, rebuild it") from exc
        if not isinstance(data, dict):
            raise StoreError(f"{where} does not hold a JSON object; rebuild the store")
        version = data.get("format_version")
        if version != FORMAT_VERSION:
            raise StoreMismatchError(
                f"store format version {version!r} in {where}, this ragcompress reads version "
                f"{FORMAT_VERSION}; rebuild the store with `ragcompress index --overwrite`"
            )
        expected = {
            "model_ref": str, "model_fingerprint": str, "tokenizer_hash": str, "template": dict,
            "compression": dict, "embedder": str, "model_shape": dict, "created": str,
        }
        for key, kind in expected.items():
            if not isinstance(data.get(key), kind):
                raise StoreError(f"{where}: field {key!r} is missing or not a {kind.__name__}")
        if set(data) - set(expected) - {"format_version"}:
            raise StoreError(f"{where}: unknown fields {sorted(set(data) - set(expected))}")
        return cls(**data)

    def write(self, directory: Path) -> None:
        """Atomic: write a temp file, fsync, rename over the old manifest."""
        tmp = directory / f".{MANIFEST}.{os.getpid()}.tmp"
        with open(tmp, "w") as handle:
            handle.write(self.to_json())
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, directory / MANIFEST)

    @classmethod
    def read(cls, directory: Path) -> "Manifest":
        path = directory / MANIFEST
        if not path.is_file():
            raise StoreError(
                f"{directory} is not a ragcompress store (no {MANIFEST}); "
                "create one with `ragcompress index --input FILE --store DIR`"
            )
        return cls.from_json(path.read_text(), path)

    def check_same_build(self, other: "Manifest") -> None:
        """Raise naming both sides when ``other`` was built differently from this store."""
        pairs = [
            ("model", self.model_fingerprint, other.model_fingerprint, self.model_ref, other.model_ref),
            ("tokenizer", self.tokenizer_hash, other.tokenizer_hash, None, None),
            ("prompt template", self.template, other.template, None, None),
            ("compression", self.compression, other.compression, None, None),
            ("embedder", self.embedder, other.embedder, None, None),
        ]
        for what, ours, theirs, our_name, their_name in pairs:
            if ours != theirs:
                ours_s = f"{our_name} ({str(ours)[:16]})" if our_name else json.dumps(ours, sort_keys=True)[:200]
                theirs_s = f"{their_name} ({str(theirs)[:16]})" if their_name else json.dumps(theirs, sort_keys=True)[:200]
                raise StoreMismatchError(
                    f"store was built with {what} {ours_s}, this run uses {theirs_s}; "
                    "use the store's settings, another --store, or --overwrite"
                )

    def check_model(self, fingerprint: str, ref: str) -> None:
        if fingerprint != self.model_fingerprint:
            raise StoreMismatchError(
                f"store was built with model {self.model_ref} (fingerprint "
                f"{self.model_fingerprint[:16]}), but {ref} has fingerprint {fingerprint[:16]}; "
                "rebuild the store for this model"
            )
