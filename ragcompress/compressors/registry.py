"""The one registry of compression methods, by name.

``METHODS`` maps a name to its class. Scoring methods take ``ratio``/``budget`` (and their own
parameters); ``adaptive:<scorer>`` wraps a scoring method in :class:`AdaptiveBudget`
(per-head budget allocation within each layer) and ``global:<scorer>`` in :class:`GlobalBudget`
(one pool for the whole cache), e.g. ``make_compressor("adaptive:kvzip", ratio=0.25)``.
"""

from __future__ import annotations

from dataclasses import fields
from typing import Any

from ragcompress.compressors.adaptive import AdaptiveBudget, GlobalBudget
from ragcompress.compressors.base import Compressor
from ragcompress.compressors.expected_attention import ExpectedAttentionCompressor
from ragcompress.compressors.knorm import KnormCompressor
from ragcompress.compressors.kvzip import KVzipCompressor
from ragcompress.compressors.learned import LearnedCompressor
from ragcompress.compressors.none import NoCompression
from ragcompress.compressors.scorer import ScorerCompressor
from ragcompress.compressors.snapkv import SnapKVCompressor
from ragcompress.compressors.streaming import StreamingCompressor

METHODS: dict[str, type[Compressor]] = {
    cls.name: cls
    for cls in (
        NoCompression,
        StreamingCompressor,
        KnormCompressor,
        SnapKVCompressor,
        ExpectedAttentionCompressor,
        KVzipCompressor,
        LearnedCompressor,
        AdaptiveBudget,
        GlobalBudget,
    )
}

WRAPPERS: dict[str, type[Compressor]] = {cls.name: cls for cls in (AdaptiveBudget, GlobalBudget)}


def scorer_names() -> list[str]:
    """Methods that score tokens and so can be wrapped (``adaptive:<name>``, ``global:<name>``)."""
    return [name for name, cls in METHODS.items() if issubclass(cls, ScorerCompressor)]


def method_names() -> list[str]:
    """Every concrete method name ``make_compressor`` accepts, wrappers spelled out."""
    plain = [name for name in METHODS if name not in WRAPPERS]
    return plain + [f"{wrapper}:{name}" for wrapper in WRAPPERS for name in scorer_names()]


def allowed_methods() -> str:
    plain = [name for name in METHODS if name not in WRAPPERS]
    wrapped = [f"{wrapper}:<{'|'.join(scorer_names())}>" for wrapper in WRAPPERS]
    return ", ".join(plain + wrapped)


def _build(cls: type[Compressor], params: dict[str, Any], method: str) -> Compressor:
    accepted = [f.name for f in fields(cls)]
    unknown = sorted(set(params) - set(accepted))
    if unknown:
        raise ValueError(
            f"method {method!r} takes no parameter {', '.join(unknown)}; "
            f"its parameters are: {', '.join(accepted) or '(none)'}"
            + ("; to evict tokens, choose a method with --method (e.g. global:kvzip)" if method == "none" else "")
        )
    try:
        return cls(**params)
    except TypeError as exc:
        raise ValueError(f"method {method!r}: {exc}") from None


def make_compressor(method: str, **params: Any) -> Compressor:
    """Instantiate a method by name; unknown names and bad parameters raise ``ValueError``
    listing the allowed values."""
    wrapper, _, inner = method.partition(":") if ":" in method else ("", "", method)
    if wrapper:
        if wrapper not in WRAPPERS or inner not in scorer_names():
            raise ValueError(f"unknown method {method!r}; choose one of: {allowed_methods()}")
        cls = WRAPPERS[wrapper]
        own = {f.name for f in fields(cls)} - {"inner"}
        outer = {k: v for k, v in params.items() if k in own}
        scorer = _build(METHODS[inner], {k: v for k, v in params.items() if k not in own}, inner)
        return _build(cls, {"inner": scorer, **outer}, method)
    if method not in METHODS or method in WRAPPERS:
        raise ValueError(f"unknown method {method!r}; choose one of: {allowed_methods()}")
    return _build(METHODS[method], params, method)
