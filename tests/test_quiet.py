"""Loading a model or the embedder prints no progress bars (library noise on every command)."""

from __future__ import annotations


def test_model_and_embedder_load_without_progress_bars(tiny_model_dir, capfd):
    from ragcompress.models import load_model
    from ragcompress.retrieval import Embedder

    model_dir = str(tiny_model_dir("llama"))  # building it (a test fixture) may print
    capfd.readouterr()
    load_model(model_dir)
    Embedder().embed(["a sentence"])
    out, err = capfd.readouterr()
    assert "Loading" not in out + err and "it/s" not in out + err
