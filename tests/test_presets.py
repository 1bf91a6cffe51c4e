"""Presets: named settings reachable from the CLI, Python and LlamaIndex, explicit options winning."""

from __future__ import annotations

import dataclasses
import glob
import json
import re
from pathlib import Path

import pytest
from test_cli import run_cli

from ragcompress.distill.packaged import packaged_for_store
from ragcompress.indexing import IndexConfig
from ragcompress.indexing.indexer import store_of
from ragcompress.presets import PRESETS, answer_options, index_config, preset
from ragcompress.runtime.recompute import RecomputeConfig

ROOT = Path(__file__).resolve().parent.parent


def test_every_preset_is_a_valid_setting_with_evidence():
    assert set(PRESETS) == {"fast", "small", "smallest", "faithful", "distilled"}
    for item in PRESETS.values():
        assert isinstance(item.index, IndexConfig)
        item.index.compressor()  # raises on a setting the compressors refuse
        assert item.evidence.startswith("docs/results/")
        cited = re.findall(r"docs/results/[\w.*-]+\.jsonl?", item.evidence)
        assert cited and all(glob.glob(str(ROOT / path)) for path in cited), (item.name, cited)
    assert preset("small").index.quant == "int4" and preset("small").index.method == "global:kvzip"
    recompute = preset("faithful").answer.recompute  # 5 % at top-3, 10 % from top-5 (docs/recompute.md)
    assert recompute == RecomputeConfig(ratio=0.05, selection="mixed", ratio_by_passages=((3, 0.05), (5, 0.1)))
    faithful = preset("faithful").index  # the general adaptor where one is packaged (an int8 store takes it)
    assert faithful.adaptor == "matching" and faithful.quant == "int8" and faithful.base_copy
    for model in ("smollm2-135m", "qwen2.5-coder-0.5b"):  # both packaged models ship a general adaptor
        assert packaged_for_store(model, store_of(faithful)).name == model
    for name in ("small", "smallest"):
        config = preset(name).index
        assert config.adaptor == "matching" and config.quant == "int4"
        for model in ("smollm2-135m", "qwen2.5-coder-0.5b"):  # each packaged model ships its adaptor for it
            assert packaged_for_store(model, store_of(config)) is not None, (name, model)
    assert preset("distilled").index.adaptor == "default"  # the model's packaged KV-Distill adaptor
    assert preset("distilled").index.base_copy  # the first retrieved passage read from the base model's cache
    with pytest.raises(ValueError, match="fast, small, smallest, faithful, distilled"):
        preset("tiny")


def test_cli_help_names_every_preset():
    from ragcompress.cli import PRESET_HELP

    listed = PRESET_HELP.split(": ", 1)[1].split(" (", 1)[0].split(", ")
    assert listed == list(PRESETS)


def test_explicit_options_override_the_preset():
    assert index_config() == IndexConfig()
    config = index_config("small", quant="int8", budget=16)
    assert (config.method, config.quant, config.budget, config.ratio) == ("global:kvzip", "int8", 16, None)
    assert index_config("small", ratio=0.5).ratio == 0.5
    smallest = index_config("smallest")  # int4 keys, int2 values
    assert (smallest.quant, smallest.value_quant) == ("int4", "int2")
    assert index_config("smallest", quant="int8").quant_config().name == "int8"  # --quant alone: both
    assert index_config("smallest", quant="int8", value_quant="int4").quant_config().name == "int8/int4"
    options = answer_options("faithful", max_new_tokens=4)
    assert options.max_new_tokens == 4 and options.recompute.ratio == 0.05
    assert answer_options("faithful", recompute=RecomputeConfig()).recompute.ratio == 0.0


def test_explicit_recompute_fixes_the_fraction_and_keeps_the_presets_selection():
    """``--recompute R`` over ``--preset faithful``: R at every top-k, still ``mixed`` selection."""
    from ragcompress.cli.options import options_from_flags

    preset_config = options_from_flags("faithful").recompute
    assert [preset_config.ratio_for(k) for k in (3, 5)] == [0.05, pytest.approx(0.1)]
    fixed = options_from_flags("faithful", recompute=0.2).recompute
    assert (fixed.ratio_for(3), fixed.ratio_for(5), fixed.selection) == (0.2, 0.2, "mixed")
    assert options_from_flags("faithful", selection="deviation").recompute.ratio_by_passages == ((3, 0.05), (5, 0.1))


def test_a_selection_without_anything_recomputed_is_refused():
    """``--selection`` ranks the recomputed tokens: with no fraction (no preset, or ``--recompute 0``)
    it was accepted and did nothing."""
    from ragcompress.cli.options import options_from_flags
    from ragcompress.errors import RagCompressError

    for flags in ({"selection": "mixed"}, {"recompute": 0.0, "selection": "question"}):
        with pytest.raises(RagCompressError, match="nothing is: give a recompute fraction too"):
            options_from_flags(None, **flags)
    with pytest.raises(RagCompressError, match="nothing is"):
        options_from_flags("faithful", recompute=0.0, selection="mixed")
    assert options_from_flags(None, recompute=0.1, selection="question").recompute.selection == "question"


def test_recompute_flag_reads_a_fraction_or_a_schedule_by_passages():
    """``--recompute 0.2`` is one fraction; ``--recompute 2:0.1,4:0.3`` a schedule (linear between
    its points, the preset's selection kept); a malformed value or a bad point is a clear error."""
    from ragcompress.cli.options import options_from_flags, recompute_schedule
    from ragcompress.errors import RagCompressError

    assert recompute_schedule(None) is None and recompute_schedule("0.2") == 0.2
    assert recompute_schedule("2:0.1,4:0.3") == ((2, 0.1), (4, 0.3))
    schedule = options_from_flags("faithful", recompute=recompute_schedule("2:0.1,4:0.3")).recompute
    assert (schedule.ratio, schedule.ratio_by_passages, schedule.selection) == (0.1, ((2, 0.1), (4, 0.3)), "mixed")
    assert [schedule.ratio_for(k) for k in (1, 3, 6)] == [0.1, pytest.approx(0.2), 0.3]
    for text in ("x", "3:", "3:0.1,5", "3:0.1:2", "0.1,5:0.2", "3.5:0.1"):
        with pytest.raises(RagCompressError, match="neither a fraction"):
            recompute_schedule(text)
    for text, problem in (("1.5", "must be in"), ("5:0.1,3:0.2", "increasing"), ("0:0.1", "passages >= 1")):
        with pytest.raises(RagCompressError, match=problem):
            options_from_flags("faithful", recompute=recompute_schedule(text))


@pytest.mark.filterwarnings(
    "ignore:no adaptor is packaged"
)  # a tiny model has none (tests/test_cli.py checks the line)
def test_cli_index_preset_is_recorded_in_the_manifest(tiny_model_dir, passages_file, tmp_path, monkeypatch, capfd):
    store = tmp_path / "store"
    args = ["index", "--input", str(passages_file), "--store", str(store), "--model", str(tiny_model_dir("llama"))]
    code, _, err = run_cli([*args, "--preset", "small", "--json"], monkeypatch, capfd)
    assert code == 0, err
    compression = json.loads((store / "manifest.json").read_text())["compression"]
    assert compression["method"] == "global:kvzip" and compression["quant"] == "int4"
    assert compression["keep_first"] == 1 and compression["keep_last"] == 0
    # options over a preset: the pooled methods' floor and value weighting reach the manifest
    weighted = tmp_path / "weighted"
    flags = ["--store", str(weighted), "--preset", "small", "--floor", "0.2", "--value-norm", "--json"]
    code, _, err = run_cli(["index", "--input", str(passages_file), *args[-2:], *flags], monkeypatch, capfd)
    assert code == 0, err
    compression = json.loads((weighted / "manifest.json").read_text())["compression"]
    assert compression["floor"] == 0.2 and compression["value_norm"] is True
    code, _, err = run_cli(["ask", "--store", str(store), "--question", "Who?", "--preset", "nope"], monkeypatch, capfd)
    assert code == 1 and err.startswith("error: unknown preset 'nope'") and err.count("\n") == 1


@pytest.mark.parametrize(
    "config",
    [
        IndexConfig(),
        IndexConfig(method="snapkv", budget=16, keep_first=2, quant="int8"),
        IndexConfig(method="adaptive:knorm", ratio=0.3, quant="int4", group_size=64, context_neighbors=2),
        IndexConfig(method="global:knorm", ratio=0.5, quant="int4", value_quant="int2", rank=8, rank_values=False),
        IndexConfig(method="global:kvzip", ratio=0.21, floor=0.2, quant="int4", value_quant="int2", rank=8),
        IndexConfig(method="global:kvzip", ratio=0.21, value_norm=True, quant="int4", value_quant="int2", rank=8),
        # every preset's store settings (the adaptor and its base copy need a trained adaptor)
        *[dataclasses.replace(p.index, adaptor=None, base_copy=False) for p in PRESETS.values()],
    ],
    ids=lambda c: f"{c.method}-{c.quant}-{c.ratio}-{c.budget}-{c.rank}" + ("-vnorm" if c.value_norm else ""),
)
def test_store_settings_are_read_back_from_the_manifest(tiny_lm, config):
    """What `index` uses to add to an existing store when no setting is given: the manifest the
    recovered settings build is the store's own (compression, encoding, embedder)."""
    from ragcompress.indexing.config import build_manifest, config_from_manifest
    from ragcompress.prompt import PromptTemplate

    template = PromptTemplate.from_tokenizer(tiny_lm.tokenizer)
    manifest = build_manifest(tiny_lm, template, config)
    again = build_manifest(tiny_lm, template, config_from_manifest(manifest))
    assert (again.compression, again.encoding, again.embedder) == (
        manifest.compression,
        manifest.encoding,
        manifest.embedder,
    )


def test_cli_adds_to_a_store_without_repeating_its_settings(tiny_model_dir, tmp_path, monkeypatch, capfd):
    """A low-rank, evicted, int4 store: a second `index` with only --input and --store uses the
    store's settings, model and basis and adds the new passages; a conflicting option is refused."""
    from ragcompress.data import SAMPLE_PASSAGES
    from ragcompress.store.verify import verify_store

    lines = SAMPLE_PASSAGES.read_text().splitlines()
    first, second = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    first.write_text("\n".join(lines[:6]) + "\n")
    second.write_text("\n".join(lines[6:9]) + "\n")
    store = tmp_path / "store"
    model = ["--model", str(tiny_model_dir("llama"))]
    build = ["--method", "global:knorm", "--ratio", "0.5", "--quant", "int4", "--rank", "8"]
    code, _, err = run_cli(["index", "--input", str(first), "--store", str(store), *model, *build], monkeypatch, capfd)
    assert code == 0, err
    before = json.loads((store / "manifest.json").read_text())
    code, out, err = run_cli(["index", "--input", str(second), "--store", str(store), "--json"], monkeypatch, capfd)
    assert code == 0, err
    assert json.loads(out)["indexed"] == 3
    after = json.loads((store / "manifest.json").read_text())
    assert (after["compression"], after["encoding"]) == (before["compression"], before["encoding"])
    report = verify_store(store)
    assert report.ok and report.passages == 9, report.problems
    code, _, err = run_cli(
        ["index", "--input", str(second), "--store", str(store), "--quant", "int8"], monkeypatch, capfd
    )
    assert code == 1 and "compression" in err


def test_explicit_choices_replace_only_what_they_name():
    """``--recompute``, a ``serve`` request and the LlamaIndex synthesizer override a preset the
    same way (``AnswerOptions.overridden``): the fraction, not the preset's selection."""
    from ragcompress.presets import answer_options

    faithful = answer_options("faithful")
    assert faithful.overridden() == faithful
    mine = faithful.overridden(recompute=0.2, max_new_tokens=5, fallback_margin=0.1)
    assert mine.recompute.ratio == 0.2 and mine.recompute.ratio_by_passages == ()
    assert mine.recompute.selection == faithful.recompute.selection == "mixed"
    assert (mine.max_new_tokens, mine.fallback_margin, mine.backend) == (5, 0.1, faithful.backend)
    assert faithful.overridden(selection="deviation", backend="dense").recompute.ratio_by_passages == (
        faithful.recompute.ratio_by_passages
    )


def test_a_conflict_with_a_presets_own_setting_names_the_preset():
    """``--preset faithful --method kvzip --ratio 0.5`` was told "base_copy (--base-copy) needs ...",
    as if the user had asked for a base copy: the preset's settings that stood are named, with
    the option that overrides the one in conflict."""
    from ragcompress.presets import index_config

    with pytest.raises(ValueError, match="needs a store that keeps every row") as caught:
        index_config("faithful", method="kvzip", ratio=0.5)
    message = str(caught.value)
    assert "preset faithful also sets" in message and "base_copy=True" in message and "--no-base-copy" in message
    assert "method=" not in message.split("also sets")[1]  # what the user gave is not the preset's
    assert index_config("faithful", method="kvzip", ratio=0.5, base_copy=False).method == "kvzip"
    with pytest.raises(ValueError, match="needs a store that keeps every row") as caught:
        index_config(None, method="kvzip", ratio=0.5, base_copy=True, adaptor="default")
    assert "preset" not in str(caught.value)
