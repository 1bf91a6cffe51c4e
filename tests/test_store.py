"""The store: round trip, resume, and refusal of stores built for something else."""

from __future__ import annotations

import json
import re

import pytest
import torch

from ragcompress.errors import InputError, StoreError, StoreMismatchError
from ragcompress.indexing import IndexConfig, Indexer, index
from ragcompress.indexing.encoder import PassageEncoder
from ragcompress.kv.quant import QuantConfig
from ragcompress.prompt import PromptTemplate
from ragcompress.store import KVStore
from ragcompress.store.codec import decode, encode
from ragcompress.store.manifest import build_digest


def checksums(store_path) -> dict[str, str]:
    with KVStore.open(store_path) as store:
        return {e.id: e.checksum for e in store.catalogue.entries()}


def test_round_trip_is_bit_exact_for_none(tiny_lm, passages_file, tmp_path, embedder):
    store_path = tmp_path / "store"
    index(passages_file, store_path, lm=tiny_lm, embedder=embedder)
    encoder = PassageEncoder(tiny_lm, PromptTemplate.from_tokenizer(tiny_lm.tokenizer))
    records = [json.loads(line) for line in passages_file.read_text().splitlines()]
    first = records[0]
    # index() encodes in batches of 8: the same batch must give the same bits.
    expected = encoder.encode([encoder.tokens.passage(r["text"]) for r in records])[0]
    with KVStore.open(store_path) as store:
        got = store.load_kv(store.entry(first["id"]))
        assert torch.equal(got.keys, expected.keys)
        assert torch.equal(got.values, expected.values)
        assert got.num_tokens == expected.num_tokens == len(encoder.tokens.passage(first["text"]))
        assert len(store) == 8


def test_batched_encoding_equals_one_at_a_time(tiny_lm, passages_file):
    encoder = PassageEncoder(tiny_lm, PromptTemplate.from_tokenizer(tiny_lm.tokenizer))
    texts = [json.loads(line)["text"] for line in passages_file.read_text().splitlines()[:3]]
    ids = [encoder.tokens.passage(t) for t in texts]
    batched = encoder.encode(ids)
    for one_ids, kv in zip(ids, batched, strict=True):
        single = encoder.encode([one_ids])[0]
        torch.testing.assert_close(kv.keys, single.keys, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(kv.values, single.values, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_a_batch_moves_a_cache_only_by_rounding_in_its_dtype(tiny_model_dir, passages_file, tmp_path, embedder, dtype):
    """What docs/guarantees.md says of ``--batch-size``, per dtype. One batch size gives the same
    bytes every time. Another (passages right-padded to a batch's longest) moves a cache by
    rounding in the model's dtype only, here within 16 units of rounding of its largest value:
    float32's last bits; in bfloat16 and float16 units of their far coarser rounding, which a
    deep model grows enough to change the rows a compressor keeps (SmolLM2 in bfloat16, snapkv
    0.3: 11 of 24 passages at batch 1 against 8; in float32 none). So a store in those dtypes
    depends on its batch size, and a resume keeps the stopped run's
    (``test_a_resume_keeps_the_batch_size_its_stopped_run_recorded``)."""
    from ragcompress.models import load_model

    lm = load_model(str(tiny_model_dir("llama")), dtype=dtype)
    settings = {"lm": lm, "embedder": embedder, "config": IndexConfig(quant="none")}
    stores = {name: tmp_path / name for name in ("batch4", "batch4-again", "batch1")}
    index(passages_file, stores["batch4"], batch_size=4, **settings)
    index(passages_file, stores["batch4-again"], batch_size=4, **settings)
    index(passages_file, stores["batch1"], batch_size=1, **settings)
    assert checksums(stores["batch4"]) == checksums(stores["batch4-again"])
    lengths = set()
    with KVStore.open(stores["batch4"]) as batched, KVStore.open(stores["batch1"]) as alone:
        for entry in alone.catalogue.entries():
            one, four = alone.load_kv(entry), batched.load_kv(batched.entry(entry.id))
            lengths.add(one.num_tokens)
            assert four.num_tokens == one.num_tokens
            rounding = 16 * torch.finfo(getattr(torch, dtype)).eps
            for got, expected in ((four.keys, one.keys), (four.values, one.values)):
                torch.testing.assert_close(got, expected, rtol=0, atol=rounding * float(expected.abs().max()))
    assert len(lengths) > 4  # passages of different lengths: padding in every batch


def test_resume_skips_finished_passages_and_matches_clean_run(tiny_lm, passages_file, tmp_path, embedder):
    """A store extended by a run over the whole input skips what it holds and equals a clean run,
    byte for byte, where the first run ended on a batch boundary (docs/guarantees.md: batches are
    encoded whole, and a passage encoded in another batch may differ in its last bits on CPUs
    whose matrix kernels depend on the batch's shape, as this test once showed on an AMD EPYC)."""
    half = tmp_path / "half.jsonl"
    half.write_text("\n".join(passages_file.read_text().splitlines()[:4]) + "\n")
    resumed = tmp_path / "resumed"
    settings = {"lm": tiny_lm, "embedder": embedder, "config": IndexConfig(quant="int4"), "batch_size": 4}
    index(half, resumed, **settings)
    report = index(passages_file, resumed, **settings)
    assert (report.indexed, report.skipped) == (4, 4)
    clean = tmp_path / "clean"
    index(passages_file, clean, **settings)
    assert checksums(resumed) == checksums(clean)
    again = index(passages_file, resumed, **settings)
    assert (again.indexed, again.skipped) == (0, 8)


def test_catalogue_reads_many_entries_in_chunks(tiny_lm, passages_file, tmp_path, embedder, monkeypatch):
    """``Catalogue.get_many`` returns the stored ones of the ids asked for, each as ``get`` would,
    across the chunks of its ``IN (...)`` queries; ids not stored are left out."""
    import ragcompress.store.catalogue as catalogue

    store = tmp_path / "store"
    index(passages_file, store, lm=tiny_lm, embedder=embedder, config=IndexConfig(quant="int4"))
    monkeypatch.setattr(catalogue, "_CHUNK", 3)
    with KVStore.open(store) as kv:
        ids = [entry.id for entry in kv.catalogue.entries()]
        found = kv.catalogue.get_many([*ids, "not-stored", ids[0]])
        assert sorted(found) == sorted(ids) and len(ids) == 8
        assert all(found[pid] == kv.catalogue.get(pid) for pid in ids)


def test_other_compression_on_existing_store_is_refused(tiny_lm, passages_file, tmp_path, embedder):
    store = tmp_path / "store"
    index(passages_file, store, lm=tiny_lm, embedder=embedder)
    before = checksums(store)
    with pytest.raises(StoreMismatchError, match="compression"):
        index(passages_file, store, lm=tiny_lm, embedder=embedder, config=IndexConfig(quant="int8"))
    assert checksums(store) == before


def test_other_model_is_refused_naming_both(tiny_model_dir, passages_file, tmp_path, embedder):
    from ragcompress.models import load_model
    from ragcompress.runtime.engine import Engine

    store = tmp_path / "store"
    index(passages_file, store, model=str(tiny_model_dir("llama")), embedder=embedder)
    other = load_model(str(tiny_model_dir("llama", seed=1)))
    with pytest.raises(StoreMismatchError) as info:
        index(passages_file, store, lm=other, embedder=embedder)
    message = str(info.value)  # both builds, each by its reference and fingerprint
    assert f"{tiny_model_dir('llama')} (" in message and f"{tiny_model_dir('llama', seed=1)} (" in message
    with pytest.raises(StoreMismatchError, match="fingerprint"):
        Engine(KVStore.open(store), other, embedder)


def test_another_embedded_model_is_refused_before_it_loads(tiny_lm, passages_file, tmp_path, embedder, monkeypatch):
    """Adding to a store of one embedded model with the other named: the names alone settle it,
    so the refusal comes before the model is converted and loaded (seconds)."""
    import ragcompress.indexing.run as run_module

    store = tmp_path / "store"
    index(passages_file, store, lm=tiny_lm, embedder=embedder)
    manifest = {**json.loads((store / "manifest.json").read_text()), "model_ref": "smollm2-135m"}
    manifest["build_sha256"] = build_digest(manifest)  # a store built for the other model, not an edited one
    (store / "manifest.json").write_text(json.dumps(manifest))
    monkeypatch.setattr(run_module, "load_model", lambda *a, **k: pytest.fail("loaded the model"))
    with pytest.raises(StoreMismatchError, match="built with model smollm2-135m, this run uses qwen2.5-coder-0.5b"):
        index(passages_file, store, model="qwen2.5-coder-0.5b", embedder=embedder)


def test_an_engine_refuses_another_embedder_than_the_stores(tiny_lm, passages_file, tmp_path, embedder):
    """An embedder of the same dimension would retrieve other passages without any error."""
    from ragcompress.runtime.engine import Engine

    store = tmp_path / "store"
    index(passages_file, store, lm=tiny_lm, embedder=embedder)

    class Other(type(embedder)):  # the same vectors under another name
        name = "another-embedder"

    other = Other.__new__(Other)
    other.__dict__.update(embedder.__dict__)
    other.name = "another-embedder"
    with pytest.raises(StoreMismatchError, match="another-embedder"):
        Engine(KVStore.open(store), tiny_lm, other)
    Engine(KVStore.open(store), tiny_lm, embedder).close()
    with pytest.raises(StoreMismatchError, match="another-embedder"):  # adding to it is refused alike
        Indexer.for_store(KVStore.open(store).manifest, tiny_lm, other)
    Indexer.for_store(KVStore.open(store).manifest, tiny_lm, embedder)


def test_format_version_mismatch_is_refused(tiny_lm, passages_file, tmp_path, embedder):
    store = tmp_path / "store"
    index(passages_file, store, lm=tiny_lm, embedder=embedder)
    manifest = json.loads((store / "manifest.json").read_text())
    manifest["format_version"] = 999
    (store / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(StoreMismatchError, match="999"):
        KVStore.open(store)


def test_changed_text_under_same_id_is_refused(tiny_lm, passages_file, tmp_path, embedder):
    store = tmp_path / "store"
    index(passages_file, store, lm=tiny_lm, embedder=embedder)
    lines = passages_file.read_text().splitlines()
    record = json.loads(lines[0])
    record["text"] += " Changed."
    changed = tmp_path / "changed.jsonl"
    changed.write_text(json.dumps(record) + "\n")
    with pytest.raises(InputError, match=re.escape(record["id"])):
        index(changed, store, lm=tiny_lm, embedder=embedder)


def test_missing_store_is_a_clear_error(tmp_path):
    with pytest.raises(StoreError, match="does not exist"):
        KVStore.open(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(StoreError, match="not a ragcompress store"):
        KVStore.open(tmp_path / "empty")


def test_codec_keeps_model_dtype_for_none():
    from ragcompress.kv import PassageKV

    kv = PassageKV.full(torch.randn(1, 1, 4, 8, dtype=torch.float64), torch.randn(1, 1, 4, 8, dtype=torch.float64))
    back = decode(encode(kv, QuantConfig("none")), torch.float64)
    assert torch.equal(back.keys, kv.keys)


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"batch_size": 0}, ValueError, "batch_size must be a whole number of passages, 1 or more; got 0"),
        ({"batch_size": 2.5}, ValueError, "got 2.5"),
        ({"config": {"quant": "int8"}}, TypeError, "config must be an IndexConfig"),
        ({"model": "another-model"}, ValueError, "model='another-model' and lm .* name different models"),
    ],
    ids=["batch-0", "batch-float", "config-dict", "model-beside-lm"],
)
def test_index_refuses_python_arguments_the_cli_cannot_pass_before_touching_the_store(
    tiny_lm, passages_file, tmp_path, kwargs, error, message
):
    """Batch size 0 indexed nothing and reported success; 2.5 or -1 failed midway and left a
    store marked mid-run; a dict config failed deep in the indexer; ``model`` beside an ``lm`` of
    another model was ignored."""
    with pytest.raises(error, match=message):
        index(passages_file, tmp_path / "store", lm=tiny_lm, **kwargs)
    assert not (tmp_path / "store").exists()


def test_index_config_fields_are_checked_for_their_kind():
    """``ratio="0.5"`` (from a settings file read as text) failed in a comparison with a bare
    TypeError; a bool passed for a count is refused, though Python counts it as an int."""
    with pytest.raises(TypeError, match="ratio must be float or None, got str '0.5'"):
        IndexConfig(method="knorm", ratio="0.5")
    with pytest.raises(TypeError, match="rank must be int or None, got bool True"):
        IndexConfig(rank=True)
    assert IndexConfig(method="knorm", ratio=1).ratio == 1  # an int is a float's value


def test_a_closed_store_says_it_was_closed_not_that_it_is_damaged(tiny_lm, passages_file, tmp_path, embedder):
    """After close(), a KVStore's or an Engine's reads said "catalogue ... cannot be read (Cannot
    operate on a closed database.); run ragcompress verify or rebuild the store": SQLite's
    ProgrammingError is a DatabaseError, so a closed object read as a damaged store."""
    from ragcompress.runtime.engine import Engine

    store_path = tmp_path / "store"
    index(passages_file, store_path, lm=tiny_lm, embedder=embedder)
    store = KVStore.open(store_path)
    vector = embedder.embed(["a question"])[0]
    store.search(vector, 3)
    store.close()
    for use in (lambda: len(store), lambda: store.search(vector, 3), lambda: store.entry("x")):
        with pytest.raises(StoreError, match="was closed .*open it again") as caught:
            use()
        assert "verify" not in str(caught.value) and "rebuild" not in str(caught.value)
    store.close()  # closing twice is harmless
    with Engine(KVStore.open(store_path), tiny_lm, embedder) as engine:
        pass
    with pytest.raises(StoreError, match="was closed"):
        len(engine.store)
