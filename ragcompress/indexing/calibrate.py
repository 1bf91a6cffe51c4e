"""The calibration step of a low-rank store: encode a sample of passages, fit the basis.

The basis is fitted on full (not evicted) caches of the first ``limit`` calibration passages, in
input order, encoded exactly as indexing encodes them (after the shared prefix, keys un-rotated):
the same sample gives the same basis (``kv.lowrank.fit_basis`` is deterministic).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from itertools import islice

from ragcompress.indexing.encoder import PassageEncoder
from ragcompress.indexing.inputs import PassageInput
from ragcompress.kv import PassageKV
from ragcompress.kv.lowrank import LowRankBasis, RankSpec, fit_basis


def calibration_caches(
    encoder: PassageEncoder, passages: Iterable[PassageInput], limit: int, batch_size: int = 8
) -> Iterator[PassageKV]:
    """Full caches of the first ``limit`` passages, one batch at a time (never all in memory)."""
    sample = iter(islice(passages, limit))
    while batch := list(islice(sample, batch_size)):
        yield from encoder.encode([encoder.tokens.passage(p.text) for p in batch])


def fit_calibration_basis(
    encoder: PassageEncoder, passages: Iterable[PassageInput], spec: RankSpec, limit: int
) -> LowRankBasis:
    """The basis ``spec`` asks for, fitted on the first ``limit`` of ``passages``."""
    return fit_basis(calibration_caches(encoder, passages, limit), spec)
