"""Shared fixtures: tiny random models (no downloads), small passage files and a small store."""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def pytest_configure(config):
    """Under pytest-xdist (``make test`` runs ``-n auto``) each worker, and every process a test
    starts (notebook kernels, indexing workers, Ray, the server), gets its share of the cores:
    OpenMP threads that outnumber the cores spin at their barriers, and a notebook run beside
    another worker took five times as long."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0"))
    if workers > 1:
        threads = str(max(1, (os.cpu_count() or 1) // workers))
        os.environ["OMP_NUM_THREADS"] = threads  # inherited by the processes tests start
        os.environ["MKL_NUM_THREADS"] = threads
        import torch

        torch.set_num_threads(int(threads))


SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
SQUAD = SHARED_DATA / "squad-dev"


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """Factory: path of a tiny random model of the given architecture (built once per session)."""
    from ragcompress.testing import make_tiny_model

    root = tmp_path_factory.mktemp("tiny-models")

    def make(arch: str = "llama", **kwargs) -> Path:
        name = arch + "".join(f"-{k}{v}" for k, v in sorted(kwargs.items()))
        return make_tiny_model(arch, root / name, **kwargs)

    return make


@pytest.fixture(scope="session")
def overflowing_model_dir(tiny_model_dir, tmp_path_factory):
    """Factory: a tiny llama whose input embedding of ``word`` (one SmolLM2 token) is 1e5. Loaded
    in float16 (largest value 65504) that row is inf, so the cache of any text holding the word
    is NaN there, and finite in bfloat16 and float32."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root = tmp_path_factory.mktemp("overflowing-models")

    def make(word: str) -> Path:
        directory = root / word.strip()
        if not (directory / "config.json").is_file():
            base = tiny_model_dir("llama")
            tokenizer = AutoTokenizer.from_pretrained(base)
            (token,) = tokenizer.encode(word, add_special_tokens=False)
            model = AutoModelForCausalLM.from_pretrained(base)
            with torch.no_grad():
                model.model.embed_tokens.weight[token] = 1e5
            model.save_pretrained(directory)
            tokenizer.save_pretrained(directory)
        return directory

    return make


@pytest.fixture(scope="session")
def tiny_lm(tiny_model_dir):
    from ragcompress.models import load_model

    return load_model(str(tiny_model_dir("llama")))


@pytest.fixture(scope="session")
def embedder():
    from ragcompress.retrieval import Embedder

    return Embedder()


@pytest.fixture(scope="module")
def built(tmp_path_factory, tiny_lm) -> Path:
    """A store of ``test_store_reliability``'s passages, indexed once per module that asks for it
    (modules with a store of their own define ``built`` or ``store`` themselves)."""
    from test_store_reliability import N_PASSAGES, _index, _texts, _write

    store = tmp_path_factory.mktemp("built") / "store"
    _index(tiny_lm, _write(store.parent / "passages.jsonl", _texts(N_PASSAGES)), store)
    return store


@pytest.fixture
def store(built, tmp_path) -> Path:
    """A fresh copy of :func:`built` at ``tmp_path/store`` for a test to change."""
    copy = tmp_path / "store"
    shutil.copytree(built, copy)
    return copy


@pytest.fixture(scope="module")
def interpreter():
    """A worker process whose Triton was imported with ``TRITON_INTERPRET=1``, one per module that
    asks for it: Triton decides at import whether kernels are interpreted, so the variable must be
    set before the worker imports it, and this process never runs under the interpreter."""
    pytest.importorskip("triton")
    saved = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        pool = multiprocessing.get_context("spawn").Pool(1)
    finally:
        if saved is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = saved
    yield pool
    pool.terminate()
    pool.join()


@pytest.fixture
def compiled_triton():
    """Skips a test of the compiled Triton kernels where they cannot run: no CUDA GPU, no Triton,
    or Triton imported under ``TRITON_INTERPRET=1`` (it decides at import, so these tests would run
    the interpreter instead)."""
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    pytest.importorskip("triton")
    from ragcompress_kernels.quantized_attention import _interpreted

    if _interpreted():
        pytest.skip("triton was imported under TRITON_INTERPRET=1; this test runs the compiled kernel")


class FailingAtCall:
    """An embedder that embeds as ``embedder`` does (its vectors and recorded name) and fails on its
    ``n``-th call: a one-process run that stops in the middle of its input, after ``n - 1`` batches."""

    def __init__(self, embedder, n: int) -> None:
        self.embedder, self.n, self.calls = embedder, n, 0
        self.name = embedder.name

    def embed(self, texts):
        self.calls += 1
        if self.calls == self.n:
            raise RuntimeError("embedder failed mid-run")
        return self.embedder.embed(texts)


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.fixture
def passages_file(tmp_path) -> Path:
    """Eight real passages from the bundled sample."""
    from ragcompress.data import SAMPLE_PASSAGES

    lines = SAMPLE_PASSAGES.read_text().splitlines()[:8]
    path = tmp_path / "passages.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def squad_available() -> bool:
    return (SQUAD / "passages.jsonl").is_file()


def require_squad() -> None:
    """Skip a real-data test when ``../shared/data/squad-dev`` is absent (a clone elsewhere); with
    ``RAGCOMPRESS_REQUIRE_REAL_DATA=1`` (set by ``.ci/run``) fail instead, so a green CI run
    cannot hide that the real-model tests did not run."""
    if squad_available():
        return
    message = f"{SQUAD} is not present"
    if os.environ.get("RAGCOMPRESS_REQUIRE_REAL_DATA") == "1":
        pytest.fail(f"{message}, and RAGCOMPRESS_REQUIRE_REAL_DATA=1 requires the real-data tests to run")
    pytest.skip(message)


def as_another_uid() -> list[str] | None:
    """The command prefix that runs a process as uid 65534 (``setpriv``, as root), or None."""
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        return None
    return ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
