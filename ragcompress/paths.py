"""Where ragcompress keeps derived, re-creatable files (converted models, assembled GGUFs)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    """Hex sha256 of a file, read in 4 MiB blocks (model files are GBs)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def cache_dir() -> Path:
    """Root of the local cache: ``$RAGCOMPRESS_CACHE`` or ``~/.cache/ragcompress``, absolute (a
    leading ``~`` expanded, a relative path taken from the current directory).

    Everything in it can be deleted; it is rebuilt from the installed model wheels on demand.
    """
    root = os.environ.get("RAGCOMPRESS_CACHE")
    path = Path(root).expanduser().absolute() if root else Path.home() / ".cache" / "ragcompress"
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:  # a read-only home, a file in the way: one line, not a traceback
        from ragcompress.errors import RagCompressError

        raise RagCompressError(
            f"cannot create the cache folder {path} ({exc.strerror or exc}); set RAGCOMPRESS_CACHE to a writable folder"
        ) from None
    return path
