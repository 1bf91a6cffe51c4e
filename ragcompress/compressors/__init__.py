"""Query-agnostic KV compression methods (DESIGN §2)."""

from ragcompress.compressors.adaptive import AdaptiveBudget, GlobalBudget
from ragcompress.compressors.base import CompressionContext, Compressor
from ragcompress.compressors.expected_attention import ExpectedAttentionCompressor
from ragcompress.compressors.knorm import KnormCompressor
from ragcompress.compressors.kvzip import KVzipCompressor
from ragcompress.compressors.learned import LearnedCompressor
from ragcompress.compressors.none import NoCompression
from ragcompress.compressors.registry import (
    METHODS,
    allowed_methods,
    make_compressor,
    method_names,
    scorer_names,
)
from ragcompress.compressors.scorer import ScorerCompressor
from ragcompress.compressors.snapkv import SnapKVCompressor
from ragcompress.compressors.streaming import StreamingCompressor

__all__ = [
    "METHODS",
    "AdaptiveBudget",
    "CompressionContext",
    "Compressor",
    "ExpectedAttentionCompressor",
    "GlobalBudget",
    "KVzipCompressor",
    "KnormCompressor",
    "LearnedCompressor",
    "NoCompression",
    "ScorerCompressor",
    "SnapKVCompressor",
    "StreamingCompressor",
    "allowed_methods",
    "make_compressor",
    "method_names",
    "scorer_names",
]
