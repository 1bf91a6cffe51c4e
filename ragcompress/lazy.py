"""A package's names imported on first use (PEP 562), so that importing one of its light
submodules does not import what its other names need: ``ragcompress.errors`` for the command
line's ``--help``, ``ragcompress.indexing.batch_starts`` on a Ray worker, without torch and
transformers (about 4 s on a 2-core CPU)."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable
from typing import Any


def lazy_exports(package: str, exports: dict[str, str]) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """The module ``__getattr__`` and ``__dir__`` of ``package``, whose names ``exports`` maps to
    the modules that define them: a name is imported when first asked for, then kept."""
    namespace = vars(sys.modules[package])

    def __getattr__(name: str) -> Any:
        module = exports.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(module), name)
        namespace[name] = value  # later lookups skip this function
        return value

    def __dir__() -> list[str]:
        return sorted(set(namespace) | set(exports))

    return __getattr__, __dir__
