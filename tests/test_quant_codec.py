"""Quantization and the blob codec: exact where promised, bounded error where not."""

from __future__ import annotations

import pytest
import torch

from ragcompress.kv import PassageKV
from ragcompress.kv.quant import QuantConfig, dequantize_keys_per_channel, pack, quantize_dequantize, unpack
from ragcompress.store import codec
from ragcompress.testing import rewritten_blob


def random_kv(layers=3, heads=2, n=37, d=16, seed=0) -> PassageKV:
    gen = torch.Generator().manual_seed(seed)
    keys = torch.randn(layers, heads, n, d, generator=gen)
    keys[..., 3] *= 20  # an outlier channel, as real keys have
    values = torch.randn(layers, heads, n, d, generator=gen)
    return PassageKV.full(keys, values)


def ragged_kv(seed=0) -> PassageKV:
    full = random_kv(seed=seed)
    layers, heads, n, d = full.keys.shape
    lengths = torch.tensor([[5, 30], [37, 1], [12, 12]])
    gen = torch.Generator().manual_seed(seed)
    positions = torch.zeros(layers, heads, n, dtype=torch.long)
    for layer in range(layers):
        for head in range(heads):
            keep = torch.randperm(n, generator=gen)[: lengths[layer, head]].sort().values
            positions[layer, head, : len(keep)] = keep
    index = positions.unsqueeze(-1).expand(-1, -1, -1, d)
    mask = (torch.arange(n) < lengths.unsqueeze(-1)).unsqueeze(-1)
    keys = torch.gather(full.keys, 2, index) * mask
    values = torch.gather(full.values, 2, index) * mask
    return PassageKV(keys, values, positions, lengths, n)


@pytest.mark.parametrize("bits", [8, 4, 2])
def test_pack_unpack_round_trip(bits):
    codes = torch.randint(0, 1 << bits, (5, 64), dtype=torch.uint8)
    packed = pack(codes, bits)
    assert packed.shape == (5, 64 * bits // 8)
    assert torch.equal(unpack(packed, bits), codes)


@pytest.mark.parametrize("make", [random_kv, ragged_kv])
def test_none_is_bit_exact(make):
    kv = make()
    back = codec.decode(codec.encode(kv, QuantConfig("none")))
    mask = kv.valid_mask()
    assert torch.equal(back.lengths, kv.lengths)
    assert torch.equal(back.positions[mask], kv.positions[mask])
    assert torch.equal(back.keys[mask], kv.keys[mask])
    assert torch.equal(back.values[mask], kv.values[mask])
    assert back.num_tokens == kv.num_tokens


@pytest.mark.parametrize("make", [random_kv, ragged_kv])
@pytest.mark.parametrize("scheme,bound", [("fp16", 1e-3), ("int8", 0.02), ("int4", 0.15)])
def test_quantized_error_is_bounded(make, scheme, bound):
    kv = make()
    back = codec.decode(codec.encode(kv, QuantConfig(scheme)))
    mask = kv.valid_mask()
    for name in ("keys", "values"):
        ref, got = getattr(kv, name)[mask], getattr(back, name)[mask]
        rel = (got - ref).norm() / ref.norm()
        assert rel < bound, f"{scheme} {name}: relative error {rel:.4f} >= {bound}"
    assert torch.equal(back.positions[mask], kv.positions[mask])


def test_int4_bytes_per_token_within_target():
    """int4 with scales must be <= 0.32x fp16 (issue #2), measured on the serialised blob."""
    kv = random_kv(layers=4, heads=2, n=160, d=64)
    fp16 = codec.encode(kv, QuantConfig("fp16"))
    int4 = codec.encode(kv, QuantConfig("int4"))
    assert len(int4) / len(fp16) <= 0.32


def test_only_kept_rows_are_stored():
    kv = ragged_kv()
    full_bytes = len(codec.encode(random_kv(), QuantConfig("fp16")))
    ragged_bytes = len(codec.encode(kv, QuantConfig("fp16")))
    kept_fraction = kv.kept_tokens / (3 * 2 * 37)
    assert ragged_bytes < full_bytes * (kept_fraction + 0.1)


def test_corrupt_blob_is_rejected():
    from ragcompress.errors import CorruptSegmentError

    blob = bytearray(codec.encode(random_kv(), QuantConfig("int8")))
    with pytest.raises(CorruptSegmentError):
        codec.decode(bytes(blob[:100]))


def test_an_evicted_blob_without_its_positions_is_refused():
    """``parse`` filled a missing ``positions`` tensor with ``0..n_max-1`` whatever the blob kept,
    so an evicted cache's rows would have been re-rotated to the wrong positions."""
    from ragcompress.compressors import make_compressor
    from ragcompress.errors import CorruptSegmentError

    kv = PassageKV.full(torch.randn(1, 1, 10, 8), torch.randn(1, 1, 10, 8))
    evicted = make_compressor("knorm", budget=4, keep_first=0, keep_last=0).compress(kv, None)
    for cache in (kv, evicted):
        blob = codec.encode(cache, QuantConfig("fp16"))
        stripped = rewritten_blob(blob, {"positions": None})  # a cache of every row has none to lose
        if cache is kv:
            assert torch.equal(codec.parse(stripped).positions, codec.parse(blob).positions)
        else:
            with pytest.raises(CorruptSegmentError, match="records no positions"):
                codec.parse(stripped)


def test_a_position_one_past_the_passage_is_refused():
    """Positions are offsets into the passage, ``0..num_tokens-1``: without this a blob keeping a
    row at ``num_tokens`` (off by one, ``>`` for ``>=``) parsed, and the row was rotated to the
    first position of the next passage in the prompt."""
    from ragcompress.compressors import make_compressor
    from ragcompress.errors import CorruptSegmentError

    kv = PassageKV.full(torch.randn(1, 1, 10, 8), torch.randn(1, 1, 10, 8))
    blob = codec.encode(
        make_compressor("knorm", budget=4, keep_first=0, keep_last=0).compress(kv, None), QuantConfig("fp16")
    )
    positions = codec.parse(blob).tensors["positions"].clone()
    positions[-1] = 10  # == num_tokens
    with pytest.raises(CorruptSegmentError, match="positions"):
        codec.parse(rewritten_blob(blob, {"positions": positions}))
    positions[-1] = 9  # the passage's last token is a position like any other
    assert codec.parse(rewritten_blob(blob, {"positions": positions})).positions.max() == 9


def _kept_at(positions: list[list[int]], num_tokens: int) -> PassageKV:
    """A cache of one layer whose heads keep rows at ``positions`` (one list per head, as long
    as each other) of a passage of ``num_tokens`` tokens."""
    kept = torch.tensor([positions])
    heads, rows = kept.shape[1:]
    lengths = torch.full((1, heads), rows)
    return PassageKV(torch.randn(1, heads, rows, 8), torch.randn(1, heads, rows, 8), kept, lengths, num_tokens)


def test_heads_keeping_more_rows_than_the_passage_has_tokens_are_refused():
    """``n_max > num_tokens``: six rows kept of a passage whose header says five tokens. A head
    keeps each token at most once, so such a blob is damaged or forged (its positions, were
    there any, would have to repeat)."""
    from ragcompress.errors import CorruptSegmentError

    blob = codec.encode(PassageKV.full(torch.randn(1, 2, 6, 8), torch.randn(1, 2, 6, 8)), QuantConfig("int8"))
    with pytest.raises(CorruptSegmentError, match="keeps up to 6 rows per head of a passage of 5 tokens"):
        codec.parse(rewritten_blob(blob, {}, num_tokens=5))
    assert codec.parse(blob).num_tokens == 6


@pytest.mark.parametrize(
    ("kept", "wrong"),
    [
        ([[1, 3, 5, 7], [1, 3, 3, 7]], "layer 0, head 1 keeps position 3 after 3"),
        ([[5, 2, 6, 8]], "layer 0, head 0 keeps position 2 after 5"),
    ],
)
def test_positions_that_repeat_or_go_backwards_are_refused(kept, wrong):
    """Each head keeps its rows in passage order (``gather_kept`` sorts them), every position once.
    A blob whose positions repeat or go backwards parsed while they lay in ``0..num_tokens-1``:
    two rows rotated to one position, or rows placed out of order, attended over as if they were
    the passage. ``encode`` refuses such a cache rather than write a blob every reader refuses."""
    from ragcompress.errors import CorruptSegmentError

    blob = codec.encode(_kept_at([[1, 3, 5, 7]] * len(kept), num_tokens=10), QuantConfig("int8"))
    assert codec.parse(blob).kept_tokens == 4 * len(kept)
    forged = rewritten_blob(blob, {"positions": torch.tensor(sum(kept, []), dtype=torch.int16)})
    with pytest.raises(CorruptSegmentError, match=f"^segment positions must increase within each head, but {wrong}$"):
        codec.parse(forged)
    with pytest.raises(ValueError, match=f"its positions must increase .* but {wrong}; sort each head's kept rows"):
        codec.encode(_kept_at(kept, num_tokens=10), QuantConfig("int8"))


def test_positions_of_a_passage_longer_than_int16_round_trip():
    """Positions are stored as int16 while they fit, int32 past 32767: without this a wrong
    switch (int16's limit, or uint16's) would store a long passage's late positions wrapped."""
    n = 40000
    positions = torch.tensor([[[0, 32767, 32768, n - 1]]])
    kv = PassageKV(torch.randn(1, 1, 4, 8), torch.randn(1, 1, 4, 8), positions, torch.tensor([[4]]), n)
    back = codec.decode(codec.encode(kv, QuantConfig("none")))
    assert torch.equal(back.positions, positions) and back.num_tokens == n


def test_tensors_of_another_width_than_the_header_are_refused():
    """A header whose ``head_dim`` disagrees with the stored rows' width (a forged or damaged
    header that still passes the store's model-shape check) is a ``CorruptSegmentError``; without
    the check the rows were reshaped to the header's width and decoded as another cache."""
    from ragcompress.errors import CorruptSegmentError

    blob = codec.encode(PassageKV.full(torch.randn(1, 1, 10, 8), torch.randn(1, 1, 10, 8)), QuantConfig("fp16"))
    with pytest.raises(CorruptSegmentError):
        codec.parse(rewritten_blob(blob, {}, head_dim=4)).dense()


def test_quant_config_validation():
    with pytest.raises(ValueError, match="int4"):
        QuantConfig("int3")
    with pytest.raises(ValueError, match="power of two"):
        QuantConfig("int8", group_size=24)
    with pytest.raises(ValueError, match="only between integer schemes"):
        QuantConfig("fp16", value_scheme="int2")
    with pytest.raises(ValueError, match="only between integer schemes"):
        QuantConfig("int4", value_scheme="fp16")
    assert QuantConfig("int4", value_scheme="int4") == QuantConfig("int4")  # one spelling per config
    split = QuantConfig("int4", 16, "int2")
    assert (split.bits, split.value_bits, split.name) == (4, 2, "int4/int2")
    assert split.of("k") == QuantConfig("int4", 16) and split.of("v") == QuantConfig("int2", 16)
    assert QuantConfig.from_name(split.name, 16) == split and QuantConfig.from_name("int8").name == "int8"


@pytest.mark.parametrize("make", [random_kv, ragged_kv])
def test_values_of_their_own_width_are_coded_as_a_store_of_that_width(make):
    """A K/V-split blob holds the keys an int4 blob holds and the values an int2 blob holds; a
    one-width blob's bytes do not mention value schemes (older stores' blobs are unchanged)."""
    kv = make()
    split = codec.parse(codec.encode(kv, QuantConfig("int4", value_scheme="int2")))
    assert split.quant == QuantConfig("int4", value_scheme="int2")
    k4, v2 = codec.decode(codec.encode(kv, QuantConfig("int4"))), codec.decode(codec.encode(kv, QuantConfig("int2")))
    got = split.dense()
    assert torch.equal(got.keys, k4.keys) and torch.equal(got.values, v2.values)
    packed = split.packed()
    assert packed.k_codes.shape[-1] == 16 // 2 and packed.v_codes.shape[-1] == 16 // 4  # d=16 at 4 and 2 bits
    assert b"value_scheme" not in codec.encode(kv, QuantConfig("int4"))


def keys_on_the_grid_ref(segment: codec.Segment, dtype: torch.dtype) -> torch.Tensor:
    """:meth:`Segment.dense`'s keys as they were computed before: codes, scales and minimums laid
    on the padded ``[L, H, n_max, d]`` grid, dequantized there, then masked."""
    mask, group_size = segment.mask(), segment.quant.group_size
    codes = codec._rows_to_grid(unpack(segment.tensors["k_codes"], segment.quant.bits), mask, torch.uint8)
    groups = codec._group_mask(segment.lengths, -(-segment.n_max // group_size), group_size)
    scale = codec._rows_to_grid(segment.tensors["k_scale"], groups, torch.float16)
    lo = codec._rows_to_grid(segment.tensors["k_min"], groups, torch.float16)
    keys = dequantize_keys_per_channel(codes, scale, lo, group_size).to(dtype)
    return keys if bool(mask.all()) else keys * mask.unsqueeze(-1)


def uneven_kv(seed=0) -> PassageKV:
    """Ragged heads around group boundaries: empty, one row, a group exactly, one past it, all."""
    full = random_kv(layers=2, heads=3, n=33, seed=seed)
    lengths = torch.tensor([[0, 1, 8], [9, 33, 16]])
    mask = (torch.arange(33) < lengths.unsqueeze(-1)).unsqueeze(-1)
    positions = torch.arange(33).expand(2, 3, 33) * mask[..., 0]
    return PassageKV(full.keys * mask, full.values * mask, positions, lengths, 33)


@pytest.mark.parametrize("make", [random_kv, ragged_kv, uneven_kv])
@pytest.mark.parametrize("scheme", ["int8", "int4", "int2", "int4/int2", "int2/int8"])
@pytest.mark.parametrize("group_size", [8, 16, 32, 64])
def test_keys_dequantized_as_kept_rows_equal_the_grid_dequantization_bit_for_bit(make, scheme, group_size):
    """:meth:`Segment.dense` dequantizes the kept key rows where they lie in the blob and scatters
    them once, instead of on the padded grid (most of it padding under ``global:`` eviction):
    kept rows are the grid computation's bit for bit, padding rows +0, values unchanged, in
    every output dtype."""
    keys_scheme, _, value_scheme = scheme.partition("/")
    quant = QuantConfig(keys_scheme, group_size, value_scheme or None)
    segment = codec.parse(codec.encode(make(), quant))
    mask = segment.mask()
    for dtype, bits in ((torch.float32, torch.int32), (torch.float16, torch.int16), (torch.bfloat16, torch.int16)):
        got, ref = segment.dense(dtype).keys, keys_on_the_grid_ref(segment, dtype)
        assert got.dtype == dtype and got.shape == ref.shape
        assert torch.equal(got[mask].view(bits), ref[mask].view(bits))
        assert not bool(got[~mask].view(bits).any())  # +0.0, bit for bit
        assert torch.equal(got, ref)


@pytest.mark.parametrize("scheme", ["int8", "int4", "int2", "fp16", "int4/int2", "int2/int8"])
def test_training_quantization_is_the_codecs_with_an_identity_gradient(scheme):
    """The KV-Distill student sees quantization through ``quantize_dequantize``: on real rows it
    must give what a stored and decoded cache gives, and pass gradients straight through."""
    torch.manual_seed(0)
    keys, values = torch.randn(2, 3, 40, 16), torch.randn(2, 3, 40, 16)
    lengths = torch.tensor([[40, 17, 33], [1, 40, 25]])
    positions = torch.arange(40).expand(2, 3, 40).clone()
    kv = PassageKV(keys, values, positions, lengths, num_tokens=40)
    quant = QuantConfig.from_name(scheme, 8)
    decoded = codec.decode(codec.encode(kv, quant), torch.float32)
    k_in, v_in = keys.clone().requires_grad_(True), values.clone().requires_grad_(True)
    k = quantize_dequantize("k", k_in, lengths, quant)
    v = quantize_dequantize("v", v_in, lengths, quant)
    mask = kv.valid_mask()
    assert torch.equal(k[mask], decoded.keys[mask]) and torch.equal(v[mask], decoded.values[mask])
    assert not torch.equal(k[mask], keys[mask])  # it did quantize
    (k.sum() + 2 * v.sum()).backward()
    assert torch.equal(k_in.grad, torch.ones_like(keys)) and torch.equal(v_in.grad, torch.full_like(values, 2.0))


@pytest.mark.parametrize("bits", [8, 4, 2])
@pytest.mark.parametrize("offset", [0.0, 20.0, -60.0, 100.0])
def test_a_group_far_from_zero_keeps_every_value_within_half_a_step(bits, offset):
    """The fp16 min and scale are what the codes are measured from: a channel with a large offset
    (fp16's own step there can exceed the quantization step) must not clamp at the top."""
    from ragcompress.kv.quant import dequantize, quantize_last_dim

    x = torch.rand(64, 32, generator=torch.Generator().manual_seed(0)) * 0.5 + offset
    codes, scale, lo = quantize_last_dim(x, bits)
    error = (dequantize(codes, scale, lo) - x).abs()
    assert (error <= scale.float().unsqueeze(-1) / 2 + 1e-6).all()
    assert (lo.float() <= x.amin(-1)).all()
    # the stored step is the ideal one, widened by at most the fp16 rounding of the min
    ideal = (x.amax(-1) - x.amin(-1)) / ((1 << bits) - 1)
    assert (scale.float() <= ideal + torch.finfo(torch.float16).eps * abs(offset) * 2 / ((1 << bits) - 1) + 1e-3).all()


def test_group_size_is_bounded():
    """A blob (or manifest) declaring a huge group would size allocations from it."""
    with pytest.raises(ValueError, match=r"power of two in \[1, 65536\]"):
        QuantConfig("int8", 1 << 36)


@pytest.mark.parametrize("scheme", ["int8", "int4", "int2"])
def test_a_group_beyond_fp16_range_is_refused_not_stored_as_inf(scheme):
    """Scales and minimums are fp16: a key channel holding 1e5 is measured from fp16's largest
    value and round-trips within half a step, but a group reaching -1e5 has no fp16 minimum at
    or below it (it was stored as -inf and decoded as nan)."""
    kv = random_kv()
    kv.keys[1, 0, 5, 2] = 1e5
    back = codec.decode(codec.encode(kv, QuantConfig(scheme)))
    half_step = (1e5 - float(kv.keys[1, 0, :, 2].min())) / ((1 << QuantConfig(scheme).bits) - 1) / 2
    assert torch.isfinite(back.keys).all() and abs(float(back.keys[1, 0, 5, 2]) - 1e5) <= half_step
    kv.keys[1, 0, 5, 2] = -1e5
    with pytest.raises(ValueError, match=r"-100000.*out of fp16 range .*store this cache unquantized"):
        codec.encode(kv, QuantConfig(scheme))
    with pytest.raises(ValueError, match="out of fp16 range"):
        quantize_dequantize("k", kv.keys, kv.lengths, QuantConfig(scheme))


def test_fp16_rows_beyond_fp16_range_are_refused():
    """Training's view of an ``fp16`` store: 1e5 would become inf."""
    kv = random_kv()
    kv.values[0, 1, 3, 4] = 1e5
    with pytest.raises(ValueError, match=r"magnitude 100000 is out of fp16 range"):
        quantize_dequantize("v", kv.values, kv.lengths, QuantConfig("fp16"))
    with pytest.raises(ValueError, match=r"magnitude 100000 is out of fp16 range"):
        codec.encode(kv, QuantConfig("fp16"))  # what a store would have written as inf


def test_a_group_size_that_does_not_tile_head_dim_is_refused_before_encoding(tiny_model_dir, passages_file, tmp_path):
    """Values are grouped along head_dim: 40 channels in groups of 32 failed inside the codec,
    after the model had encoded the first batch (a bare ValueError in the CLI)."""
    from ragcompress.errors import InputError
    from ragcompress.indexing import IndexConfig, index
    from ragcompress.testing import HashEmbedder

    model = str(tiny_model_dir("llama", head_dim=40))
    embedder = HashEmbedder()
    with pytest.raises(InputError, match="head_dim 40, which quantization groups of 32 do not divide.*--group-size 8"):
        index(
            passages_file,
            tmp_path / "store",
            model=model,
            config=IndexConfig(quant="int4", embedder=embedder.name),
            embedder=embedder,
        )
    assert not (tmp_path / "store").exists()
    config = IndexConfig(quant="int4", group_size=8, embedder=embedder.name)
    index(passages_file, tmp_path / "store", model=model, config=config, embedder=embedder)


@pytest.mark.parametrize("scheme", ["none", "fp16", "int8", "int4", "int2", "int4/int2"])
@pytest.mark.parametrize("kind", ["keys", "values"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_cache_holding_inf_or_nan_is_refused_under_every_scheme(scheme, kind, bad):
    """A model that overflowed in float16: ``none`` stored its NaN as it was (the store verified,
    every answer over the passage read NaN attention) and the other schemes refused it advising
    ``none``. Every scheme refuses it now, naming the layer and a wider dtype, not ``none``."""
    from ragcompress.errors import InputError, UnstorableCacheError

    kv = random_kv()
    kv = PassageKV.full(kv.keys.half(), kv.values.half())
    getattr(kv, kind)[1, 0, 5, 2] = bad
    with pytest.raises(UnstorableCacheError) as caught:
        codec.encode(kv, QuantConfig.from_name(scheme))
    message = str(caught.value)
    assert message == (
        f"the cache holds inf or NaN ({kind} of layer 1): the model overflowed computing it in float16; "
        "encode with the model in bfloat16 or float32 (--dtype, --overwrite for an existing store)"
    )
    assert isinstance(caught.value, InputError) and isinstance(caught.value, ValueError)


def test_inf_or_nan_is_refused_in_a_base_copy_and_a_projected_cache_not_on_padding_rows():
    """Only kept rows are stored, so only they are checked: an evicted cache's padding may hold
    anything. A base copy and a cache stored as low-rank latents are checked like any other."""
    from ragcompress.errors import UnstorableCacheError
    from ragcompress.kv.lowrank import RankSpec, fit_basis

    kv = ragged_kv()
    padding = ~kv.valid_mask()
    kv.keys[padding] = float("nan")
    back = codec.decode(codec.encode(kv, QuantConfig("none")))
    assert bool(back.keys.isfinite().all())
    base = random_kv()
    base.values[2, 1, 0, 0] = float("inf")
    with pytest.raises(UnstorableCacheError, match=r"\(the base copy's values of layer 2\).* in float32; check"):
        codec.encode(random_kv(), QuantConfig("int8"), base=base)
    basis = fit_basis([random_kv(seed=s) for s in range(3)], RankSpec(rank=8))
    projected = random_kv(seed=4)
    projected.keys[0, 1, 3, 3] = float("nan")
    for scheme in ("none", "int8"):
        with pytest.raises(UnstorableCacheError, match=r"\(keys of layer 0\)"):
            codec.encode(projected, QuantConfig(scheme), basis)


def fp16_max_channel_kv(make=random_kv) -> PassageKV:
    """An fp16 model's cache whose key and value channel 5 run to fp16's largest value in every
    group of 32 rows."""
    kv = make()
    ramp = torch.linspace(-65504.0, 65504.0, 32).half().float().repeat(2)[: kv.keys.shape[2]]
    kv.keys[..., 5] = ramp
    kv.values[..., 5] = ramp.flip(0)
    mask = kv.valid_mask().unsqueeze(-1)
    return PassageKV(kv.keys * mask, kv.values * mask, kv.positions, kv.lengths, kv.num_tokens)


@pytest.mark.parametrize("make", [random_kv, ragged_kv])
@pytest.mark.parametrize("scheme", ["int8", "int4", "int2", "int4/int2"])
def test_a_finite_fp16_cache_decodes_finite_in_fp16(make, scheme):
    """A group reaching 65504 is measured from its fp16 minimum with a step rounded up, so
    ``min + code * step`` passed 65504 (up to 65566 at int8) and became inf in fp16: the grid
    path (nothing evicted), the kept-rows path (evicted) and the values. Clamped to ±65504 now."""
    kv = fp16_max_channel_kv(make)
    segment = codec.parse(codec.encode(kv, QuantConfig.from_name(scheme)))
    wide = segment.dense(torch.float32)
    assert float(wide.keys.abs().max()) > 65520  # what fp16 rounds to inf
    half = segment.dense(torch.float16)
    assert bool(half.keys.isfinite().all()) and bool(half.values.isfinite().all())
    assert float(half.keys.abs().max()) == 65504.0


def test_a_low_rank_cache_reaching_fp16_max_rebuilds_finite_in_fp16():
    """Keys rebuilt from quantized latents overshoot by the latents' rounding as well."""
    from ragcompress.kv.lowrank import RankSpec, fit_basis

    gen = torch.Generator().manual_seed(0)

    def cache() -> PassageKV:
        keys = torch.randn(1, 1, 64, 32, generator=gen)
        keys[..., 3] = torch.linspace(-60000.0, 65504.0, 64)
        return PassageKV.full(keys.half().float(), torch.randn(1, 1, 64, 32, generator=gen))

    basis = fit_basis([cache() for _ in range(4)], RankSpec(rank=8, values=False))
    segment = codec.parse(codec.encode(cache(), QuantConfig("int4"), basis))
    assert float(segment.dense(torch.float32, basis).keys.abs().max()) > 65520
    assert bool(segment.dense(torch.float16, basis).keys.isfinite().all())


def test_packed_torch_rows_reaching_fp16_max_are_finite_in_fp16():
    """The packed backends' PyTorch path dequantizes and rotates every layer, then casts to the
    query's dtype: the same overshoot (and RoPE's turn of a 65504 channel) made inf there."""
    from ragcompress.runtime.packed import PackedSegments
    from ragcompress.testing import PlainRotary

    blob = codec.encode(fp16_max_channel_kv(), QuantConfig("int8"))
    packed = PackedSegments.from_blobs([codec.parse(blob).packed()], 5, PlainRotary(16))
    keys, values, _ = packed._dense_layers(torch.float16)[1]
    assert bool(keys.isfinite().all()) and bool(values.isfinite().all())


def test_the_fp16_clamp_leaves_every_value_in_range_bit_for_bit():
    """Every finite fp16 value, and fp32 values between them, cast as a plain ``.to(float16)``
    does; only values beyond ±65504 change (to ±65504, not inf); other dtypes are not clamped."""
    from ragcompress.kv.quant import FP16_MAX, cast_dequantized

    every = torch.arange(-(1 << 15), 1 << 15, dtype=torch.int32).to(torch.int16).view(torch.float16)
    every = every[every.isfinite()].float()
    between = (torch.rand(100_000, generator=torch.Generator().manual_seed(0)) * 2 - 1) * FP16_MAX
    for x in (every, between, torch.tensor([65519.99, -65519.99, 65504.0, -0.0, 1e-8])):
        assert torch.equal(cast_dequantized(x.clone(), torch.float16).view(torch.int16), x.half().view(torch.int16))
    over = torch.tensor([65520.0, -65566.0, 1e9])
    assert cast_dequantized(over.clone(), torch.float16).tolist() == [65504.0, -65504.0, 65504.0]
    for dtype in (torch.float32, torch.bfloat16):
        assert torch.equal(cast_dequantized(over.clone(), dtype), over.to(dtype))


@pytest.mark.parametrize("make", [random_kv, ragged_kv, uneven_kv])
@pytest.mark.parametrize("scheme", ["int8", "int4", "int2/int8"])
def test_decoding_to_fp16_is_the_fp32_decoding_cast_where_in_range(make, scheme):
    """What decoding in fp16 returned before the clamp (the fp32 rows cast), bit for bit, on
    every path: grid, kept rows, values and low-rank rebuilt keys."""
    from ragcompress.kv.lowrank import RankSpec, fit_basis

    quant = QuantConfig.from_name(scheme, 8)
    kv = make()
    segment = codec.parse(codec.encode(kv, quant))
    half, wide = segment.dense(torch.float16), segment.dense(torch.float32)
    assert torch.equal(half.keys.view(torch.int16), wide.keys.half().view(torch.int16))
    assert torch.equal(half.values.view(torch.int16), wide.values.half().view(torch.int16))
    basis = fit_basis([random_kv(*kv.keys.shape, seed=s) for s in range(1, 4)], RankSpec(rank=8))
    latent = codec.parse(codec.encode(kv, quant, basis))
    half, wide = latent.dense(torch.float16, basis), latent.dense(torch.float32, basis)
    assert torch.equal(half.keys.view(torch.int16), wide.keys.half().view(torch.int16))
    assert torch.equal(half.values.view(torch.int16), wide.values.half().view(torch.int16))


def test_a_prefix_whose_cache_overflowed_is_refused_and_nothing_is_written(
    overflowing_model_dir, passages_file, tmp_path
):
    """The system prompt holds "helpful": in float16 the prompt prefix's cache is NaN, which an
    unquantized store kept (every answer read it) and a quantized one stored too before its first
    passage failed. The prefix is refused by name, before the store exists."""
    from ragcompress.errors import UnstorableCacheError
    from ragcompress.indexing import IndexConfig, index
    from ragcompress.testing import HashEmbedder

    embedder = HashEmbedder()
    with pytest.raises(
        UnstorableCacheError,
        match=r"^the prompt prefix: the cache holds inf or NaN \(keys of layer 0\): "
        r"the model overflowed computing it in float16; .*\(nothing was written\)$",
    ):
        index(
            passages_file,
            tmp_path / "store",
            model=str(overflowing_model_dir(" helpful")),
            config=IndexConfig(quant="none", embedder=embedder.name),
            embedder=embedder,
            dtype="float16",
        )
    assert not (tmp_path / "store").exists()


def test_a_refused_cache_names_its_passage():
    """The codec does not know which passage it encodes: the record names it, for finite values
    beyond fp16's range too (a bfloat16 model's keys of ±1.9e5 under int8)."""
    import numpy as np

    from ragcompress.errors import UnstorableCacheError
    from ragcompress.indexing.indexer import passage_record
    from ragcompress.indexing.inputs import PassageInput

    kv = random_kv()
    kv = PassageKV.full(kv.keys.bfloat16(), kv.values.bfloat16())
    kv.keys[0, 1, 4, 3] = -1.9e5
    passage = PassageInput("doc-7", "text")
    with pytest.raises(
        UnstorableCacheError,
        match=r"^passage 'doc-7': cannot quantize to int8: a group spans \[-190464, .*"
        r"store this cache unquantized .*, or leave the passage out of the input$",
    ):
        passage_record(passage, kv, QuantConfig("int8"), np.zeros(4, dtype=np.float32))
    assert passage_record(passage, kv, QuantConfig("none"), np.zeros(4, dtype=np.float32)).kept == 3 * 2 * 37
