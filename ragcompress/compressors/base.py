"""The compressor interface: query-agnostic, offline reduction of one passage's cache.

A compressor sees the passage's full cache (keys un-rotated) and the encoder that produced it, so
scorers that need more than the cache (attention of the passage's own queries, a reconstruction
pass as in KVzip) can run the model again. It returns a :class:`PassageKV` that keeps a subset of
tokens per layer and head, recording their original positions. Quantization is not a
compressor: it is applied by the store to whatever a compressor keeps (see ``quant.py``).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from ragcompress.errors import InputError
from ragcompress.kv import PassageKV
from ragcompress.kv.rope import position_limit

if TYPE_CHECKING:
    from ragcompress.indexing.encoder import PassageEncoder


@dataclass(frozen=True)
class CompressionContext:
    """What a compressor may use besides the cache itself."""

    encoder: PassageEncoder
    token_ids: list[int]


@dataclass(frozen=True)
class Compressor(ABC):
    """Base class; subclasses are frozen dataclasses registered under ``name``."""

    name: ClassVar[str]

    @abstractmethod
    def compress(self, kv: PassageKV, context: CompressionContext) -> PassageKV:
        """Return the cache to store for one passage."""

    def fits(self, encoder: PassageEncoder, token_ids: list[int]) -> bool:
        """Whether :meth:`compress` can run on the passage ``token_ids`` within the model's
        positions, given a passage that is itself within them (indexing and training refuse a
        longer one first). Only a probe that runs past the passage can fail (KVzip's
        reconstruction overrides this); a method probing the passage's own tokens in place
        (SnapKV, Expected Attention) or none at all reaches no further than the passage."""
        return True

    def config(self) -> dict[str, Any]:
        """What a store manifest records to tell compressors apart (name + parameters)."""
        from dataclasses import asdict

        return {"method": self.name, **asdict(self)}


def check_fits(
    compressor: Compressor,
    encoder: PassageEncoder,
    passage_id: str,
    token_ids: list[int],
    remedy: str,
    reader: str = "",
) -> None:
    """Refuse (``InputError``) the passage ``passage_id`` of ``token_ids`` when ``compressor``
    cannot run on it within the model's positions (:meth:`Compressor.fits`: KVzip's probe repeats
    the passage after it, about ``prefix + 2n`` positions), by its id, length and the model's
    limit, then ``remedy`` (``reader``: who reads it, said after its length). ``index`` checks every
    passage of its input here and ``train`` every passage its compressed student reads, before
    either encodes one: scoring such a passage stopped each run midway, ``index`` after earlier
    passages were committed, ``train`` after its whole teacher pass."""
    if compressor.fits(encoder, token_ids):
        return
    raise InputError(
        f"--method {compressor.config()['method']} scores passage {passage_id} ({len(token_ids)} tokens{reader}) with a "
        f"probe past the model's positions ({encoder.lm.ref} handles {position_limit(encoder.lm.config)}); {remedy}"
    )
