"""The registry of text compression methods, by name."""

from __future__ import annotations

from typing import Any

from ragcompress.text.base import TextCompressor
from ragcompress.text.extractive import SentenceExtractor
from ragcompress.text.selfinfo import SelfInformationCompressor

TEXT_METHODS: dict[str, type[TextCompressor]] = {
    SelfInformationCompressor.name: SelfInformationCompressor,
    SentenceExtractor.name: SentenceExtractor,
}


def make_text_compressor(method: str, *, lm: Any, embedder: Any = None, **params: Any) -> TextCompressor:
    """Build a registered method from a LoadedModel (and an Embedder for ``extractive``)."""
    if method == SelfInformationCompressor.name:
        return SelfInformationCompressor(lm, **params)
    if method == SentenceExtractor.name:
        if embedder is None:
            from ragcompress.retrieval import Embedder

            embedder = Embedder()
        return SentenceExtractor(lm.tokenizer, embedder, **params)
    raise ValueError(f"unknown text compression method {method!r}; choose one of: {', '.join(TEXT_METHODS)}")
