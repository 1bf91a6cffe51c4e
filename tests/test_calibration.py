"""Label-free APE calibration: ``ragcompress calibrate`` chooses a temperature by KL to full
prefill, records it in the manifest, and every stored-cache answer applies it."""

from __future__ import annotations

import dataclasses
import json
import sys

import pytest
import torch

from ragcompress.indexing import IndexConfig, index
from ragcompress.runtime.calibration import calibrate_temperature
from ragcompress.runtime.engine import Engine
from ragcompress.runtime.options import AnswerOptions
from ragcompress.runtime.recompute import RecomputeConfig
from ragcompress.store import Manifest

QUESTION = "What city is the sporting capital of Australia?"


@pytest.fixture(scope="module")
def store(tmp_path_factory, tiny_model_dir, embedder):
    from ragcompress.data import SAMPLE_PASSAGES

    root = tmp_path_factory.mktemp("calibration")
    passages = root / "passages.jsonl"
    passages.write_text("\n".join(SAMPLE_PASSAGES.read_text().splitlines()[:6]) + "\n")
    index(passages, root / "store", model=str(tiny_model_dir("qwen2")), config=IndexConfig(), embedder=embedder)
    return root / "store"


def record(store, temperature: float) -> None:
    manifest = Manifest.read(store)
    dataclasses.replace(manifest, attention={"temperature": temperature}).write(store)


def first_logits(engine: Engine, options: AnswerOptions) -> torch.Tensor:
    entries = engine.retrieve(QUESTION, 3)
    prepared = engine.prepare(QUESTION, entries, options.replace(backend="dense"))
    from ragcompress.runtime.generate import forward_logits

    ids = torch.tensor([prepared.input_ids])
    return forward_logits(engine.lm.model, ids, prepared.cache, prepared.position, 1, **prepared.attention_kwargs)


def test_identity_temperature_changes_nothing(store):
    with Engine.open(store) as engine:
        plain = first_logits(engine, AnswerOptions(calibrate=False))
    record(store, 1.0)
    with Engine.open(store) as engine:
        assert torch.equal(first_logits(engine, AnswerOptions()), plain)


def test_recorded_temperature_is_applied_unless_overridden(store):
    record(store, 0.8)
    with Engine.open(store) as engine:
        applied = first_logits(engine, AnswerOptions())
        explicit = first_logits(engine, AnswerOptions(recompute=RecomputeConfig(temperature=0.8), calibrate=False))
        plain = first_logits(engine, AnswerOptions(calibrate=False))
        own = first_logits(engine, AnswerOptions(recompute=RecomputeConfig(temperature=1.2)))
        other = first_logits(engine, AnswerOptions(recompute=RecomputeConfig(temperature=1.2), calibrate=False))
    assert torch.equal(applied, explicit)
    assert not torch.equal(applied, plain)
    assert torch.equal(own, other)  # a temperature of the request's own wins
    record(store, 1.0)


def test_calibration_chooses_the_lowest_kl_deterministically(store):
    with Engine.open(store, options=AnswerOptions(calibrate=False)) as engine:
        first = calibrate_temperature(engine, samples=2, top_k=2, grid=(0.5, 1.0, 2.0), answer_tokens=3)
        again = calibrate_temperature(engine, samples=2, top_k=2, grid=(0.5, 1.0, 2.0), answer_tokens=3)
        reference = untempered_kl(engine, samples=2, top_k=2, answer_tokens=3)
    assert first == again
    assert set(first.kl) == {"0.5", "1", "2"}
    assert len(set(first.kl.values())) == 3  # each temperature was applied
    assert first.kl[f"{first.temperature:g}"] == min(first.kl.values())
    assert all(value >= 0.0 for value in first.kl.values())
    assert reference > 0.0 and first.kl["1"] == pytest.approx(reference, rel=1e-3, abs=1e-6)


def untempered_kl(engine: Engine, samples: int, top_k: int, answer_tokens: int) -> float:
    """The mean KL at temperature 1 computed apart from the calibration's code: each group's full
    prompt and greedy answer in one plain forward, against the stored caches' request read along
    the same answer by the model itself."""
    from ragcompress.runtime.calibration import PROBE_QUESTION

    entries = sorted(engine.store.catalogue.entries(), key=lambda e: e.id)
    anchors = [entries[i * len(entries) // samples] for i in range(samples)]  # evenly spaced
    options = engine.options.replace(max_new_tokens=answer_tokens, backend="dense")
    model, total = engine.lm.model, 0.0
    for anchor in anchors:
        group = engine.retrieve(anchor.text, top_k)
        answer = engine.answer_full(PROBE_QUESTION, group, options).token_ids
        ids = engine.full_prompt_ids(PROBE_QUESTION, group, options)
        keep = len(answer) + 1
        with torch.inference_mode():
            full = model(torch.tensor([ids + answer])).logits[0, -keep:].float().log_softmax(-1)
            prepared = engine.prepare(PROBE_QUESTION, group, options)
            read = prepared.input_ids + answer
            positions = torch.arange(prepared.position, prepared.position + len(read)).unsqueeze(0)
            out = model(
                input_ids=torch.tensor([read]),
                position_ids=positions,
                past_key_values=prepared.cache,
                use_cache=True,
                **prepared.attention_kwargs,
            )
            cached = out.logits[0, -keep:].float().log_softmax(-1)
        total += float((full.exp() * (full - cached)).sum(-1).mean())
    return total / len(anchors)


def test_calibration_groups_are_spread_over_the_whole_store(store, monkeypatch):
    """The groups' anchors were ``entries[::len // samples][:samples]``: a store under twice
    ``samples`` gave its first passages only (here 0-3 of 6), a larger one never its tail (the
    last 22 of the 173 SQuAD passages at the default 16)."""
    with Engine.open(store, options=AnswerOptions(calibrate=False)) as engine:
        entries = sorted(engine.store.catalogue.entries(), key=lambda e: e.id)
        asked: list[str] = []
        retrieve = engine.retrieve
        monkeypatch.setattr(engine, "retrieve", lambda text, k: (asked.append(text), retrieve(text, k))[1])
        calibrate_temperature(engine, samples=4, top_k=1, grid=(1.0,), answer_tokens=1)
    assert asked == [entries[i].text for i in (0, 1, 3, 4)]


def test_calibrating_an_empty_store_is_one_line_naming_it(tmp_path, tiny_model_dir, embedder, capfd, monkeypatch):
    from ragcompress.cli import main
    from ragcompress.data import SAMPLE_PASSAGES
    from ragcompress.indexing import remove

    passages = tmp_path / "passages.jsonl"
    passages.write_text(SAMPLE_PASSAGES.read_text().splitlines()[0] + "\n")
    index(passages, tmp_path / "store", model=str(tiny_model_dir("qwen2")), config=IndexConfig(), embedder=embedder)
    with Engine.open(tmp_path / "store") as engine:
        ids = [e.id for e in engine.store.catalogue.entries()]
    remove(tmp_path / "store", ids)
    monkeypatch.setattr(sys, "argv", ["ragcompress", "calibrate", "--store", str(tmp_path / "store")])
    with pytest.raises(SystemExit) as exit_:
        main()
    err = capfd.readouterr().err
    assert exit_.value.code == 1 and err.startswith("error: store ") and "holds no passages" in err, err
    assert err.count("\n") == 1, err


def test_cli_records_the_temperature(store, capfd, monkeypatch):
    from ragcompress.cli import main

    monkeypatch.setattr(sys, "argv", ["ragcompress", "calibrate", "--store", str(store), "--samples", "1", "--json"])
    main()
    out = json.loads(capfd.readouterr().out)
    assert Manifest.read(store).attention["temperature"] == out["temperature"]
    assert "sha256" in Manifest.read(store).attention  # sealed: an edit of it is refused (below)
    record(store, 1.0)


def test_an_edited_calibrated_temperature_is_refused_not_applied(store):
    """The temperature is written after the build, outside ``build_sha256``; an edit of it (a typo,
    a flipped digit) inside [0.1, 10] passed every check and changed every answer. ``calibrate``
    seals the entry with its own sha256 now; one written before that is read as it is."""
    import pytest

    from ragcompress.errors import StoreError
    from ragcompress.store.manifest import MANIFEST, sealed_attention

    manifest = Manifest.read(store)
    dataclasses.replace(manifest, attention=sealed_attention({"temperature": 0.8, "samples": 2})).write(store)
    assert Manifest.read(store).attention["temperature"] == 0.8
    path = store / MANIFEST
    sealed = path.read_text()
    path.write_text(sealed.replace('"temperature": 0.8', '"temperature": 0.3'))
    with pytest.raises(StoreError, match="'attention' was edited after `ragcompress calibrate` wrote it"):
        Manifest.read(store)
    path.write_text(sealed)
    record(store, 1.0)  # an unsealed entry (a manifest written before the seal) still reads
    assert Manifest.read(store).attention == {"temperature": 1.0}


def test_cli_records_nothing_in_another_build_swapped_in_while_it_measured(
    store, tmp_path, tiny_model_dir, monkeypatch, capfd
):
    """`index --overwrite` with other settings during `calibrate`: the temperature measured on the
    old build is refused, and the new store's manifest is left as it was."""
    import shutil

    from ragcompress.cli import main
    from ragcompress.data import SAMPLE_PASSAGES
    from ragcompress.runtime import calibration

    copy = tmp_path / "store"
    shutil.copytree(store, copy)
    passages = tmp_path / "passages.jsonl"
    passages.write_text("\n".join(SAMPLE_PASSAGES.read_text().splitlines()[:2]) + "\n")
    measure = calibration.calibrate_temperature

    def swapping(engine, **kwargs):
        result = measure(engine, **kwargs)
        index(passages, copy, model=str(tiny_model_dir("qwen2")), config=IndexConfig(quant="int8"), overwrite=True)
        return result

    monkeypatch.setattr(calibration, "calibrate_temperature", swapping)
    monkeypatch.setattr(sys, "argv", ["ragcompress", "calibrate", "--store", str(copy), "--samples", "1"])
    before = (copy / "manifest.json").read_bytes()
    with pytest.raises(SystemExit):
        main()
    assert "replaced by another build" in capfd.readouterr().err
    assert (copy / "manifest.json").read_bytes() != before  # the new build's, without a temperature
    assert "temperature" not in Manifest.read(copy).attention


def test_calibration_runs_on_a_sliding_window_model_whose_prompts_outrun_the_window(tmp_path, tiny_model_dir, embedder):
    """``calibrate`` rewinds each probe's full prefill to read its answer back; on a model whose
    window is shorter than the prompt (Gemma-3's 512, Phi-3-mini's 2047 against a top-3 prompt)
    transformers' sliding layers had dropped those rows and ``crop`` raised a RuntimeError
    traceback. The full prefill is read again instead, and its KL is what a fresh full prefill gives."""
    from ragcompress.data import SAMPLE_PASSAGES

    passages = tmp_path / "passages.jsonl"
    passages.write_text("\n".join(SAMPLE_PASSAGES.read_text().splitlines()[:4]) + "\n")
    model = str(tiny_model_dir("mistral", sliding_window=128))
    index(passages, tmp_path / "store", model=model, config=IndexConfig(), embedder=embedder)
    with Engine.open(tmp_path / "store", options=AnswerOptions(calibrate=False)) as engine:
        entries = engine.retrieve(QUESTION, 2)
        assert len(engine.full_prompt_ids(QUESTION, entries, engine.options)) > 2 * 128  # well past the window
        result = calibrate_temperature(engine, samples=2, top_k=2, grid=(1.0,), answer_tokens=3)
        reference = untempered_kl(engine, samples=2, top_k=2, answer_tokens=3)
    assert reference > 0.0 and result.kl["1"] == pytest.approx(reference, rel=1e-3, abs=1e-6)


def test_the_packed_backends_answer_a_calibrated_store_with_no_calibrate(
    tmp_path, tiny_model_dir, embedder, capfd, monkeypatch
):
    """The packed backends cannot apply a temperature, and their refusal named the way round it
    (answering without the calibration) in Python only: `ask`, `eval` and `serve` had no flag for it,
    so a calibrated store could not be answered through them at all from the command line."""
    from ragcompress.cli import main
    from ragcompress.data import SAMPLE_PASSAGES

    passages, store = tmp_path / "passages.jsonl", tmp_path / "store"
    passages.write_text("\n".join(SAMPLE_PASSAGES.read_text().splitlines()[:4]) + "\n")
    index(passages, store, model=str(tiny_model_dir("qwen2")), config=IndexConfig(quant="int8"), embedder=embedder)
    record(store, 0.8)
    ask = ["ragcompress", "ask", "--store", str(store), "--question", QUESTION, "--max-new-tokens", "2"]
    monkeypatch.setattr(sys, "argv", [*ask, "--backend", "packed-torch", "--json"])
    with pytest.raises(SystemExit) as refused:
        main()
    assert refused.value.code == 1 and "--no-calibrate" in capfd.readouterr().err
    monkeypatch.setattr(sys, "argv", [*ask, "--backend", "packed-torch", "--no-calibrate", "--json"])
    main()
    packed = json.loads(capfd.readouterr().out)
    monkeypatch.setattr(sys, "argv", [*ask, "--no-calibrate", "--json"])
    main()
    dense = json.loads(capfd.readouterr().out)
    assert packed["backend"] == "packed-torch" and packed["answer"] == dense["answer"]
