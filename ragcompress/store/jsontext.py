"""JSON read from a store's files (manifest, ``index.json``, the indexing-run marker, a row's
metadata): a store is someone else's bytes, and JSON nested deeper than Python's recursion limit
(200,000 brackets fit in 1 MiB) makes ``json.loads`` raise ``RecursionError``, which is not the
``ValueError`` every reader already turns into its named error for malformed JSON."""

from __future__ import annotations

import json
from typing import Any


def loads_json(text: str | bytes) -> Any:
    """``json.loads``, raising ``ValueError`` for JSON nested too deeply to parse, as for any other
    malformed JSON."""
    try:
        return json.loads(text)
    except RecursionError:
        raise ValueError("JSON nested too deeply") from None
