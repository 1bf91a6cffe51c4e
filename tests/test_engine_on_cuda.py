"""The whole query path with the model on a CUDA GPU: `auto` (the dense path), the fused kernel,
selective recompute (the `faithful` preset's path), the near-tie fallback (over an int4 store
and over an int8 one, whose exact first passage it reuses), the batch `serve` decodes and full
prefill answer there as they do on the CPU; and indexing there (the encoder's forwards, the scorers'
probes, both kinds of adaptor) stores what it stores on the CPU (benchmarks/gpu_check.sh runs the
``gpu``-marked tests). The model is a tiny random llama with a character tokenizer, so the check
needs no packaged model: only torch, transformers, tokenizers and faiss on the GPU machine. The
same harness runs here on the CPU, where the paths must agree too."""

from __future__ import annotations

import pytest
import torch

from ragcompress.runtime.options import AnswerOptions
from ragcompress.runtime.recompute import RecomputeConfig

QUESTIONS = ["Where was the treaty signed?", "Who founded the city?", "What is the main export?"]
TOP_K = 3


@pytest.fixture(scope="module")
def char_store(tmp_path_factory):
    """A tiny llama (head_dim 16, GQA 2, one token per character) and an int4 store of eight
    bundled passages, both built on the CPU as indexing is."""
    from ragcompress.data import SAMPLE_PASSAGES
    from ragcompress.indexing import IndexConfig, index
    from ragcompress.models import load_model
    from ragcompress.testing import HashEmbedder, make_tiny_model

    root = tmp_path_factory.mktemp("cuda-engine")
    model_dir = make_tiny_model("llama", root / "model", tokenizer="chars")
    passages = root / "passages.jsonl"
    passages.write_text("\n".join(SAMPLE_PASSAGES.read_text().splitlines()[:8]) + "\n")
    config = IndexConfig(quant="int4", group_size=16, embedder=HashEmbedder().name)
    index(passages, root / "store", lm=load_model(str(model_dir)), embedder=HashEmbedder(), config=config)
    return str(model_dir), str(root / "store")


@pytest.fixture(scope="module")
def char_store_int8(char_store, tmp_path_factory):
    """The same model and passages in an int8 store: its passages are exact after the prefix, so
    the near-tie fallback reuses the first one (``runtime.prepare.fallback_prefill``)."""
    from ragcompress.data import SAMPLE_PASSAGES
    from ragcompress.indexing import IndexConfig, index
    from ragcompress.models import load_model
    from ragcompress.testing import HashEmbedder

    model_dir, _ = char_store
    root = tmp_path_factory.mktemp("cuda-engine-int8")
    passages = root / "passages.jsonl"
    passages.write_text("\n".join(SAMPLE_PASSAGES.read_text().splitlines()[:8]) + "\n")
    config = IndexConfig(quant="int8", embedder=HashEmbedder().name)
    index(passages, root / "store", lm=load_model(model_dir), embedder=HashEmbedder(), config=config)
    return model_dir, str(root / "store")


def answers(model_dir: str, store: str, device: str, backends: list[str]) -> dict[str, list[tuple[str, list[int]]]]:
    """Per backend, ``recompute`` (a quarter of the passage tokens, mixed selection),
    ``fallback`` (a margin no first token reaches: every question falls back), ``batch`` (all
    questions decoded together, as ``serve`` does) and ``full`` prefill: ``(path that ran, greedy
    token ids)`` per question."""
    from ragcompress.models import load_model
    from ragcompress.runtime.batch import BatchStream
    from ragcompress.runtime.engine import Engine
    from ragcompress.store import KVStore
    from ragcompress.testing import HashEmbedder

    lm = load_model(model_dir, device=device)
    out: dict[str, list[tuple[str, list[int]]]] = {
        name: [] for name in [*backends, "recompute", "fallback", "batch", "full"]
    }
    recompute = RecomputeConfig(ratio=0.25, selection="mixed")
    with Engine(KVStore.open(store), lm, HashEmbedder(), AnswerOptions(max_new_tokens=8)) as engine:
        for question in QUESTIONS:
            entries = engine.retrieve(question, TOP_K)
            for backend in backends:
                answer = engine.answer_cached(question, entries, engine.options.replace(backend=backend))
                out[backend].append((answer.backend, answer.token_ids))
            answer = engine.answer_cached(question, entries, engine.options.replace(recompute=recompute))
            out["recompute"].append((answer.backend, answer.token_ids))
            answer = engine.answer_cached(question, entries, engine.options.replace(fallback_margin=0.999))
            out["fallback"].append((answer.backend, answer.token_ids))
            full = engine.answer_full(question, entries)
            out["full"].append((full.backend, full.token_ids))
        prepared = [engine.prepare(q, engine.retrieve(q, TOP_K)) for q in QUESTIONS]
        batched: list[list[int]] = [[] for _ in QUESTIONS]
        for i, token in BatchStream(lm.model, prepared, [8] * len(QUESTIONS), engine.stop_ids):
            if token is not None:
                batched[i].append(token)
        out["batch"] = [("dense", ids) for ids in batched]
    return out


def test_a_character_tokenizer_model_answers_alike_through_every_cpu_path(char_store):
    """The harness the CUDA test uses, on the CPU: ``auto`` is the dense path, and the packed
    PyTorch path gives its tokens."""
    out = answers(*char_store, "cpu", ["auto", "dense", "packed-torch"])
    assert all(ids for _, ids in out["dense"])
    assert [path for path, _ in out["auto"]] == ["dense"] * len(QUESTIONS)
    assert out["auto"] == out["dense"]
    assert [ids for _, ids in out["packed-torch"]] == [ids for _, ids in out["dense"]]
    assert out["batch"] == out["dense"]
    assert all(ids for _, ids in out["recompute"])
    assert [path for path, _ in out["fallback"]] == ["fallback"] * len(QUESTIONS)
    assert [ids for _, ids in out["fallback"]] == [ids for _, ids in out["full"]]  # int4: after the prefix


def test_the_int8_harness_falls_back_through_its_first_passage_on_the_cpu(char_store_int8):
    """The int8 store the CUDA test also reads: every question falls back, reusing the exact
    first passage, and answers."""
    out = answers(*char_store_int8, "cpu", ["dense"])
    assert [path for path, _ in out["fallback"]] == ["fallback"] * len(QUESTIONS)
    assert all(ids for _, ids in out["fallback"])


@pytest.mark.gpu
def test_engine_on_cuda_answers_as_on_the_cpu(char_store, char_store_int8):
    """With the model on CUDA: ``auto`` answers through the dense path, the fused kernel
    (``packed-triton``) gives the tokens the packed PyTorch path gives on the CPU, and the dense
    path, selective recompute, the near-tie fallback (int4 and int8 stores), the batched decode
    and full prefill give the CPU's tokens (fp32 weights; greedy)."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    pytest.importorskip("triton")
    cpu = answers(*char_store, "cpu", ["dense", "packed-torch"])
    cuda = answers(*char_store, "cuda", ["auto", "dense", "packed-triton"])
    assert [path for path, _ in cuda["auto"]] == ["dense"] * len(QUESTIONS)
    assert [path for path, _ in cuda["packed-triton"]] == ["packed-triton"] * len(QUESTIONS)
    assert cuda["dense"] == cpu["dense"] and cuda["full"] == cpu["full"]
    assert cuda["recompute"] == cpu["recompute"] and cuda["batch"] == cpu["batch"]
    assert [ids for _, ids in cuda["packed-triton"]] == [ids for _, ids in cpu["packed-torch"]]
    assert cuda["fallback"] == cpu["fallback"]
    assert (
        answers(*char_store_int8, "cuda", ["dense"])["fallback"]
        == answers(*char_store_int8, "cpu", ["dense"])["fallback"]
    )


# One store per part of indexing that runs the model: the encoder's forward (plain), the probes
# of KVzip, Expected Attention and SnapKV, and the two kinds of adaptor (folded into the weights;
# correcting the cache from captured projection inputs).
INDEXING = {
    "plain": {},
    "kvzip": {"method": "global:kvzip", "ratio": 0.5, "keep_first": 1, "keep_last": 0},
    "expected-attention": {"method": "expected-attention", "ratio": 0.5},
    "snapkv": {"method": "snapkv", "ratio": 0.5},
    "forward-adaptor": {"adaptor": "forward"},
    "cache-adaptor": {"adaptor": "cache"},
}


def indexed_caches(model_dir: str, root, device: str) -> dict[str, dict[str, object]]:
    """Per :data:`INDEXING` setting, the stored caches (``PassageKV``, read back on the CPU) of
    four bundled passages indexed with the model on ``device``."""
    from ragcompress.data import SAMPLE_PASSAGES
    from ragcompress.indexing import IndexConfig, index
    from ragcompress.models import load_model
    from ragcompress.store import KVStore
    from ragcompress.testing import HashEmbedder, noisy_adaptor

    lm = load_model(model_dir, device=device)
    passages = root / "passages.jsonl"
    passages.write_text("\n".join(SAMPLE_PASSAGES.read_text().splitlines()[:4]) + "\n")
    caches = {}
    for name, settings in INDEXING.items():
        settings = dict(settings)
        if "adaptor" in settings:  # the same factors on both devices (seeded), saved on the CPU
            kind = settings["adaptor"]
            settings["adaptor"] = str(noisy_adaptor(lm, 2, kind=kind).save(root / f"adaptor-{device}-{kind}"))
        config = IndexConfig(embedder=HashEmbedder().name, **settings)
        store = root / f"{device}-{name}"
        index(passages, store, lm=lm, embedder=HashEmbedder(), config=config, batch_size=2)
        with KVStore.open(store) as opened:
            caches[name] = {entry.id: opened.load_kv(entry) for entry in opened.catalogue.entries()}
    return caches


def test_every_indexing_setting_of_the_device_test_stores_its_own_caches(char_store, tmp_path):
    """The harness of the CUDA indexing test, on the CPU: each setting changes what is stored
    (eviction keeps half the rows, an adaptor moves keys and values), so agreeing with the CPU on
    each of them is a check of that part of indexing."""
    caches = indexed_caches(char_store[0], tmp_path, "cpu")
    plain = caches["plain"]
    assert len(plain) == 4
    for name in ("kvzip", "expected-attention", "snapkv"):
        assert all(kv.kept_tokens < plain[pid].kept_tokens for pid, kv in caches[name].items()), name
    for name in ("forward-adaptor", "cache-adaptor"):
        for pid, kv in caches[name].items():
            assert kv.kept_tokens == plain[pid].kept_tokens and not torch.equal(kv.keys, plain[pid].keys), name


@pytest.mark.gpu
def test_indexing_on_cuda_stores_what_the_cpu_stores(char_store, tmp_path):
    """With the model on CUDA every part of indexing that runs it (the encoder, the scorers'
    probes, both kinds of adaptor) stores the CPU's caches: the same kept rows, keys and values
    within fp32 rounding (the caches are stored unquantized, so no rounding step hides a
    difference)."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    cpu = indexed_caches(char_store[0], tmp_path, "cpu")
    cuda = indexed_caches(char_store[0], tmp_path, "cuda")
    for name in INDEXING:
        assert cuda[name].keys() == cpu[name].keys(), name
        for pid, want in cpu[name].items():
            got = cuda[name][pid]
            assert torch.equal(got.positions, want.positions) and torch.equal(got.lengths, want.lengths), (name, pid)
            assert torch.allclose(got.keys, want.keys, atol=1e-4, rtol=1e-4), (name, pid)
            assert torch.allclose(got.values, want.values, atol=1e-4, rtol=1e-4), (name, pid)
