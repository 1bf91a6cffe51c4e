"""Text compression for LLMs that cannot take a KV cache: the interface and the token budget.

A text compressor shortens each retrieved passage on its own (one output per input, so callers
keep each passage's metadata and score) to a target fraction of its tokens or to a share of a
total token budget. Tokens are counted with the tokenizer of the small LM ragcompress runs, and
the achieved size is measured by re-tokenizing the output, never assumed from the target.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar


@dataclass(frozen=True)
class CompressedText:
    """One compressed passage; ``original_tokens`` / ``kept_tokens`` are tokenizer counts."""

    text: str
    original_tokens: int
    kept_tokens: int

    @property
    def ratio(self) -> float:
        """Fraction of tokens kept (0.5 keeps half); 1.0 for an empty input."""
        return self.kept_tokens / self.original_tokens if self.original_tokens else 1.0


@dataclass(frozen=True)
class Budget:
    """How much to keep: a fraction ``rate`` of every passage, or ``target_tokens`` in total
    (shares of 0 tokens included: a total smaller than the number of passages leaves some empty)."""

    rate: float | None = None
    target_tokens: int | None = None

    def __post_init__(self) -> None:
        if (self.rate is None) == (self.target_tokens is None):
            raise ValueError("give exactly one of rate (fraction kept, in (0, 1]) or target_tokens (> 0)")
        if self.rate is not None and not 0.0 < self.rate <= 1.0:
            raise ValueError(f"rate must be in (0, 1], got {self.rate}")
        if self.target_tokens is not None and self.target_tokens < 1:
            raise ValueError(f"target_tokens must be at least 1, got {self.target_tokens}")

    def split(self, lengths: list[int]) -> list[int]:
        """Per-passage token budgets: ``ceil(rate * n)``, or ``target_tokens`` shared in
        proportion to passage length (largest remainders get the leftover tokens). ``rate * n`` is
        rounded before the ceiling: in floating point 0.55 * 100 is 55.00000000000001, not 55.
        The shares of ``target_tokens`` add up to it: a passage whose share rounds down to 0 gets
        0 (its text is dropped), where a floor of 1 token each made a total of 1 over 6 passages
        keep 6 or more."""
        if self.rate is not None:
            return [min(n, max(1, math.ceil(round(self.rate * n, 9)))) if n else 0 for n in lengths]
        assert self.target_tokens is not None  # __post_init__: exactly one of rate, target_tokens
        total = sum(lengths)
        if total <= self.target_tokens:
            return list(lengths)
        shares = [self.target_tokens * n / total for n in lengths]
        budgets = [math.floor(s) for s in shares]
        leftover = self.target_tokens - sum(budgets)
        for i in sorted(range(len(lengths)), key=lambda i: budgets[i] - shares[i])[:leftover]:
            budgets[i] += 1
        return [min(n, b) for n, b in zip(lengths, budgets, strict=True)]


class TextCompressor(ABC):
    """Shortens passages to per-passage token budgets; subclasses are registered by ``name``."""

    name: ClassVar[str]

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"]) if text else 0

    @abstractmethod
    def _compress_one(self, text: str, query: str | None, budget: int) -> str:
        """Return ``text`` shortened to at most about ``budget`` tokens (``budget`` >= 1)."""

    def compress(
        self, texts: list[str], query: str | None = None, *, rate: float | None = None, target_tokens: int | None = None
    ) -> list[CompressedText]:
        """Compress each text to its share of the budget; one :class:`CompressedText` per input
        (empty text for a share of 0 tokens: :meth:`Budget.split`)."""
        budget = Budget(rate, target_tokens)
        lengths = [self.count_tokens(t) for t in texts]
        out = []
        for text, n, keep in zip(texts, lengths, budget.split(lengths), strict=True):
            short = text if keep >= n else "" if keep == 0 else self._compress_one(text, query, keep)
            out.append(CompressedText(short, n, self.count_tokens(short)))
        return out

    def config(self) -> dict[str, Any]:
        return {"method": self.name}
