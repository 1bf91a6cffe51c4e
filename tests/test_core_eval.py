"""``benchmarks/core_eval.py``'s checkpoint: every row names the code revision and threads that
answered it, and the results file records every revision its rows came from (a resumed run
can span commits; the file's own ``meta.git`` is only the revision that wrote it)."""

from __future__ import annotations

import importlib
import json

core_eval = importlib.import_module("core_eval")  # benchmarks/core_eval.py


def test_checkpoint_rows_name_the_run_that_answered_them(tmp_path, tiny_model_dir, embedder):
    from ragcompress import Engine, IndexConfig, KVStore, index
    from ragcompress.data import SAMPLE_PASSAGES, SAMPLE_QUESTIONS
    from ragcompress.evaluation import read_questions
    from ragcompress.models import load_model
    from ragcompress.runtime.options import AnswerOptions

    lm = load_model(str(tiny_model_dir("llama")))
    store = tmp_path / "store"
    index(SAMPLE_PASSAGES, store, lm=lm, embedder=embedder, config=IndexConfig(quant="int8"))
    questions = read_questions(SAMPLE_QUESTIONS, 3)
    folder = tmp_path / "ck"
    folder.mkdir()
    # one question answered by an earlier run, before rows named their run
    with Engine(KVStore.open(store), lm, embedder, AnswerOptions(max_new_tokens=2)) as engine:
        first, measured = core_eval.checkpointed(
            engine, questions[:1], 1, folder, "x", "0/1", {"git": "a1", "threads": 1}
        )
        assert first is not None and measured == {"git": ["a1"], "threads": ["1"]}
        rows = [json.loads(line) for line in (folder / "x-shard0.jsonl").read_text().splitlines()]
        (folder / "x-shard0.jsonl").write_text(json.dumps({k: v for k, v in rows[0].items() if k != "run"}) + "\n")
        results, measured = core_eval.checkpointed(
            engine, questions, 1, folder, "x", "0/1", {"git": "b2", "threads": 2}
        )
    assert [r.question.id for r in results] == [q.id for q in questions]
    assert measured == {"git": ["b2", "not recorded"], "threads": ["2", "not recorded"]}
