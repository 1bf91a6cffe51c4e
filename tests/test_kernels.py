"""Fused packed attention (ragcompress_kernels): kernel vs fp32 reference, layout contract, runtime.

Kernel tests run in one worker process started with ``TRITON_INTERPRET=1`` (Triton decides at
import whether kernels are interpreted, so the variable must be set before the worker imports
it); this process and the rest of the suite never run under the interpreter. The worker runs
the case functions below and returns errors / token ids, which are asserted here.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from ragcompress.kv.quant import QuantConfig
from ragcompress.kv.rope import rotate_half
from ragcompress.runtime.options import AnswerOptions
from ragcompress.store import codec
from ragcompress.testing import PlainRotary

from attention_reference import evict_every_other_head, fp32_attention

TOL = {torch.float32: 2e-4, torch.float16: 2e-2, torch.bfloat16: 6e-2}


def make_blobs(
    lengths: list[int], heads: int, head_dim: int, scheme: str, seed: int, group_size: int = 32
) -> list[bytes]:
    """Random passages through the store codec; every other head evicts a ragged subset.
    ``scheme``: one for keys and values (``int4``) or keys/values (``int4/int2``)."""
    quant = QuantConfig.from_name(scheme, group_size)
    gen = torch.Generator().manual_seed(seed)
    blobs = []
    for n in lengths:
        keys = torch.randn(1, heads, n, head_dim, generator=gen) * 2
        values = torch.randn(1, heads, n, head_dim, generator=gen)
        blobs.append(codec.encode(evict_every_other_head(keys, values, gen), quant))
    return blobs


def build_case(case: dict, device: str = "cpu"):
    from ragcompress.runtime.packed import PackedSegments

    torch.manual_seed(case["seed"])
    heads, d, group, q_len = case["heads"], case["head_dim"], case["group"], case["q_len"]
    dtype = case.get("dtype", torch.float32)
    blobs = make_blobs(case["lengths"], heads, d, case["scheme"], case["seed"], case.get("group_size", 32))
    rotary = PlainRotary(d, rotary_dim=case.get("rotary_dim"), paired=case.get("paired", False))
    prefix = case.get("prefix", 9)
    packed = PackedSegments.from_blobs([codec.parse(b).packed() for b in blobs], prefix, rotary, device=device)
    total = prefix + q_len
    batch = case.get("batch", 1)
    query = torch.randn(batch, heads * group, q_len, d).to(dtype)
    key = torch.randn(batch, heads, total, d).to(dtype)
    value = torch.randn(batch, heads, total, d).to(dtype)
    expected = fp32_attention([codec.decode(b) for b in blobs], 0, rotary, prefix, query, key, value)
    return packed, query, key, value, expected


def run_kernel_case(case: dict) -> dict:
    """Worker: max |kernel - fp32 reference| and |ref - reference| for one case and split plans."""
    from ragcompress_kernels import packed_attention, packed_attention_ref

    packed, query, key, value, expected = build_case(case)
    seg = packed.layers[0]
    out = {"ref": (packed_attention_ref(query, key, value, seg).float() - expected).abs().max().item()}
    for splits in case.get("splits", [None]):
        got = packed_attention(query, key, value, seg, backend="triton", num_splits=splits)
        assert got.dtype == query.dtype and got.shape == expected.shape
        out[str(splits)] = (got.float() - expected).abs().max().item()
    return out


def answer_both_backends(model_ref: str, store: str, questions: list[str], top_k: int, max_new: int) -> dict:
    """Worker: token ids of each question through the kernel (interpreted) and the torch reference,
    plus the assembled (dequantize-then-SDPA) path."""
    from ragcompress.models import load_model
    from ragcompress.runtime.engine import Engine
    from ragcompress.store import KVStore

    from store_worker import HashEmbedder

    lm = load_model(model_ref)
    engine = Engine(KVStore.open(store), lm, HashEmbedder(), AnswerOptions(max_new_tokens=max_new))
    out: dict[str, list] = {"triton": [], "torch": [], "assembled": [], "passages": []}
    for question in questions:
        entries = engine.retrieve(question, top_k)
        out["passages"].append([e.num_tokens for e in entries])
        out["triton"].append(
            engine.answer_cached(
                question, entries, AnswerOptions(max_new_tokens=max_new, backend="packed-triton")
            ).token_ids
        )
        out["torch"].append(
            engine.answer_cached(question, entries, engine.options.replace(backend="packed-torch")).token_ids
        )
        out["assembled"].append(engine.answer_cached(question, entries).token_ids)
    engine.close()
    return out


def test_a_layout_the_kernel_would_misread_is_refused():
    """The kernels trust ``seg_len`` and ``positions``: kept rows beyond a segment's own would be
    read from the next segment, a position beyond the RoPE tables from outside them. A layout
    built by hand that does either is refused where it is made (CPU tensors)."""
    packed, *_ = build_case(
        dict(lengths=[5, 20], heads=1, head_dim=16, group=1, q_len=1, scheme="int8", group_size=8, seed=0)
    )
    seg = packed.layers[0]
    longer = seg.seg_len.clone()
    longer[0, 0] = seg.seg_start_host[1] + 1
    with pytest.raises(ValueError, match="seg_len must be within"):
        dataclasses.replace(seg, seg_len=longer)
    for position in (-1, seg.cos.shape[0]):
        moved = seg.positions.clone()
        moved[0, 0] = position
        with pytest.raises(ValueError, match="positions must be within the RoPE tables"):
            dataclasses.replace(seg, positions=moved)


def test_the_reference_reads_a_layout_without_passage_rows():
    """No passage rows at all (the Triton kernel attends over the fp rows alone): the PyTorch
    path, the CPU's, answers the same as attention over those rows, instead of failing a reshape."""
    from ragcompress_kernels import packed_attention_ref

    packed, query, key, value, _ = build_case(
        dict(lengths=[5], heads=1, head_dim=16, group=2, q_len=1, scheme="int8", group_size=8, seed=0)
    )
    seg = packed.layers[0]
    rows = ("k_codes", "k_scale", "k_min", "v_codes", "v_scale", "v_min", "positions")
    for segments in (1, 0):
        empty = dataclasses.replace(
            seg,
            seg_start_host=(0,) * (segments + 1),
            seg_start=torch.zeros(segments + 1, dtype=torch.int32),
            seg_len=torch.zeros(1, segments, dtype=torch.int32),
            **{name: getattr(seg, name)[:, :0].contiguous() for name in rows},
        )
        expected = torch.nn.functional.scaled_dot_product_attention(query, key, value, enable_gqa=True)
        torch.testing.assert_close(packed_attention_ref(query, key, value, empty), expected.transpose(1, 2))


CASES = {
    # name: ragged / non-power-of-two lengths, head_dim, GQA group, bits, prefill or decode
    "prefill-d64-g1-int8": dict(lengths=[37, 64, 5], heads=2, head_dim=64, group=1, q_len=7, scheme="int8"),
    "prefill-d128-g3-int4": dict(lengths=[50, 33], heads=2, head_dim=128, group=3, q_len=11, scheme="int4"),
    "prefill-d64-g4-int4-batch2": dict(
        lengths=[70, 1, 29], heads=1, head_dim=64, group=4, q_len=5, scheme="int4", batch=2
    ),
    "prefill-d128-g1-int8-long-q": dict(
        lengths=[45], heads=2, head_dim=128, group=1, q_len=40, scheme="int8", prefix=3
    ),
    "decode-d64-g3-int4": dict(
        lengths=[37, 100, 64, 3, 21], heads=2, head_dim=64, group=3, q_len=1, scheme="int4", splits=[None, 1, 2, 4]
    ),
    "decode-d128-g4-int8": dict(
        lengths=[90, 17, 33], heads=2, head_dim=128, group=4, q_len=1, scheme="int8", splits=[None, 1, 3]
    ),
    # one passage cut into row ranges (split-K inside a segment), a head keeping fewer rows
    "decode-d64-g2-int8-one-passage": dict(
        lengths=[150], heads=2, head_dim=64, group=2, q_len=1, scheme="int8", splits=[None, 2, 3]
    ),
    "decode-d64-g1-int2": dict(
        lengths=[40, 26], heads=3, head_dim=64, group=1, q_len=1, scheme="int2", splits=[None, 2]
    ),
    "decode-d64-g3-int4-fp16": dict(
        lengths=[60, 31], heads=2, head_dim=64, group=3, q_len=1, scheme="int4", dtype=torch.float16, splits=[None, 1]
    ),
    "prefill-d64-g4-int8-fp16": dict(
        lengths=[23, 41], heads=1, head_dim=64, group=4, q_len=6, scheme="int8", dtype=torch.float16
    ),
    # prefill with split-K forced (the default plan splits decode only; kernel_bench times both)
    "prefill-d64-g2-int4-splits": dict(
        lengths=[37, 64, 21], heads=2, head_dim=64, group=2, q_len=9, scheme="int4", splits=[None, 2, 3]
    ),
    # values of their own width (index --value-quant): keys and values unpacked with different bits
    "decode-d64-g3-int4-values-int2": dict(
        lengths=[37, 100, 3], heads=2, head_dim=64, group=3, q_len=1, scheme="int4/int2", splits=[None, 2]
    ),
    "prefill-d128-g2-int2-values-int8": dict(
        lengths=[50, 33], heads=2, head_dim=128, group=2, q_len=5, scheme="int2/int8"
    ),
    # Gemma's head_dim 256, a GQA group of 7, no prefix (the fp rows are the query tokens only)
    "prefill-d256-g7-int4-no-prefix": dict(
        lengths=[37, 20], heads=2, head_dim=256, group=7, q_len=3, scheme="int4", prefix=0, splits=[None, 2]
    ),
    # other RoPE layouts: partial rotary (Phi-4-mini turns 96 of 128 channels), paired (Cohere),
    # paired over half of each head (GLM)
    "prefill-d128-g3-int4-partial-rotary": dict(
        lengths=[50, 33], heads=2, head_dim=128, group=3, q_len=5, scheme="int4", rotary_dim=96
    ),
    "decode-d64-g2-int8-paired": dict(
        lengths=[37, 64, 5], heads=2, head_dim=64, group=2, q_len=1, scheme="int8", paired=True, splits=[None, 2]
    ),
    "decode-d64-g4-int4-paired-half": dict(
        lengths=[29, 40], heads=1, head_dim=64, group=4, q_len=1, scheme="int4", rotary_dim=32, paired=True
    ),
}


@pytest.mark.parametrize("name", list(CASES))
def test_kernel_matches_fp32_reference(interpreter, name):
    case = dict(CASES[name], seed=len(name))
    errors = interpreter.apply(run_kernel_case, (case,))
    tol = TOL[case.get("dtype", torch.float32)]
    assert errors["ref"] < tol, errors
    for plan, err in errors.items():
        assert err < tol, (plan, errors)


@pytest.mark.parametrize(
    "name", ["prefill-d64-g1-int8", "decode-d64-g3-int4", "prefill-d128-g3-int4", "decode-d64-g3-int4-values-int2"]
)
def test_reference_path_matches_codec_dequantization(name):
    from ragcompress_kernels import (
        attention_over_dense_ref,
        dequantize_segments_ref,
        drop_padding_rows,
        packed_attention,
    )

    packed, query, key, value, expected = build_case(dict(CASES[name], seed=1))
    seg = packed.layers[0]
    got = packed_attention(query, key, value, seg, backend="auto")  # CPU: the PyTorch reference
    assert (got - expected).abs().max().item() < 2e-5
    # what the runtime's registered attention function runs on CPU (all layers dequantized at once)
    got = packed.attend(0, query, key, value, query.shape[-1] ** -0.5)
    assert (got - expected).abs().max().item() < 2e-5
    # the runtime's CPU path: padding rows dropped once, mask only where heads differ
    keys, values, valid = drop_padding_rows(*dequantize_segments_ref(seg))
    assert keys.shape[1] == sum(CASES[name]["lengths"]) and valid is not None  # every other head evicts
    got = attention_over_dense_ref(query, key, value, keys, values, valid, query.shape[-1] ** -0.5)
    assert (got - expected).abs().max().item() < 2e-5


def test_drop_padding_rows_removes_the_mask_without_eviction():
    from ragcompress_kernels import attention_over_dense_ref, dequantize_segments_ref, drop_padding_rows

    packed, query, key, value, expected = build_case(
        dict(CASES["prefill-d64-g4-int8-fp16"], seed=2, heads=1, dtype=torch.float32)
    )
    seg = packed.layers[0]
    keys, values, valid = drop_padding_rows(*dequantize_segments_ref(seg))
    assert valid is None and keys.shape[1] == 23 + 41
    got = attention_over_dense_ref(query, key, value, keys, values, None, query.shape[-1] ** -0.5)
    assert (got - expected).abs().max().item() < 2e-5


def test_packed_layout_round_trips_codec():
    """Un-rotated (cos=1, sin=0) dequantized rows equal ``codec.decode`` row for row, per head."""
    from ragcompress.runtime.packed import PackedSegments
    from ragcompress_kernels import dequantize_segments_ref

    blobs = make_blobs([37, 64, 5], heads=3, head_dim=64, scheme="int4", seed=3)

    class Identity(PlainRotary):
        def cos_sin(self, positions, layer_idx):
            shape = (*positions.shape, 64)
            return torch.ones(shape), torch.zeros(shape)

    seg = PackedSegments.from_blobs([codec.parse(b).packed() for b in blobs], 5, Identity(64)).layers[0]
    keys, values, valid = dequantize_segments_ref(seg)
    assert seg.seg_start_host == (0, 64, 128, 160)
    position = 5
    for s, blob in enumerate(blobs):
        kv = codec.decode(blob)
        rows = slice(seg.seg_start_host[s], seg.seg_start_host[s + 1])
        for head in range(3):
            n = int(kv.lengths[0, head])
            assert int(seg.seg_len[head, s]) == n == int(valid[head, rows].sum())
            assert torch.equal(keys[head, rows][:n], kv.keys[0, head, :n])
            assert torch.equal(values[head, rows][:n], kv.values[0, head, :n])
            assert torch.equal(seg.positions[head, rows][:n].long(), kv.positions[0, head, :n] + position)
        position += kv.num_tokens


def test_launcher_rejects_bad_inputs():
    from ragcompress_kernels import packed_attention

    packed, query, key, value, _ = build_case(dict(CASES["decode-d64-g3-int4"], seed=0))
    seg = packed.layers[0]
    with pytest.raises(ValueError, match="dtypes differ"):
        packed_attention(query, key.half(), value, seg)
    with pytest.raises(ValueError, match="query heads"):
        packed_attention(query[:, :5], key, value, seg)
    with pytest.raises(ValueError, match="head_dim"):
        packed_attention(query[..., :32], key[..., :32], value[..., :32], seg)
    with pytest.raises(ValueError, match="contiguous"):
        packed_attention(query, key.transpose(2, 3).contiguous().transpose(2, 3), value, seg)
    with pytest.raises(ValueError, match="backend"):
        packed_attention(query, key, value, seg, backend="cuda")
    with pytest.raises(ValueError, match="k_scale"):
        dataclasses.replace(seg, k_scale=seg.k_scale.float())


def test_layout_refuses_tensors_the_kernel_would_misread():
    """The kernel indexes the layout's tensors as contiguous: a strided view (same values) read
    through it gave attention errors of 1-4 instead of 1e-6, so the layout refuses it by name."""
    packed, *_ = build_case(dict(CASES["decode-d64-g3-int4"], seed=0))
    seg = packed.layers[0]
    for name in ("k_scale", "positions", "v_codes"):
        tensor = getattr(seg, name)
        strided = torch.empty(tensor.shape[::-1], dtype=tensor.dtype).permute(*reversed(range(tensor.dim())))
        strided.copy_(tensor)
        with pytest.raises(ValueError, match=f"{name} must be contiguous"):
            dataclasses.replace(seg, **{name: strided})


@pytest.mark.parametrize("layout", [{}, {"rotary_dim": 48}, {"paired": True}])
def test_triton_refuses_rotary_tables_whose_partners_differ(layout):
    """The kernel rotates keys by two dots, (k cos) . q + (k sin) . q' with q' = -rotate(q), which
    equals q . RoPE(k) only when each channel's table entries are its RoPE partner's (transformers'
    ``cat(freqs, freqs)``, paired RoPE's repeated values) and cos is 1 on channels RoPE leaves:
    other tables are refused by the Triton backend, and ``auto`` takes the PyTorch reference,
    which reads any tables."""

    from ragcompress_kernels import packed_attention
    from ragcompress_kernels.quantized_attention import resolve_backend

    packed, query, key, value, expected = build_case(dict(CASES["decode-d64-g3-int4"], seed=0, **layout))
    seg = packed.layers[0]
    assert seg.rope_tables_pair_up and seg.rotary_dim == layout.get("rotary_dim", 64)
    assert (packed_attention(query, key, value, seg) - expected).abs().max().item() < 2e-5
    sin = seg.sin.clone()
    sin[:, 0] += 0.5
    cos = seg.cos.clone()
    cos[:, -1] = 0.5  # a channel partial rotary leaves, or the last turned one
    for odd in (dataclasses.replace(seg, sin=sin), dataclasses.replace(seg, cos=cos)):
        assert not odd.rope_tables_pair_up
        with pytest.raises(ValueError, match="give each RoPE channel its partner's angle"):
            packed_attention(query, key, value, odd, backend="triton")
        assert resolve_backend("auto", query.to("meta"), odd) == "torch"
        out = packed_attention(query, key, value, odd)  # auto on the CPU: the reference, any tables
        assert torch.isfinite(out).all()
    with pytest.raises(ValueError, match="rot_dim must be even"):
        dataclasses.replace(seg, rot_dim=7)


def run_head_dim_80(case: dict) -> dict:
    """Worker: head_dim 80 (a hidden size of 2560 over 32 heads) through every backend: errors of the torch paths
    against the independent reference, and what ``backend="triton"`` raises."""
    from ragcompress_kernels import packed_attention

    packed, query, key, value, expected = build_case(case)
    seg = packed.layers[0]
    out: dict = {
        "auto": (packed_attention(query, key, value, seg).float() - expected).abs().max().item(),
        "attend": (packed.attend(0, query, key, value, 80**-0.5).float() - expected).abs().max().item(),
    }
    try:
        packed_attention(query, key, value, seg, backend="triton")
    except Exception as error:  # the Triton interpreter's own error does not pickle
        out["triton"] = f"{type(error).__name__}: {error}"
    return out


def test_head_dim_the_kernel_cannot_build_is_refused_by_name(interpreter):
    """The kernel's channels are one ``tl.arange`` (powers of two): head_dim 80 failed inside
    Triton ("arange's range must be a power of 2"); now ``triton`` names the head_dim and what to
    use, and ``auto`` takes the PyTorch path."""
    case = dict(lengths=[37, 20], heads=2, head_dim=80, group=2, q_len=3, scheme="int4", group_size=16, seed=5)
    out = interpreter.apply(_with_path, (str(Path(__file__).parent), run_head_dim_80, case))
    assert out["auto"] < 2e-5 and out["attend"] < 2e-5, out
    assert out["triton"] == (
        "ValueError: the Triton kernels need head_dim a power of two >= 16, got 80; use backend='torch'"
    )


def run_bfloat16(case: dict) -> dict:
    """Worker: bfloat16 queries under the interpreter: what ``backend="triton"`` does (it returned
    numbers off by ~1e8: the interpreter's bfloat16 ``tl.dot`` is wrong) and ``auto``'s error."""
    from ragcompress_kernels import packed_attention

    packed, query, key, value, expected = build_case(case)
    seg = packed.layers[0]
    query, key, value = (t.to(torch.bfloat16) for t in (query, key, value))
    out: dict = {"auto": (packed_attention(query, key, value, seg).float() - expected).abs().max().item()}
    try:
        out["triton"] = (
            (packed_attention(query, key, value, seg, backend="triton").float() - expected).abs().max().item()
        )
    except Exception as error:  # the Triton interpreter's own error does not pickle
        out["triton"] = f"{type(error).__name__}: {error}"
    return out


def test_bfloat16_queries_are_refused_by_the_interpreted_kernel(interpreter):
    case = dict(CASES["decode-d64-g3-int4"], seed=0)
    out = interpreter.apply(_with_path, (str(Path(__file__).parent), run_bfloat16, case))
    assert out["auto"] < TOL[torch.bfloat16], out  # the PyTorch path on the CPU
    assert str(out["triton"]).startswith("ValueError: Triton's interpreter (TRITON_INTERPRET=1) multiplies bfloat16"), (
        out
    )


def run_bfloat16_engine(model_dir: str, store: str) -> str:
    """Worker: ``packed-triton`` asked of a bfloat16 model under the interpreter."""
    from ragcompress.errors import InputError
    from ragcompress.models import load_model
    from ragcompress.runtime.engine import Engine
    from ragcompress.store import KVStore

    from store_worker import HashEmbedder

    lm = load_model(model_dir, dtype="bfloat16")
    with Engine(KVStore.open(store), lm, HashEmbedder(), AnswerOptions(max_new_tokens=2)) as engine:
        entries = engine.retrieve(QUESTIONS[0], 2)
        try:
            engine.answer_cached(QUESTIONS[0], entries, engine.options.replace(backend="packed-triton"))
        except InputError as error:
            return str(error)
    return "answered"


def test_the_engine_refuses_packed_triton_for_bfloat16_under_the_interpreter(interpreter, tiny_model_dir, tmp_path):
    from ragcompress.data import SAMPLE_PASSAGES
    from ragcompress.indexing import IndexConfig, index

    from store_worker import HashEmbedder

    passages = tmp_path / "passages.jsonl"
    passages.write_text("\n".join(SAMPLE_PASSAGES.read_text().splitlines()[:3]) + "\n")
    model = str(tiny_model_dir("llama"))
    index(
        passages,
        tmp_path / "store",
        model=model,
        embedder=HashEmbedder(),
        dtype="bfloat16",
        config=IndexConfig(quant="int8", embedder=HashEmbedder.name),
    )
    message = interpreter.apply(
        _with_path, (str(Path(__file__).parent), run_bfloat16_engine, model, str(tmp_path / "store"))
    )
    assert message.startswith("Triton's interpreter (TRITON_INTERPRET=1) multiplies bfloat16 matrices wrongly"), message
    assert message.endswith("use backend packed-torch or dense, or float32 weights")


def test_engine_routes_a_head_dim_the_kernel_cannot_build(tiny_model_dir, tmp_path):
    """A model whose head_dim is no power of two: ``auto`` answers through the dense path,
    ``packed-triton`` is refused by name, and ``packed-torch`` answers as the dense path does."""
    from ragcompress.data import SAMPLE_PASSAGES
    from ragcompress.errors import InputError
    from ragcompress.indexing import IndexConfig, index
    from ragcompress.models import load_model
    from ragcompress.runtime.engine import Engine
    from ragcompress.store import KVStore

    from store_worker import HashEmbedder

    passages = tmp_path / "passages.jsonl"
    passages.write_text("\n".join(SAMPLE_PASSAGES.read_text().splitlines()[:4]) + "\n")
    lm = load_model(str(tiny_model_dir("llama", head_dim=24)))
    config = IndexConfig(quant="int4", group_size=8, embedder=HashEmbedder.name)
    index(passages, tmp_path / "store", lm=lm, embedder=HashEmbedder(), config=config)
    with Engine(KVStore.open(tmp_path / "store"), lm, HashEmbedder(), AnswerOptions(max_new_tokens=4)) as engine:
        entries = engine.retrieve(QUESTIONS[0], 2)
        dense = engine.answer_cached(QUESTIONS[0], entries)
        assert dense.backend == "dense" and dense.token_ids
        with pytest.raises(InputError, match="head_dim a power of two >= 16, the model's is 24; use backend"):
            engine.answer_cached(QUESTIONS[0], entries, engine.options.replace(backend="packed-triton"))
        packed = engine.answer_cached(QUESTIONS[0], entries, engine.options.replace(backend="packed-torch"))
        assert packed.backend == "packed-torch" and packed.token_ids == dense.token_ids


def test_triton_backend_on_cpu_needs_the_interpreter():
    from ragcompress_kernels import HAS_TRITON, packed_attention
    from ragcompress_kernels.quantized_attention import _interpreted

    if not HAS_TRITON or _interpreted():
        pytest.skip("needs triton imported without TRITON_INTERPRET")
    packed, query, key, value, _ = build_case(dict(CASES["decode-d64-g3-int4"], seed=0))
    seg = packed.layers[0]
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        packed_attention(query, key, value, seg, backend="triton")


def test_plan_splits_balances_rows_and_covers_every_segment():
    """Splits are row ranges on 64-row boundaries that cover every packed row once, in order,
    cut inside a segment where that balances them (one long passage is several splits), each
    naming the segments its rows lie in."""
    from ragcompress_kernels import plan_splits

    def check(seg_start, fp_rows, target):
        splits = plan_splits(seg_start, fp_rows, target)
        assert splits[0][0] == 0 and splits[-1][1] == seg_start[-1]
        for (lo, hi, seg_lo, seg_hi), following in zip(splits, [*splits[1:], None], strict=True):
            assert lo < hi or seg_start[-1] == 0
            assert following is None or following[0] == hi
            assert lo % 64 == 0
            covered = [j for j in range(len(seg_start) - 1) if seg_start[j] < hi and seg_start[j + 1] > lo]
            assert list(range(seg_lo, seg_hi)) == covered
        return [(lo, hi) for lo, hi, _, _ in splits]

    assert check((0, 64, 128, 160), 10, 1) == [(0, 160)]
    assert check((0, 64, 128, 192, 256), 0, 4) == [(0, 64), (64, 128), (128, 192), (192, 256)]
    assert check((0, 64, 128, 192, 256), 0, 2) == [(0, 128), (128, 256)]
    assert check((0, 512), 1, 4) == [(0, 192), (192, 384), (384, 512)]  # inside one passage
    assert check((0, 32), 500, 8) == [(0, 32)]
    assert check((0, 96, 96, 608), 0, 3) == [(0, 256), (256, 512), (512, 608)]  # an empty segment
    assert check((0,), 7, 4) == [(0, 0)]  # no segment rows: one split over the fp rows


def test_plan_splits_holds_its_contract_for_any_layout():
    """Property (hypothesis): for any segment layout (padded sizes in multiples of 16 rows, empty
    segments included), fp rows and target, the splits tile the packed rows in order, on 64-row
    boundaries, at most ``target`` of them, each naming
    exactly the segments its rows overlap."""
    from hypothesis import given, settings
    from hypothesis import strategies as st

    from ragcompress_kernels import plan_splits

    @settings(max_examples=300, deadline=None)
    @given(st.lists(st.integers(0, 40), max_size=20), st.integers(0, 300), st.integers(1, 64))
    def check(sizes, fp_rows, target):
        seg_start = [0]
        for size in sizes:
            seg_start.append(seg_start[-1] + 16 * size)
        splits = plan_splits(tuple(seg_start), fp_rows, target)
        rows = seg_start[-1]
        assert splits[0][0] == 0 and splits[-1][1] == rows
        assert all(a[1] == b[0] for a, b in zip(splits, splits[1:], strict=False))
        assert all(lo % 64 == 0 and (lo < hi or rows == 0) for lo, hi, _, _ in splits)
        assert len(splits) <= target
        for lo, hi, seg_lo, seg_hi in splits:
            covered = [j for j in range(len(sizes)) if seg_start[j] < hi and seg_start[j + 1] > lo]
            assert set(covered) <= set(range(seg_lo, seg_hi))
            # no segment named whose rows lie wholly outside the range (empty segments may be)
            assert all(seg_start[j + 1] == seg_start[j] or j in covered for j in range(seg_lo, seg_hi))

    check()


@pytest.fixture(scope="module", params=[None, "int2"], ids=["int4", "int4-values-int2"])
def tiny_int4_store(tiny_model_dir, tmp_path_factory, request):
    """A tiny llama (head_dim 16, GQA 2) and an int4 store of eight passages (values int4, or
    int2: ``index --value-quant``)."""
    from ragcompress.data import SAMPLE_PASSAGES
    from ragcompress.indexing import IndexConfig, index
    from ragcompress.models import load_model

    from store_worker import HashEmbedder

    root = tmp_path_factory.mktemp("packed")
    model_dir = tiny_model_dir("llama")
    passages = root / "passages.jsonl"
    passages.write_text("\n".join(SAMPLE_PASSAGES.read_text().splitlines()[:8]) + "\n")
    store = root / "store"
    index(
        passages,
        store,
        lm=load_model(str(model_dir)),
        embedder=HashEmbedder(),
        config=IndexConfig(quant="int4", group_size=16, embedder=HashEmbedder.name, value_quant=request.param),
    )
    return str(model_dir), str(store)


QUESTIONS = ["Where was the treaty signed?", "Who founded the city?", "What is the main export?"]


def test_packed_torch_path_answers_like_the_assembled_path(tiny_int4_store):
    from ragcompress.models import load_model
    from ragcompress.runtime.engine import Engine
    from ragcompress.store import KVStore

    from store_worker import HashEmbedder

    model_dir, store = tiny_int4_store
    engine = Engine(KVStore.open(store), load_model(model_dir), HashEmbedder(), AnswerOptions(max_new_tokens=12))
    for question in QUESTIONS:
        entries = engine.retrieve(question, 3)
        packed = engine.answer_cached(question, entries, engine.options.replace(backend="packed-torch"))
        assembled = engine.answer_cached(question, entries)
        assert len(packed.token_ids) > 0
        assert packed.token_ids == assembled.token_ids
    engine.close()


def test_kernel_decodes_the_same_tokens_as_the_reference(interpreter, tiny_int4_store):
    model_dir, store = tiny_int4_store
    tests_dir = str(Path(__file__).parent)
    out = interpreter.apply(_with_path, (tests_dir, answer_both_backends, model_dir, store, QUESTIONS[:2], 2, 5))
    assert all(len(t) > 0 for t in out["torch"])
    assert out["triton"] == out["torch"] == out["assembled"]


@pytest.fixture(scope="module", params=["phi", "glm"])
def other_rope_store(tiny_model_dir, tmp_path_factory, request):
    """A tiny model whose RoPE turns part of each head (Phi) or adjacent channels over half of
    each head (GLM), and an int4 store of eight passages."""
    from ragcompress.data import SAMPLE_PASSAGES
    from ragcompress.indexing import IndexConfig, index
    from ragcompress.models import load_model

    from store_worker import HashEmbedder

    root = tmp_path_factory.mktemp("rope")
    model_dir = tiny_model_dir(request.param)
    passages = root / "passages.jsonl"
    passages.write_text("\n".join(SAMPLE_PASSAGES.read_text().splitlines()[:8]) + "\n")
    config = IndexConfig(quant="int4", group_size=16, embedder=HashEmbedder.name)
    index(passages, root / "store", lm=load_model(str(model_dir)), embedder=HashEmbedder(), config=config)
    return str(model_dir), str(root / "store")


def test_kernel_turns_keys_in_the_models_rope_layout(interpreter, other_rope_store):
    """The fused kernel (interpreted) decodes the tokens of the PyTorch reference and of the
    assembled path for partial and paired RoPE (tests/test_runtime.py checks the reference
    against the dense path on more layouts)."""
    model_dir, store = other_rope_store
    tests_dir = str(Path(__file__).parent)
    out = interpreter.apply(_with_path, (tests_dir, answer_both_backends, model_dir, store, QUESTIONS[:2], 2, 5))
    assert all(len(t) > 0 for t in out["torch"])
    assert out["triton"] == out["torch"] == out["assembled"]


def _with_path(path: str, fn, *args):
    import sys

    if path not in sys.path:
        sys.path.insert(0, path)
    return fn(*args)


@pytest.mark.slow
def test_kernel_and_reference_agree_on_real_questions_with_smollm2(interpreter, tmp_path):
    """SmolLM2-135M (GQA 3, head_dim 64), int4 store of SQuAD passages, greedy answers."""
    import json

    from conftest import SQUAD, require_squad

    require_squad()
    from ragcompress.indexing import IndexConfig, index
    from ragcompress.models import DEFAULT_MODEL, load_model

    from store_worker import HashEmbedder

    passages = (SQUAD / "passages.jsonl").read_text().splitlines()[:3]
    ids = {json.loads(line)["id"] for line in passages}
    questions = [
        q["question"]
        for q in map(json.loads, (SQUAD / "questions.jsonl").read_text().splitlines())
        if q["passage_id"] in ids
    ][:1]  # one question: the interpreter runs every layer's kernel per token (minutes per question)
    source = tmp_path / "passages.jsonl"
    source.write_text("\n".join(passages) + "\n")
    lm = load_model()
    index(
        source,
        tmp_path / "store",
        lm=lm,
        embedder=HashEmbedder(),
        config=IndexConfig(quant="int4", embedder=HashEmbedder.name),
    )
    out = interpreter.apply(
        _with_path,
        (str(Path(__file__).parent), answer_both_backends, DEFAULT_MODEL, str(tmp_path / "store"), questions, 2, 3),
    )
    assert all(len(t) > 0 for t in out["torch"])
    assert out["triton"] == out["torch"]


def test_reference_rotation_with_general_tables():
    """Tables whose halves differ (not ``cat(freqs, freqs)``) take the general rotate_half path."""

    from ragcompress_kernels import dequantize_segments_ref

    seg = build_case(dict(CASES["prefill-d64-g1-int8"], seed=4))[0].layers[0]
    gen = torch.Generator().manual_seed(0)
    cos, sin = torch.rand(seg.cos.shape, generator=gen), torch.rand(seg.sin.shape, generator=gen)
    plain = dataclasses.replace(seg, cos=torch.ones_like(cos), sin=torch.zeros_like(sin))
    keys, _, valid = dequantize_segments_ref(dataclasses.replace(seg, cos=cos, sin=sin))
    raw, _, _ = dequantize_segments_ref(plain)
    pos = seg.positions.long()
    expected = raw * cos[pos] + rotate_half(raw) * sin[pos]
    assert torch.allclose(keys[valid], expected[valid], atol=1e-6)


# --- the compiled kernel on a CUDA GPU (benchmarks/gpu_check.sh) ----------------------------------
# Ragged shapes with the kernel's autotune keys (GQA 4, head_dim 128, int4/int8, decode with and
# without split-K, prefill) that benchmarks/kernel_bench.py times, so the benchmark reuses the
# tuning, plus one other head_dim / GQA / bit width. Every autotune key costs ~18 compiles.

GPU_CASES = {
    "decode-d128-g4-int4-16-passages": dict(
        lengths=[512, 37, 500, 480, 511, 64, 300, 512, 129, 400, 512, 7, 250, 512, 333, 1],
        heads=8,
        head_dim=128,
        group=4,
        q_len=1,
        scheme="int4",
        splits=[None, 1, 5],
    ),
    "decode-d128-g4-int8-3-passages": dict(
        lengths=[300, 17, 129], heads=8, head_dim=128, group=4, q_len=1, scheme="int8", splits=[None, 1, 2]
    ),
    "decode-d128-g4-int4-1-passage": dict(lengths=[333], heads=8, head_dim=128, group=4, q_len=1, scheme="int4"),
    "prefill-d128-g4-int8-5-passages": dict(
        lengths=[77, 512, 3, 250, 64], heads=8, head_dim=128, group=4, q_len=20, scheme="int8"
    ),
    "prefill-d128-g4-int4-2-passages-batch2": dict(
        lengths=[511, 45], heads=8, head_dim=128, group=4, q_len=32, scheme="int4", batch=2, prefix=64
    ),
    "decode-d64-g3-int2-3-passages": dict(
        lengths=[40, 26, 100], heads=3, head_dim=64, group=3, q_len=1, scheme="int2", splits=[None, 2]
    ),
    # the first case's autotune key with GLM's RoPE (paired over half of each head): one more compile
    "decode-d128-g4-int4-3-passages-paired-half": dict(
        lengths=[300, 17, 129], heads=8, head_dim=128, group=4, q_len=1, scheme="int4", rotary_dim=64, paired=True
    ),
}
GPU_RUNS = [(name, torch.float16) for name in GPU_CASES] + [
    ("decode-d128-g4-int4-16-passages", torch.bfloat16),
    ("prefill-d128-g4-int8-5-passages", torch.bfloat16),
]


@pytest.mark.gpu
@pytest.mark.parametrize("name, dtype", GPU_RUNS, ids=[f"{n}-{str(d).split('.')[-1]}" for n, d in GPU_RUNS])
def test_compiled_kernel_on_cuda_matches_reference(compiled_triton, name, dtype):
    """``packed_attention(backend="triton")`` on CUDA tensors (compiled, not interpreted) against
    ``packed_attention_ref`` on the same tensors and the independent fp32 reference on the CPU."""
    from ragcompress_kernels import packed_attention, packed_attention_ref

    case = dict(GPU_CASES[name], seed=len(name), dtype=dtype)
    packed, query, key, value, expected = build_case(case, device="cuda")
    seg = packed.layers[0]
    query, key, value = query.cuda(), key.cuda(), value.cuda()
    tol = TOL[dtype]
    ref = packed_attention_ref(query, key, value, seg)
    assert (ref.float().cpu() - expected).abs().max().item() < tol
    for splits in case.get("splits", [None]) if dtype == torch.float16 else [None]:
        got = packed_attention(query, key, value, seg, backend="triton", num_splits=splits)
        assert got.is_cuda and got.dtype == dtype and got.shape == ref.shape
        assert torch.isfinite(got).all()
        vs_ref = (got.float() - ref.float()).abs().max().item()
        vs_independent = (got.float().cpu() - expected).abs().max().item()
        assert vs_ref < tol and vs_independent < tol, (splits, vs_ref, vs_independent)


def test_kernels_and_runtime_import_without_triton():
    """``make demo`` installs no Triton: the kernels package and the query path must import, and the
    PyTorch paths run, when ``import triton`` fails (a subprocess where it is blocked)."""
    import subprocess
    import sys

    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import ragcompress.runtime.engine\n"
        "from importlib import import_module\n"
        "kernels = [import_module(f'ragcompress_kernels.{m}') for m in ('latent_attention', 'quantized_attention')]\n"
        "assert not any(k.HAS_TRITON for k in kernels)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
