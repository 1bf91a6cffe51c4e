"""``kvzip``: attention received while the model reconstructs the passage (Kim et al., 2025,
"KVzip: Query-Agnostic KV Cache Compression with Context Reconstruction").

After the passage's cache the model is asked to repeat it (``prompt`` as a user turn, then the
passage's own tokens teacher-forced as the answer). A cached token the model needs to reproduce
the passage is one it will need for any question about it, so its score is the *maximum*
attention any reconstruction query puts on it, over those queries and the query heads of its KV
group. The reconstruction runs in chunks of ``chunk`` tokens (:func:`run_probe`), so each forward
pass attends over at most ``chunk x (prefix + 2 x passage)`` entries; the extra indexing cost is
one forward pass over the passage and the prompt.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from ragcompress.compressors.base import CompressionContext
from ragcompress.compressors.probe import probe_fits, run_probe
from ragcompress.compressors.scorer import ScorerCompressor
from ragcompress.kv import PassageKV

if TYPE_CHECKING:
    from ragcompress.indexing.encoder import PassageEncoder

REPEAT_PROMPT = "Repeat the previous passage exactly."


@dataclass(frozen=True)
class KVzipCompressor(ScorerCompressor):
    """chunk: reconstruction tokens per forward pass; prompt: the repeat instruction."""

    name = "kvzip"
    chunk: int = 256
    prompt: str = REPEAT_PROMPT

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.chunk, int) or self.chunk < 1:
            raise ValueError(f"kvzip: chunk must be a positive int, got {self.chunk!r}")

    def probe_ids(self, encoder: PassageEncoder, token_ids: list[int]) -> list[int]:
        """The reconstruction probe: the repeat request as a user turn, then the passage's own tokens."""
        return encoder.tokens.suffix(self.prompt) + list(token_ids)

    def fits(self, encoder: PassageEncoder, token_ids: list[int]) -> bool:
        """Whether :meth:`compress` can run on the passage ``token_ids``: it is kept whole (ratio 1,
        or a budget of its length: never scored, :meth:`keeps_all`), or :meth:`score` can probe it,
        the prefix, the passage and its reconstruction (about twice the passage) within the model's
        positions (:func:`probe_fits`)."""
        n = len(token_ids)
        return self.keeps_all(n) or probe_fits(encoder, n, len(self.probe_ids(encoder, token_ids)))

    def score(self, kv: PassageKV, context: CompressionContext) -> torch.Tensor:
        n = kv.num_tokens
        probe_ids = self.probe_ids(context.encoder, context.token_ids)
        probe = run_probe(
            context.encoder,
            kv,
            probe_ids,
            context_len=n,
            score_len=n,
            query_reduce="max",
            group_reduce="max",
            chunk=self.chunk,
        )
        assert probe.attention is not None  # asked for with score_len
        return probe.attention
