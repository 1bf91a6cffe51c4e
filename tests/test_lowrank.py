"""Low-rank latents (issue 16): projection, codec, store basis, index options."""

from __future__ import annotations

import shutil

import pytest
import torch

from ragcompress.errors import CorruptSegmentError, InputError, StoreMismatchError
from ragcompress.indexing import IndexConfig, index
from ragcompress.indexing import run as run_module
from ragcompress.kv import PassageKV
from ragcompress.kv.lowrank import RankSpec, fit_basis
from ragcompress.kv.quant import QuantConfig
from ragcompress.store import KVStore
from ragcompress.store.basis import basis_from_bytes, basis_sha256, basis_to_bytes
from ragcompress.store.codec import decode, encode, parse
from ragcompress.store.verify import verify_store


def low_rank_caches(seed: int, count: int = 6, layers: int = 3, heads: int = 2, d: int = 32, n: int = 40):
    """Caches whose rows live near a rank-8 subspace per (layer, head), with an offset and noise."""
    gen = torch.Generator().manual_seed(seed)
    mix = torch.randn(layers, heads, 8, d, generator=gen)
    offset = torch.randn(layers, heads, 1, d, generator=gen) * 3
    caches = []
    for _ in range(count):
        k = (
            torch.randn(layers, heads, n, 8, generator=gen) @ mix
            + offset
            + 0.05 * torch.randn(layers, heads, n, d, generator=gen)
        )
        v = torch.randn(layers, heads, n, 8, generator=gen) @ mix.flip(-1) + 0.05 * torch.randn(
            layers, heads, n, d, generator=gen
        )
        caches.append(PassageKV.full(k, v))
    return caches


def ragged(kv: PassageKV, seed: int) -> PassageKV:
    """``kv`` with per-head budgets: each head keeps a random subset of rows (an evicted cache)."""
    gen = torch.Generator().manual_seed(seed)
    layers, heads, n, d = kv.keys.shape
    lengths = torch.randint(3, n, (layers, heads), generator=gen)
    n_max = int(lengths.max())
    keys = torch.zeros(layers, heads, n_max, d)
    values = torch.zeros_like(keys)
    positions = torch.zeros(layers, heads, n_max, dtype=torch.long)
    for layer in range(layers):
        for head in range(heads):
            rows = torch.randperm(n, generator=gen)[: int(lengths[layer, head])].sort().values
            keys[layer, head, : len(rows)] = kv.keys[layer, head, rows]
            values[layer, head, : len(rows)] = kv.values[layer, head, rows]
            positions[layer, head, : len(rows)] = rows
    return PassageKV(keys, values, positions, lengths, kv.num_tokens)


def rel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("scheme", ["fp16", "int8", "int4"])
def test_full_rank_reproduces_the_row_store_within_quantization_error(scheme):
    caches = low_rank_caches(0)
    basis = fit_basis(caches, RankSpec(rank=32))
    for kv in (caches[0], ragged(caches[1], 1)):
        plain = decode(encode(kv, QuantConfig(scheme)))
        latent = decode(encode(kv, QuantConfig(scheme), basis), basis=basis)
        mask = kv.valid_mask().unsqueeze(-1)
        for got, want, ref in ((latent.keys, plain.keys, kv.keys), (latent.values, plain.values, kv.values)):
            plain_error = rel_error(want * mask, ref * mask)
            assert rel_error(got * mask, ref * mask) <= 2 * plain_error + 2e-3  # fp16 basis: ~1e-3
        assert torch.equal(latent.lengths, kv.lengths) and torch.equal(latent.positions, plain.positions)
        assert not (latent.keys * ~mask).any()  # padding rows are zero, as in row stores


@pytest.mark.parametrize("scheme", ["none", "fp16", "int8", "int4", "int4/int2"])
@pytest.mark.parametrize("values", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_round_trip_is_what_the_store_gives_back_with_the_projections_gradient(scheme, values, dtype):
    """Training's view of a low-rank store (``LowRankBasis.round_trip``, ``train --kv-rank``)
    equals a stored and decoded segment on every real row, and passes the projection's gradient
    straight through the rounding; for a bfloat16 model too (a ``none`` store keeps its latents
    in the cache's dtype, which training did not round to)."""
    caches = low_rank_caches(0)
    basis = fit_basis(caches[:4], RankSpec(rank=8, values=values))
    quant = QuantConfig.from_name(scheme, 8)
    kv = ragged(caches[5], 2)
    if dtype != torch.float32:
        kv = PassageKV(kv.keys.to(dtype), kv.values.to(dtype), kv.positions, kv.lengths, kv.num_tokens)
    stored = decode(encode(kv, quant, basis), basis=basis, dtype=dtype)
    mask = kv.valid_mask().unsqueeze(-1)
    kinds = (("k", kv.keys, stored.keys), ("v", kv.values, stored.values)) if values else (("k", kv.keys, stored.keys),)
    for kind, rows, want in kinds:
        x = rows.clone().requires_grad_(True)
        got = basis.round_trip(kind, x, kv.lengths, quant)
        assert got.dtype == want.dtype == dtype
        if dtype == torch.float32:
            torch.testing.assert_close(got * mask, want * mask, atol=1e-5, rtol=1e-5)
        else:  # the same latents, rebuilt in fp32 and rounded once to bfloat16 by both
            torch.testing.assert_close((got * mask).float(), (want * mask).float(), atol=0, rtol=0)
        if dtype != torch.float32:
            continue  # the gradient, in fp32 (a bfloat16 one would only add its rounding)
        weight = torch.randn(got.shape, generator=torch.Generator().manual_seed(4))
        (got * weight).sum().backward()
        projector = torch.stack([b @ b.transpose(1, 2) for b in basis.bases[kind]])  # [L, H, d, d]
        torch.testing.assert_close(x.grad, weight @ projector, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("scheme", ["fp16", "int8"])
def test_round_trip_refuses_latents_beyond_fp16_range(scheme):
    """A key scaled to ~1e5 projects to latents fp16 cannot hold (they became inf)."""
    caches = low_rank_caches(0)
    basis = fit_basis(caches[:4], RankSpec(rank=8))
    kv = caches[5]
    with pytest.raises(ValueError, match="out of fp16 range"):
        basis.round_trip("k", -1e5 * kv.keys, kv.lengths, QuantConfig(scheme))


def test_low_rank_recovers_a_low_rank_cache_and_is_smaller():
    caches = low_rank_caches(0)
    basis = fit_basis(caches[:4], RankSpec(rank=8))
    kv = caches[5]  # not in the calibration sample
    blob = encode(kv, QuantConfig("int8"), basis)
    got = decode(blob, basis=basis)
    assert rel_error(got.keys, kv.keys) < 0.03 and rel_error(got.values, kv.values) < 0.05
    assert len(blob) < 0.4 * len(encode(kv, QuantConfig("int8")))
    assert parse(blob).ranks == {"k": (8, 8, 8), "v": (8, 8, 8)}


def test_projection_is_deterministic_for_a_calibration_sample():
    spec = RankSpec(energy=0.9)
    first = fit_basis(low_rank_caches(0), spec)
    again = fit_basis(low_rank_caches(0), spec)
    other = fit_basis(low_rank_caches(7), spec)
    assert basis_to_bytes(first) == basis_to_bytes(again)
    assert basis_sha256(first) != basis_sha256(other)
    kv = low_rank_caches(3)[0]
    assert encode(kv, QuantConfig("int4"), first) == encode(kv, QuantConfig("int4"), again)
    restored = basis_from_bytes(basis_to_bytes(first))
    assert basis_sha256(restored) == basis_sha256(first)
    assert restored.ranks("k") == first.ranks("k")


def test_energy_ranks_keep_the_energy_and_progressive_favours_shallow_layers():
    gen = torch.Generator().manual_seed(0)
    # channel scales decay geometrically: the variance a rank keeps is known in closed form
    scales = 0.8 ** torch.arange(64.0)
    caches = [PassageKV.full(*(torch.randn(2, 6, 1, 50, 64, generator=gen) * scales).unbind(0)) for _ in range(8)]
    # rank r keeps about 1 - 0.64**r of the variance: 0.95 needs 7 directions (0.956), 0.977 needs
    # 9 (0.972 at 8, 0.982 at 9); ranks round up to a multiple of 8
    basis = fit_basis(caches, RankSpec(energy=0.95))
    finer = fit_basis(caches, RankSpec(energy=0.977))
    for kind in ("k", "v"):
        assert all(e >= 0.95 - 1e-6 for e in basis.energy[kind])
        assert basis.ranks(kind) == (8,) * 6
        assert all(e >= 0.977 - 1e-6 for e in finer.energy[kind])
        assert finer.ranks(kind) == (16,) * 6
    progressive = fit_basis(caches, RankSpec(energy=0.999, schedule="progressive"))
    ranks = progressive.ranks("k")
    assert ranks is not None and list(ranks) == sorted(ranks, reverse=True) and ranks[0] > ranks[-1]
    keys_only = fit_basis(caches, RankSpec(rank=16, values=False))
    assert keys_only.ranks("v") is None
    kv = caches[0]
    got = decode(encode(kv, QuantConfig("int8"), keys_only), basis=keys_only)
    assert torch.allclose(got.values, decode(encode(kv, QuantConfig("int8"))).values)


def test_an_energy_rank_is_the_smallest_multiple_of_eight_that_keeps_the_energy():
    """Eight equal directions over a faint tail: eight keep about 0.99 of the variance, seven about
    0.87. The rank is 8; without this, a rank read one direction short (checking what ``r - 1``
    directions keep) asked for 16, and the geometric test above cannot tell (7 already keep 0.95)."""
    gen = torch.Generator().manual_seed(0)
    scales = torch.cat([torch.ones(8), torch.full((56,), 0.03)])
    caches = [PassageKV.full(*(torch.randn(2, 1, 1, 200, 64, generator=gen) * scales).unbind(0)) for _ in range(4)]
    basis = fit_basis(caches, RankSpec(energy=0.95))
    assert basis.ranks("k") == basis.ranks("v") == (8,)


def test_each_basis_direction_has_its_largest_entry_positive():
    """An eigenvector's sign is arbitrary (``eigh`` may flip it between LAPACK builds or inputs),
    so each is fixed: its largest-magnitude entry positive. Without this the same calibration
    sample could give another machine a basis of other signs (other latents, another basis
    checksum), which the determinism test, run on one machine, cannot see."""
    basis = fit_basis(low_rank_caches(0), RankSpec(rank=8))
    for kind in ("k", "v"):
        for layer in basis.bases[kind]:  # [H, d, r]
            peak = layer.gather(-2, layer.abs().argmax(-2, keepdim=True))
            assert bool((peak > 0).all())


def test_rank_spec_validates_its_fields():
    for bad in (dict(), dict(rank=8, energy=0.9), dict(rank=12), dict(energy=1.5), dict(rank=8, schedule="x")):
        with pytest.raises(ValueError):
            RankSpec(**bad)
    with pytest.raises(ValueError, match="rank"):
        IndexConfig(rank=10)


def test_a_latent_segment_needs_its_own_basis():
    caches = low_rank_caches(0)
    basis = fit_basis(caches, RankSpec(rank=8))
    blob = encode(caches[0], QuantConfig("int4"), basis)
    with pytest.raises(CorruptSegmentError, match="no low-rank basis"):
        decode(blob)
    with pytest.raises(CorruptSegmentError, match="ranks"):
        decode(blob, basis=fit_basis(caches, RankSpec(rank=16)))


def test_index_with_rank_and_a_store_refuses_a_mismatched_basis(
    tiny_lm, passages_file, tmp_path, embedder, monkeypatch
):
    full = tmp_path / "full"
    config = IndexConfig(quant="int8", rank=16, calibration_passages=4)  # the tiny model's head_dim
    index(passages_file, full, lm=tiny_lm, embedder=embedder, config=config)
    plain = tmp_path / "plain"
    index(passages_file, plain, lm=tiny_lm, embedder=embedder, config=IndexConfig(quant="int8"))
    low = tmp_path / "low"
    index(passages_file, low, lm=tiny_lm, embedder=embedder, config=IndexConfig(quant="int8", rank=8))
    with KVStore.open(full) as a, KVStore.open(plain) as b:
        lowrank = a.manifest.compression["lowrank"]
        assert lowrank["ranks_k"] == [16, 16] and lowrank["calibration"] == "input:first-4"
        assert a.basis_bytes > 0 and b.basis_bytes == 0
        for entry in a.catalogue.entries():
            got, want = a.load_kv(entry), b.load_kv(b.entry(entry.id))
            assert rel_error(got.keys, want.keys) < 0.02 and rel_error(got.values, want.values) < 0.02
    # resuming reuses the stored basis; another rank on the same store is refused
    again = index(passages_file, full, lm=tiny_lm, embedder=embedder, config=config)
    assert again.skipped == 8
    with pytest.raises(StoreMismatchError):
        index(passages_file, full, lm=tiny_lm, embedder=embedder, config=IndexConfig(quant="int8", rank=8))
    # a rank on a store of full rows is refused before a basis is fitted for it
    fits = []
    monkeypatch.setattr(run_module, "fit_calibration_basis", lambda *a, **k: fits.append(a))
    with pytest.raises(StoreMismatchError, match="full-rank rows"):
        index(passages_file, plain, lm=tiny_lm, embedder=embedder, config=IndexConfig(quant="int8", rank=8))
    assert fits == []
    monkeypatch.undo()
    assert verify_store(full).problems == []
    shutil.copy(low / "basis.safetensors", full / "basis.safetensors")
    with KVStore.open(full) as store, pytest.raises(StoreMismatchError, match="basis"):
        store.load_kv(next(iter(store.catalogue.entries())))
    assert {p.kind for p in verify_store(full).problems} == {"basis", "segment"}


@pytest.mark.parametrize(
    "content, message",
    [
        (None, "do not exist"),
        ("", "holds no passages"),
        ('{"id": "l", "text": "' + "word " * 6000 + '"}\n', r"'l' has \d+ tokens, more than .* can attend to"),
    ],
)
def test_calibration_passages_are_checked_before_the_basis_is_fitted(
    tiny_lm, passages_file, tmp_path, embedder, content, message
):
    """An empty ``--calibration`` file was a ValueError from the fit, one missing was named the
    "input", a passage longer than the model's positions was encoded past them without a word."""
    calibration = tmp_path / "calibration.jsonl"
    if content is not None:
        calibration.write_text(content)
    config = IndexConfig(quant="int8", rank=8, calibration=str(calibration))
    with pytest.raises(
        InputError, match=rf"calibration.jsonl \(--calibration, IndexConfig\(calibration=...\).*{message}"
    ):
        index(passages_file, tmp_path / "store", lm=tiny_lm, embedder=embedder, config=config)
    assert not (tmp_path / "store").exists()


def test_only_the_passages_a_store_keeps_are_checked_for_its_probe(tiny_model_dir, tmp_path, embedder, monkeypatch):
    """KVzip's probe reaches about twice a passage: ``index`` refuses an input passage past it
    before any is encoded. A ``--calibration`` file's passages are encoded for the basis and never
    compressed, so one past the probe (within the positions) is fitted on; the same passage in the
    input (the basis fitted on it, then stored) is refused before the basis is fitted."""
    import dataclasses

    from conftest import write_jsonl

    model = str(tiny_model_dir("llama", max_position_embeddings=400))
    long = write_jsonl(tmp_path / "long.jsonl", [{"id": "long", "text": "word " * 250}])
    short = write_jsonl(tmp_path / "short.jsonl", [{"id": "short", "text": "a short passage"}])
    config = IndexConfig(method="kvzip", ratio=0.5, quant="int8", rank=8, calibration=str(long))
    assert index(short, tmp_path / "store", model=model, embedder=embedder, config=config).indexed == 1

    def refused(*args, **kwargs):
        raise AssertionError("the basis was fitted")

    monkeypatch.setattr(run_module, "fit_calibration_basis", refused)
    on_input = dataclasses.replace(config, calibration=None)
    with pytest.raises(
        InputError, match=r"^--method kvzip scores passage long \(251 tokens\) .*\(nothing was written\)$"
    ):
        index(long, tmp_path / "other", model=model, embedder=embedder, config=on_input)


@pytest.mark.parametrize("ranks", [(8, 8, 8, 8), (8, 16, 8, 16), (16, 8, 4, 8)])
@pytest.mark.parametrize("quant_name", ["int4", "none"])
def test_latents_decode_to_their_per_layer_quantization_with_one_rank_or_several(ranks, quant_name):
    """``decode_latents`` decodes the layers that share a rank in one pass (all of them in the
    usual ``--rank R`` store); whatever the grouping, each layer gets its own per-channel
    quantization of its kept rows (or the rows themselves, unquantized), zeros on padding rows,
    in layer order."""
    from ragcompress.kv.quant import dequantize_keys_per_channel, quantize_keys_per_channel
    from ragcompress.store.latent import decode_latents, encode_latents

    torch.manual_seed(0)
    heads, n_max, quant = 2, 40, QuantConfig(quant_name, group_size=16)
    lengths = torch.tensor([[40, 23], [7, 40], [16, 1], [3, 33]])
    latents = [torch.randn(heads, n_max, r) * torch.linspace(3, 0.1, r) for r in ranks]
    tensors, meta = encode_latents("k", latents, lengths, quant, torch.float32)
    decoded = decode_latents("k", tensors, ranks, lengths, n_max, quant)
    assert [z.shape for z in decoded] == [z.shape for z in latents]
    for layer, z in enumerate(latents):
        if quant.bits is None:
            expected = z
        else:
            codes, scale, low = quantize_keys_per_channel(z.unsqueeze(0), lengths[layer : layer + 1], 4, 16)
            expected = dequantize_keys_per_channel(codes, scale, low, 16)[0]
        kept = torch.arange(n_max) < lengths[layer].unsqueeze(-1)
        assert torch.equal(decoded[layer][kept], expected[kept])
        assert not decoded[layer][~kept].any()


def test_bytes_per_token_counts_the_basis_once_over_the_whole_store(tmp_path):
    """``index``/``stats`` (every passage) and ``eval`` (the retrieved ones) report stored bytes by
    one formula: blobs over their tokens, the basis spread over all the store's tokens."""
    from types import SimpleNamespace

    from ragcompress.store.kvstore import KVStore

    entries = [SimpleNamespace(length=300, num_tokens=10), SimpleNamespace(length=100, num_tokens=30)]
    store = SimpleNamespace(
        catalogue=SimpleNamespace(entries=lambda: iter(entries)),
        basis_bytes=80,
        stored_bytes=lambda chosen: sum(e.length for e in chosen),
    )
    store.basis_bytes_per_token = lambda: KVStore.basis_bytes_per_token(store)
    assert KVStore.bytes_per_token(store) == (400 + 80) / 40
    assert KVStore.bytes_per_token(store, entries[:1]) == 300 / 10 + 80 / 40
    store.basis_bytes = 0
    assert KVStore.bytes_per_token(store, entries[1:]) == 100 / 30
    assert KVStore.bytes_per_token(store, []) == 0.0


def test_a_rank_above_head_dim_is_refused_not_clamped():
    """``--rank 128`` on a model of head_dim 64 was clamped to 64 without a word: no fewer numbers
    than the rows, and a basis on top. Full rank (= head_dim) stays allowed (the tests use it)."""
    from ragcompress.errors import InputError
    from ragcompress.kv.lowrank import CalibrationMoments

    torch.manual_seed(0)
    moments = CalibrationMoments()
    moments.add(PassageKV.full(torch.randn(2, 2, 40, 16), torch.randn(2, 2, 40, 16)))
    with pytest.raises(InputError, match=r"rank 24 is above the model's head_dim \(16\)"):
        moments.basis(RankSpec(rank=24))
    assert moments.basis(RankSpec(rank=16)).ranks("k") == (16, 16)


@pytest.mark.parametrize(
    "given",
    [{"calibration": "x.jsonl"}, {"calibration_passages": 8}, {"rank_values": False}, {"rank_schedule": "bogus"}],
)
def test_low_rank_options_without_a_rank_are_refused(given):
    """``--calibration``, ``--calibration-passages``, ``--no-rank-values`` and ``--rank-schedule``
    without ``--rank``/``--rank-energy`` built a full-rank store without a word."""
    with pytest.raises(ValueError, match="only to a low-rank store"):
        IndexConfig(**given)
    IndexConfig(rank=8, **{k: v for k, v in given.items() if k != "rank_schedule"})
