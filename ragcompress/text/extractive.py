"""Sentence-level extraction by similarity to the question (RECOMP extractive).

RECOMP (Xu, Shi and Choi, ICLR 2024) compresses retrieved documents by keeping the sentences a
dual encoder scores as most useful for the question. This is that scheme with the store's
sentence embedder (all-MiniLM-L6-v2) used as is, without RECOMP's task-specific fine-tuning:
sentences are ranked by cosine similarity to the question and kept, in their original order,
while they fit the passage's token budget (the best sentence is always kept). Each kept sentence
is followed by the whitespace that followed it in the input (a space, a paragraph break, nothing
after a CJK full stop), not by one space: that put a space into CJK text that has none and
joined paragraphs into one.
"""

from __future__ import annotations

import re
from typing import Any, ClassVar

import numpy as np

from ragcompress.text.base import TextCompressor

# A sentence ends at . ! or ? (optionally followed by a closing quote or bracket) before
# whitespace of at most one line break and a digit or a letter that is not lower-case (any script;
# CJK has no case: split_sentences checks the case of group 2), after an optional opening quote; at
# a CJK full stop, exclamation or question mark (。！？, no space follows them); or at a blank line
# (the first alternative never spans one, so a blank line before a lower-case word still ends).
_BOUNDARY = re.compile(
    r"([.!?][\"')\]»”’]?)(?:[^\S\n]+\n?|\n)[^\S\n]*(?=[\"'(\[«„“‘]?(\w))|([。！？][」』”）]?)\s*|\n\s*\n"
)


def split_sentences(text: str) -> list[str]:
    """Sentences of ``text`` with surrounding whitespace stripped; empty pieces dropped. A Latin
    full stop ends a sentence only before a letter that is not lower-case (``e.g. six`` is one sentence):
    Cyrillic, Greek and accented capitals count (``Über``, ``Это``), which an ASCII class missed,
    leaving such a text one sentence that extraction could not shorten."""
    return [text[start:end] for start, end in sentence_spans(text)]


def sentence_spans(text: str) -> list[tuple[int, int]]:
    """The character spans of :func:`split_sentences`' sentences in ``text`` (whitespace
    stripped): what lies between two of them is the input's own separator."""
    pieces, start = [], 0
    for match in _BOUNDARY.finditer(text):
        if match.group(1):
            after = match.group(2)  # the word character that follows (past an opening quote)
            if not (after.isdigit() or (after.isalpha() and not after.islower())):  # a capital, or a caseless script
                continue
            end = match.end(1)
        else:
            end = match.end(3) if match.group(3) else match.start()
        pieces.append((start, end))
        start = match.end()
    pieces.append((start, len(text)))
    spans = []
    for begin, end in pieces:
        piece = text[begin:end]
        if piece.strip():
            spans.append((begin + len(piece) - len(piece.lstrip()), end - len(piece) + len(piece.rstrip())))
    return spans


class SentenceExtractor(TextCompressor):
    """Keeps the sentences closest to the question; ``embedder`` is a ragcompress Embedder."""

    name: ClassVar[str] = "extractive"

    def __init__(self, tokenizer: Any, embedder: Any) -> None:
        super().__init__(tokenizer)
        self.embedder = embedder

    def _compress_one(self, text: str, query: str | None, budget: int) -> str:
        if not query or not query.strip():
            raise ValueError("sentence extraction ranks sentences by the question; give a non-empty query")
        spans = sentence_spans(text)
        if len(spans) <= 1:
            return text
        sentences = [text[start:end] for start, end in spans]
        vectors = self.embedder.embed([query, *sentences])  # [1 + s, dim], unit norm
        similarity = vectors[1:] @ vectors[0]  # [s]
        after = [text[end:start] for (_, end), (start, _) in zip(spans, spans[1:], strict=False)] + [""]
        # a line break costs its own token; a space joins the next word's, so English costs are the sentences'
        costs = [self.count_tokens(s) + self.count_tokens(a.strip(" ")) for s, a in zip(sentences, after, strict=True)]
        kept: list[int] = []
        used = 0
        for i in np.argsort(-similarity, kind="stable").tolist():
            if not kept or used + costs[i] <= budget:
                kept.append(i)
                used += costs[i]
        kept.sort()
        return "".join(sentences[i] + after[i] for i in kept[:-1]) + sentences[kept[-1]]
