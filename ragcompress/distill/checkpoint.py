"""Training checkpoints without pickle: nested dicts/lists of tensors and JSON values in one
safetensors file (tensors as tensors, the structure as JSON in the header metadata).

``torch.load`` unpickles, and nothing ragcompress reads may execute code
(``tests/test_store_reliability.py``), checkpoints included: a checkpoint folder can come from
anywhere. Dict keys keep their type (an optimizer's state is keyed by int).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file

from ragcompress.errors import InputError
from ragcompress.paths import follow_umask, remove_dead_temps

_TREE = "tree"


def _encode(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, torch.Tensor):
        key = f"t{len(tensors)}"
        tensors[key] = obj.detach().contiguous().clone()
        return {"__tensor__": key}
    if isinstance(obj, dict):
        return {"__dict__": [[k, _encode(v, tensors)] for k, v in obj.items()]}
    if isinstance(obj, (list, tuple)):
        return {"__list__": [_encode(v, tensors) for v in obj]}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot checkpoint a {type(obj).__name__}")


def _decode(node: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(node, dict):
        if "__tensor__" in node:
            return tensors[node["__tensor__"]]
        if "__dict__" in node:
            return {k: _decode(v, tensors) for k, v in node["__dict__"]}
        return [_decode(v, tensors) for v in node["__list__"]]
    return node


def save_tree(obj: Any, path: Path) -> None:
    """Write ``obj`` atomically (temp file, then rename), with the mode the umask gives
    (:func:`~ragcompress.paths.follow_umask`). A run killed mid-save leaves its
    ``.NAME.PID.tmp`` (a checkpoint's size): those whose process is gone are deleted here."""
    tensors: dict[str, torch.Tensor] = {}
    tree = _encode(obj, tensors)
    remove_dead_temps(path.parent, re.compile(rf"\.{re.escape(path.name)}\.(\d+)\.tmp"))
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    save_file(tensors, str(tmp), metadata={_TREE: json.dumps(tree)})
    follow_umask(tmp)  # safetensors wrote it 0600: shared as the umask says, before the rename
    os.replace(tmp, path)


def load_tree(path: Path) -> Any:
    """What :func:`save_tree` wrote to ``path``; a damaged or foreign file is an ``InputError``
    naming it (a killed run never leaves one: saves are atomic)."""
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
        if _TREE not in metadata:
            raise ValueError("no ragcompress tree in its metadata")
        return _decode(json.loads(metadata[_TREE]), load_file(str(path)))
    except (OSError, ValueError, SafetensorError, KeyError) as exc:
        raise InputError(
            f"{path} is not a readable ragcompress training file ({exc}); delete it (the run recomputes what it "
            "held) or use another --out folder"
        ) from None
