"""The FAISS index over passage vectors: empty, smaller than ``k``, and queried by another embedder."""

from __future__ import annotations

import numpy as np
import pytest

from ragcompress.errors import StoreMismatchError
from ragcompress.retrieval import VectorIndex


def _index(n: int, dim: int = 4) -> VectorIndex:
    vectors = np.eye(dim, dtype=np.float32)[:n]
    return VectorIndex(np.arange(10, 10 + n, dtype=np.int64), vectors)


def test_empty_and_small_indexes_return_what_they_hold():
    empty = VectorIndex(np.zeros(0, dtype=np.int64), np.zeros((0, 0), dtype=np.float32))
    assert empty.search(np.ones(4, dtype=np.float32), 3) == []
    one = _index(1)
    assert one.search(np.eye(4, dtype=np.float32)[0], 5) == [(10, 1.0)]
    assert [row for row, _ in _index(3).search(np.eye(4, dtype=np.float32)[2], 8)][0] == 12


def test_a_query_from_another_embedder_is_refused_by_name():
    """A question embedded by another embedder than the store's (another dimension) failed with
    a bare ``AssertionError`` from FAISS."""
    with pytest.raises(StoreMismatchError, match="8 dimensions, the store's index 4.*another embedder"):
        _index(2).search(np.ones(8, dtype=np.float32), 1)


def test_a_relative_embedder_folder_is_recorded_by_its_absolute_path(tmp_path, monkeypatch):
    """A store records its embedder; a relative folder would name another folder (or none) when
    the store is read from another working directory."""
    from ragcompress.indexing import IndexConfig
    from ragcompress.retrieval import DEFAULT_EMBEDDER, Embedder, embedder_name

    (tmp_path / "my-embedder").mkdir()
    monkeypatch.chdir(tmp_path)
    absolute = str(tmp_path / "my-embedder")
    assert IndexConfig(embedder="my-embedder").embedder == absolute
    assert Embedder("./my-embedder").name == absolute == embedder_name(absolute)
    assert Embedder().name == DEFAULT_EMBEDDER and embedder_name("not-a-folder") == "not-a-folder"


def test_exact_top_k_ranks_by_inner_product_and_breaks_ties_by_order():
    from ragcompress.retrieval import exact_top_k

    vectors = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.6, 0.8]])
    queries = np.array([[1.0, 0.0], [0.0, 1.0]])
    assert exact_top_k(queries, vectors, 3).tolist() == [[0, 2, 3], [1, 3, 0]]
    assert exact_top_k(queries, vectors, 10).shape == (2, 4)  # fewer vectors than k: all of them
