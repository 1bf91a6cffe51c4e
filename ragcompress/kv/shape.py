"""The shape of a model's KV cache, as a store records it and every segment must match."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class ModelShape:
    """``layers`` x ``kv_heads`` x ``head_dim`` of one token's keys (and of its values)."""

    layers: int
    kv_heads: int
    head_dim: int

    def __post_init__(self) -> None:
        for name in ("layers", "kv_heads", "head_dim"):
            value = getattr(self, name)
            if type(value) is not int or value <= 0:
                raise ValueError(f"model shape needs {name!r} as a positive integer, got {value!r}")

    @classmethod
    def from_config(cls, config: Any) -> ModelShape:
        """From a transformers config (``head_dim`` falls back to ``hidden_size / heads``)."""
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        return cls(int(config.num_hidden_layers), int(config.num_key_value_heads), int(head_dim))

    @classmethod
    def from_dict(cls, data: dict[str, int]) -> ModelShape:
        return cls(data["layers"], data["kv_heads"], data["head_dim"])

    def as_dict(self) -> dict[str, int]:
        return {"layers": self.layers, "kv_heads": self.kv_heads, "head_dim": self.head_dim}

    def as_tuple(self) -> tuple[int, int, int]:
        return self.layers, self.kv_heads, self.head_dim

    @property
    def fp16_bytes_per_token(self) -> int:
        """Bytes an uncompressed fp16 cache takes per token: K and V, every layer and KV head."""
        return 2 * self.layers * self.kv_heads * self.head_dim * 2
