"""Query-agnostic KV compression methods (DESIGN §2)."""

from ragcompress.compressors.base import CompressionContext, Compressor
from ragcompress.compressors.none import NoCompression
from ragcompress.compressors.registry import METHODS, make_compressor

__all__ = ["METHODS", "CompressionContext", "Compressor", "NoCompression", "make_compressor"]
