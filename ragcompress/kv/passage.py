"""In-memory form of one passage's KV cache, shared by compressors, the store and the runtime."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class PassageKV:
    """KV cache of one passage encoded after the shared prefix, keys stored *un-rotated*.

    Heads may keep different numbers of tokens (per-head budgets), so tensors are padded to the
    longest head and ``lengths`` says how many rows of each head are real. ``positions`` records
    the offset inside the passage of every kept token explicitly: evicted tokens keep their
    original positions for RoPE, and the prompt that follows starts at ``num_tokens``.

    keys, values: ``[layers, kv_heads, n_max, head_dim]``
    positions:    ``[layers, kv_heads, n_max]`` int64, offsets in ``[0, num_tokens)``
    lengths:      ``[layers, kv_heads]`` int64, ``lengths <= n_max``
    """

    keys: torch.Tensor
    values: torch.Tensor
    positions: torch.Tensor
    lengths: torch.Tensor
    num_tokens: int

    @classmethod
    def full(cls, keys: torch.Tensor, values: torch.Tensor) -> PassageKV:
        """A cache that keeps every token: positions ``0..n-1`` on every head."""
        layers, heads, n, _ = keys.shape
        positions = torch.arange(n).expand(layers, heads, n).clone()
        lengths = torch.full((layers, heads), n, dtype=torch.long)
        return cls(keys, values, positions, lengths, n)

    def __post_init__(self) -> None:
        layers, heads, n_max, _ = self.keys.shape
        if self.values.shape != self.keys.shape:
            raise ValueError(f"values {tuple(self.values.shape)} != keys {tuple(self.keys.shape)}")
        if tuple(self.positions.shape) != (layers, heads, n_max):
            raise ValueError(f"positions {tuple(self.positions.shape)} != {(layers, heads, n_max)}")
        if tuple(self.lengths.shape) != (layers, heads):
            raise ValueError(f"lengths {tuple(self.lengths.shape)} != {(layers, heads)}")
        if n_max and int(self.lengths.max()) > n_max:
            raise ValueError("lengths exceed the padded token dimension")

    @property
    def is_uniform(self) -> bool:
        """Every head keeps the same tokens at positions ``0..n-1`` (no eviction)."""
        n_max = self.keys.shape[2]
        return n_max == self.num_tokens and bool((self.lengths == n_max).all())

    @property
    def kept_tokens(self) -> int:
        """Kept (token, layer, head) entries; ``num_tokens * layers * heads`` without eviction."""
        return int(self.lengths.sum())

    def valid_mask(self) -> torch.Tensor:
        """``[layers, kv_heads, n_max]`` bool, True on real (not padding) rows."""
        n_max = self.keys.shape[2]
        return torch.arange(n_max) < self.lengths.unsqueeze(-1)

    def layer_rows(self) -> torch.Tensor:
        """``[layers]`` int64: rows of each layer holding a real entry on some head (its longest
        head). With per-head eviction the layers of one passage keep different amounts, and the
        dense runtime pads each layer only to its own longest head (``runtime.assemble``)."""
        if self.keys.shape[2] == 0:
            return torch.zeros(self.lengths.shape[0], dtype=torch.long)
        return self.lengths.max(dim=1).values
