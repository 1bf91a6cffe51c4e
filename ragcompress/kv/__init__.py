"""Tensor code shared by the offline and the query side: one passage's cache (:class:`PassageKV`),
the model's cache shape (:class:`ModelShape`), RoPE (``rope``), KIVI quantization (``quant``) and
building transformers caches from tensors (``cache``)."""

from ragcompress.kv.passage import PassageKV
from ragcompress.kv.shape import ModelShape

__all__ = ["ModelShape", "PassageKV"]
