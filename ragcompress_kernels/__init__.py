"""Triton kernels of ragcompress (import name ``ragcompress_kernels``), each with a PyTorch reference."""

from .latent_attention import LatentSegments, latent_attention, latent_attention_ref
from .quantized_attention import (
    BACKENDS,
    HAS_TRITON,
    QuantizedSegments,
    attention_over_dense_ref,
    dequantize_rows_ref,
    dequantize_segments_ref,
    drop_padding_rows,
    packed_attention,
    packed_attention_ref,
    plan_splits,
    resolve_backend,
    triton_runs_on,
    triton_supports_head_dim,
    valid_rows_ref,
)

__all__ = [
    "BACKENDS",
    "HAS_TRITON",
    "LatentSegments",
    "QuantizedSegments",
    "attention_over_dense_ref",
    "dequantize_rows_ref",
    "dequantize_segments_ref",
    "drop_padding_rows",
    "latent_attention",
    "latent_attention_ref",
    "packed_attention",
    "packed_attention_ref",
    "plan_splits",
    "resolve_backend",
    "triton_runs_on",
    "triton_supports_head_dim",
    "valid_rows_ref",
]
