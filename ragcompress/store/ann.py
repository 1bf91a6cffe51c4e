"""Which FAISS index a store gets, chosen by its size, and how well the approximate one recalls.

Below :data:`FLAT_MAX` passages the index is exact (``IndexFlatIP``): a scan of 10k 384-dim
vectors is ~15 MB, about a millisecond, and no approximation is worth its recall loss. Above it
the index is HNSW (``IndexHNSWFlat``, inner product): its search cost grows with log N, not N,
so retrieval at 100k passages costs about what it costs at 10k. HNSW needs no training (IVF
would need a k-means pass and a choice of ``nprobe`` per corpus) and keeps the raw vectors in a
flat storage, which ``verify`` compares with the catalogue and which gives exact neighbours to
measure recall against.

Both are wrapped in ``IndexIDMap2`` so search returns catalogue row numbers. The chosen type, its
parameters and the recall@10 measured when it was built are recorded in the manifest's ``index``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

# Exact search up to this many vectors; HNSW above (module doc).
FLAT_MAX = 10_000
# HNSW graph degree, build and search beam widths: FAISS's usual operating point for ~0.95+
# recall@10 on sentence embeddings at 1e5..1e6 vectors. efSearch is stored in the index file.
HNSW_M = 32
HNSW_EF_CONSTRUCTION = 80
HNSW_EF_SEARCH = 64
# Recall is measured at build time on this many seeded queries (midpoints of two stored vectors,
# which are near several passages but equal to none).
RECALL_QUERIES = 200
RECALL_K = 10


def index_params(count: int, flat_max: int | None = None) -> dict[str, Any]:
    """The index type and parameters for a store of ``count`` passages."""
    if count <= (FLAT_MAX if flat_max is None else flat_max):
        return {"type": "flat", "metric": "inner_product"}
    return {
        "type": "hnsw",
        "metric": "inner_product",
        "M": HNSW_M,
        "ef_construction": HNSW_EF_CONSTRUCTION,
        "ef_search": HNSW_EF_SEARCH,
    }


def new_index(dim: int, params: dict[str, Any]) -> Any:
    """An empty id-mapped FAISS index of the type ``params`` names."""
    import faiss

    if params["type"] == "flat":
        return faiss.IndexIDMap2(faiss.IndexFlatIP(dim))
    if params["type"] == "hnsw":
        hnsw = faiss.IndexHNSWFlat(dim, int(params["M"]), faiss.METRIC_INNER_PRODUCT)
        hnsw.hnsw.efConstruction = int(params["ef_construction"])
        hnsw.hnsw.efSearch = int(params["ef_search"])
        return faiss.IndexIDMap2(hnsw)
    raise ValueError(f"unknown index type {params['type']!r}")


def stored_vectors(index: Any) -> np.ndarray | None:
    """``[ntotal, d]`` view of the raw vectors of a flat or HNSW id-mapped index (None otherwise)."""
    import faiss

    inner: Any = faiss.downcast_index(index.index)
    if isinstance(inner, faiss.IndexHNSW):
        inner = faiss.downcast_index(inner.storage)
    if not isinstance(inner, faiss.IndexFlat):
        return None
    return faiss.rev_swig_ptr(inner.get_xb(), index.ntotal * index.d).reshape(index.ntotal, index.d)


def recall_at_k(index: Any, k: int = RECALL_K, queries: int = RECALL_QUERIES, seed: int = 0) -> float | None:
    """Mean fraction of the exact top-``k`` that ``index`` returns, over seeded midpoint queries.

    The exact answer comes from a flat scan of the index's own stored vectors, so this measures
    the approximation alone. None for an index with fewer than ``k`` vectors.
    """
    import faiss

    vectors = stored_vectors(index)
    if vectors is None or index.ntotal < max(k, 2):
        return None
    rng = np.random.default_rng(seed)
    pairs = rng.integers(0, index.ntotal, size=(queries, 2))
    q = vectors[pairs[:, 0]] + vectors[pairs[:, 1]]
    q /= np.maximum(np.linalg.norm(q, axis=1, keepdims=True), 1e-12)
    q = np.ascontiguousarray(q, dtype=np.float32)
    exact = faiss.IndexFlatIP(index.d)
    exact.add(vectors)
    _, truth = exact.search(q, k)  # positions in the stored order
    ids = faiss.vector_to_array(index.id_map)
    _, found = index.search(q, k)
    hits = sum(len(set(ids[t].tolist()) & set(f.tolist())) for t, f in zip(truth, found, strict=True))
    return hits / (k * queries)
