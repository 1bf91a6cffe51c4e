"""A store's low-rank basis on disk: ``DIR/basis.safetensors``, hashed in the manifest.

The file holds every layer's key (and value) basis as fp16 ``[H, d, r_l]`` tensors named
``k.000``, ``k.001``, ... and the means as fp32 ``[L, H, d]`` (``k.mean``); its metadata holds
the calibration variance kept per layer. The bytes are canonical (sorted header), so the
sha256 recorded in the manifest (``compression.lowrank.basis_sha256``) identifies one basis: a
store opened with another basis file than its manifest names is refused, since its latents
would be rebuilt into the wrong keys silently.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from ragcompress.errors import StoreMismatchError
from ragcompress.kv import ModelShape
from ragcompress.kv.lowrank import KINDS, LowRankBasis
from ragcompress.store.codec import _canonical, _metadata

BASIS = "basis.safetensors"


def basis_to_bytes(basis: LowRankBasis) -> bytes:
    """Canonical safetensors bytes (bases fp16, means fp32): what the store keeps and hashes."""
    tensors: dict[str, torch.Tensor] = {}
    meta: dict[str, str] = {}
    for kind, bases in basis.bases.items():
        for layer, b in enumerate(bases):
            tensors[f"{kind}.{layer:03d}"] = b.to(torch.float16).contiguous()
        tensors[f"{kind}.mean"] = basis.means[kind].float().contiguous()
        meta[f"{kind}.energy"] = ",".join(f"{e:.6f}" for e in basis.energy[kind])
    return _canonical(st_save(tensors, metadata=meta))


def basis_from_bytes(blob: bytes) -> LowRankBasis:
    tensors = st_load(blob)
    meta = _metadata(blob)
    bases: dict[str, tuple[torch.Tensor, ...]] = {}
    means: dict[str, torch.Tensor] = {}
    energy: dict[str, tuple[float, ...]] = {}
    for kind in KINDS:
        if f"{kind}.mean" not in tensors:
            continue
        means[kind] = tensors[f"{kind}.mean"].float()
        bases[kind] = tuple(tensors[f"{kind}.{layer:03d}"].float() for layer in range(means[kind].shape[0]))
        energy[kind] = tuple(float(e) for e in meta[f"{kind}.energy"].split(","))
    if "k" not in bases:
        raise ValueError("a low-rank basis holds at least the keys' bases")
    return LowRankBasis(bases, means, energy)


def basis_sha256(basis: LowRankBasis) -> str:
    return hashlib.sha256(basis_to_bytes(basis)).hexdigest()


def manifest_entry(basis: LowRankBasis, spec: dict[str, object], calibration: str) -> dict[str, object]:
    """The ``lowrank`` object of a manifest's ``compression``: the hash, ranks and kept variance
    per layer, the rank specification and what the basis was fitted on."""
    return {"basis_sha256": basis_sha256(basis), **basis.describe(), **spec, "calibration": calibration}


def max_basis_bytes(shape: ModelShape) -> int:
    """The most bytes a basis of a model of ``shape`` can hold: keys' and values' bases fp16
    ``[H, d, r <= d]`` per layer and means fp32 ``[L, H, d]``, with a header naming them."""
    layers, heads, d = shape.as_tuple()
    return 2 * layers * heads * d * (2 * d + 4) + 256 * (2 * layers + 2) + (1 << 20)


def read_basis(directory: Path, expected_sha256: str, shape: ModelShape) -> LowRankBasis:
    """The basis of the store at ``directory``; refused unless its sha256 is the manifest's. A
    file larger than a basis of the manifest's ``shape`` can be is refused unread (the sha256 comes
    after the read: a hostile store's sparse 64 GiB file ended in a MemoryError traceback)."""
    path = directory / BASIS
    try:
        size = path.stat().st_size
        if size > max_basis_bytes(shape):
            raise StoreMismatchError(
                f"{path} has {size} bytes, more than a basis of this model can ({max_basis_bytes(shape)}); rebuild it"
            )
        blob = path.read_bytes()
    except OSError as exc:
        raise StoreMismatchError(f"{path} cannot be read ({exc}); the store's latents need it, rebuild it") from None
    found = hashlib.sha256(blob).hexdigest()
    if found != expected_sha256:
        raise StoreMismatchError(
            f"{path} has sha256 {found[:16]}, the store's manifest names basis {expected_sha256[:16]}; "
            "a basis from another store rebuilds the wrong keys: restore this store's basis or rebuild it"
        )
    return basis_from_bytes(blob)
