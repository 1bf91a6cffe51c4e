"""The latent kernel (latent @ basis, RoPE, attention) against an fp32 reference built from the
store codec, over ragged shapes; and the packed strategy over a low-rank store.

Kernel cases run in one worker process started with ``TRITON_INTERPRET=1`` (as in
``test_kernels.py``: Triton decides at import whether kernels are interpreted).
"""

from __future__ import annotations

import pytest
import torch

from ragcompress.kv import PassageKV
from ragcompress.kv.lowrank import LowRankBasis, RankSpec, fit_basis
from ragcompress.kv.quant import QuantConfig
from ragcompress.runtime.options import AnswerOptions
from ragcompress.store import codec
from ragcompress.testing import PlainRotary

from attention_reference import evict_every_other_head, fp32_attention

TOL = {torch.float32: 2e-4, torch.float16: 2e-2}


def make_case(case: dict) -> tuple[list[bytes], LowRankBasis]:
    """Random passages of ``layers`` layers near a low-rank subspace, every other head evicting a
    ragged subset, stored as latents of a basis with key rank ``rk`` and value rank ``rv`` (``rv``
    None: keys only, values stored as quantized rows), values at ``value_scheme`` if given."""
    gen = torch.Generator().manual_seed(case["seed"])
    layers, heads, d = case["layers"], case["heads"], case["head_dim"]
    mix = torch.randn(layers, heads, 20, d, generator=gen)
    shift = torch.randn(layers, heads, 1, d, generator=gen)

    def rows(n: int) -> torch.Tensor:
        z = torch.randn(layers, heads, n, 20, generator=gen)
        return z @ mix + shift + 0.1 * torch.randn(layers, heads, n, d, generator=gen)

    calibration = [PassageKV.full(rows(40), rows(40)) for _ in range(4)]
    if case["rv"] is None:
        basis = fit_basis(calibration, RankSpec(rank=case["rk"], values=False))
    else:
        k_basis = fit_basis(calibration, RankSpec(rank=case["rk"]))
        v_basis = fit_basis(calibration, RankSpec(rank=case["rv"]))
        basis = LowRankBasis(
            {"k": k_basis.bases["k"], "v": v_basis.bases["v"]},
            {"k": k_basis.means["k"], "v": v_basis.means["v"]},
            {"k": k_basis.energy["k"], "v": v_basis.energy["v"]},
        )
    blobs = []
    for n in case["lengths"]:
        kv = evict_every_other_head(rows(n), rows(n), gen)
        blobs.append(codec.encode(kv, QuantConfig(case["scheme"], 32, case.get("value_scheme")), basis))
    return blobs, basis


def build(case: dict, device: str = "cpu"):
    from ragcompress.runtime.latent_packed import LatentPackedSegments

    blobs, basis = make_case(case)
    rotary = PlainRotary(case["head_dim"], rotary_dim=case.get("rotary_dim"), paired=case.get("paired", False))
    prefix, q_len, group = case.get("prefix", 9), case["q_len"], case["group"]
    packed = LatentPackedSegments.from_segments([codec.parse(b) for b in blobs], basis, prefix, rotary, device)
    torch.manual_seed(case["seed"])
    dtype = case.get("dtype", torch.float32)
    batch, heads, d = case.get("batch", 1), case["heads"], case["head_dim"]
    query = torch.randn(batch, heads * group, q_len, d).to(dtype)
    key = torch.randn(batch, heads, prefix + q_len, d).to(dtype)
    value = torch.randn(batch, heads, prefix + q_len, d).to(dtype)
    layer = case["layers"] - 1
    expected = fp32_attention([codec.decode(b, basis=basis) for b in blobs], layer, rotary, prefix, query, key, value)
    return packed, layer, query, key, value, expected


def run_kernel_case(case: dict) -> dict:
    """Worker: max |kernel - fp32 reference| and |torch path - reference| for one case."""
    from ragcompress_kernels.latent_attention import latent_attention

    packed, layer, query, key, value, expected = build(case)
    seg = packed.layers[layer]
    errors = {}
    for splits in case.get("splits", [None]):  # None: the automatic split-K plan
        got = latent_attention(query, key, value, seg, backend="triton", num_splits=splits)
        assert got.dtype == query.dtype and got.shape == expected.shape
        errors[f"triton-{splits}"] = (got.float() - expected).abs().max().item()
    ref = latent_attention(query, key, value, seg, backend="torch")
    return {**errors, "torch": (ref.float() - expected).abs().max().item()}


CASES = {
    # ragged / non-power-of-two lengths and ranks (rk != rv, padded to a power of two in the kernel)
    "prefill-d64-g1-int8-r24-r40": dict(
        lengths=[37, 64, 5], layers=2, heads=2, head_dim=64, group=1, q_len=7, scheme="int8", rk=24, rv=40
    ),
    "decode-d64-g3-int4-r16-r32": dict(
        lengths=[37, 100, 3], layers=1, heads=2, head_dim=64, group=3, q_len=1, scheme="int4", rk=16, rv=32
    ),
    # split-K inside passages (row ranges), forced: one long passage and a keys-only projection
    "decode-d64-g2-int4-r16-one-passage-splits": dict(
        lengths=[150],
        layers=1,
        heads=2,
        head_dim=64,
        group=2,
        q_len=1,
        scheme="int4",
        rk=16,
        rv=None,
        splits=[None, 2, 3],
    ),
    "prefill-d32-g2-int8-r8-r16-splits": dict(
        lengths=[70, 40, 90],
        layers=1,
        heads=2,
        head_dim=32,
        group=2,
        q_len=6,
        scheme="int8",
        rk=8,
        rv=16,
        splits=[2, 3],
    ),
    "prefill-d32-g2-int2-r8-r16-batch2": dict(
        lengths=[50, 19], layers=2, heads=3, head_dim=32, group=2, q_len=4, scheme="int2", rk=8, rv=16, batch=2
    ),
    # keys-only projection (values as quantized rows), values at their own width: the smallest preset's shape
    "prefill-d64-g2-int4-r32-v-int2-rows": dict(
        lengths=[45, 70, 9],
        layers=2,
        heads=2,
        head_dim=64,
        group=2,
        q_len=5,
        scheme="int4",
        rk=32,
        rv=None,
        value_scheme="int2",
    ),
    "decode-d32-g1-int8-r8-v-rows": dict(
        lengths=[33, 6], layers=1, heads=3, head_dim=32, group=1, q_len=1, scheme="int8", rk=8, rv=None
    ),
    "prefill-d32-g2-int4-r8-r16-v-int2-latents": dict(
        lengths=[50, 19],
        layers=1,
        heads=2,
        head_dim=32,
        group=2,
        q_len=3,
        scheme="int4",
        rk=8,
        rv=16,
        value_scheme="int2",
    ),
    "decode-d64-g4-int4-fp16": dict(
        lengths=[60, 31],
        layers=1,
        heads=1,
        head_dim=64,
        group=4,
        q_len=1,
        scheme="int4",
        rk=32,
        rv=24,
        dtype=torch.float16,
    ),
    # other RoPE layouts: partial rotary (Phi-4-mini's 0.75), paired over half of each head (GLM)
    "prefill-d64-g2-int4-r16-r32-partial-rotary": dict(
        lengths=[37, 20], layers=1, heads=2, head_dim=64, group=2, q_len=4, scheme="int4", rk=16, rv=32, rotary_dim=48
    ),
    "decode-d64-g3-int8-r24-v-rows-paired-half": dict(
        lengths=[45, 9],
        layers=1,
        heads=2,
        head_dim=64,
        group=3,
        q_len=1,
        scheme="int8",
        rk=24,
        rv=None,
        rotary_dim=32,
        paired=True,
        splits=[None, 2],
    ),  # fmt: skip
}


@pytest.mark.parametrize("name", list(CASES))
def test_latent_kernel_matches_fp32_reference(interpreter, name):
    case = dict(CASES[name], seed=len(name))
    errors = interpreter.apply(run_kernel_case, (case,))
    tol = TOL[case.get("dtype", torch.float32)]
    assert all(err < tol for err in errors.values()), errors


def test_latent_layout_refuses_what_the_kernel_cannot_read():
    from ragcompress.runtime.latent_packed import LatentPackedSegments

    case = dict(CASES["decode-d64-g3-int4-r16-r32"], seed=0)
    blobs, basis = make_case(case)
    keys_only = fit_basis([codec.decode(blobs[0], basis=basis)], RankSpec(rank=16, values=False))
    blob = codec.encode(codec.decode(blobs[0], basis=basis), QuantConfig("int4"), keys_only)
    mixed = [codec.parse(blobs[0]), codec.parse(blob)]  # values latents in one segment, rows in the other
    with pytest.raises(ValueError, match="values alike"):
        LatentPackedSegments.from_segments(mixed, basis, 0, PlainRotary(64))
    fp16 = codec.encode(codec.decode(blobs[0], basis=basis), QuantConfig("fp16"), basis)
    with pytest.raises(ValueError, match="int8/int4/int2"):
        LatentPackedSegments.from_segments([codec.parse(fp16)], basis, 0, PlainRotary(64))


def test_latent_triton_refuses_rotary_tables_whose_partners_differ():
    """The latent kernel rotates keys by two dots too (tests/test_kernels.py says why): other
    tables are refused by the Triton backend and read by the torch path."""
    import dataclasses

    from ragcompress_kernels import latent_attention

    packed, layer, query, key, value, _ = build(dict(CASES["decode-d64-g3-int4-r16-r32"], seed=0))
    seg = packed.layers[layer]
    assert seg.rope_tables_pair_up
    sin = seg.sin.clone()
    sin[:, 0] += 0.5
    odd = dataclasses.replace(seg, sin=sin)
    with pytest.raises(ValueError, match="give each RoPE channel its partner's angle"):
        latent_attention(query, key, value, odd, backend="triton")
    assert torch.isfinite(latent_attention(query, key, value, odd, backend="torch")).all()


@pytest.mark.parametrize("block_n", [0, 8, 48, -16])
def test_latent_attention_refuses_a_tile_it_cannot_run(block_n):
    """``block_n`` 0 once became 32 without a word, -16 gave NaN, 48 failed inside Triton."""
    from ragcompress_kernels import latent_attention

    packed, layer, query, key, value, _ = build(dict(CASES["decode-d64-g3-int4-r16-r32"], seed=0))
    with pytest.raises(ValueError, match="block_n must be a power of two >= 16"):
        latent_attention(query, key, value, packed.layers[layer], backend="torch", block_n=block_n)


LATENT_STORES = {
    "keys-and-values-rank8-int4": dict(quant="int4", rank=8),
    # the smallest preset's shape: evicted, key latents at int4, values as int2 rows
    "kvzip-keys-rank8-int4-values-int2": dict(
        method="global:kvzip",
        ratio=0.5,
        keep_first=1,
        keep_last=0,
        quant="int4",
        value_quant="int2",
        rank=8,
        rank_values=False,
    ),
}


@pytest.fixture(scope="module", params=list(LATENT_STORES))
def tiny_latent_store(request, tiny_model_dir, tmp_path_factory):
    """A tiny llama (head_dim 16) and a low-rank store of eight passages (``LATENT_STORES``)."""
    from ragcompress.data import SAMPLE_PASSAGES
    from ragcompress.indexing import IndexConfig, index
    from ragcompress.models import load_model

    from store_worker import HashEmbedder

    root = tmp_path_factory.mktemp("latent")
    model_dir = tiny_model_dir("llama")
    passages = root / "passages.jsonl"
    passages.write_text("\n".join(SAMPLE_PASSAGES.read_text().splitlines()[:8]) + "\n")
    store = root / "store"
    config = IndexConfig(group_size=16, embedder=HashEmbedder.name, **LATENT_STORES[request.param])
    index(passages, store, lm=load_model(str(model_dir)), embedder=HashEmbedder(), config=config)
    return str(model_dir), str(store)


QUESTIONS = ["Where was the treaty signed?", "Who founded the city?"]


def answer_backends(model_ref: str, store: str, backends: list[str]) -> dict[str, list[list[int]]]:
    """Token ids of each question through each backend (run in the interpreter worker for triton)."""
    from ragcompress.models import load_model
    from ragcompress.runtime.engine import Engine
    from ragcompress.store import KVStore

    from store_worker import HashEmbedder

    engine = Engine(KVStore.open(store), load_model(model_ref), HashEmbedder(), AnswerOptions(max_new_tokens=6))
    out: dict[str, list[list[int]]] = {backend: [] for backend in backends}
    for question in QUESTIONS:
        entries = engine.retrieve(question, 3)
        for backend in backends:
            options = engine.options.replace(backend=backend)
            out[backend].append(engine.answer_cached(question, entries, options).token_ids)
    engine.close()
    return out


def test_packed_strategy_over_latents_decodes_like_the_dense_path(interpreter, tiny_latent_store):
    model_dir, store = tiny_latent_store
    got = answer_backends(model_dir, store, ["dense", "packed-torch"])
    assert got["packed-torch"] == got["dense"] and all(got["dense"])
    kernel = interpreter.apply(answer_backends, (model_dir, store, ["packed-triton"]))
    assert kernel["packed-triton"] == got["dense"]


@pytest.mark.gpu
@pytest.mark.parametrize("name", list(CASES))
def test_compiled_latent_kernel_on_cuda_matches_reference(compiled_triton, name):
    """``latent_attention(backend="triton")`` on CUDA tensors (compiled, not interpreted: the
    interpreter runs Python, so constexpr branches and ``tl.dot`` shapes are only proven compiled)
    against the torch path on the same tensors and the independent fp32 reference on the CPU.
    ``benchmarks/gpu_check.sh`` runs it; here it skips."""
    from ragcompress_kernels.latent_attention import latent_attention

    case = dict(CASES[name], seed=len(name))
    packed, layer, query, key, value, expected = build(case, device="cuda")
    seg = packed.layers[layer]
    query, key, value = query.cuda(), key.cuda(), value.cuda()
    tol = TOL[case.get("dtype", torch.float32)]
    # the first case through the autotuner (8 configs compiled), the others at one tile size, so the
    # GPU check's compile time stays within its cap
    block_n = None if name == next(iter(CASES)) else 32
    got = latent_attention(query, key, value, seg, backend="triton", block_n=block_n)
    ref = latent_attention(query, key, value, seg, backend="torch")
    assert got.is_cuda and got.dtype == query.dtype and torch.isfinite(got).all()
    vs_ref = (got.float() - ref.float()).abs().max().item()
    vs_independent = (got.float().cpu() - expected).abs().max().item()
    assert vs_ref < tol and vs_independent < tol, (vs_ref, vs_independent)
