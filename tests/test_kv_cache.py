"""PreallocatedLayer: in-place appends that return what DynamicLayer's concatenation returns."""

from __future__ import annotations

import torch
from transformers.cache_utils import DynamicLayer

from ragcompress.kv.cache import PreallocatedLayer


def test_appends_in_place_and_falls_back_when_full_or_replaced():
    gen = torch.Generator().manual_seed(0)
    first, buffer = torch.randn(1, 2, 5, 4, generator=gen), torch.zeros(1, 2, 8, 4)
    buffer[:, :, :5] = first
    layer, plain = PreallocatedLayer(buffer, buffer.clone(), 5), DynamicLayer()
    plain.update(first, first)
    for new in (2, 1):  # fills the buffer exactly: written in place, no reallocation
        step = torch.randn(1, 2, new, 4, generator=gen)
        keys, _ = layer.update(step, step)
        expected, _ = plain.update(step, step)
        assert torch.equal(keys, expected) and keys.data_ptr() == buffer.data_ptr()
    layer.crop(-2)
    plain.crop(-2)
    step = torch.randn(1, 2, 3, 4, generator=gen)  # 6 + 3 > 8 rows: concatenation from here on
    keys, _ = layer.update(step, step)
    assert torch.equal(keys, plain.update(step, step)[0]) and keys.data_ptr() != buffer.data_ptr()

    other = PreallocatedLayer(torch.zeros(1, 2, 8, 4), torch.zeros(1, 2, 8, 4), 4)
    other.keys = torch.ones(1, 2, 4, 4)  # replaced from outside (selective recompute does this)
    other.values = torch.ones(1, 2, 4, 4)
    keys, _ = other.update(step[:, :, :1], step[:, :, :1])
    assert keys.shape[-2] == 5 and torch.equal(keys[:, :, :4], torch.ones(1, 2, 4, 4))
