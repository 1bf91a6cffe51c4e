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


def test_ties_come_back_in_row_order():
    """FAISS returns equal scores latest row first; the first retrieved passage is placed next to
    the prefix (and read from its base copy), so ties go to the earlier row, as exact_top_k does."""
    index = VectorIndex(np.arange(1, 6, dtype=np.int64), np.tile(np.eye(4, dtype=np.float32)[:1], (5, 1)))
    assert [row for row, _ in index.search(np.eye(4, dtype=np.float32)[0], 3)] == [1, 2, 3]
    assert [row for row, _ in index.search(np.eye(4, dtype=np.float32)[0], 5)] == [1, 2, 3, 4, 5]


def test_an_inverted_file_returns_k_hits_beyond_the_k_its_nprobe_was_tuned_for():
    """An IVF index's nprobe is tuned for recall@10: cells that held fewer than k vectors between
    them gave fewer hits than asked (the padding -1s were dropped), 40 of 100 in the audit's
    6,000-passage store. Searching more cells for a larger k (and more until k come back) gives
    k hits, with the recall of an exact scan where every cell is read."""
    from ragcompress.retrieval import exact_top_k
    from ragcompress.store import ann

    rng = np.random.default_rng(0)
    centres = rng.standard_normal((32, 16))
    vectors = (centres[rng.integers(0, 32, 2000)] + 0.1 * rng.standard_normal((2000, 16))).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    index = VectorIndex.__new__(VectorIndex)
    index.index = ann.new_index(16, {"type": "ivf", "nlist": 32, "nprobe": 1}, vectors)
    index.index.add_with_ids(vectors, np.arange(2000, dtype=np.int64))
    index.count = 2000
    for k in (10, 100, 400):
        hits = index.search(vectors[7], k)
        assert len(hits) == k and len({row for row, _ in hits}) == k
    everything = index.search(vectors[7], 2000)
    assert [row for row, _ in everything][:50] == exact_top_k(vectors[7:8], vectors, 50)[0].tolist()


def test_a_search_for_no_passages_is_refused_by_name(tmp_path, tiny_lm):
    from test_store_reliability import _index, _texts, _write

    from ragcompress.errors import InputError
    from ragcompress.store import KVStore

    _index(tiny_lm, _write(tmp_path / "passages.jsonl", _texts(3)), tmp_path / "store")
    with KVStore.open(tmp_path / "store") as kv:
        for k in (0, -1, 2.0):
            with pytest.raises(InputError, match=r"k \(top_k\) must be a whole number of passages, at least 1"):
                kv.search(np.ones(kv.index().index.d, dtype=np.float32), k)  # type: ignore[arg-type]


def test_threads_sharing_an_embedder_load_it_once_and_it_pickles_by_name(monkeypatch):
    """Its first use had no lock: four threads of a server loaded the model four times."""
    import pickle
    import threading
    import time

    import sentence_transformers

    from ragcompress.retrieval import Embedder

    loads: list[str] = []

    def slow_model(path, device, **options):
        loads.append(path)
        time.sleep(0.2)
        return object()

    monkeypatch.setattr(sentence_transformers, "SentenceTransformer", slow_model)
    embedder = Embedder()
    threads = [threading.Thread(target=embedder._load) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(loads) == 1
    copy = pickle.loads(pickle.dumps(embedder))
    assert copy.name == embedder.name and copy._model is None


def test_the_embedder_counts_the_texts_longer_than_its_window():
    """MiniLM reads 256 word pieces (``[CLS]`` and ``[SEP]`` among them) and embeds a longer
    passage's start only; indexing counts such passages with the model's own tokenizer, and an
    embedder without a window (the stand-ins) is not checked."""
    from ragcompress.retrieval import Embedder, past_window
    from ragcompress.testing import HashEmbedder

    embedder = Embedder()
    assert embedder.window == 256
    fits, past = "x " * 254, "x " * 255  # 256 and 257 word pieces
    assert past_window(embedder, [fits, past, "short", "word " * 400]) == 2
    assert past_window(embedder, [fits]) == past_window(embedder, []) == 0
    assert past_window(HashEmbedder(), [past]) == 0


def test_an_embedder_folder_naming_a_custom_module_class_is_refused_before_it_loads(tmp_path):
    """A store's manifest names its embedder directory; sentence-transformers before 6.0 imported
    a ``.py`` class named in that directory's ``modules.json`` (code from someone else's store ran
    on opening it), 6.x refuses with a traceback. Refused by name here, and nothing runs."""
    from ragcompress.errors import ModelError
    from ragcompress.retrieval import Embedder

    folder = tmp_path / "emb"
    folder.mkdir()
    ran = tmp_path / "ran"
    (folder / "evil.py").write_text(f"open({str(ran)!r}, 'w').write('ran')\nclass Evil: pass\n")
    (folder / "modules.json").write_text(
        '[{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},'
        ' {"idx": 1, "name": "1", "path": "1_Pooling", "type": "evil.Evil"}]'
    )
    with pytest.raises(ModelError, match=r"outside sentence-transformers \(\['evil.Evil'\]\)"):
        Embedder(str(folder)).embed(["a question"])
    assert not ran.exists()


def test_an_embedder_folder_that_is_not_a_model_is_refused_in_one_line(tmp_path):
    from ragcompress.errors import ModelError
    from ragcompress.retrieval import Embedder

    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ModelError, match="did not load"):
        Embedder(str(tmp_path)).embed(["a question"])
