"""The benchmarks' cached intermediate results (``benchmarks/common.py``: ``load_keyed`` /
``save_keyed``): passage caches, scores and calibration moments are reused only when they were
computed from what the run would compute them from, so a stale file is recomputed, never used."""

from __future__ import annotations

import importlib

import torch

common = importlib.import_module("common")

KEY = {"model": "abc", "scorer": "kvzip", "code": "0123"}
TOKENS = {"p0": [1, 2, 3], "p1": [4, 5]}


def _save(path) -> dict[str, torch.Tensor]:
    tensors = {"p0/scores": torch.rand(2, 3), "p1/scores": torch.rand(2, 2)}
    common.save_keyed(path, tensors, KEY, TOKENS)
    return tensors


def test_round_trip_under_the_same_key(tmp_path):
    path = tmp_path / "scores.safetensors"
    saved = _save(path)
    loaded = common.load_keyed(path, dict(KEY), TOKENS)
    assert set(loaded) == set(saved)
    assert all(torch.equal(loaded[name], saved[name]) for name in saved)


def test_another_key_reuses_nothing_and_says_what_changed(tmp_path, capsys):
    path = tmp_path / "scores.safetensors"
    _save(path)
    assert common.load_keyed(path, {**KEY, "code": "4567"}, TOKENS) == {}
    assert "code" in capsys.readouterr().out
    assert common.load_keyed(path, {**KEY, "adaptor": "ff"}, TOKENS) == {}


def test_a_passage_whose_tokens_changed_is_left_out(tmp_path):
    path = tmp_path / "scores.safetensors"
    _save(path)
    loaded = common.load_keyed(path, KEY, {"p0": [1, 2, 3], "p1": [4, 6]})
    assert set(loaded) == {"p0/scores"}


def test_a_passage_the_file_does_not_hold_is_missing_not_an_error(tmp_path):
    path = tmp_path / "scores.safetensors"
    _save(path)
    assert set(common.load_keyed(path, KEY, {**TOKENS, "p2": [7]})) == {"p0/scores", "p1/scores"}
    assert common.load_keyed(tmp_path / "absent.safetensors", KEY, TOKENS) == {}


def test_library_digest_follows_the_source(tmp_path, monkeypatch):
    (tmp_path / "kv").mkdir()
    (tmp_path / "kv" / "a.py").write_text("x = 1\n")
    (tmp_path / "b.py").write_text("y = 2\n")
    monkeypatch.setattr(common, "LIBRARY", tmp_path)
    before = common.library_digest("kv", "b.py")
    assert common.library_digest("b.py", "kv") == before  # order of the parts does not matter
    (tmp_path / "kv" / "a.py").write_text("x = 3\n")
    assert common.library_digest("kv", "b.py") != before
    assert common.library_digest("b.py") == common.library_digest("b.py")


_MODULE = '''"""A module."""

from dataclasses import dataclass

LIMIT = 4  # the largest


@dataclass(frozen=True)
class Config:
    """A config."""

    ratio: float = 0.5
    """The kept share."""


def keep(n: int, config: Config) -> int:
    """How many to keep."""
    local: int = round(n * config.ratio)
    return min(local, LIMIT)
'''


def test_library_digest_ignores_docstrings_comments_and_annotations(tmp_path, monkeypatch):
    """A docstring, comment, formatting or annotation edit does not change what a module computes,
    so it keeps the digest (and every benchmark's cached passage caches and scores with it); a
    change of code, a constant or a dataclass field, changes it."""
    monkeypatch.setattr(common, "LIBRARY", tmp_path)
    module = tmp_path / "m.py"
    module.write_text(_MODULE)
    before = common.library_digest("m.py")
    unchanged = {
        "docstrings": _MODULE.replace("A module.", "The module.").replace("How many", "The number"),
        "comment": _MODULE.replace("# the largest", "# the most there may be"),
        "attribute docstring": _MODULE.replace("The kept share.", "Share of tokens kept."),
        "annotations": _MODULE.replace("n: int", "n: float").replace(") -> int", ") -> float"),
        "local annotation": _MODULE.replace("local: int", "local: float"),
        "formatting": _MODULE.replace("min(local, LIMIT)", "min(\n        local,\n        LIMIT,\n    )"),
    }
    for edit, text in unchanged.items():
        module.write_text(text)
        assert common.library_digest("m.py") == before, edit
    changed = {
        "constant": _MODULE.replace("LIMIT = 4", "LIMIT = 5"),
        "default": _MODULE.replace("= 0.5", "= 0.25"),
        "dataclass field": _MODULE.replace("ratio: float = 0.5", "ratio: float = 0.5\n    floor: int = 0"),
        "field annotation": _MODULE.replace("ratio: float", "ratio: ClassVar[float]"),
        "code": _MODULE.replace("round(", "int("),
    }
    for edit, text in changed.items():
        module.write_text(text)
        assert common.library_digest("m.py") != before, edit
    (tmp_path / "n.py").write_text(_MODULE)
    assert common.library_digest("n.py") != before  # the path is part of what is hashed


def test_the_encoding_code_exists():
    for part in common.ENCODING_CODE:
        assert (common.LIBRARY / part).exists(), part


def test_cached_scores_computes_only_what_is_missing_and_keeps_it(tmp_path, monkeypatch, capsys):
    """One passage scored before, one new: only the new one is scored, and both are kept; a
    scorer whose scores come from elsewhere (kvpress) exits naming what to run instead."""
    import pytest

    import ragcompress.compressors as compressors
    from ragcompress.compressors import KnormCompressor

    path = tmp_path / "scores.safetensors"
    before = {"p0/scores": torch.rand(2, 3)}
    common.save_keyed(path, before, KEY, TOKENS)
    scored: list[object] = []

    class Counting(KnormCompressor):  # a scoring method, as cached_scores requires
        def score(self, kv, context):
            scored.append(kv)
            return torch.ones(2, 2)

    monkeypatch.setattr(compressors, "make_compressor", lambda name: Counting())
    caches = {"p0": "cache0", "p1": "cache1"}
    scores = common.cached_scores(path, KEY, TOKENS, caches, "knorm", encoder=None)
    assert scored == ["cache1"] and torch.equal(scores["p0"], before["p0/scores"])
    assert set(common.load_keyed(path, KEY, TOKENS)) == {"p0/scores", "p1/scores"}
    assert "knorm: scored 1 passages" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="1 passages have no kvpress-x scores; run it elsewhere"):
        common.cached_scores(
            tmp_path / "other.safetensors", KEY, TOKENS, {"p0": "c"}, "kvpress-x", None, "run it elsewhere"
        )
