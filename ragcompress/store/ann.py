"""Which FAISS index a store gets, chosen by its size, and how well the approximate one recalls.

Up to :data:`FLAT_MAX` passages the index is exact (``IndexFlatIP``): a scan of 4k 384-dim
vectors is ~6 MB, a fraction of a millisecond, and no approximation is worth its recall loss.
Above it the index is an inverted file (``IndexIVFFlat``, inner product): k-means cells
(:func:`nlist_for`), of which a query scans the ``nprobe`` nearest. Its cost per query is the
centroid scan plus ``nprobe`` cells of contiguous vectors, so at 100k passages it stays within a
few tenths of a millisecond of a 1k flat scan (``benchmarks/store_scale.py``); an HNSW graph
(the previous choice) visits thousands of vectors scattered over memory, cost as much or up to
about twice as much per query, recalled less on the same queries, and took 20x longer to build.

``nprobe`` is not guessed: :func:`tune_nprobe` picks the smallest power of two whose recall@10
against an exact scan reaches :data:`RECALL_TARGET` on seeded midpoint queries, at build time,
so a corpus whose embeddings cluster less gets more probes. The k-means is FAISS's, seeded, so
the same rows give the same index. IVF-Flat keeps the raw vectors, which ``verify`` compares with
the catalogue and which give the exact neighbours recall is measured against.

Both are wrapped in ``IndexIDMap2`` so search returns catalogue row numbers. The chosen type, its
parameters and the recall@10 measured when it was built are recorded in the manifest's ``index``.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np

# Exact search up to this many vectors; IVF above (module doc).
FLAT_MAX = 4096
# Recall is measured at build time on this many seeded queries (midpoints of two stored vectors,
# which are near several passages but equal to none); nprobe is raised until it reaches the target.
RECALL_QUERIES = 200
RECALL_K = 10
RECALL_TARGET = 0.95
# k-means wants at least ~39 training points per centroid (FAISS warns below).
POINTS_PER_CELL = 39
# ... and uses at most 256 per centroid (it subsamples above): the training sample's size per cell.
TRAINING_PER_CELL = 256


def nlist_for(count: int) -> int:
    """Cells of an IVF index over ``count`` vectors: a power of two near 4 sqrt(N) (FAISS's rule
    of thumb is 4-16 sqrt(N)), with enough points per cell to train it."""
    target = max(1, min(4 * count**0.5, count / POINTS_PER_CELL))
    return 1 << int(np.log2(target))


def index_params(count: int, flat_max: int | None = None) -> dict[str, Any]:
    """The index type and parameters for a store of ``count`` passages (IVF's ``nprobe`` is
    chosen when it is built, :func:`tune_nprobe`)."""
    if count <= (FLAT_MAX if flat_max is None else flat_max):
        return {"type": "flat", "metric": "inner_product"}
    return {"type": "ivf", "metric": "inner_product", "nlist": nlist_for(count)}


def new_index(dim: int, params: dict[str, Any], training: np.ndarray | None = None) -> Any:
    """An empty id-mapped FAISS index of the type ``params`` names; an IVF index is trained on
    ``training`` (the vectors it will hold) first."""
    import faiss

    if params["type"] == "flat":
        return faiss.IndexIDMap2(faiss.IndexFlatIP(dim))
    if params["type"] == "ivf":
        if training is None:
            raise ValueError("an IVF index is trained on the vectors it will hold: pass training=")
        ivf = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, int(params["nlist"]), faiss.METRIC_INNER_PRODUCT)
        ivf.cp.seed = 1234
        ivf.train(np.ascontiguousarray(training, dtype=np.float32))
        ivf.nprobe = int(params.get("nprobe", 1))
        return faiss.IndexIDMap2(ivf)
    raise ValueError(f"unknown index type {params['type']!r}")


def search_top_k(index: Any, query: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """FAISS ``search`` of one query ``[1, d]`` for ``k`` hits (``k`` at most the index's size).

    An IVF index's ``nprobe`` was tuned for recall@10; a larger ``k`` scans proportionally more
    cells, and cells that hold fewer than ``k`` vectors between them are followed by twice as
    many until ``k`` come back or every cell was read: the tuned ``nprobe`` alone returned 40 of
    a 6,000-passage store's top 100, at a recall of 0.34. ``nprobe`` goes with the call
    (``SearchParametersIVF``), not the shared index, so concurrent searches do not race on it."""
    import faiss

    inner = faiss.downcast_index(index.index) if hasattr(index, "index") else None
    if not isinstance(inner, faiss.IndexIVF):
        return index.search(query, k)
    nprobe = min(inner.nlist, inner.nprobe * -(-k // RECALL_K))
    while True:
        params: Any = faiss.SearchParametersIVF()
        params.nprobe = nprobe
        scores, rows = index.search(query, k, params=params)
        if int((rows[0] >= 0).sum()) >= k or nprobe >= inner.nlist:
            return scores, rows
        nprobe = min(2 * nprobe, inner.nlist)


def stored_vectors(index: Any) -> np.ndarray | None:
    """``[ntotal, d]`` raw vectors of a flat or IVF-Flat id-mapped index, in insertion order
    (a view for flat, a copy for IVF); None for another type. HNSW-Flat (what stores above 10k
    passages got before IVF) is read too, so their ``verify`` still passes."""
    import faiss

    inner = _vector_holder(index)
    if inner is None:
        return None
    if isinstance(inner, faiss.IndexIVFFlat):
        inner.make_direct_map()
        return inner.reconstruct_n(0, inner.ntotal)
    return faiss.rev_swig_ptr(inner.get_xb(), index.ntotal * index.d).reshape(index.ntotal, index.d)


def _vector_holder(index: Any) -> Any | None:
    """The FAISS index that holds an id-mapped ``index``'s raw vectors: its flat or IVF-Flat
    index (an HNSW-Flat's storage); None for another type."""
    import faiss

    inner: Any = faiss.downcast_index(index.index)
    if isinstance(inner, faiss.IndexHNSW):
        inner = faiss.downcast_index(inner.storage)
    return inner if isinstance(inner, (faiss.IndexIVFFlat, faiss.IndexFlat)) else None


# Rows of raw vectors the exact scan reads at a time (recall at build time): 16k x 384 x 4 bytes
# = 25 MB, and the 200 queries' scores over them 13 MB, so measuring recall never holds a second
# copy of a large index's vectors.
SCAN_CHUNK = 16384


def _stored_chunks(index: Any, chunk: int = SCAN_CHUNK) -> Iterator[np.ndarray]:
    """An index's raw vectors in insertion order, ``chunk`` rows at a time: views of a flat
    index's storage, copies of one chunk at a time for IVF-Flat (:func:`stored_vectors` for
    the other types, whole)."""
    import faiss

    inner = _vector_holder(index)
    if isinstance(inner, faiss.IndexIVFFlat):
        inner.make_direct_map()
        for start in range(0, inner.ntotal, chunk):
            yield inner.reconstruct_n(start, min(chunk, inner.ntotal - start))
        return
    vectors = stored_vectors(index)
    if vectors is not None:
        for start in range(0, len(vectors), chunk):
            yield vectors[start : start + chunk]


def _midpoint_queries(index: Any, queries: int, seed: int) -> np.ndarray:
    """Seeded queries halfway between two stored vectors (near several passages, equal to none)."""
    rng = np.random.default_rng(seed)
    pairs = rng.integers(0, index.ntotal, size=(queries, 2))
    wanted = np.unique(pairs)
    rows = np.empty((len(wanted), index.d), dtype=np.float32)
    start = 0
    for vectors in _stored_chunks(index):
        at = np.flatnonzero((wanted >= start) & (wanted < start + len(vectors)))
        rows[at] = vectors[wanted[at] - start]
        start += len(vectors)
    q = rows[np.searchsorted(wanted, pairs[:, 0])] + rows[np.searchsorted(wanted, pairs[:, 1])]
    q /= np.maximum(np.linalg.norm(q, axis=1, keepdims=True), 1e-12)
    return np.ascontiguousarray(q, dtype=np.float32)


# Scores this close to a query's k-th exact score tie with it (float32 inner products of unit
# vectors computed in another order differ by ~1e-7; a midpoint query ties its two rows exactly).
TIE = 1e-5


def _exact_truth(index: Any, k: int, queries: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """Seeded midpoint queries, the row ids of their exact top-``k`` and each query's k-th score:
    an inner-product scan of the index's own stored vectors, one chunk at a time (a flat copy of
    every vector, as this once made, doubled a 10M-passage build's memory); None for an index
    with fewer than ``k`` vectors or of a type whose vectors cannot be read."""
    import faiss

    if index.ntotal < max(k, 2) or _vector_holder(index) is None:
        return None
    q = _midpoint_queries(index, queries, seed)
    best_scores = np.full((len(q), k), -np.inf, dtype=np.float32)
    best_rows = np.zeros((len(q), k), dtype=np.int64)
    start = 0
    for vectors in _stored_chunks(index):
        scores = q @ vectors.T
        rows = np.broadcast_to(np.arange(start, start + len(vectors)), scores.shape)
        if scores.shape[1] > k:  # the chunk's own top-k first (equal scores at the cut: any of them)
            top = np.argpartition(-scores, k - 1, axis=1)[:, :k]
            scores, rows = np.take_along_axis(scores, top, 1), top + start
        scores, rows = np.concatenate([best_scores, scores], 1), np.concatenate([best_rows, rows], 1)
        order = np.lexsort((rows, -scores), axis=1)[:, :k]  # highest score first, then earlier row
        best_scores, best_rows = np.take_along_axis(scores, order, 1), np.take_along_axis(rows, order, 1)
        start += len(vectors)
    return q, faiss.vector_to_array(index.id_map)[best_rows], best_scores[:, -1]


def _recall(index: Any, q: np.ndarray, truth: np.ndarray, kth: np.ndarray) -> float:
    """Fraction of the exact top-k found; a found row that ties the k-th exact score (:data:`TIE`)
    counts too, since which of equal rows is "the" top-k is arbitrary (a midpoint query ties the
    two rows it lies between)."""
    scores, found = index.search(q, truth.shape[1])
    hits = 0
    for t, f, s, cut in zip(truth, found, scores, kth, strict=True):
        exact = set(t.tolist())
        hits += sum(
            1
            for row, score in zip(f.tolist(), s.tolist(), strict=True)
            if row in exact or (row >= 0 and score >= cut - TIE)
        )
    return hits / truth.size


def recall_at_k(index: Any, k: int = RECALL_K, queries: int = RECALL_QUERIES, seed: int = 0) -> float | None:
    """Mean fraction of the exact top-``k`` that ``index`` returns, over seeded midpoint queries.

    The exact answer comes from a flat scan of the index's own stored vectors, so this measures
    the approximation alone. None for an index with fewer than ``k`` vectors.
    """
    found = _exact_truth(index, k, queries, seed)
    return None if found is None else _recall(index, *found)


def tune_nprobe(index: Any, target: float = RECALL_TARGET) -> tuple[int, float | None]:
    """Set an IVF index's ``nprobe`` to the smallest power of two whose recall@10 reaches
    ``target`` (or to every cell); returns ``(nprobe, recall)``. Flat: ``(0, None)``, unchanged.
    The exact neighbours are computed once and every candidate is scored against them."""
    import faiss

    inner: Any = faiss.downcast_index(index.index)
    if not isinstance(inner, faiss.IndexIVF):
        return 0, None
    found = _exact_truth(index, RECALL_K, RECALL_QUERIES, 0)
    nprobe = 1
    while True:
        inner.nprobe = nprobe
        recall = None if found is None else _recall(index, *found)
        if recall is None or recall >= target or nprobe >= inner.nlist:
            return nprobe, recall
        nprobe = min(2 * nprobe, inner.nlist)
