"""Text compression for LLMs that cannot take a KV cache (DESIGN §2)."""

from ragcompress.text.base import Budget, CompressedText, TextCompressor
from ragcompress.text.extractive import SentenceExtractor, split_sentences
from ragcompress.text.registry import TEXT_METHODS, make_text_compressor
from ragcompress.text.selfinfo import SelfInformationCompressor

__all__ = [
    "Budget",
    "CompressedText",
    "TextCompressor",
    "SentenceExtractor",
    "split_sentences",
    "SelfInformationCompressor",
    "TEXT_METHODS",
    "make_text_compressor",
]
