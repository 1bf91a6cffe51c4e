"""``benchmarks/text_compression.py --from-log``: runs appended to one log are told apart, and a
partial log is summarized over the questions every method answered."""

from __future__ import annotations

import argparse
import importlib
import json

import pytest

text_compression = importlib.import_module("text_compression")  # benchmarks/ is on pytest's pythonpath


def _line(run: dict | None, method: str, question: str, sub_em: float) -> str:
    row = {"question": question, "method": method, "answer": "a", "sub_em": sub_em, "tokens": 10, "compress_s": 0.1}
    return json.dumps({**row, "agree": True, **({"run": run} if run else {})})


def test_a_log_of_two_runs_is_summarized_one_run_at_a_time(tmp_path, capsys):
    first, second = {"id": "r1", "top_k": 3}, {"id": "r2", "top_k": 5}
    log = tmp_path / "tc.log"
    log.write_text(
        "\n".join(
            [_line(first, "uncompressed", "q1", 1.0), _line(first, "extractive@0.5", "q1", 0.0)]
            + [_line(second, "uncompressed", "q1", 0.0), _line(second, "extractive@0.5", "q1", 1.0)]
        )
    )
    with pytest.raises(SystemExit, match=r"holds 2 runs: r1 \(2 lines\), r2 \(2 lines\); choose one with --run"):
        text_compression.rows_of_log(log, None)
    rows, settings = text_compression.rows_of_log(log, "r2")
    assert settings["top_k"] == 5 and [r["sub_em"] for r in rows["extractive@0.5"]] == [1.0]
    with pytest.raises(SystemExit, match="no run 'r3'"):
        text_compression.rows_of_log(log, "r3")
    old = tmp_path / "old.log"  # lines from before runs were recorded: one unnamed run
    old.write_text(_line(None, "uncompressed", "q1", 1.0))
    assert text_compression.rows_of_log(old, None)[1] == {"id": text_compression.UNRECORDED}


def test_a_partial_log_is_summarized_over_the_questions_every_method_answered(tmp_path):
    run = {"id": "r1"}
    rows = {
        "uncompressed": [json.loads(_line(run, "uncompressed", q, 1.0)) for q in ("q1", "q2", "q3")],
        "extractive@0.5": [json.loads(_line(run, "extractive@0.5", q, 0.0)) for q in ("q2", "q1")],
    }
    out = tmp_path / "summary.json"
    args = argparse.Namespace(top_k=3, data="d", threads=1, out=out)
    text_compression.summarize(rows, args, "reader", "")
    summary = json.loads(out.read_text())
    assert summary["n"] == 2
    assert summary["methods"]["uncompressed"]["tokens_per_question"] == 10
    assert summary["methods"]["extractive@0.5"]["token_ratio"] == 1.0
