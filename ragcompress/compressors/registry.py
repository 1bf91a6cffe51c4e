"""The one registry of compression methods, by name."""

from __future__ import annotations

from typing import Any

from ragcompress.compressors.base import Compressor
from ragcompress.compressors.none import NoCompression

METHODS: dict[str, type[Compressor]] = {
    NoCompression.name: NoCompression,
}


def make_compressor(method: str, **params: Any) -> Compressor:
    """Instantiate a registered method; an unknown name lists the allowed ones."""
    try:
        cls = METHODS[method]
    except KeyError:
        raise ValueError(f"unknown method {method!r}; choose one of: {', '.join(METHODS)}") from None
    return cls(**params)
