"""Learned passage caches (KV-Distill, ``ragcompress.distill``) on a tiny random model.

Both adaptor kinds (``forward``: peft LoRA inside the passage forward; ``cache``: a correction of
the cached keys and values) are held to the same anchors. An adaptor of zeros is the base store
bit for bit; a trained adaptor changes the caches
and round-trips through its files exactly; a store refuses caches of another adaptor (or of
none); one optimizer step lowers the distillation loss on its batch; the learned scorer keeps
exactly the budget, and its fit recovers a linear target.
"""

from __future__ import annotations

import dataclasses
import json
import warnings

import pytest
import torch

from ragcompress.compressors import CompressionContext, make_compressor
from ragcompress.distill.adaptor import Adaptor, lora_active, remove_adapter
from ragcompress.distill.distiller import Distiller
from ragcompress.distill.scorer import fit
from ragcompress.distill.train import TrainConfig
from ragcompress.errors import InputError, StoreMismatchError
from ragcompress.indexing import IndexConfig, index
from ragcompress.indexing.encoder import PassageEncoder
from ragcompress.kv import PassageKV
from ragcompress.kv.lowrank import RankSpec, fit_basis
from ragcompress.kv.quant import QuantConfig
from ragcompress.models import load_model
from ragcompress.prompt import PromptTemplate
from ragcompress.runtime.assemble import assemble
from ragcompress.runtime.generate import forward_logits
from ragcompress.store import KVStore, codec
from ragcompress.testing import noisy_adaptor


def blobs(store_path) -> dict[str, str]:
    """Every passage's segment checksum, after verifying each segment."""
    with KVStore.open(store_path) as store:
        return {e.id: (store.read_segment(e), e.checksum)[1] for e in store.catalogue.entries()}


KINDS = ["forward", "cache"]


@pytest.fixture(scope="module")
def lm(tiny_model_dir):
    return load_model(str(tiny_model_dir("llama")))


@pytest.mark.parametrize("kind", KINDS)
def test_zero_adaptor_is_the_base_store_bit_for_bit(lm, tmp_path, passages_file, embedder, kind):
    zero = Adaptor.initial(lm.model, rank=4, alpha=8, kind=kind)
    zero = dataclasses.replace(zero, meta={"base_fingerprint": lm.fingerprint}).save(tmp_path / "zero")
    trained = noisy_adaptor(lm, 1, kind=kind).save(tmp_path / "trained")
    common = dict(model=lm.ref, lm=lm, embedder=embedder, batch_size=3)
    index(passages_file, tmp_path / "base", config=IndexConfig(quant="int8"), **common)
    index(passages_file, tmp_path / "zero-store", config=IndexConfig(quant="int8", adaptor=str(zero)), **common)
    index(passages_file, tmp_path / "trained-store", config=IndexConfig(quant="int8", adaptor=str(trained)), **common)
    assert blobs(tmp_path / "zero-store") == blobs(tmp_path / "base")
    assert blobs(tmp_path / "trained-store") != blobs(tmp_path / "base")  # the adaptor is applied
    with KVStore.open(tmp_path / "trained-store") as store:
        assert store.manifest.encoding["adaptor"] == Adaptor.load(trained).hash


@pytest.mark.parametrize("kind", KINDS)
def test_an_adapted_encoder_without_its_adaptor_encodes_as_the_base_model(lm, kind):
    template = PromptTemplate.from_tokenizer(lm.tokenizer)
    base = PassageEncoder(lm, template)
    adapted = PassageEncoder(lm, template, noisy_adaptor(lm.model, 3, kind=kind))
    stripped = adapted.without_adaptor()
    assert stripped.prefix_kv is adapted.prefix_kv  # shared, not encoded again
    assert torch.equal(stripped.prefix_kv.keys, base.prefix_kv.keys)
    ids = [base.tokens.passage(t) for t in ("Melbourne is in Victoria.", "Apollo 11 landed on the Moon.")]
    for s, b, a in zip(stripped.encode(ids), base.encode(ids), adapted.encode(ids), strict=True):
        assert torch.equal(s.keys, b.keys) and torch.equal(s.values, b.values)
        assert not torch.equal(a.keys, b.keys)  # the adapted encoder itself is unchanged
    assert base.without_adaptor() is base


@pytest.mark.parametrize("kind", KINDS)
def test_adaptor_round_trips_to_identical_caches(lm, tmp_path, kind):
    adaptor = noisy_adaptor(lm, 2, scorer=True, kind=kind)
    loaded = Adaptor.load(adaptor.save(tmp_path / "a"))
    assert loaded.hash == adaptor.hash and loaded.has_scorer
    template = PromptTemplate.from_tokenizer(lm.tokenizer)
    ids = [PassageEncoder(lm, template).tokens.passage(t) for t in ("Melbourne is in Victoria.", "Apollo 11 landed.")]
    before = PassageEncoder(lm, template, adaptor).encode(ids)
    after = PassageEncoder(lm, template, loaded).encode(ids)
    base = PassageEncoder(lm, template).encode(ids)
    for a, b, c in zip(before, after, base, strict=True):
        assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)
        assert not torch.equal(a.keys, c.keys)


def test_a_saved_adaptor_follows_the_umask(lm, tmp_path):
    """safetensors writes the adaptor's weights 0600 whatever the umask, so an adaptor trained for
    a shared store could not be read by the others the umask shares with (its JSON beside it
    could); its files get the modes ``open`` gives under the umask."""
    import os
    import stat

    old = os.umask(0o002)
    try:
        folder = noisy_adaptor(lm, 2).save(tmp_path / "a")
    finally:
        os.umask(old)
    assert {p.name: stat.S_IMODE(p.stat().st_mode) for p in folder.iterdir()} == {
        "adaptor.safetensors": 0o664,
        "adaptor.json": 0o664,
    }
    (tmp_path / "a" / "adaptor.json").write_text(
        (tmp_path / "a" / "adaptor.json").read_text().replace('"hash": "', '"hash": "0')
    )
    with pytest.raises(Exception, match="hash"):
        Adaptor.load(tmp_path / "a")


def test_store_refuses_another_adaptor(lm, tmp_path, passages_file, embedder):
    first = noisy_adaptor(lm, 3).save(tmp_path / "first")
    second = noisy_adaptor(lm, 4).save(tmp_path / "second")
    common = dict(model=lm.ref, lm=lm, embedder=embedder)
    index(passages_file, tmp_path / "store", config=IndexConfig(adaptor=str(first)), **common)
    with pytest.raises(StoreMismatchError, match="adaptor .* this run uses adaptor"):
        index(passages_file, tmp_path / "store", config=IndexConfig(adaptor=str(second)), **common)
    with pytest.raises(StoreMismatchError, match="no adaptor"):
        index(passages_file, tmp_path / "store", config=IndexConfig(), **common)
    with pytest.raises(StoreMismatchError, match="built with compression"):  # a preset's: compression named first
        index(passages_file, tmp_path / "store", config=IndexConfig(adaptor=str(second), quant="int4"), **common)
    index(passages_file, tmp_path / "store", config=IndexConfig(adaptor=str(first)), **common)  # same: resumes


def test_python_index_adds_to_a_store_of_an_unpackaged_adaptor_given_by_folder_alone(
    lm, tmp_path, passages_file, embedder
):
    """``index(adaptor=FOLDER)`` without a config is what ``ragcompress index --adaptor FOLDER``
    alone is: the store's other settings with the adaptor it cannot find by its recorded hash.
    Before, a Python caller had to restate every setting; another adaptor is still refused, and
    an adaptor beside a config is ambiguous."""
    ours, other = noisy_adaptor(lm, 3).save(tmp_path / "ours"), noisy_adaptor(lm, 4).save(tmp_path / "other")
    lines = passages_file.read_text().splitlines()
    first = tmp_path / "first.jsonl"
    first.write_text("\n".join(lines[:2]) + "\n")
    common = dict(model=lm.ref, lm=lm, embedder=embedder)
    store = tmp_path / "store"
    config = IndexConfig(method="global:knorm", ratio=0.5, quant="int4", adaptor=str(ours))
    index(first, store, config=config, **common)
    with pytest.raises(InputError, match="not packaged; pass its folder"):
        index(passages_file, store, **common)
    with pytest.raises(StoreMismatchError, match="adaptor"):
        index(passages_file, store, adaptor=str(other), **common)
    with pytest.raises(ValueError, match="not both"):
        index(passages_file, store, config=config, adaptor=str(ours), **common)
    report = index(passages_file, store, adaptor=str(ours), **common)
    assert (report.indexed, report.skipped) == (len(lines) - 2, 2)
    whole = tmp_path / "whole"
    index(passages_file, whole, config=config, **common)
    assert blobs(store) == blobs(whole)  # the added passages encoded as with every setting restated


def test_adaptor_for_another_model_is_refused(lm, tmp_path):
    adaptor = noisy_adaptor(lm.model, 5)
    adaptor.meta = {"base_model": "other", "base_fingerprint": "f" * 64}
    with pytest.raises(StoreMismatchError, match="trained on model other"):
        PassageEncoder(lm, PromptTemplate.from_tokenizer(lm.tokenizer), adaptor)


def test_an_adaptor_file_without_its_base_model_is_refused_for_indexing(lm, tmp_path, passages_file, embedder):
    """The hash covers settings and tensors, not the base model's fingerprint: with it deleted
    from adaptor.json, indexing any model with the adaptor went unchecked."""
    folder = noisy_adaptor(lm, 5).save(tmp_path / "adaptor")
    meta = json.loads((folder / "adaptor.json").read_text())
    del meta["base_fingerprint"]
    (folder / "adaptor.json").write_text(json.dumps(meta))
    store = tmp_path / "store"
    with pytest.raises(InputError, match="records no base_fingerprint, so it cannot be checked against the model"):
        index(passages_file, store, model=lm.ref, lm=lm, embedder=embedder, config=IndexConfig(adaptor=str(folder)))
    assert not store.exists()


def test_forward_adaptor_is_on_only_while_passages_are_encoded(lm):
    """The answering model stays the base model: after a forward adaptor encoded passages (its
    LoRA layers injected into the shared model), full prefill gives the base logits bit for bit."""
    ids = torch.tensor([[5, 17, 42, 9, 33, 7]])
    with torch.no_grad():
        before = lm.model(ids).logits
    template = PromptTemplate.from_tokenizer(lm.tokenizer)
    encoder = PassageEncoder(lm, template, noisy_adaptor(lm.model, 7))
    base = PassageEncoder(lm, template).encode([[5, 17, 42]])[0]
    adapted = encoder.encode([[5, 17, 42]])[0]
    assert not torch.equal(adapted.values, base.values)
    with torch.no_grad():
        assert torch.equal(lm.model(ids).logits, before)
    assert torch.equal(PassageEncoder(lm, template).encode([[5, 17, 42]])[0].keys, base.keys)


ADAPTED = {
    "phi3": {"qkv_proj", "o_proj", "gate_up_proj", "down_proj"},
    "phi": {"q_proj", "k_proj", "v_proj", "dense", "fc1", "fc2"},
    "starcoder2": {"q_proj", "k_proj", "v_proj", "o_proj", "c_fc", "c_proj"},
}


@pytest.mark.parametrize(
    ("kind", "arch"), [(kind, "llama") for kind in KINDS] + [("forward", arch) for arch in ADAPTED]
)
def test_one_training_step_lowers_the_loss_on_its_batch(lm, kind, arch, tiny_model_dir):
    """Every linear projection of a layer is adapted, by whatever name the family gives it:
    Phi-3's fused ``qkv_proj`` and ``gate_up_proj``, Phi-2's ``dense`` and ``fc1``/``fc2``."""
    if arch != "llama":
        lm = load_model(str(tiny_model_dir(arch)))
    torch.manual_seed(0)
    adaptor = Adaptor.initial(lm.model, rank=4, alpha=8, kind=kind)
    if arch in ADAPTED:
        assert {name.split(".")[-3] for name in adaptor.tensors} == ADAPTED[arch]
    distiller = Distiller(lm, adaptor, teacher_top=16, continuation=8)
    texts = ["Melbourne is the sporting capital of Australia.", "Apollo 11 landed on the Moon in 1969."]
    example = distiller.teacher("q", [distiller.tokens.passage(t) for t in texts], "Where did Apollo 11 land?")
    optimizer = torch.optim.SGD(distiller.trainable(), lr=1.0)
    qa, cont, *_ = distiller.losses(example)
    before = float((qa + cont).detach())
    assert before > 0  # independently encoded caches differ from full prefill
    (qa + cont).backward()
    optimizer.step()
    with torch.no_grad():
        qa, cont, *_ = distiller.losses(example)
    assert float(qa + cont) < before


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_lora_factors_train_in_float32_under_a_half_precision_model(dtype, tiny_model_dir):
    """peft made the LoRA factors in the model's dtype: AdamW on float16 ones overflowed (``train
    --dtype float16`` wrote an adaptor of NaN and exited 0), on bfloat16 ones it dropped most small
    updates. They are float32 now, the adapted forward still runs in the model's dtype, and an
    adaptor of zeros still leaves the passages' caches bit for bit as the base model makes them."""
    lm = load_model(str(tiny_model_dir("llama")), dtype=dtype)
    distiller = Distiller(lm, Adaptor.initial(lm.model, rank=2, alpha=4), teacher_top=16, continuation=4)
    texts = ["Melbourne is the sporting capital of Australia.", "Apollo 11 landed on the Moon in 1969."]
    passages = [distiller.tokens.passage(t) for t in texts]
    params = distiller.trainable()
    assert {p.dtype for p in params} == {torch.float32}
    assert distiller.lora_name is not None
    with torch.no_grad():
        with lora_active(lm.model, distiller.lora_name):
            adapted = distiller.encoder.forward_with_grad(passages)
        plain = distiller.encoder.forward_with_grad(passages)
    for (k, v), (base_k, base_v) in zip(adapted, plain, strict=True):
        assert k.dtype == v.dtype == lm.model.dtype
        assert torch.equal(k, base_k) and torch.equal(v, base_v)
    example = distiller.teacher("q", passages, "Where did Apollo 11 land?")
    optimizer = torch.optim.AdamW(params, lr=3e-4, weight_decay=0.0)
    before: list[torch.Tensor] = []
    for _ in range(2):  # A's gradient is zero while B is (the first step)
        before = [param.detach().clone() for param in params]
        optimizer.zero_grad()
        qa, cont, *_ = distiller.losses(example)
        (qa + 0.5 * cont).backward()
        optimizer.step()
    assert all(bool(param.isfinite().all()) for param in params)
    moved = [
        float((b != param.detach()).float().mean())
        for b, param in zip(before, params, strict=True)
        if param.grad is not None and bool((param.grad != 0).all())  # the last layer's MLP reaches no cache
    ]
    assert moved and min(moved) > 0.9  # each factor took every update; in bfloat16 most were rounded away


def test_a_diverging_run_stops_with_a_named_error_and_saves_nothing_more(lm):
    """A step whose loss or parameters are not finite ends the run before its checkpoint."""
    from ragcompress.distill.loop import TrainingState, run_steps
    from ragcompress.errors import NonFiniteError

    distiller = Distiller(lm, Adaptor.initial(lm.model, rank=2, alpha=4), teacher_top=16, continuation=4)
    texts = ["Melbourne is the sporting capital of Australia.", "Apollo 11 landed on the Moon in 1969."]
    example = distiller.teacher("q", [distiller.tokens.passage(t) for t in texts], "Where did Apollo 11 land?")
    config = TrainConfig(lr=1e30, steps=3, batch=1, clip=0, eval_every=1, checkpoint_every=1, val_examples=1)
    params = distiller.trainable()
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=0.0)
    saved: list[int] = []
    state = TrainingState()
    state.history["val"].append({"step": 0})
    with pytest.raises(NonFiniteError, match=r"training step \d: .*NaN or infinite.*lower --lr.*float32"):
        run_steps(
            distiller, config, [example], [example], optimizer, params, state, lambda s: saved.append(s.step), False
        )
    assert saved == list(range(1, state.step + 1)) and state.step < 3  # nothing saved from the step that failed


def test_an_adaptor_of_nan_is_neither_saved_nor_loaded(lm, tmp_path):
    from safetensors.torch import save_file

    from ragcompress.distill.adaptor import CONFIG, WEIGHTS
    from ragcompress.errors import NonFiniteError

    adaptor = noisy_adaptor(lm, 1)
    folder = adaptor.save(tmp_path / "adaptor")
    name = sorted(adaptor.tensors)[0]
    adaptor.tensors[name] = adaptor.tensors[name].clone()
    adaptor.tensors[name][0, 0] = float("nan")
    with pytest.raises(NonFiniteError, match=rf"{name}.*NaN or infinite.*not saved"):
        adaptor.save(tmp_path / "nan")
    assert not (tmp_path / "nan").exists()
    # one written before save refused it (its hash matching its tensors)
    save_file(adaptor.tensors, folder / WEIGHTS)
    config = json.loads((folder / CONFIG).read_text())
    (folder / CONFIG).write_text(json.dumps({**config, "hash": adaptor.hash}))
    with pytest.raises(NonFiniteError, match="NaN or infinite.*train it again"):
        Adaptor.load(folder)


def test_the_teacher_reads_a_sliding_window_model_whose_context_outruns_the_window(tiny_model_dir):
    """The teacher crops its full-prefill cache back to the passages after decoding the answer; on a
    model whose window is shorter than the context transformers' sliding layers had dropped those
    rows and ``crop`` raised a RuntimeError, so ``train`` failed on Mistral-style models. Its cache
    now keeps every row (the masks apply the window), and the continuation targets are those of
    one plain forward over the whole sequence."""
    lm = load_model(str(tiny_model_dir("mistral", sliding_window=24)))
    distiller = Distiller(lm, Adaptor.initial(lm.model, rank=4, alpha=8), teacher_top=16, continuation=8)
    texts = ["Melbourne is the sporting capital of Australia.", "Apollo 11 landed on the Moon in 1969."]
    passages = [distiller.tokens.passage(t) for t in texts]
    example = distiller.teacher("q", passages, "Where did Apollo 11 land?")
    context = list(distiller.prefix_ids) + [t for ids in passages for t in ids]
    assert len(context) > 2 * 24
    with torch.no_grad():
        logits = lm.model(torch.tensor([context + example.cont_suffix + example.cont])).logits[0]
    rows = logits[len(context) + len(example.cont_suffix) - 1 : -1].float().log_softmax(-1)
    values, idx = rows.topk(16, dim=-1)
    assert torch.equal(idx, example.cont_idx)
    torch.testing.assert_close(values, example.cont_lp, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_hard_label_term_is_the_teachers_own_greedy_cross_entropy_when_the_cache_is_exact(lm, kind):
    # one passage encoded alone after the prefix *is* full prefill's cache: the untrained student
    # then predicts what the teacher predicts, so its KL is ~0, every answer row's argmax is the
    # teacher's, and the hard-label term is the teacher's own -log p(greedy token)
    adaptor = Adaptor.initial(lm.model, rank=4, alpha=8, kind=kind)
    distiller = Distiller(lm, adaptor, teacher_top=16, continuation=8)
    passage = distiller.tokens.passage("Apollo 11 landed on the Moon in 1969.")
    example = distiller.teacher("q", [passage], "Where did Apollo 11 land?")
    with torch.no_grad():
        losses = distiller.losses(example)
    assert float(losses.kl_answer) < 1e-4
    assert losses.top1_answer == 1.0
    assert float(losses.ce_answer) == pytest.approx(float(-example.qa_lp[:, 0].mean()), abs=1e-3)


@pytest.mark.parametrize("method", ["learned", "global:learned"])
def test_learned_scorer_keeps_exactly_the_budget(lm, tmp_path, passages_file, embedder, method):
    adaptor = noisy_adaptor(lm, 6, scorer=True).save(tmp_path / "scored")
    store = tmp_path / "store"
    config = IndexConfig(method=method, ratio=0.25, keep_first=1, keep_last=0, adaptor=str(adaptor))
    index(passages_file, store, model=lm.ref, lm=lm, embedder=embedder, config=config)
    layers, heads = lm.config.num_hidden_layers, lm.config.num_key_value_heads
    with KVStore.open(store) as opened:
        entries = list(opened.catalogue.entries())
        assert entries
        for entry in entries:
            budget = max(1, int(entry.num_tokens * 0.25))
            assert entry.kept == layers * heads * budget


def test_learned_scorer_needs_an_adaptor_with_a_scorer(lm, tmp_path, passages_file, embedder):
    """Without one, indexing failed at the first passage (advising --adaptor where one was given)
    and left an empty store behind that later runs were refused by."""
    unscored = str(noisy_adaptor(lm, 6).save(tmp_path / "unscored"))  # --scorer-passages 0
    common = dict(model=lm.ref, lm=lm, embedder=embedder)
    for adaptor, message in [
        (None, "'global:learned' scores tokens .*no adaptor is used; index with --adaptor"),
        (unscored, f"'global:learned' scores tokens .*adaptor {unscored} has none .*use global:kvzip"),
    ]:
        store = tmp_path / "s"
        with pytest.raises(InputError, match=message):
            index(
                passages_file, store, config=IndexConfig(method="global:learned", ratio=0.5, adaptor=adaptor), **common
            )
        assert not store.exists()


def test_scorer_fit_recovers_a_linear_target():
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(2, 3, 8, generator=gen)
    samples = []
    for n in (20, 30, 25):
        keys, values = torch.randn(2, 3, n, 4, generator=gen), torch.randn(2, 3, n, 4, generator=gen)
        kv = PassageKV.full(keys, values)
        log_score = torch.einsum("lhnd,lhd->lhn", torch.cat([keys, values], -1), weight) - 3.0
        samples.append((kv, log_score.exp()))
    fitted, bias, r2 = fit(samples, l2=1e-6)
    assert r2 > 0.999
    assert torch.allclose(fitted, weight, atol=1e-2) and torch.allclose(bias, torch.full((2, 3), -3.0), atol=1e-2)


def test_packaged_adaptor_loads_by_name_and_records_its_provenance():
    from ragcompress.distill.packaged import packaged_adaptor, resolve_adaptor

    adaptor = resolve_adaptor("default", "smollm2-135m")  # Adaptor.load checks the recorded hash
    assert adaptor.has_scorer and packaged_adaptor(adaptor.hash) is not None
    meta = adaptor.meta
    assert meta["base_model"] == "smollm2-135m" and len(meta["base_fingerprint"]) == 64
    assert len(meta["training_data_sha256"]) == 64 and meta["ratio"] == 1.0 and meta["metrics"]["steps"] > 0
    assert not set(meta["train_articles"]) & set(meta["val_articles"])
    with pytest.raises(Exception, match="no adaptor is packaged"):
        resolve_adaptor("default", "some-org/another-model")
    general = resolve_adaptor("default", "qwen2.5-coder-0.5b")  # the evaluation model's general adaptor
    assert (general.meta["method"], general.meta["ratio"], general.meta["quant"]) == ("none", 1.0, "none")
    assert not set(general.meta["train_articles"]) & set(general.meta["val_articles"])
    qwen = resolve_adaptor("qwen2.5-coder-0.5b-kvzip-0.25-int4", "qwen2.5-coder-0.5b")  # by name
    assert qwen.meta["base_model"] == "qwen2.5-coder-0.5b" and packaged_adaptor(qwen.hash) is not None
    assert (qwen.meta["method"], qwen.meta["ratio"], qwen.meta["quant"]) == ("global:kvzip", 0.25, "int4")
    assert not set(qwen.meta["train_articles"]) & set(qwen.meta["val_articles"])
    with pytest.raises(
        InputError, match="neither a folder nor a packaged adaptor .*qwen2.5-coder-0.5b-kvzip-0.25-int4"
    ):
        resolve_adaptor("qwen-typo", "qwen2.5-coder-0.5b")


def test_a_packaged_model_under_another_name_finds_its_adaptors_by_fingerprint():
    """A local copy of a packaged model (its folder named otherwise) has the packaged model's
    fingerprint: ``--adaptor default`` found no adaptor for it and ``matching`` encoded with the
    base model. Both now find the packaged model's adaptors; another fingerprint finds none."""
    from ragcompress.distill.packaged import GENERAL, TrainedStore, packaged_for_store, resolve_adaptor

    packaged = resolve_adaptor("default", "smollm2-135m")
    fingerprint, copy = packaged.meta["base_fingerprint"], "/home/me/models/smol_local"
    assert resolve_adaptor("default", copy, fingerprint).hash == packaged.hash
    assert packaged_for_store(copy, GENERAL._replace(quant="int8"), fingerprint).name == "smollm2-135m"
    smallest = TrainedStore("global:kvzip", 0.25, "int4")
    assert packaged_for_store(copy, smallest, fingerprint).name == "smollm2-135m-kvzip-0.25-int4"
    assert packaged_for_store(copy, smallest) is None and packaged_for_store(copy, smallest, "0" * 64) is None
    with pytest.raises(InputError, match="no adaptor is packaged for /home/me/models/smol_local"):
        resolve_adaptor("default", copy, "0" * 64)


def test_a_training_run_folder_given_as_an_adaptor_names_the_adaptor_inside(lm, tmp_path):
    from ragcompress.distill.packaged import resolve_adaptor

    noisy_adaptor(lm.model, 3).save(tmp_path / "run" / "adaptor")
    with pytest.raises(InputError, match=f"{tmp_path / 'run'} is a `ragcompress train` output folder; its adaptor is"):
        resolve_adaptor(tmp_path / "run", lm.ref)


def test_train_saves_a_loadable_adaptor_and_resumes_from_its_checkpoint(lm, tmp_path):
    """`ragcompress train` end to end on a tiny model: teacher examples, steps, checkpoint, scorer,
    adaptor folder, history and plot; a second call with more steps resumes where the first ended."""
    import json

    from ragcompress.data import SAMPLE_PASSAGES, SAMPLE_QUESTIONS
    from ragcompress.distill.train import TrainConfig, train

    config = TrainConfig(
        top_k=2, rank=2, alpha=4, steps=2, batch=1, train_questions=2, val_examples=1, continuation=4,
        scorer_passages=2, eval_every=1, checkpoint_every=1, val_articles=["Apollo_program"],
    )  # fmt: skip
    out = tmp_path / "run"
    first = train(lm, SAMPLE_PASSAGES, SAMPLE_QUESTIONS, out, dataclasses.replace(config), progress=False)
    assert first.kind == "forward" and first.has_scorer and first.meta["metrics"]["steps"] == 2
    assert first.meta["val_articles"] == ["Apollo_program"] and "Apollo_program" not in first.meta["train_articles"]
    # --minutes is per invocation: a budget far below the first run's step time still buys the resumed step
    kept = out / f"adaptor-{first.hash[:16]}"
    with pytest.warns(UserWarning, match=f"the one it replaces .* was moved to {kept}"):
        resumed = train(
            lm,
            SAMPLE_PASSAGES,
            SAMPLE_QUESTIONS,
            out,
            dataclasses.replace(config, steps=3, minutes=1e-9),
            progress=False,
        )
    history = json.loads((out / "history.json").read_text())
    assert [row["step"] for row in history["train"]] == [1, 2, 3]
    assert resumed.meta["metrics"]["steps"] == 3 and (out / "loss.png").is_file()
    loaded = Adaptor.load(out / "adaptor")
    assert loaded.hash == resumed.hash != first.hash
    assert Adaptor.load(kept).hash == first.hash  # stores built with the first one still find it
    swapped = dataclasses.replace(config, steps=4, val_articles=["Victoria_(Australia)"])
    with pytest.raises(InputError, match="holding out"):  # its checkpoint trained on the new held-out article
        train(lm, SAMPLE_PASSAGES, SAMPLE_QUESTIONS, out, swapped, progress=False)


def test_views_add_teacher_examples_of_other_contexts_and_reuse_the_ones_computed(lm, tmp_path, monkeypatch):
    """``--views``: the first view is the retrieved passages in retrieval order (what views=1
    builds), the others draws of top-k from the 2k nearest, the same on every run; a run with more
    views reuses the examples a run with fewer computed; a teacher file of another view count is refused."""
    from ragcompress.data import SAMPLE_PASSAGES, SAMPLE_QUESTIONS
    from ragcompress.distill.checkpoint import load_tree
    from ragcompress.distill.corpus import question_of, views_of
    from ragcompress.distill.train import TrainConfig, train

    views = views_of("q1", [5, 3, 9, 1], 2, 3)
    assert views[0] == ("q1", [5, 3]) and [v[0] for v in views] == ["q1", "q1@view1", "q1@view2"]
    assert all(len(rows) == 2 and set(rows) <= {5, 3, 9, 1} for _, rows in views)
    assert views_of("q1", [5, 3, 9, 1], 2, 3) == views and question_of("q1@view2") == "q1"

    config = TrainConfig(
        top_k=2, rank=2, alpha=4, steps=1, batch=1, train_questions=2, val_examples=1, continuation=4,
        scorer_passages=0, eval_every=1, val_articles=["Apollo_program"],
    )  # fmt: skip
    one = tmp_path / "one"
    train(lm, SAMPLE_PASSAGES, SAMPLE_QUESTIONS, one, config, progress=False)
    single = load_tree(one / "teacher.safetensors")["train"]
    assert len(single) == 2
    (one / "checkpoint.safetensors").unlink()  # which refuses another --views first (test_distill_inputs)
    with pytest.raises(Exception, match="1 view"):
        train(lm, SAMPLE_PASSAGES, SAMPLE_QUESTIONS, one, dataclasses.replace(config, steps=2, views=2), progress=False)

    two = tmp_path / "two"
    two.mkdir()
    (two / "teacher-train.part").write_bytes((one / "teacher-train.part").read_bytes())
    calls = []
    teacher = Distiller.teacher

    def counting(self, example_id, *args, **kwargs):  # the teacher pass, counted
        calls.append(example_id)
        return teacher(self, example_id, *args, **kwargs)

    monkeypatch.setattr(Distiller, "teacher", counting)
    train(lm, SAMPLE_PASSAGES, SAMPLE_QUESTIONS, two, dataclasses.replace(config, views=2), progress=False)
    doubled = load_tree(two / "teacher.safetensors")["train"]
    assert [e["qid"] for e in doubled[::2]] == [e["qid"] for e in single]  # view 0: the examples of views=1
    assert all(e["qid"].endswith("@view1") for e in doubled[1::2])
    assert [question_of(c) for c in calls if "@view" in c] == [e["qid"] for e in single]  # only new views computed
    for old, new in zip(single, doubled[::2], strict=True):
        assert torch.equal(old["qa_lp"], new["qa_lp"])


def test_training_warm_started_from_an_adaptor_starts_from_its_factors(lm, tmp_path, monkeypatch):
    """``--init-adaptor`` continues a finished run (e.g. a packaged adaptor, whose checkpoint is
    gone): a step whose update is skipped leaves its factors as they were; the result records
    where it started; an adaptor trained on an article this run holds out is refused."""

    from ragcompress.data import SAMPLE_PASSAGES, SAMPLE_QUESTIONS
    from ragcompress.distill.train import TrainConfig, train

    config = TrainConfig(
        top_k=2, rank=2, alpha=4, steps=1, batch=1, train_questions=2, val_examples=1, continuation=4,
        scorer_passages=0, eval_every=1, val_articles=["Apollo_program"],
    )  # fmt: skip
    first = train(lm, SAMPLE_PASSAGES, SAMPLE_QUESTIONS, tmp_path / "first", config, progress=False)
    start = str(tmp_path / "first" / "adaptor")
    monkeypatch.setattr(torch.optim.AdamW, "step", lambda self, closure=None: None)  # the factors stay put
    warm = dataclasses.replace(config, rank=8, alpha=16, init_adaptor=start)
    with pytest.warns(UserWarning, match=r"starting from --init-adaptor .*keeps --rank 2 \(not 8\), --alpha 4"):
        again = train(lm, SAMPLE_PASSAGES, SAMPLE_QUESTIONS, tmp_path / "warm", warm, progress=False)
    assert again.settings == first.settings  # rank and alpha come from the adaptor started from
    assert again.tensors.keys() == first.tensors.keys()
    assert all(torch.equal(again.tensors[k], first.tensors[k]) for k in first.tensors)
    assert again.meta["init_adaptor_hash"] == first.hash
    leaky = dataclasses.replace(warm, val_articles=["Victoria_(Australia)"])
    with pytest.raises(InputError, match="held out here"):
        train(lm, SAMPLE_PASSAGES, SAMPLE_QUESTIONS, tmp_path / "leaky", leaky, progress=False)


def test_merged_forward_adaptor_encodes_as_peft_layers_do(lm):
    """Indexing folds a forward adaptor into the weights (a plain forward's cost); training runs
    peft's unmerged LoRA layers. Both must compute the same passage caches."""
    template = PromptTemplate.from_tokenizer(lm.tokenizer)
    adaptor = noisy_adaptor(lm.model, 11)
    passages = [[5, 17, 42, 9], [8, 3]]
    merged = PassageEncoder(lm, template, adaptor).forward_capturing(passages)[0]
    plain = PassageEncoder(lm, template)
    name = adaptor.attach(lm.model)
    try:
        with torch.no_grad(), lora_active(lm.model, name):
            unmerged = plain.forward_with_grad(passages)
    finally:
        remove_adapter(lm.model, name)
    base = plain.forward(passages)
    for (k, v), (k_ref, v_ref) in zip(merged, unmerged, strict=True):
        torch.testing.assert_close(k, k_ref, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(v, v_ref, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(merged[-1][0], base[-1][0], atol=1e-4)


def test_forward_adaptor_of_another_shape_is_refused(lm, tiny_model_dir):
    other = load_model(str(tiny_model_dir("llama", head_dim=8)))
    adaptor = noisy_adaptor(lm.model, 3)
    with pytest.raises(InputError, match="does not fit"):
        PassageEncoder(other, PromptTemplate.from_tokenizer(other.tokenizer), adaptor)


def zero_student(lm, compressor=None, quant=None) -> Distiller:
    """A distiller whose adaptor is zero: its student cache must be what the runtime serves."""
    return Distiller(
        lm,
        Adaptor.initial(lm.model, rank=4, alpha=8),
        teacher_top=16,
        continuation=8,
        compressor=compressor,
        quant=quant,
    )


def served_logprobs(distiller: Distiller, segments, suffix: list[int], total: int):
    """The runtime's assembled cache of the prefix and ``segments`` (runtime.assemble) and the
    log-probabilities ``suffix`` reads over it."""
    encoder, lm = distiller.encoder, distiller.lm
    prefix = encoder.prefix_kv
    prefix_keys = encoder.rotary.rotate_layers(prefix.keys, prefix.positions)
    served = assemble(lm.config, encoder.rotary, prefix_keys, prefix, segments, lm.model.dtype)
    assert served.next_position == total
    with torch.no_grad():
        logits = forward_logits(
            lm.model, torch.tensor([suffix]), served.cache, total, len(suffix), **served.attention_kwargs()
        )
    return served, logits.float().log_softmax(-1)


@pytest.mark.parametrize("lowrank", [None, RankSpec(rank=8), RankSpec(rank=8, values=False)])
def test_compressed_student_reads_what_the_runtime_serves(lm, lowrank):
    """The student trained for an evicted (and low-rank) store must be that store: with the
    adaptor at zero, its cache and row mask read the question as the runtime's assembled cache
    of the compressed, stored passages does (runtime.assemble, per-head masks, ragged attention)."""
    compressor = make_compressor("global:kvzip", ratio=0.5, keep_first=1, keep_last=0)
    quant = QuantConfig("int4", 8) if lowrank else QuantConfig()
    distiller = zero_student(lm, compressor, quant)
    texts = ("Melbourne is the sporting capital.", "Apollo 11 landed.")
    passages = [distiller.tokens.passage(t) for t in texts]
    calibration = ["The Yuan dynasty was founded by Kublai Khan.", "Jacksonville lies on the St. Johns River."]
    basis = None
    if lowrank is not None:
        basis = fit_basis(distiller.encoder.encode([distiller.tokens.passage(t) for t in calibration]), lowrank)
        distiller.basis = basis
    suffix = distiller.tokens.suffix("Where did Apollo 11 land?")
    with torch.no_grad():
        keys, values, total, mask = distiller.student_compressed_tensors(passages)
        student = distiller.student_logprobs(keys, values, total, suffix, len(suffix), mask)
    encoder = distiller.encoder
    segments = [
        codec.decode(
            codec.encode(compressor.compress(encoder.encode([ids])[0], CompressionContext(encoder, ids)), quant, basis),
            torch.float32,
            basis=basis,
        )
        for ids in passages
    ]
    assert any(not s.is_uniform for s in segments)  # rows were evicted
    served, logprobs = served_logprobs(distiller, segments, suffix, total)
    assert served.kv_mask is not None
    # the student pads every layer to the passage's longest; the runtime each layer to its own
    assert [m.sum(-1).tolist() for m in served.kv_mask] == mask.sum(-1).tolist()
    torch.testing.assert_close(student, logprobs, atol=1e-4, rtol=1e-4)


def test_student_evicts_by_value_weighted_scores_when_trained_for_them():
    """``train --value-norm``: the student's eviction is the store's (``index --value-norm``), and
    without an eviction method the flag is refused before any training."""
    from ragcompress.distill.config import student_compressor

    weighted = student_compressor(TrainConfig(method="global:kvzip", ratio=0.25, keep_first=1, value_norm=True))
    plain = student_compressor(TrainConfig(method="global:kvzip", ratio=0.25, keep_first=1))
    assert weighted is not None and plain is not None
    assert weighted.config() == {**plain.config(), "value_norm": True}
    with pytest.raises(ValueError, match="--value-norm needs an eviction --method"):
        TrainConfig(value_norm=True)


def test_learning_rate_warms_up_then_decays_to_a_tenth_and_is_constant_by_default():
    from ragcompress.distill.config import lr_factor

    assert [lr_factor(TrainConfig(steps=10), step) for step in (0, 5, 9)] == [1.0, 1.0, 1.0]
    config = TrainConfig(steps=12, warmup=4, decay="cosine")
    factors = [lr_factor(config, step) for step in range(13)]
    assert factors[:4] == [0.25, 0.5, 0.75, 1.0]
    assert factors[4] == 1.0 and all(a > b for a, b in zip(factors[4:], factors[5:], strict=False))  # then falls
    assert factors[12] == pytest.approx(0.1) and min(factors) == pytest.approx(0.1)
    with pytest.raises(ValueError, match="decay"):
        TrainConfig(decay="linear")


def test_one_compressed_training_step_lowers_the_loss_on_its_batch(lm):
    torch.manual_seed(0)
    compressor = make_compressor("global:kvzip", ratio=0.5, keep_first=1, keep_last=0)
    distiller = Distiller(
        lm,
        Adaptor.initial(lm.model, rank=4, alpha=8),
        teacher_top=16,
        continuation=8,
        compressor=compressor,
        quant=QuantConfig("int4", 8),
    )
    texts = ["Melbourne is the sporting capital of Australia.", "Apollo 11 landed on the Moon in 1969."]
    example = distiller.teacher("q", [distiller.tokens.passage(t) for t in texts], "Where did Apollo 11 land?")
    optimizer = torch.optim.SGD(distiller.trainable(), lr=1.0)
    qa, cont, *_ = distiller.losses(example)
    before = float((qa + cont).detach())
    (qa + cont).backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in optimizer.param_groups[0]["params"])
    optimizer.step()
    with torch.no_grad():
        qa, cont, *_ = distiller.losses(example)
    assert float(qa + cont) < before


def test_train_config_refuses_a_compression_it_cannot_train():
    with pytest.raises(ValueError, match="needs an eviction"):
        TrainConfig(ratio=0.25)
    with pytest.raises(ValueError, match="learned"):
        TrainConfig(method="global:learned", ratio=0.25)
    with pytest.raises(ValueError, match="quant scheme"):
        TrainConfig(quant="int3")
    with pytest.raises(ValueError, match="kind 'forward'"):
        TrainConfig(kind="cache", quant="int4")


def test_the_scorer_is_fitted_by_default_only_where_a_store_may_read_it():
    assert TrainConfig().scorer_fit_passages() == 40  # a general adaptor: index --method global:learned
    assert TrainConfig(method="global:kvzip", ratio=0.25).scorer_fit_passages() == 0
    assert TrainConfig(method="global:kvzip", ratio=0.25, scorer_passages=8).scorer_fit_passages() == 8
    assert TrainConfig(scorer_passages=0).scorer_fit_passages() == 0


def test_an_adaptor_trained_for_another_compression_is_used_with_a_warning(lm, tmp_path, passages_file, embedder):
    specialist = noisy_adaptor(lm, 8)
    specialist.meta |= {"method": "global:kvzip", "ratio": 0.25, "quant": "int4"}
    path = specialist.save(tmp_path / "specialist")
    common = dict(model=lm.ref, lm=lm, embedder=embedder)
    with pytest.warns(UserWarning, match="trained for a store of global:kvzip 0.25 int4, this store is none 1 int8"):
        index(passages_file, tmp_path / "other", config=IndexConfig(quant="int8", adaptor=str(path)), **common)
    same = IndexConfig(method="global:kvzip", ratio=0.25, quant="int4", adaptor=str(path))
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        index(passages_file, tmp_path / "same", config=same, **common)


def test_a_budget_store_is_named_by_its_budget_in_the_adaptor_warning(lm):
    from ragcompress.indexing.indexer import warn_if_trained_for_another_store

    specialist = noisy_adaptor(lm.model, 8)
    specialist.meta = {"method": "global:kvzip", "ratio": 0.25, "quant": "int4"}
    config = IndexConfig(method="global:kvzip", budget=16, quant="int4")
    with pytest.warns(UserWarning, match="this store is global:kvzip budget 16 int4"):
        warn_if_trained_for_another_store(specialist, config)


def test_compressed_training_saves_its_kept_rows_and_a_resumed_run_reuses_them(lm, tmp_path, monkeypatch):
    """The compressed student's kept rows (KVzip on the base cache, the slowest step of a first
    epoch) are saved with each checkpoint; a resumed run with the same settings reads them and
    scores nothing again, and one for another compression is refused."""

    from ragcompress.compressors.kvzip import KVzipCompressor
    from ragcompress.data import SAMPLE_PASSAGES, SAMPLE_QUESTIONS
    from ragcompress.distill.checkpoint import load_tree
    from ragcompress.distill.train import TrainConfig, train

    config = TrainConfig(
        top_k=2, rank=2, alpha=4, steps=2, batch=1, train_questions=2, val_examples=1, continuation=4,
        scorer_passages=0, eval_every=1, checkpoint_every=1, val_articles=["Apollo_program"],
        method="global:kvzip", ratio=0.5, quant="int4", keep_first=1, keep_last=0,
    )  # fmt: skip
    out = tmp_path / "run"
    train(lm, SAMPLE_PASSAGES, SAMPLE_QUESTIONS, out, config, progress=False)
    saved = load_tree(out / "kept-rows.safetensors")
    assert len(saved["rows"]) >= 3  # both training examples' passages and the held-out one's

    def no_scoring(*args, **kwargs):
        raise AssertionError("kept rows were scored again")

    monkeypatch.setattr(KVzipCompressor, "score", no_scoring)
    train(lm, SAMPLE_PASSAGES, SAMPLE_QUESTIONS, out, dataclasses.replace(config, steps=3), progress=False)
    again = load_tree(out / "kept-rows.safetensors")
    assert all(torch.equal(again["rows"][k][0], v[0]) for k, v in saved["rows"].items())
    with pytest.raises(InputError, match=r"ratio=0.5 \(this run: 0.25\)"):  # another ratio: refused, not resumed
        train(
            lm, SAMPLE_PASSAGES, SAMPLE_QUESTIONS, out, dataclasses.replace(config, steps=4, ratio=0.25), progress=False
        )


def test_matching_adaptor_is_the_one_packaged_for_the_store_or_none_with_a_warning(
    lm, tmp_path, passages_file, embedder, monkeypatch
):
    """``adaptor="matching"`` (the ``smallest`` preset) takes the adaptor packaged for this model
    and trained for exactly this store's compression; with none packaged it encodes with the base
    model, says so, and the manifest records no adaptor."""
    import ragcompress.distill.packaged as packaged_module

    packaged = tmp_path / "packaged"
    keys_rank8 = RankSpec(rank=8, values=False).as_dict()
    for seed, ratio, lowrank in ((9, 0.25, None), (10, 0.5, None), (11, 0.5, keys_rank8)):
        specialist = noisy_adaptor(lm, seed)
        specialist.meta |= {"method": "global:kvzip", "ratio": ratio, "quant": "int4"}
        if lowrank:  # trained with --kv-rank 8 --no-kv-rank-values
            specialist.meta["lowrank"] = lowrank
        specialist.save(packaged / f"tiny-kvzip-{ratio}-int4{'-r8k' if lowrank else ''}")
    monkeypatch.setattr(packaged_module, "PACKAGED", packaged)
    common = dict(model=lm.ref, lm=lm, embedder=embedder)
    config = IndexConfig(method="global:kvzip", ratio=0.5, keep_first=1, quant="int4", adaptor="matching")
    index(passages_file, tmp_path / "matched", config=config, **common)
    with KVStore.open(tmp_path / "matched") as store:
        assert store.manifest.encoding["adaptor"] == Adaptor.load(packaged / "tiny-kvzip-0.5-int4").hash
    low_rank = dataclasses.replace(config, rank=8, rank_values=False)
    index(passages_file, tmp_path / "matched-r8k", config=low_rank, **common)
    with KVStore.open(tmp_path / "matched-r8k") as store:
        assert store.manifest.encoding["adaptor"] == Adaptor.load(packaged / "tiny-kvzip-0.5-int4-r8k").hash
    with pytest.warns(UserWarning, match="low-rank latents"):  # keys and values projected: none trained for it
        index(
            passages_file, tmp_path / "unmatched-r8", config=dataclasses.replace(low_rank, rank_values=True), **common
        )
    unmatched = IndexConfig(method="global:kvzip", ratio=0.125, keep_first=1, quant="int4", adaptor="matching")
    with pytest.warns(
        UserWarning, match="no adaptor is packaged for .* global:kvzip 0.125 int4; encoding with the base"
    ):
        index(passages_file, tmp_path / "unmatched", config=unmatched, **common)
    with KVStore.open(tmp_path / "unmatched") as store:
        assert not store.manifest.encoding.get("adaptor")
    budget = IndexConfig(method="global:kvzip", budget=4, keep_first=1, quant="int4", adaptor="matching")
    with pytest.warns(UserWarning, match="global:kvzip a token budget int4; encoding with the base"):
        index(passages_file, tmp_path / "budget", config=budget, **common)
    # values of their own width (index --value-quant int2): only an adaptor trained so matches
    split = dataclasses.replace(config, value_quant="int2")
    with pytest.warns(UserWarning, match=r"0.5 int4/int2; .* --quant int4 --value-quant int2"):
        index(passages_file, tmp_path / "split-unmatched", config=split, **common)
    specialist = noisy_adaptor(lm, 12)
    specialist.meta |= {"method": "global:kvzip", "ratio": 0.5, "quant": "int4/int2"}
    specialist.save(packaged / "tiny-kvzip-0.5-int4v2")
    index(passages_file, tmp_path / "split-matched", config=split, **common)
    with KVStore.open(tmp_path / "split-matched") as store:
        assert store.manifest.encoding["adaptor"] == Adaptor.load(packaged / "tiny-kvzip-0.5-int4v2").hash
        assert store.manifest.quant == QuantConfig("int4", value_scheme="int2")
    # value-weighted scores (index --value-norm) pick other rows: only an adaptor trained so matches
    weighted = dataclasses.replace(config, value_norm=True)
    with pytest.warns(UserWarning, match=r"0.5 with value-weighted scores int4; .* --quant int4 --value-norm"):
        index(passages_file, tmp_path / "weighted-unmatched", config=weighted, **common)
    weighted_specialist = noisy_adaptor(lm, 13)
    weighted_specialist.meta |= {"method": "global:kvzip", "ratio": 0.5, "quant": "int4", "value_norm": True}
    weighted_specialist.save(packaged / "tiny-kvzip-0.5-int4-vnorm")
    index(passages_file, tmp_path / "weighted-matched", config=weighted, **common)
    with KVStore.open(tmp_path / "weighted-matched") as store:
        assert store.manifest.encoding["adaptor"] == Adaptor.load(packaged / "tiny-kvzip-0.5-int4-vnorm").hash
    index(passages_file, tmp_path / "plain-again", config=config, **common)  # plain scores keep the plain one
    with KVStore.open(tmp_path / "plain-again") as store:
        assert store.manifest.encoding["adaptor"] == Adaptor.load(packaged / "tiny-kvzip-0.5-int4").hash


def test_an_int8_store_matches_the_general_adaptor_and_nothing_else_does(tmp_path, monkeypatch):
    """An uncompressed int8 store takes the model's general (ratio 1.0, unquantized) adaptor
    under ``matching``; an int4 or evicted store does not fall back to it."""
    import ragcompress.distill.packaged as packaged_module
    from ragcompress.distill.packaged import TrainedStore, packaged_for_store

    general = tmp_path / "packaged" / "tiny"
    general.mkdir(parents=True)
    (general / "adaptor.json").write_text(json.dumps({"base_model": "tiny", "ratio": 1.0, "quant": "none"}))
    monkeypatch.setattr(packaged_module, "PACKAGED", tmp_path / "packaged")
    assert packaged_for_store("tiny", TrainedStore("none", 1.0, "none")) == general
    assert packaged_for_store("tiny", TrainedStore("none", 1.0, "int8")) == general
    assert packaged_for_store("other", TrainedStore("none", 1.0, "int8")) is None
    assert packaged_for_store("tiny", TrainedStore("none", 1.0, "int4")) is None
    assert packaged_for_store("tiny", TrainedStore("global:kvzip", 0.5, "int8")) is None


def test_half_adaptor_encodes_as_the_fp32_one_up_to_fp16_rounding(lm, tmp_path):
    """``Adaptor.half`` (how the 24x store's adaptor ships): fp16 factors, another hash, half the
    file, and the same caches up to the factors' rounding."""
    adaptor = noisy_adaptor(lm, 12)
    half = Adaptor.load(adaptor.half().save(tmp_path / "half"))
    full_size = (adaptor.save(tmp_path / "fp32") / "adaptor.safetensors").stat().st_size
    assert half.hash != adaptor.hash
    assert (tmp_path / "half" / "adaptor.safetensors").stat().st_size < 0.6 * full_size
    assert all(t.dtype == torch.float16 for t in half.lora_tensors.values())
    template = PromptTemplate.from_tokenizer(lm.tokenizer)
    ids = [PassageEncoder(lm, template).tokens.passage("Melbourne is the capital of Victoria.")]
    base = PassageEncoder(lm, template).encode(ids)[0]
    ref = PassageEncoder(lm, template, adaptor).encode(ids)[0]
    got = PassageEncoder(lm, template, half).encode(ids)[0]
    torch.testing.assert_close(got.keys, ref.keys, atol=2e-3, rtol=2e-3)
    torch.testing.assert_close(got.values, ref.values, atol=2e-3, rtol=2e-3)
    assert (ref.keys - base.keys).abs().max() > 20 * (got.keys - ref.keys).abs().max()  # the adaptor still acts


def test_a_low_rank_store_fits_its_basis_on_base_model_caches_adaptor_or_not(lm, tmp_path, passages_file, embedder):
    """``train --kv-rank`` projects the student on a basis of base-model caches; ``index --rank``
    with an adaptor fits the store's the same way, so the runtime serves what the student read."""
    adaptor = noisy_adaptor(lm, 9).save(tmp_path / "adaptor")
    common = dict(model=lm.ref, lm=lm, embedder=embedder)
    config = IndexConfig(quant="int8", rank=8, calibration_passages=4)
    index(passages_file, tmp_path / "base", config=config, **common)
    index(passages_file, tmp_path / "adapted", config=dataclasses.replace(config, adaptor=str(adaptor)), **common)
    with KVStore.open(tmp_path / "base") as base, KVStore.open(tmp_path / "adapted") as adapted:
        assert base.basis is not None and adapted.basis is not None
        for kind in base.basis.bases:
            for a, b in zip(base.basis.bases[kind], adapted.basis.bases[kind], strict=True):
                assert torch.equal(a, b)
        assert blobs(tmp_path / "base") != blobs(tmp_path / "adapted")  # the passages are adapted


def test_extra_passages_add_training_examples_with_the_models_own_questions(lm, tmp_path, monkeypatch):
    """``--extra-passages``: the base model writes one question per chosen passage (written once,
    read back on the next run), those questions become training examples retrieved over the union
    of both corpora, and validation stays on the held-out articles only."""
    from ragcompress.data import SAMPLE_PASSAGES, SAMPLE_QUESTIONS
    from ragcompress.distill import synthetic
    from ragcompress.distill.checkpoint import load_tree
    from ragcompress.distill.train import TrainConfig, train

    essays = tmp_path / "essays"
    essays.mkdir()
    (essays / "one.txt").write_text("Startups grow fast. " * 30 + "\n\n" + "Founders should talk to users. " * 25)
    (essays / "two.txt").write_text("Lisp has macros. " * 40)
    config = TrainConfig(
        top_k=2, rank=2, alpha=4, steps=1, batch=1, train_questions=0, val_examples=1, continuation=4,
        scorer_passages=0, eval_every=1, val_articles=["Apollo_program"], extra_passages=str(essays),
        extra_questions=2,
    )  # fmt: skip
    out = tmp_path / "run"
    adaptor = train(lm, SAMPLE_PASSAGES, SAMPLE_QUESTIONS, out, config, progress=False)
    header, *written = [json.loads(line) for line in (out / "extra-questions.jsonl").read_text().splitlines()]
    assert header == {"training_data_sha256": adaptor.meta["training_data_sha256"]}
    assert len(written) == 2 and all(r["id"] == "synthetic:" + r["passage_id"] for r in written)
    teacher = load_tree(out / "teacher.safetensors")
    synthetic_ids = {e["qid"] for e in teacher["train"] if e["qid"].startswith("synthetic:")}
    assert synthetic_ids == {r["id"] for r in written if r["question"]}
    assert not any(e["qid"].startswith("synthetic:") for e in teacher["val"])
    assert {"one", "two"} <= set(adaptor.meta["train_articles"])

    def refuse(*args, **kwargs):  # a second run reads the questions back instead of writing them
        raise AssertionError("question written again")

    monkeypatch.setattr(synthetic, "write_question", refuse)
    data = adaptor.meta["training_data_sha256"]
    assert synthetic.synthetic_questions(lm, [], 0, out / "extra-questions.jsonl", data) == []
    from ragcompress.indexing.inputs import iter_passages

    again = synthetic.synthetic_questions(
        lm, list(iter_passages(essays)), 2, out / "extra-questions.jsonl", data, False
    )
    assert [q.id for q in again] == [r["id"] for r in written if r["question"]]
    with pytest.raises(InputError, match="held-out"):
        train(lm, SAMPLE_PASSAGES, SAMPLE_QUESTIONS, tmp_path / "bad",
              dataclasses.replace(config, extra_passages=str(SAMPLE_PASSAGES)), progress=False)  # fmt: skip
    # a held-out passage's text under another title (a copied article) is refused by its text
    apollo = next(p for p in iter_passages(SAMPLE_PASSAGES) if p.article == "Apollo_program")
    (essays / "copied.txt").write_text("Notes.\n\n" + "  ".join(apollo.text.upper().split(" ")) + " More notes.")
    with pytest.raises(InputError, match=rf"copied.* holds the text of held-out passage {apollo.id} \(article Apollo"):
        train(lm, SAMPLE_PASSAGES, SAMPLE_QUESTIONS, tmp_path / "copied", config, progress=False)
    (essays / "copied.txt").write_text(apollo.text[: len(apollo.text) // 2])  # a piece of one, chunked apart
    with pytest.raises(InputError, match=rf"holds the text of held-out passage {apollo.id}"):
        train(lm, SAMPLE_PASSAGES, SAMPLE_QUESTIONS, tmp_path / "piece", config, progress=False)


@pytest.mark.parametrize(
    ("arch", "config"),
    [
        ("llama", {}),
        # local and global layers with their own RoPE, YaRN's attention scaling on the global one
        (
            "gemma3_text",
            {
                "layer_types": ["sliding_attention", "full_attention"],
                "rope_scaling": {"rope_type": "yarn", "factor": 4.0},
            },
        ),
        ("smollm3", {"layers": 4}),  # its fourth layer has no RoPE
        ("phi3", {"partial_rotary_factor": 0.75}),  # RoPE over the first 12 of 16 channels
        ("glm", {}),  # RoPE over adjacent channel pairs of the first half of each head
    ],
)
@pytest.mark.parametrize("compressed", [False, True])
def test_the_student_moves_keys_in_each_layers_own_rope(arch, config, compressed, tiny_model_dir):
    """With the adaptor at zero the student's cache is the runtime's assembled cache of the same
    passages, layer by layer: each passage's keys moved to their place with that layer's RoPE.
    (Until 2026-12-05 the student moved every layer's keys with the first layer's tables: wrong
    for Gemma-3's other layer type, for layers without RoPE, and for YaRN's scaling, applied
    twice when a rotated key was rotated again.)"""
    lm = load_model(str(tiny_model_dir(arch, **config)))
    compressor = make_compressor("global:kvzip", ratio=0.5, keep_first=1, keep_last=0) if compressed else None
    distiller = zero_student(lm, compressor, QuantConfig() if compressed else None)
    passages = [distiller.tokens.passage(t) for t in ("Melbourne is the sporting capital.", "Apollo 11 landed.")]
    suffix = distiller.tokens.suffix("Where did Apollo 11 land?")
    with torch.no_grad():
        if compressed:
            keys, values, total, mask = distiller.student_compressed_tensors(passages)
            student = distiller.student_logprobs(keys, values, total, suffix, len(suffix), mask)
        else:
            keys, values, total = distiller.student_forward_tensors(passages)
            student = distiller.student_logprobs(keys, values, total, suffix, len(suffix))
    encoder = distiller.encoder
    segments = [encoder.encode([ids])[0] for ids in passages]
    if compressor is not None:
        segments = [
            compressor.compress(kv, CompressionContext(encoder, ids))
            for kv, ids in zip(segments, passages, strict=True)
        ]
    torch.testing.assert_close(student, served_logprobs(distiller, segments, suffix, total)[1], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(
    ("arch", "config"),
    [
        ("mistral", {"sliding_window": 8}),
        ("gemma2", {"sliding_window": 8, "attn_logit_softcapping": 50.0}),
        ("gemma3_text", {"sliding_window": 8, "layer_types": ["sliding_attention", "full_attention"]}),
    ],
)
def test_a_quantized_student_on_a_sliding_window_model_reads_what_the_runtime_serves(arch, config, tiny_model_dir):
    """A quantized store of a sliding-window model keeps every row of every head, so the runtime
    reads it with no row mask (its sliding layers keep their window); the student, trained over
    passages longer than the window, must read its cache the same way. (Until 2027-01 the
    student passed a row mask over every row while its sliding layers kept only the window's:
    ``train --quant int4`` on Mistral, Gemma-2 or Gemma-3 stopped with a RuntimeError.)"""
    lm = load_model(str(tiny_model_dir(arch, **config)))
    distiller = zero_student(lm, None, QuantConfig("int4", 8))
    texts = ("Melbourne is the sporting capital of Australia.", "Apollo 11 landed on the Moon in 1969.")
    passages = [distiller.tokens.passage(t) for t in texts]
    assert all(len(ids) > config["sliding_window"] for ids in passages)
    suffix = distiller.tokens.suffix("Where did Apollo 11 land?")
    with torch.no_grad():
        keys, values, total, mask = distiller.student_compressed_tensors(passages)
        student = distiller.student_logprobs(keys, values, total, suffix, len(suffix), mask)
    encoder = distiller.encoder
    segments = [codec.decode(codec.encode(encoder.encode([ids])[0], QuantConfig("int4", 8))) for ids in passages]
    torch.testing.assert_close(student, served_logprobs(distiller, segments, suffix, total)[1], atol=1e-4, rtol=1e-4)


def test_training_for_per_head_eviction_on_a_sliding_window_model_is_refused_up_front(
    tiny_model_dir, tmp_path, monkeypatch
):
    """The runtime refuses a store evicted per head once a request outgrows the model's sliding
    window; training for such a store is refused before any work, with the runtime's reason
    (until 2027-01 it stopped in the student's attention with a RuntimeError)."""
    from ragcompress.data import SAMPLE_PASSAGES, SAMPLE_QUESTIONS
    from ragcompress.distill import train as train_module

    lm = load_model(str(tiny_model_dir("mistral", sliding_window=8)))

    def no_teacher(*args, **kwargs):
        raise AssertionError("the teacher pass ran")

    monkeypatch.setattr(train_module, "teacher_examples", no_teacher)
    config = TrainConfig(method="global:kvzip", ratio=0.5, quant="int4", steps=1, batch=1, val_examples=1)
    with pytest.raises(InputError, match=r"keeps a different number of rows per head.*sliding window \(8 tokens\)"):
        train_module.train(lm, SAMPLE_PASSAGES, SAMPLE_QUESTIONS, tmp_path / "run", config, progress=False)
    assert not (tmp_path / "run").exists()
    student = zero_student(lm, make_compressor("global:kvzip", ratio=0.5, keep_first=1, keep_last=0))
    passages = [student.tokens.passage("Apollo 11 landed on the Moon in 1969.")]
    with torch.no_grad():
        keys, values, total, mask = student.student_compressed_tensors(passages)
        with pytest.raises(InputError, match=r"rows per head.*needs \d+ rows.*--method none"):
            student.student_logprobs(keys, values, total, student.tokens.suffix("Where?"), 1, mask)


@pytest.mark.parametrize("kind", KINDS)
def test_a_base_copy_is_the_base_stores_cache_read_for_the_first_passage(lm, tmp_path, passages_file, embedder, kind):
    """``base_copy`` stores each passage's base-model cache beside the adapted one: bit for bit
    the store without an adaptor's, read for the first retrieved passage only (it directly follows
    the prefix, where the base cache is full prefill's); later passages read the adapted cache,
    on the dense path and the packed one alike."""
    from ragcompress.kv.cache import cache_layers
    from ragcompress.runtime.engine import Engine
    from ragcompress.runtime.options import AnswerOptions
    from ragcompress.store.verify import verify_store

    adaptor = str(noisy_adaptor(lm, 4, kind=kind).save(tmp_path / "adaptor"))
    common = dict(model=lm.ref, lm=lm, embedder=embedder, batch_size=4)
    stores = {
        "base": IndexConfig(quant="int8"),
        "adapted": IndexConfig(quant="int8", adaptor=adaptor),
        "both": IndexConfig(quant="int8", adaptor=adaptor, base_copy=True),
    }
    for name, config in stores.items():
        index(passages_file, tmp_path / name, config=config, **common)
    opened = {name: KVStore.open(tmp_path / name) for name in stores}
    try:
        assert verify_store(tmp_path / "both").ok
        assert opened["both"].manifest.base_copy and not opened["adapted"].manifest.base_copy
        for entry in opened["both"].catalogue.entries():
            base, adapted = (opened[n].load_kv(opened[n].entry(entry.id)) for n in ("base", "adapted"))
            assert not torch.equal(base.keys, adapted.keys)  # the adaptor moved the cache
            assert torch.equal(opened["both"].load_kv(entry, first=True).keys, base.keys)
            assert torch.equal(opened["both"].load_kv(entry, first=True).values, base.values)
            assert torch.equal(opened["both"].load_kv(entry).keys, adapted.keys)
            assert torch.equal(
                opened["adapted"].load_kv(opened["adapted"].entry(entry.id), first=True).keys, adapted.keys
            )
        question = "Which city is the sporting capital of Australia?"
        options = AnswerOptions(max_new_tokens=4, backend="dense")
        engines = {name: Engine(opened[name], lm, embedder, options) for name in stores}
        entries = engines["both"].retrieve(question, 2)
        rows = {
            name: cache_layers(engine.prepare(question, [opened[name].entry(e.id) for e in entries]).cache)
            for name, engine in engines.items()
        }
        prefix, first = engines["both"].prefix.num_tokens, entries[0].num_tokens
        end = prefix + first + entries[1].num_tokens
        for (k, v), (kb, vb), (ka, va) in zip(rows["both"], rows["base"], rows["adapted"], strict=True):
            first_rows, second_rows = slice(prefix, prefix + first), slice(prefix + first, end)
            assert torch.equal(k[:, :, first_rows], kb[:, :, first_rows]) and torch.equal(
                v[:, :, first_rows], vb[:, :, first_rows]
            )
            assert torch.equal(k[:, :, second_rows], ka[:, :, second_rows]) and torch.equal(
                v[:, :, second_rows], va[:, :, second_rows]
            )
            assert not torch.equal(k[:, :, first_rows], ka[:, :, first_rows])  # not the adapted first passage
        for backend in ("dense", "packed-torch"):  # one passage: the store without an adaptor's answer
            one = [entries[0]]
            got = engines["both"].answer_cached(question, one, options.replace(backend=backend)).token_ids
            want = engines["base"].answer_cached(question, [opened["base"].entry(entries[0].id)], options).token_ids
            assert got == want, backend
    finally:
        for store in opened.values():
            store.close()


def test_a_base_copy_needs_an_adaptor_and_every_row_and_is_recorded(lm, tmp_path, passages_file, embedder):
    with pytest.raises(ValueError, match="give an adaptor"):
        IndexConfig(base_copy=True)
    with pytest.raises(ValueError, match="keeps every row"):
        IndexConfig(base_copy=True, adaptor="default", method="global:kvzip", ratio=0.5)
    with pytest.raises(ValueError, match="no rank, no neighbours"):
        IndexConfig(base_copy=True, adaptor="default", context_neighbors=2)
    adaptor = str(noisy_adaptor(lm, 4).save(tmp_path / "adaptor"))
    config = IndexConfig(quant="none", adaptor=adaptor, base_copy=True)
    index(passages_file, tmp_path / "store", model=lm.ref, lm=lm, embedder=embedder, config=config)
    with KVStore.open(tmp_path / "store") as store:
        assert store.manifest.encoding["base_copy"] is True
        assert store.manifest.passages_exact  # unquantized, and the first passage reads the base copy
    with pytest.raises(StoreMismatchError, match="passage encoding"):  # adding without base copies
        index(
            passages_file,
            tmp_path / "store",
            model=lm.ref,
            lm=lm,
            embedder=embedder,
            config=dataclasses.replace(config, base_copy=False),
        )


def test_a_base_copy_that_does_not_decode_is_a_verify_problem(lm, tmp_path, passages_file, embedder):
    """``verify`` decodes each blob's base copy too: the first retrieved passage is read from it,
    so without that a base copy missing its values (its blob's checksum made to match) passed
    ``verify`` and failed only when a query read it."""
    from safetensors.torch import load, save

    from ragcompress.store.verify import verify_store
    from ragcompress.testing import point_row_at_appended_blob

    adaptor = str(noisy_adaptor(lm, 4).save(tmp_path / "adaptor"))
    config = IndexConfig(quant="none", adaptor=adaptor, base_copy=True)
    store = tmp_path / "store"
    index(passages_file, store, model=lm.ref, lm=lm, embedder=embedder, config=config)
    with KVStore.open(store) as kv:
        victim = next(iter(kv.catalogue.entries()))
    path = store / "shards" / victim.shard
    blob = path.read_bytes()[victim.offset : victim.offset + victim.length]
    tensors = load(blob)
    assert "base.v" in tensors
    damaged = save({name: t for name, t in tensors.items() if name != "base.v"}, metadata=codec._metadata(blob))
    point_row_at_appended_blob(store, victim.id, victim.shard, damaged)
    problems = [(p.kind, p.passage_id) for p in verify_store(store).problems]
    assert problems == [("segment", victim.id)]


@pytest.mark.parametrize(("arch", "problem"), [("qwen3", "normalises keys"), ("phi3", "fused qkv_proj")])
def test_a_cache_adaptor_refused_for_a_model_names_its_kind_and_the_forward_kind(arch, problem, tiny_model_dir):
    """Only kind ``cache`` is refused for these models; the message said "adaptors do not support
    it", as if no adaptor could be trained for them."""
    lm = load_model(str(tiny_model_dir(arch)))
    with pytest.raises(InputError, match=rf"{problem}.*kind 'cache'.*--kind forward"):
        Adaptor.initial(lm.model, rank=2, alpha=4, kind="cache")
    assert Adaptor.initial(lm.model, rank=2, alpha=4, kind="forward").kind == "forward"
