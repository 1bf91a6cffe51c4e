"""Neighbour-conditioned encoding: which passages a passage is encoded after (FusionRAG-style).

A passage cached alone never attended to the passages that will sit before it in a prompt. When a
store is built with ``context_neighbors = n``, each passage is encoded after the ``n`` passages of
the indexing input most similar to it (the store's own embeddings, cosine), and only its own KV
are kept. Retrieval places passages by similarity to the question, so the passages most likely to
precede a passage in a prompt are the ones most like it; the most similar one is put directly
before it (``[n-th, …, 2nd, 1st, passage]``), where the strongest cross-passage attention sits.
Query time is unchanged: the stored KV are re-rotated to wherever the passage lands.

When retrieval returns exactly a passage's encoding neighbours in that order before it, its
cache equals full prefill's (``tests/test_neighbours.py``); otherwise it is an approximation that
has at least seen related text, which is what the measurements in ``docs/recompute.md`` weigh.
"""

from __future__ import annotations

import numpy as np


def neighbour_order(
    vectors: np.ndarray, pool: np.ndarray, n: int, self_rows: list[int] | None = None
) -> list[list[int]]:
    """For every row of ``vectors [m, dim]`` (unit norm), the indices into ``pool [p, dim]`` of its
    ``n`` most similar pool rows, least similar first (so the most similar is adjacent).

    self_rows: each vector's own index in the pool (excluded), or -1 / None when it is not there.
    Ties break by pool order (stable sort), so the choice is deterministic.
    """
    if n < 0:
        raise ValueError(f"context_neighbors must be >= 0, got {n}")
    if n == 0 or len(vectors) == 0:
        return [[] for _ in range(len(vectors))]
    sims = np.asarray(vectors, dtype=np.float64) @ np.asarray(pool, dtype=np.float64).T
    if self_rows is not None:
        for row, own in enumerate(self_rows):
            if own >= 0:
                sims[row, own] = -np.inf
    order = np.argsort(-sims, axis=1, kind="stable")
    contexts = []
    for row in range(len(vectors)):
        picked = [int(j) for j in order[row] if np.isfinite(sims[row, j])][:n]
        contexts.append(picked[::-1])
    return contexts


class NeighbourPool:
    """The passages neighbours are drawn from (normally the whole indexing input), with their
    embeddings; built once per run so every batch sees the same pool and a resumed run encodes
    every passage exactly as an uninterrupted one."""

    def __init__(self, ids: list[str], token_ids: list[list[int]], vectors: np.ndarray) -> None:
        if not len(ids) == len(token_ids) == len(vectors):
            raise ValueError("a neighbour pool needs one id, token list and vector per passage")
        self.ids = ids
        self.token_ids = token_ids
        self.vectors = vectors
        self._row = {pid: row for row, pid in enumerate(ids)}

    def row_of(self, passage_id: str) -> int:
        return self._row.get(passage_id, -1)

    def contexts(self, passage_ids: list[str], vectors: np.ndarray, n: int) -> list[list[int]]:
        """The context token ids each passage is encoded after: its ``n`` neighbours' tokens,
        concatenated least similar first."""
        order = neighbour_order(vectors, self.vectors, n, [self.row_of(pid) for pid in passage_ids])
        return [[tok for j in picked for tok in self.token_ids[j]] for picked in order]
