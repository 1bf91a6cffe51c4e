"""``benchmarks/lowrank_frontier.py``'s ``~merge`` rows (an ablation of issue 16): evicted rows'
values are merged into kept rows, and nothing else about the store changes."""

from __future__ import annotations

import importlib
from types import SimpleNamespace

import pytest
import torch

from ragcompress.compressors import make_compressor
from ragcompress.kv import PassageKV

frontier = importlib.import_module("lowrank_frontier")


def _case() -> tuple[PassageKV, torch.Tensor, PassageKV]:
    torch.manual_seed(0)
    full = PassageKV.full(torch.randn(3, 2, 40, 8), torch.randn(3, 2, 40, 8))
    scores = torch.rand(3, 2, 40)
    kept = make_compressor("global:kvzip", ratio=0.2, keep_first=1, keep_last=0).select(full, scores)
    assert len(set(kept.lengths.flatten().tolist())) > 1  # ragged heads: padding rows are exercised
    return full, scores, kept


def test_merge_keeps_the_rows_keys_and_positions():
    full, scores, kept = _case()
    merged = frontier.merge_evicted(full, kept, scores)
    assert torch.equal(merged.keys, kept.keys)
    assert torch.equal(merged.positions, kept.positions)
    assert torch.equal(merged.lengths, kept.lengths)
    assert not torch.equal(merged.values, kept.values)


def test_each_kept_value_is_the_weighted_mean_of_the_rows_assigned_to_it():
    full, scores, kept = _case()
    merged = frontier.merge_evicted(full, kept, scores)
    unit = torch.nn.functional.normalize(full.keys, dim=-1)
    for layer in range(3):
        for head in range(2):
            rows = kept.positions[layer, head, : kept.lengths[layer, head]]
            target = rows[(unit[layer, head] @ unit[layer, head, rows].T).argmax(-1)]  # every row's kept row
            for i, row in enumerate(rows.tolist()):
                group = target == row
                w = scores[layer, head, group]
                expected = (w.unsqueeze(-1) * full.values[layer, head, group]).sum(0) / w.sum()
                torch.testing.assert_close(merged.values[layer, head, i], expected)


def test_merge_row_names_parse():
    row = frontier.RowSpec.parse("global:kvzip@0.21/int4v2/r32k+adaptor~merge")
    assert row.merge and row.adaptor and row.value_quant == "int2"
    assert not frontier.RowSpec.parse("global:kvzip@0.21/int4v2/r32k").merge


def test_basescore_rows_parse_and_need_an_adaptor():
    row = frontier.RowSpec.parse("global:kvzip@0.21/int4v2/r32k+adaptor~basescore")
    assert row.base_scores and row.adaptor and not row.merge
    assert not frontier.RowSpec.parse("global:kvzip@0.21/int4v2/r32k+adaptor").base_scores
    with pytest.raises(SystemExit, match="basescore"):
        frontier.RowSpec.parse("global:kvzip@0.21/int4v2/r32k~basescore")


def test_the_full_prefill_reference_is_refused_for_another_top_k_model_or_code(tmp_path):
    """The workdir's full-prefill answers are read by every later row: a ``--top-k 5`` run over a
    top-3 reference (same questions) once reused it, and a file that does not say what it read
    cannot be checked."""

    questions = [SimpleNamespace(id="q1"), SimpleNamespace(id="q2")]
    run = SimpleNamespace(
        questions=questions,
        retrieved=[["a#0", "b#1", "c#2"], ["d#0", "a#0", "e#3"]],
        lm=SimpleNamespace(ref="tiny"),
        args=SimpleNamespace(top_k=3),
    )
    code = frontier.library_digest(*frontier.REFERENCE_CODE)
    reference = {
        "answers": ["x", "y"],
        "questions": ["q1", "q2"],
        "retrieved": run.retrieved,
        "model": "tiny",
        "code": code,
    }
    path = tmp_path / "full.pt"
    assert frontier.checked_reference(reference, run, path) is reference
    top5 = SimpleNamespace(**{**vars(run), "retrieved": [r + ["f#0", "g#0"] for r in run.retrieved]})
    with pytest.raises(SystemExit, match="other retrieved passages"):
        frontier.checked_reference(reference, top5, path)
    with pytest.raises(SystemExit, match="another model"):
        frontier.checked_reference({**reference, "model": "other"}, run, path)
    with pytest.raises(SystemExit, match="other questions"):
        frontier.checked_reference({**reference, "questions": ["q2", "q1"]}, run, path)
    with pytest.raises(SystemExit, match="does not record"):
        frontier.checked_reference({k: v for k, v in reference.items() if k != "retrieved"}, run, path)
    with pytest.raises(SystemExit, match="other library code"):  # runtime or encoding code changed since
        frontier.checked_reference({**reference, "code": "0" * 16}, run, path)
    with pytest.raises(SystemExit, match="other library code"):  # written before the code was recorded
        frontier.checked_reference({k: v for k, v in reference.items() if k != "code"}, run, path)


def test_entity_tokens_are_numbers_and_capitalised_words_not_opening_a_sentence():
    """``~entity`` (docs/rules.md): which passage tokens get their scores doubled."""
    pieces = ["The", " economy", " of", " Victoria", " grew", " in", " 1", "9", "5", "6", ".", " Mel", "bourne"]
    pieces += [" is", " (", "AF", "L", ")", " big", ".", "\n\n"]
    tokenizer = SimpleNamespace(decode=lambda ids: pieces[ids[0]])
    flags = frontier.entity_tokens(tokenizer, list(range(len(pieces)))).tolist()
    entities = [p for p, f in zip(pieces, flags, strict=True) if f]
    # "The" and " Mel"+"bourne" open sentences; "AF"+"L" follow a parenthesis
    assert entities == [" Victoria", " 1", "9", "5", "6", "AF", "L"]


def test_entity_rows_need_kvzip_scores_and_models_name_one_folder():
    """Doubling a score raises its token only where scores are positive (KVzip's probabilities),
    and a model named by a hub id or a folder names one workdir, as core_eval names its files."""
    from common import model_slug

    assert frontier.RowSpec.parse("global:kvzip@0.21/int4v2/r32k~entity").entity
    for row in ("global:knorm@0.21/int4/-~entity", "none@1/fp16/-~entity"):
        with pytest.raises(SystemExit, match="doubles KVzip's scores"):
            frontier.RowSpec.parse(row)
    assert model_slug("qwen2.5-coder-0.5b") == "qwen2.5-coder-0.5b"
    assert model_slug("Qwen/Qwen2.5-0.5B") == "Qwen_Qwen2.5-0.5B"
    assert "/" not in model_slug("/models/my llama")
