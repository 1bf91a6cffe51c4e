"""Presets: named settings reachable from the CLI, Python and LlamaIndex, explicit options winning."""

from __future__ import annotations

import json

import pytest
from test_cli import run_cli

from ragcompress.indexing import IndexConfig
from ragcompress.presets import PRESETS, answer_options, index_config, preset
from ragcompress.runtime.recompute import RecomputeConfig


def test_every_preset_is_a_valid_setting_with_evidence():
    assert set(PRESETS) == {"fast", "small", "smallest", "faithful", "distilled"}
    for item in PRESETS.values():
        assert isinstance(item.index, IndexConfig) and item.index.compressor() is not None
        assert item.evidence.startswith("docs/results/")
    assert preset("small").index.quant == "int4" and preset("small").index.method == "global:kvzip"
    assert preset("faithful").answer.recompute == RecomputeConfig(ratio=0.1, selection="mixed")
    assert preset("smallest").index.rank_spec() is not None  # a low-rank store
    assert preset("distilled").index.adaptor == "default"  # the model's packaged KV-Distill adaptor
    with pytest.raises(ValueError, match="fast, small, smallest, faithful, distilled"):
        preset("tiny")


def test_explicit_options_override_the_preset():
    assert index_config() == IndexConfig()
    config = index_config("small", quant="int8", budget=16)
    assert (config.method, config.quant, config.budget, config.ratio) == ("global:kvzip", "int8", 16, None)
    assert index_config("small", ratio=0.5).ratio == 0.5
    options = answer_options("faithful", max_new_tokens=4)
    assert options.max_new_tokens == 4 and options.recompute.ratio == 0.1
    assert answer_options("faithful", recompute=RecomputeConfig()).recompute.ratio == 0.0


def test_cli_index_preset_is_recorded_in_the_manifest(tiny_model_dir, passages_file, tmp_path, monkeypatch, capfd):
    store = tmp_path / "store"
    args = ["index", "--input", str(passages_file), "--store", str(store), "--model", str(tiny_model_dir("llama"))]
    code, _, err = run_cli([*args, "--preset", "small", "--json"], monkeypatch, capfd)
    assert code == 0, err
    compression = json.loads((store / "manifest.json").read_text())["compression"]
    assert compression["method"] == "global:kvzip" and compression["quant"] == "int4"
    assert compression["keep_first"] == 1 and compression["keep_last"] == 0
    code, _, err = run_cli(["ask", "--store", str(store), "--question", "Who?", "--preset", "nope"], monkeypatch, capfd)
    assert code == 1 and err.startswith("error: unknown preset 'nope'") and err.count("\n") == 1
