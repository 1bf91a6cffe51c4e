"""``none``: keep every token (full cache reuse, TurboRAG-style)."""

from __future__ import annotations

from dataclasses import dataclass

from ragcompress.compressors.base import CompressionContext, Compressor
from ragcompress.kv import PassageKV


@dataclass(frozen=True)
class NoCompression(Compressor):
    name = "none"

    def compress(self, kv: PassageKV, context: CompressionContext) -> PassageKV:
        return kv
