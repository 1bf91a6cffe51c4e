"""Model resolution, the evaluation model's assembly check, and refusal of unsupported models."""

from __future__ import annotations

import json

import pytest

from ragcompress import models
from ragcompress.errors import ModelError


def test_unknown_model_names_the_embedded_ones(tmp_path):
    with pytest.raises(ModelError, match="smollm2-135m.*qwen2.5-coder-0.5b"):
        models.resolve_model_dir("no-such-model")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="no config.json"):
        models.resolve_model_dir(str(tmp_path / "empty"))


def test_model_without_rope_family_is_refused(tmp_path):
    from transformers import GPT2Config

    GPT2Config(n_layer=1, n_embd=32, n_head=2).save_pretrained(tmp_path)
    with pytest.raises(ModelError, match="model type 'gpt2' is not supported"):
        models.load_model(str(tmp_path))


def test_fingerprint_changes_with_weights(tiny_model_dir):
    a = models.load_model(str(tiny_model_dir("llama")))
    b = models.load_model(str(tiny_model_dir("llama", seed=1)))
    again = models.load_model(str(tiny_model_dir("llama")))
    assert a.fingerprint != b.fingerprint
    assert a.fingerprint == again.fingerprint
    assert a.tokenizer_hash == b.tokenizer_hash


@pytest.mark.eval_model
def test_eval_model_hash_mismatch_is_an_error_and_keeps_nothing(tmp_path, monkeypatch):
    """A wrong sha256 must fail loudly; the assembled file is never kept or used."""
    monkeypatch.setenv("RAGCOMPRESS_CACHE", str(tmp_path))
    monkeypatch.setattr(models, "QWEN_SHA256", "0" * 64)
    with pytest.raises(ModelError, match="expected 0000"):
        models.qwen_gguf()
    assert not any((tmp_path / "gguf").iterdir())


@pytest.mark.eval_model
def test_eval_model_parts_assemble_to_the_published_hash():
    path = models.qwen_gguf()
    assert models.sha256_file(path) == models.QWEN_SHA256
    source = json.loads((models.resolve_model_dir(models.EVAL_MODEL) / "ragcompress_source.json").read_text())
    assert source["sha256"] == models.QWEN_SHA256
