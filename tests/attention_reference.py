"""What the kernel tests (``test_kernels.py``, ``test_lowrank_kernel.py``) compare against: passages
whose heads keep ragged rows, and fp32 attention over their ``codec.decode`` rows.

One copy for both kernels, so a fix to the reference reaches both. Their ``TRITON_INTERPRET=1``
workers import it too: a spawned worker starts with this process's ``sys.path``, which holds
``tests/`` (pytest's default import mode puts it there, the folder having no ``__init__.py``), and
unpickling a worker function imports its test module, which imports this one.
"""

from __future__ import annotations

import torch

from ragcompress.kv import PassageKV
from ragcompress.kv.rope import apply_rope
from ragcompress.testing import PlainRotary


def evict_every_other_head(keys: torch.Tensor, values: torch.Tensor, gen: torch.Generator) -> PassageKV:
    """``keys``/``values`` ``[layers, H, n, d]`` as a passage whose odd heads keep a sorted random
    subset of rows (fewer the higher the head; the same rows on every layer): ragged segment
    lengths and position gaps for the kernels to read. Draws one ``randperm`` from ``gen`` per odd head."""
    _, heads, n, _ = keys.shape
    kv = PassageKV.full(keys.clone(), values.clone())
    for head in range(1, heads, 2):
        keep = max(1, n - 1 - head * n // (2 * heads))
        idx = torch.randperm(n, generator=gen)[:keep].sort().values
        kv.lengths[:, head] = keep
        kv.positions[:, head, :keep] = idx
        kv.keys[:, head, :keep] = keys[:, head, idx]
        kv.values[:, head, :keep] = values[:, head, idx]
    return kv


def fp32_attention(
    passages: list[PassageKV],
    layer: int,
    rotary: PlainRotary,
    start: int,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
) -> torch.Tensor:
    """fp32 attention of ``query`` ``[B, Hq, q, d]`` over ``layer`` of the decoded ``passages``
    (every kept row visible, keys turned by the model side's RoPE at their positions, the first
    passage's from ``start``) and then the fp ``key``/``value`` ``[B, H, T, d]``, the last ``q``
    rows causal: ``[B, q, Hq, d]``. Built from plain torch ops on the decoded rows, none of the
    packed layouts or kernels under test."""
    keys, values, masks = [], [], []
    position = start
    for kv in passages:
        cos, sin = rotary.rotation_tables(*rotary.cos_sin(kv.positions[layer] + position, layer))
        keys.append(apply_rope(kv.keys[layer], cos, sin, paired=rotary.paired))
        values.append(kv.values[layer])
        masks.append(kv.valid_mask()[layer])
        position += kv.num_tokens
    batch, q_heads, q_len, d = query.shape
    heads, total = key.shape[1], key.shape[2]
    group = q_heads // heads
    all_k = torch.cat([torch.cat(keys, 1).expand(batch, -1, -1, -1), key.float()], 2).repeat_interleave(group, 1)
    all_v = torch.cat([torch.cat(values, 1).expand(batch, -1, -1, -1), value.float()], 2).repeat_interleave(group, 1)
    causal = torch.ones(q_len, total, dtype=torch.bool).tril(total - q_len)
    allowed = torch.cat(
        [torch.cat(masks, 1).unsqueeze(1).expand(-1, q_len, -1), causal.expand(heads, -1, -1)], -1
    ).repeat_interleave(group, 0)
    scores = (query.float() @ all_k.transpose(-1, -2)) * d**-0.5
    probs = scores.masked_fill(~allowed, float("-inf")).softmax(-1)
    return (probs @ all_v).transpose(1, 2)
