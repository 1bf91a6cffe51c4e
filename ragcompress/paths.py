"""Where ragcompress keeps derived, re-creatable files (converted models, assembled GGUFs)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """Root of the local cache: ``$RAGCOMPRESS_CACHE`` or ``~/.cache/ragcompress``.

    Everything in it can be deleted; it is rebuilt from the installed model wheels on demand.
    """
    root = os.environ.get("RAGCOMPRESS_CACHE")
    path = Path(root) if root else Path.home() / ".cache" / "ragcompress"
    path.mkdir(parents=True, exist_ok=True)
    return path
