"""The CLI contract (DESIGN §3): JSON shapes, one-line errors, non-zero exits, stores left intact."""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import json
import os
import re
import shutil
import sqlite3
import subprocess
import sys

import pytest

from ragcompress.cli import main


def run_cli(args: list[str], monkeypatch, capfd) -> tuple[int, str, str]:
    monkeypatch.setattr(sys, "argv", ["ragcompress", *args])
    code = 0
    try:
        main()
    except SystemExit as exc:
        code = exc.code or 0
    out, err = capfd.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def cli_store(tmp_path_factory, tiny_model_dir):
    """A store built through the CLI from the first 8 bundled passages, int8."""
    from ragcompress.data import SAMPLE_PASSAGES

    root = tmp_path_factory.mktemp("cli")
    passages = root / "passages.jsonl"
    passages.write_text("\n".join(SAMPLE_PASSAGES.read_text().splitlines()[:8]) + "\n")
    store = root / "store"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "ragcompress.cli",
            "index",
            "--input",
            str(passages),
            "--store",
            str(store),
            "--model",
            str(tiny_model_dir("llama")),
            "--quant",
            "int8",
            "--json",
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return store, json.loads(result.stdout), passages


def test_index_json_shape(cli_store):
    _, data, _ = cli_store
    assert data["indexed"] == 8 and data["skipped"] == 0 and data["passages"] == 8
    assert set(data["kv_bytes_per_token"]) == {"fp16", "stored"}
    # int8 with head_dim 16: 1 byte per value + fp16 scale/min per 16 values (values) or 32 tokens
    # (keys) + blob header, against 2 bytes: between 1.5x and 2x.
    assert 1.5 < data["compression"] < 2.0


def test_index_names_the_titles_and_metadata_it_updated(cli_store, monkeypatch, capfd, tmp_path):
    store, _, passages = cli_store
    shutil.copytree(store, tmp_path / "store")
    records = [json.loads(line) for line in passages.read_text().splitlines()]
    records[1]["title"] = "Another title"
    edited = tmp_path / "edited.jsonl"
    edited.write_text("".join(json.dumps(r) + "\n" for r in records))
    code, out, err = run_cli(["index", "--input", str(edited), "--store", str(tmp_path / "store")], monkeypatch, capfd)
    assert code == 0, err
    assert "skipped 8 already stored (updated 1 titles/metadata)" in out
    records[2]["source"] = "wiki"
    edited.write_text("".join(json.dumps(r) + "\n" for r in records))
    args = ["index", "--input", str(edited), "--store", str(tmp_path / "store"), "--json"]
    code, out, err = run_cli(args, monkeypatch, capfd)
    assert code == 0, err
    assert (json.loads(out)["skipped"], json.loads(out)["updated"]) == (8, 1)


def test_index_warns_of_the_chunks_an_edited_document_no_longer_has(tiny_model_dir, monkeypatch, capfd, tmp_path):
    docs, store = tmp_path / "docs", tmp_path / "store"
    docs.mkdir()
    # one chunk each, of one word piece a word ('old12' is two: the embedder's window warning)
    words = lambda tag: " ".join([tag] * 150)  # noqa: E731
    (docs / "policy.md").write_text(f"{words('old')}\n\n{words('price')}\n")
    build = ["index", "--input", str(docs), "--store", str(store), "--model", str(tiny_model_dir("llama"))]
    code, _, err = run_cli(build, monkeypatch, capfd)
    assert code == 0 and "warning" not in err, err
    (docs / "policy.md").write_text(f"{words('new')}\n")
    code, out, err = run_cli(["index", "--input", str(docs), "--store", str(store), "--replace"], monkeypatch, capfd)
    assert code == 0, err
    assert "stay searchable" in err and f"`ragcompress remove --store {store} 'policy.md#1'`" in err
    code, _, err = run_cli(["remove", "--store", str(store), "policy.md#1"], monkeypatch, capfd)
    assert code == 0, err
    code, out, err = run_cli(["index", "--input", str(docs), "--store", str(store), "--json"], monkeypatch, capfd)
    assert code == 0 and json.loads(out)["stale"] == [] and "warning" not in err, err


def test_index_warns_of_passages_longer_than_the_embedder_reads(tiny_model_dir, monkeypatch, capfd, tmp_path):
    """The embedder reads 256 word pieces of a passage; the rest took no part in retrieval and
    nothing said so (only docs/scaling.md did). A run counts the passages it embedded past the
    window, reports them in --json and warns once, naming the count and the window."""
    passages, store = tmp_path / "passages.jsonl", tmp_path / "store"
    long_text = " ".join(f"word{i}" for i in range(300))
    records = [{"id": "a", "text": "A short passage."}, {"id": "b", "text": long_text}, {"id": "c", "text": "Short."}]
    passages.write_text("".join(json.dumps(r) + "\n" for r in records))
    args = ["index", "--input", str(passages), "--store", str(store), "--model", str(tiny_model_dir("llama"))]
    code, out, err = run_cli([*args, "--json"], monkeypatch, capfd)
    assert code == 0, err
    assert (json.loads(out)["past_embedder_window"], json.loads(out)["embedder_window"]) == (1, 256)
    warnings = [line for line in err.splitlines() if line.startswith("warning: ")]
    assert warnings == [line for line in err.splitlines() if "embedder reads" in line]
    assert len(warnings) == 1 and warnings[0].startswith(
        "warning: 1 passages are longer than the embedder reads (256 word pieces): only their start is embedded"
    )
    code, out, err = run_cli([*args, "--json"], monkeypatch, capfd)  # nothing embedded again: nothing to say
    assert code == 0 and json.loads(out)["past_embedder_window"] == 0 and "warning" not in err, err


def test_overwrite_with_some_settings_names_the_store_settings_it_resets(
    cli_store, tiny_model_dir, monkeypatch, capfd, tmp_path
):
    """``--overwrite`` with some settings given rebuilds with the defaults for the rest, not the
    store's own (as documented); the settings that changes, unasked, are named on stderr: an int8
    store rebuilt with ``--method knorm --ratio 0.5`` became a full-width one without a word."""
    store, _, passages = cli_store
    copy = tmp_path / "store"
    shutil.copytree(store, copy)
    args = ["index", "--input", str(passages), "--store", str(copy), "--model", str(tiny_model_dir("llama"))]
    code, out, err = run_cli([*args, "--overwrite", "--method", "knorm", "--ratio", "0.5"], monkeypatch, capfd)
    assert code == 0, err
    assert "note: --overwrite rebuilds" in err and "quant 'int8' -> 'none'" in err
    assert "method" not in err.split("not the store's own:")[1]  # what was asked for is not a surprise
    code, out, err = run_cli([*args, "--overwrite", "--method", "knorm", "--ratio", "0.5"], monkeypatch, capfd)
    assert code == 0 and "note:" not in err  # the same settings again: nothing reset


def test_ask_json_shape(cli_store, monkeypatch, capfd):
    store, _, _ = cli_store
    code, out, err = run_cli(
        ["ask", "--store", str(store), "--question", "Who won?", "--top-k", "2", "--max-new-tokens", "4", "--json"],
        monkeypatch,
        capfd,
    )
    assert code == 0, err
    data = json.loads(out)
    assert set(data) == {"answer", "passage_ids", "ttft_s", "total_s", "backend"}
    assert data["backend"] == "dense"
    assert len(data["passage_ids"]) == 2 and data["ttft_s"] > 0 and data["total_s"] >= data["ttft_s"]
    assert out.count("\n") == 1


def test_eval_json_shape(cli_store, monkeypatch, capfd):
    from ragcompress.data import SAMPLE_QUESTIONS

    store, _, _ = cli_store
    code, out, err = run_cli(
        [
            "eval",
            "--store",
            str(store),
            "--questions",
            str(SAMPLE_QUESTIONS),
            "--top-k",
            "1",
            "--sample",
            "3",
            "--article",
            "Victoria_(Australia)",
            "--max-new-tokens",
            "4",
            "--json",
        ],
        monkeypatch,
        capfd,
    )
    assert code == 0, err
    data = json.loads(out)
    assert data["n"] == 3
    assert set(data) == {
        "n",
        "recall_at_k",
        "full",
        "compressed",
        "agreement",
        "ttft_speedup",
        "ttft_speedup_mean",
        "fallback_rate",
        "torch_threads",
        "device",
        "kv_bytes_per_token",
        "compression",
        "top_k",
        "preset",
        "preset_matches_store",
        "options",
        "dtype",
    }
    assert data["n"] == 3 and data["device"] == "cpu"
    assert (data["top_k"], data["preset"], data["dtype"]) == (1, None, "float32")
    assert data["options"]["max_new_tokens"] == 4 and data["options"]["recompute"]["ratio"] == 0.0
    for side in ("full", "compressed"):
        assert set(data[side]) == {"sub_em", "f1", "ttft_s_median", "ttft_s_mean"}
    assert 0.0 <= data["agreement"] <= 1.0 and data["fallback_rate"] == 0.0


def test_eval_and_bench_json_record_the_top_k_preset_and_answer_options_they_measured(cli_store, monkeypatch, capfd):
    """``eval`` printed ``recall@5`` while its JSON said only ``recall_at_k``, and neither JSON said
    which preset or answer options (recompute, selection, fallback margin, backend) it measured:
    a results file could not say what it was a result of."""
    from ragcompress.data import SAMPLE_QUESTIONS

    store, _, _ = cli_store
    evaluate = ["eval", "--store", str(store), "--questions", str(SAMPLE_QUESTIONS), "--limit", "1", "--json"]
    code, out, err = run_cli(
        [*evaluate, "--top-k", "2", "--preset", "faithful", "--recompute", "0.5", "--max-new-tokens", "2"],
        monkeypatch,
        capfd,
    )
    assert code == 0, err
    data = json.loads(out)
    assert (data["top_k"], data["preset"], data["dtype"]) == (2, "faithful", "float32")
    # faithful on a model with no packaged adaptor builds a plain int8 store: this one
    assert data["preset_matches_store"] is True and "not built with" not in err
    options = data["options"]
    assert options["max_new_tokens"] == 2 and options["backend"] == "auto"
    recompute = options["recompute"]
    assert recompute["ratio"] == 0.5 and recompute["ratio_by_passages"] == []  # --recompute over the preset's schedule
    assert recompute["selection"] == "mixed"  # the preset's, kept

    code, out, err = run_cli(
        [*evaluate, "--fallback-margin", "0.2", "--recompute", "0.1", "--selection", "question", "--backend", "dense"],
        monkeypatch,
        capfd,
    )
    assert code == 0, err
    data = json.loads(out)
    assert (data["top_k"], data["preset"], data["preset_matches_store"]) == (3, None, None)
    assert data["options"]["fallback_margin"] == 0.2 and data["options"]["backend"] == "dense"
    assert data["options"]["recompute"]["selection"] == "question"

    bench = ["bench", "--store", str(store), "--top-k", "2,1", "--limit", "1", "--repeats", "1", "--no-packed"]
    code, out, err = run_cli([*bench, "--indexing-passages", "0", "--preset", "faithful", "--json"], monkeypatch, capfd)
    assert code == 0, err
    data = json.loads(out)
    assert (data["top_k"], data["preset"], data["dtype"]) == ([2, 1], "faithful", "float32")
    assert [row["top_k"] for row in data["rows"]] == [2, 1]
    assert data["options"]["max_new_tokens"] == 1  # bench times the first token
    assert data["options"]["recompute"]["ratio_by_passages"] == [[3, 0.05], [5, 0.1]]  # faithful's schedule
    assert data["preset_matches_store"] is True
    code, out, err = run_cli([*evaluate, "--preset", "small"], monkeypatch, capfd)  # small: global:kvzip, int4
    assert code == 0, err
    assert json.loads(out)["preset_matches_store"] is False
    assert "not built with --preset small (method 'none' (preset: 'global:kvzip'), ratio None (preset: 0.25)" in err
    assert {"model", "store", "device", "rows", "meta"} <= set(data)  # the keys report.py reads are kept


def test_a_store_built_with_a_preset_matches_it_where_its_adaptor_is_not_packaged(
    tmp_path, tiny_model_dir, monkeypatch, capfd
):
    """``--preset small`` on a model with no packaged adaptor encodes with the base model (a
    warning says so): that store is the preset's store, not one built otherwise."""
    from ragcompress.data import SAMPLE_PASSAGES, SAMPLE_QUESTIONS

    passages = tmp_path / "passages.jsonl"
    passages.write_text("\n".join(SAMPLE_PASSAGES.read_text().splitlines()[:3]) + "\n")
    store = tmp_path / "store"
    model = str(tiny_model_dir("llama"))
    code, _, err = run_cli(
        ["index", "--input", str(passages), "--store", str(store), "--model", model, "--preset", "small"],
        monkeypatch,
        capfd,
    )
    assert code == 0, err
    evaluate = [
        "eval",
        "--store",
        str(store),
        "--questions",
        str(SAMPLE_QUESTIONS),
        "--limit",
        "1",
        "--max-new-tokens",
        "1",
        "--json",
    ]
    code, out, err = run_cli([*evaluate, "--preset", "small"], monkeypatch, capfd)
    assert code == 0, err
    assert json.loads(out)["preset_matches_store"] is True and "not built with" not in err
    code, out, err = run_cli([*evaluate, "--preset", "fast"], monkeypatch, capfd)
    assert json.loads(out)["preset_matches_store"] is False
    assert "not built with --preset fast (method 'global:kvzip' (preset: 'none'), ratio 0.25 (preset: None)" in err


def test_eval_notes_a_top_k_above_the_store_and_a_sample_above_the_questions(cli_store, monkeypatch, capfd):
    """``recall@20`` over a store of 8 passages, or ``--sample 100`` of 15 questions, read as what
    they are not: both are said, as ``ask`` says the first (both were silent)."""
    from ragcompress.data import SAMPLE_QUESTIONS

    store, _, _ = cli_store
    args = ["eval", "--store", str(store), "--questions", str(SAMPLE_QUESTIONS), "--max-new-tokens", "1"]
    code, out, err = run_cli(
        [*args, "--top-k", "20", "--sample", "100", "--article", "Victoria_(Australia)"], monkeypatch, capfd
    )
    assert code == 0, err
    assert "note: --top-k 20, but the store holds 8 passages" in out
    assert "note: --sample 100, but the questions (after --article/--outside) are 15: all were asked" in out


def test_eval_refuses_unscorable_questions_in_one_line_before_loading_anything(tmp_path, monkeypatch, capfd):
    """SQuAD-style answer objects once crashed with a traceback after every question was
    answered; an empty answer list scored 0 without a word."""
    questions = tmp_path / "questions.jsonl"
    for answers, message in (
        ([{"text": "Melbourne", "answer_start": 3}], '"answers" must be a list of strings'),
        ([], "has no answer to score against"),
    ):
        questions.write_text(json.dumps({"id": "q1", "question": "Who?", "answers": answers}) + "\n")
        (tmp_path / "not-opened").mkdir(exist_ok=True)  # exists (the CLI checks that first), never opened
        code, out, err = run_cli(
            ["eval", "--store", str(tmp_path / "not-opened"), "--questions", str(questions)], monkeypatch, capfd
        )
        assert code == 1 and out == "" and err.count("\n") == 1, err
        assert err.startswith(f"error: {questions}:1: ") and message in err, err


def test_ask_and_eval_name_what_is_wrong_before_loading_the_model(tmp_path, monkeypatch, capfd):
    """An empty question and a folder given as the questions file are one line each, before any
    model loads (the store here is an empty folder that is never opened)."""
    (tmp_path / "not-opened").mkdir()
    store = str(tmp_path / "not-opened")
    code, out, err = run_cli(["ask", "--store", store, "--question", "   "], monkeypatch, capfd)
    assert code == 1 and not out and err == "error: --question is empty; ask a question with some text in it\n"
    code, out, err = run_cli(["eval", "--store", store, "--questions", str(tmp_path)], monkeypatch, capfd)
    assert code == 1 and not out and err.count("\n") == 1
    assert err.startswith(f"error: questions file {tmp_path} is a folder; give the JSONL file")


def test_ask_says_when_the_store_holds_fewer_passages_than_top_k(cli_store, monkeypatch, capfd):
    store, _, _ = cli_store
    code, out, err = run_cli(
        ["ask", "--store", str(store), "--question", "Who won?", "--top-k", "50", "--max-new-tokens", "2"],
        monkeypatch,
        capfd,
    )
    assert code == 0, err
    assert "note: --top-k 50, but the store holds 8 passages: all of them were read" in out


def bad_inputs(tmp_path):
    ok = json.dumps({"id": "a", "text": "Some text."})
    return {
        "missing": (tmp_path / "missing.jsonl", "does not exist"),
        "empty": (tmp_path / "empty.jsonl", "holds no passages"),
        "malformed": (tmp_path / "malformed.jsonl", ":2: malformed JSON"),
        "empty_text": (tmp_path / "empty_text.jsonl", "'b' has empty text"),
        "duplicate": (tmp_path / "duplicate.jsonl", "duplicate passage id 'a'"),
    }, {
        "empty": "",
        "malformed": ok + "\n{not json\n",
        "empty_text": ok + "\n" + json.dumps({"id": "b", "text": "   "}) + "\n",
        "duplicate": ok + "\n" + ok + "\n",
    }


@pytest.mark.parametrize("case", ["missing", "empty", "malformed", "empty_text", "duplicate"])
def test_bad_input_is_one_line_error_and_store_untouched(case, cli_store, tmp_path, tiny_model_dir, monkeypatch, capfd):
    store, _, _ = cli_store
    before = sorted((p.name, p.stat().st_size) for p in (store / "shards").iterdir())
    cases, contents = bad_inputs(tmp_path)
    path, message = cases[case]
    if case in contents:
        path.write_text(contents[case])
    code, out, err = run_cli(
        [
            "index",
            "--input",
            str(path),
            "--store",
            str(store),
            "--model",
            str(tiny_model_dir("llama")),
            "--quant",
            "int8",
        ],
        monkeypatch,
        capfd,
    )
    assert code == 1
    assert out == ""
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err, err
    assert sorted((p.name, p.stat().st_size) for p in (store / "shards").iterdir()) == before


def test_a_passage_whose_cache_overflowed_is_one_line_naming_it_and_the_store_resumes(
    overflowing_model_dir, tmp_path, monkeypatch, capfd
):
    """A model that overflows in float16 on one passage's word: its int8 cache failed in the
    quantizer with a 22-frame ValueError advising ``--quant none`` (which stored the NaN). Now one
    line names the passage and a wider dtype; the batches before it stay committed, the run is
    unfinished (``verify`` exits 2, its note naming the refusal: it said to re-run with the same
    input, which stops at the same passage) and a re-run without the passage finishes the store."""
    from conftest import write_jsonl

    records = [
        {"id": "a", "text": "A plain passage about horses and their riders."},
        {"id": "b", "text": "A zebra is striped, black and white."},
        {"id": "c", "text": "Another plain passage, about ships."},
    ]
    passages = write_jsonl(tmp_path / "passages.jsonl", records)
    store = tmp_path / "store"
    model = str(overflowing_model_dir(" zebra"))
    capfd.readouterr()  # what building the model printed
    args = ["index", "--store", str(store), "--model", model, "--quant", "int8", "--dtype", "float16"]
    code, out, err = run_cli([*args, "--input", str(passages), "--batch-size", "1"], monkeypatch, capfd)
    assert code == 1 and out == ""
    assert err == (
        "error: passage 'b': the cache holds inf or NaN (keys of layer 0): the model overflowed computing it in "
        "float16; encode with the model in bfloat16 or float32 (--dtype, --overwrite for an existing store), or "
        "leave the passage out of the input\n"
    )
    code, out, err = run_cli(["verify", "--store", str(store)], monkeypatch, capfd)
    assert code == 2 and out.startswith(f"UNFINISHED: {store}: 1 passages in 1 shards, 0 problems"), out
    # what stopped the run, and that the same input stops there again ("re-run with the same input" did)
    refused = "passage 'b': the cache holds inf or NaN (keys of layer 0)"
    assert "with the same input and --store" not in out + err, out
    assert re.search(
        rf"note: the indexing run started on .* stopped before its end: the store holds only part of an input of 3 "
        rf"passages\. It refused {re.escape(refused)}: .*, or leave the passage out of the input; the same input and "
        r"settings stop there again: make that change, then index into this store again \(answering refuses it until "
        r"then\)\n",
        out,
    ), out
    assert (
        err.startswith(f"error: store {store} is intact but not answerable: the indexing run started on ")
        and refused in err
    )
    without = write_jsonl(tmp_path / "without.jsonl", [records[0], records[2]])
    code, out, err = run_cli([*args, "--input", str(without)], monkeypatch, capfd)
    assert code == 0, err
    code, out, err = run_cli(["verify", "--store", str(store)], monkeypatch, capfd)
    assert code == 0 and out.startswith(f"OK: {store}: 2 passages"), out


def test_unknown_store_and_long_question(cli_store, tmp_path, monkeypatch, capfd):
    code, _, err = run_cli(["ask", "--store", str(tmp_path / "nope"), "--question", "x"], monkeypatch, capfd)
    assert code == 1 and "does not exist" in err and err.count("\n") == 1
    store, _, _ = cli_store
    code, _, err = run_cli(["ask", "--store", str(store), "--question", "word " * 5000], monkeypatch, capfd)
    assert code == 1 and "positions" in err and "handles 4096" in err, err


def test_bad_option_values_list_allowed_values(cli_store, monkeypatch, capfd):
    store, _, passages = cli_store
    code, _, err = run_cli(
        ["index", "--input", str(passages), "--store", str(store), "--quant", "int3"], monkeypatch, capfd
    )
    assert code == 1 and "none, fp16, int8, int4, int2" in err
    code, _, err = run_cli(
        ["index", "--input", str(passages), "--store", str(store), "--method", "magic"], monkeypatch, capfd
    )
    assert code == 1 and "unknown method 'magic'" in err and "none" in err


def test_recompute_schedule_answers_and_a_malformed_one_is_one_line(cli_store, monkeypatch, capfd):
    """``--recompute 1:0.5,3:1`` is a schedule by passages retrieved (100 % at top-3 here, so the
    answer is full prefill's); a malformed value fails before the model loads, naming both forms."""
    store, _, _ = cli_store
    ask = ["ask", "--store", str(store), "--question", "Who won?", "--top-k", "3", "--max-new-tokens", "3"]
    code, out, err = run_cli([*ask, "--recompute", "1:0.5,3:1", "--compare-full", "--json"], monkeypatch, capfd)
    assert code == 0, err
    data = json.loads(out)
    assert data["answer"] == data["full"]["answer"]
    code, out, err = run_cli([*ask, "--recompute", "3:half"], monkeypatch, capfd)
    assert (code, out) == (1, "") and err.count("\n") == 1
    assert "--recompute '3:half'" in err and "3:0.05,5:0.1" in err


def test_compare_full_says_faster_or_slower_as_measured(cli_store, monkeypatch, capfd):
    """``ask --compare-full`` printed "(0.6x slower)" when full prefill was the faster: the
    larger TTFT over the smaller, and which way."""
    from ragcompress.cli.answer import than_the_cache
    from ragcompress.runtime.engine import Engine

    assert than_the_cache(1.7) == "1.7x slower than from cache"
    assert than_the_cache(0.6) == "1.7x faster than from cache"
    assert than_the_cache(0.25) == "4.0x faster than from cache"
    assert than_the_cache(1.02) == than_the_cache(0.98) == "as fast as from cache"

    store, _, _ = cli_store
    answer_cached, answer_full = Engine.answer_cached, Engine.answer_full

    def timed(method, ttft_s):
        return lambda self, *a, **k: dataclasses.replace(method(self, *a, **k), ttft_s=ttft_s)

    monkeypatch.setattr(Engine, "answer_cached", timed(answer_cached, 0.020))
    monkeypatch.setattr(Engine, "answer_full", timed(answer_full, 0.012))
    ask = ["ask", "--store", str(store), "--question", "Who won?", "--top-k", "1", "--max-new-tokens", "1"]
    code, out, err = run_cli([*ask, "--compare-full"], monkeypatch, capfd)
    assert code == 0, err
    assert "TTFT of full prefill: 12 ms (1.7x faster than from cache)" in out
    monkeypatch.setattr(Engine, "answer_full", timed(answer_full, 0.034))
    code, out, err = run_cli([*ask, "--compare-full"], monkeypatch, capfd)
    assert code == 0 and "TTFT of full prefill: 34 ms (1.7x slower than from cache)" in out, err


def test_fallback_margin_answers_near_ties_by_full_prefill(cli_store, monkeypatch, capfd):
    """``--fallback-margin 0.999``: every first token of a tiny random model is a near tie, so the
    answer is full prefill's and says so; a margin outside [0, 1) is a usage error."""
    store, _, _ = cli_store
    ask = ["ask", "--store", str(store), "--question", "Who won?", "--top-k", "3", "--max-new-tokens", "3"]
    code, out, err = run_cli([*ask, "--fallback-margin", "0.999", "--compare-full", "--json"], monkeypatch, capfd)
    assert code == 0, err
    data = json.loads(out)
    assert data["backend"] == "fallback" and data["answer"] == data["full"]["answer"]
    code, out, err = run_cli([*ask, "--fallback-margin", "0.999"], monkeypatch, capfd)
    assert code == 0 and "answered by full prefill" in out
    code, out, err = run_cli([*ask, "--fallback-margin", "1.5"], monkeypatch, capfd)
    assert code == 2 and "--fallback-margin" in err


def test_serve_takes_the_answering_defaults_ask_takes(cli_store, monkeypatch, capfd):
    """``serve --recompute 1:0.5,3:1 --selection mixed --fallback-margin 0.1`` are the service's
    defaults (a request may still override them), and so is ``--backend``; a malformed schedule or
    an unknown backend fails as it does for ask."""
    pytest.importorskip("starlette")
    import ragcompress.serve
    from ragcompress.runtime.recompute import RecomputeConfig

    store, _, _ = cli_store
    seen: list = []
    monkeypatch.setattr(ragcompress.serve, "run", lambda app, *a, **k: seen.append(app.state.service.engine.options))
    serve = ["serve", "--store", str(store), "--port", "0"]
    flags = ["--recompute", "1:0.5,3:1", "--selection", "mixed", "--fallback-margin", "0.1"]
    code, _, err = run_cli([*serve, *flags], monkeypatch, capfd)
    assert code == 0, err
    (options,) = seen
    assert options.recompute == RecomputeConfig(0.5, selection="mixed", ratio_by_passages=((1, 0.5), (3, 1.0)))
    assert options.fallback_margin == 0.1
    code, out, err = run_cli([*serve, "--recompute", "3:half"], monkeypatch, capfd)
    assert (code, out) == (1, "") and "--recompute '3:half'" in err
    code, _, err = run_cli([*serve, "--backend", "packed-torch"], monkeypatch, capfd)
    assert code == 0, err
    assert seen[-1].backend == "packed-torch"
    code, out, err = run_cli([*serve, "--backend", "fast"], monkeypatch, capfd)
    assert (code, out) == (1, "") and "backend" in err
    # as ask says: a default top-k above the store's passages, and a preset the store was not built with
    code, _, err = run_cli([*serve, "--top-k", "20", "--preset", "small"], monkeypatch, capfd)
    assert code == 0, err
    assert "--top-k 20, but the store holds 8 passages" in err and "not built with --preset small" in err


def test_serve_refuses_at_start_what_it_could_not_answer_any_request_with(cli_store, monkeypatch, capfd):
    """A recompute default on the packed backend started, said "listening", and answered every
    request 400 (which no client could fix); a port in use was found after the model loaded and
    ended in uvicorn's log with status 3. Both are one error line and status 1, the second before
    the model loads."""
    pytest.importorskip("starlette")
    import socket

    import ragcompress.serve
    from ragcompress.runtime.engine import Engine

    store, _, _ = cli_store
    served: list = []
    monkeypatch.setattr(ragcompress.serve, "run", lambda app, *a, **k: served.append(app))
    serve = ["serve", "--store", str(store)]
    code, out, err = run_cli(
        [*serve, "--port", "0", "--backend", "packed-torch", "--recompute", "0.1"], monkeypatch, capfd
    )
    assert (code, out, served) == (1, "", []) and err.count("\n") == 1
    assert "selective recompute edits an assembled cache; use backend dense" in err
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    opened: list = []
    monkeypatch.setattr(Engine, "open", classmethod(lambda cls, *a, **k: opened.append(1)))
    try:
        code, out, err = run_cli([*serve, "--port", str(holder.getsockname()[1])], monkeypatch, capfd)
    finally:
        holder.close()
    assert (code, out, opened) == (1, "", []) and err.startswith("error: cannot listen on 127.0.0.1:")
    assert "choose another --port" in err and err.count("\n") == 1


def test_workers_without_ray_is_refused_not_ignored(tmp_path, monkeypatch, capfd):
    """``--workers`` sizes the Ray actor pool; without ``--ray`` it would change nothing, so it is
    an error before anything is read or written, not a one-process run the user did not ask for."""
    passages = tmp_path / "passages.jsonl"
    passages.write_text('{"id": "a", "text": "one passage"}\n')
    store = tmp_path / "store"
    code, out, err = run_cli(
        ["index", "--input", str(passages), "--store", str(store), "--workers", "4"], monkeypatch, capfd
    )
    assert (code, out) == (1, "") and err.count("\n") == 1
    assert err.startswith("error: --workers") and "--ray" in err
    assert not store.exists()


def test_verify_of_a_path_that_is_no_store_says_so(tmp_path, monkeypatch, capfd):
    """A mistyped --store is not a damaged store: no repair hint (remove, --overwrite) for it."""
    (tmp_path / "empty").mkdir()
    for path, said in (
        (tmp_path / "missing", "does not exist; build it"),
        (tmp_path / "empty", "is not a ragcompress store"),
    ):
        code, out, err = run_cli(["verify", "--store", str(path)], monkeypatch, capfd)
        assert (code, out) == (1, "") and err.count("\n") == 1
        assert said in err and "--overwrite" not in err


@contextlib.contextmanager
def _catalogue_held(store):
    """The store's catalogue held locked exclusively by another connection, as a writer can hold
    it (a WAL reader is not blocked by a writer's ordinary transaction)."""
    holder = sqlite3.connect(store / "catalogue.sqlite", isolation_level=None, timeout=0)
    holder.execute("PRAGMA locking_mode=EXCLUSIVE")
    holder.execute("BEGIN EXCLUSIVE")
    try:
        yield
    finally:
        holder.execute("ROLLBACK")
        holder.close()


BUSY_COMMANDS = {  # every command that opens a store (train opens none), less --store
    "index": ["index", "--input", "PASSAGES"],
    "ask": ["ask", "--question", "Who won?", "--top-k", "2", "--max-new-tokens", "4"],
    "eval": ["eval", "--questions", "QUESTIONS", "--sample", "2", "--max-new-tokens", "4"],
    "bench": ["bench", "--repeats", "1"],
    "calibrate": ["calibrate"],
    "remove": ["remove", "doc-x", "--missing-ok"],
    "compact": ["compact"],
    "serve": ["serve", "--port", "0"],
}


def _busy_command(command, cli_store, tmp_path):
    """A copy of the test store (to hold busy) and ``command``'s arguments from
    :data:`BUSY_COMMANDS` with their input files filled in, less ``--store``."""
    from ragcompress.data import SAMPLE_QUESTIONS

    store, _, passages = cli_store
    copy = tmp_path / "store"
    shutil.copytree(store, copy)
    named = {"PASSAGES": str(passages), "QUESTIONS": str(SAMPLE_QUESTIONS)}
    return copy, [named.get(arg, arg) for arg in BUSY_COMMANDS[command]]


@pytest.mark.parametrize("command", list(BUSY_COMMANDS))
def test_a_store_another_process_holds_locked_is_busy_for_every_command(
    command, cli_store, tmp_path, monkeypatch, capfd
):
    """Only ``verify`` exited 3 (busy: retry when the writer finishes) on a store whose catalogue
    another process holds locked; every other command said the same words and exited 1, as for a
    damaged store or a bad input. Every command exits 3 on it, with its one line."""
    import ragcompress.serve

    monkeypatch.setattr(ragcompress.serve, "run", lambda app, *a, **k: None)  # serve would start listening
    copy, args = _busy_command(command, cli_store, tmp_path)
    with _catalogue_held(copy):
        code, out, err = run_cli([*args, "--store", str(copy)], monkeypatch, capfd)
    assert (code, out) == (3, ""), err
    assert err == (
        f"error: catalogue {copy / 'catalogue.sqlite'} is locked by another process writing it (database is "
        "locked); retry when the writer finishes\n"
    )


@pytest.mark.parametrize("command", ["index", "remove", "compact"])
def test_a_store_another_writer_holds_is_busy_for_every_writer(command, cli_store, tmp_path, monkeypatch, capfd):
    """A second writer refused by the store's writer lock (the commonest busy store) exited 1, as
    for damage, where a locked catalogue exits 3: both are busy (``StoreBusyError``), retry when
    the writer finishes."""
    from ragcompress.store.writer import StoreLock

    copy, args = _busy_command(command, cli_store, tmp_path)
    with StoreLock(copy):  # another writer (flock excludes another open file of this process too)
        code, out, err = run_cli([*args, "--store", str(copy)], monkeypatch, capfd)
    assert (code, out) == (3, ""), err
    assert err.startswith(f"error: store {copy} is being written by ") and err.endswith(
        "; wait for it to finish (one writer at a time)\n"
    ), err


def test_verify_json_of_a_busy_store_is_one_object_saying_so(cli_store, tmp_path, monkeypatch, capfd):
    """``verify --json`` on a store another process holds locked printed nothing on stdout, so a
    script parsing it got no object. It prints a report's keys, ``ok`` and ``answerable`` null
    (not checked: neither intact nor damaged), ``busy`` true and the error; exit 3 and the
    stderr line are as without ``--json``."""
    store, _, _ = cli_store
    copy = tmp_path / "store"
    shutil.copytree(store, copy)
    with _catalogue_held(copy):
        plain = run_cli(["verify", "--store", str(copy)], monkeypatch, capfd)
        code, out, err = run_cli(["verify", "--store", str(copy), "--json"], monkeypatch, capfd)
    line = (
        f"store {copy} is busy, not checked: catalogue {copy / 'catalogue.sqlite'} is locked by another process "
        "writing it (database is locked); retry when the writer finishes"
    )
    assert plain == (3, "", f"error: {line}\n")
    assert (code, err) == (3, f"error: {line}\n")
    assert out.count("\n") == 1 and json.loads(out) == {
        "ok": None,
        "answerable": None,
        "store": str(copy),
        "passages": None,
        "shards": None,
        "problems": [],
        "notes": [],
        "busy": True,
        "error": line,
    }
    code, out, _ = run_cli(["verify", "--store", str(copy), "--json"], monkeypatch, capfd)
    assert code == 0 and "busy" not in json.loads(out)  # released: the report as ever


# the options typed str that name a file or folder (--model is expanded where it is resolved, models.py)
FILE_TEXT_OPTIONS = {"adaptor", "calibration", "extra_passages", "init_adaptor"}


def test_every_path_option_expands_a_leading_tilde(cli_store, tmp_path, monkeypatch, capfd):
    """A shell expands ``~`` only at the start of a word, so ``--store=~/s`` arrived as typed:
    ``index`` made a folder named ``~`` in the current one, and ``verify`` found no store. Every
    option naming a file or folder expands it, as ``--model`` did."""
    import typing
    from pathlib import Path

    monkeypatch.setenv("HOME", str(cli_store[0].parent))
    monkeypatch.chdir(tmp_path)
    code, out, err = run_cli(["verify", f"--store=~/{cli_store[0].name}", "--json"], monkeypatch, capfd)
    assert code == 0 and json.loads(out)["ok"], err
    code, _, err = run_cli(["index", "--input=~/absent.jsonl", "--store=~/new"], monkeypatch, capfd)
    assert code == 1 and str(cli_store[0].parent / "absent.jsonl") in err, err
    assert not (tmp_path / "~").exists()

    from ragcompress.cli import app
    from ragcompress.cli.options import home_path

    unexpanded = []
    for command in app.registered_commands:
        hints = typing.get_type_hints(command.callback)
        for name, parameter in inspect.signature(command.callback).parameters.items():
            parser = getattr(parameter.default, "parser", None)
            if Path in (hints[name], *typing.get_args(hints[name])):
                unexpanded += [] if parser is home_path else [f"{command.callback.__name__} {name}"]
            elif name in FILE_TEXT_OPTIONS:
                unexpanded += [] if parser is os.path.expanduser else [f"{command.callback.__name__} {name}"]
    assert unexpanded == []
    assert home_path("~/s") == Path.home() / "s"


def test_ask_backend_option_chooses_and_names_the_attention_path(cli_store, monkeypatch, capfd):
    from ragcompress.cli import BACKEND_OPTION
    from ragcompress.runtime.options import BACKENDS

    assert all(name in BACKEND_OPTION.help for name in BACKENDS)
    store, _, _ = cli_store
    ask = ["ask", "--store", str(store), "--question", "Who won?", "--top-k", "2", "--max-new-tokens", "2"]
    code, out, err = run_cli([*ask, "--backend", "packed-torch"], monkeypatch, capfd)
    assert code == 0, err
    assert "(packed-torch attention)" in out
    code, out, err = run_cli([*ask, "--backend", "dense"], monkeypatch, capfd)
    assert code == 0 and "(dense attention)" in out, err
    code, _, err = run_cli([*ask, "--backend", "magic"], monkeypatch, capfd)
    assert code == 1 and "backend 'magic' is not one of: auto, dense, packed-torch, packed-triton" in err


def test_bench_measures_each_context_size_once_and_refuses_none(cli_store, monkeypatch, capfd):
    """``--top-k 2,1,2`` timed the 2 twice (two rows, and the plot's line turned back on
    itself); ``--top-k 0`` is no context size."""
    store, _, _ = cli_store
    sizes: list[list[int]] = []
    monkeypatch.setattr("ragcompress.bench.bench", lambda engine, items, top_ks, *a: sizes.append(top_ks) or [])
    args = ["bench", "--store", str(store), "--limit", "1", "--repeats", "1", "--no-packed", "--indexing-passages", "0"]
    code, _, err = run_cli([*args, "--top-k", "2,1,2", "--json"], monkeypatch, capfd)
    assert code == 0, err
    assert sizes == [[2, 1]]
    code, out, err = run_cli([*args, "--top-k", "1,0"], monkeypatch, capfd)
    assert code == 1 and not out and "passage counts of 1 or more" in err


def test_eval_prints_what_it_measured_before_a_damaged_passage_stopped_it(cli_store, monkeypatch, capfd):
    """A damaged passage met by the 3rd question stopped ``eval`` with the error alone: the two
    questions answered before it (minutes each on a real model) were lost. Their figures go to
    stderr before the error; the exit is still a failure."""
    from ragcompress import evaluation
    from ragcompress.data import SAMPLE_QUESTIONS
    from ragcompress.errors import CorruptSegmentError

    store, _, _ = cli_store
    real = evaluation.iter_eval

    def failing_third(engine, items, top_k):
        for number, result in enumerate(real(engine, items, top_k)):
            if number == 2:
                raise CorruptSegmentError("passage 'x': checksum mismatch")
            yield result

    monkeypatch.setattr(evaluation, "iter_eval", failing_third)
    args = ["eval", "--store", str(store), "--questions", str(SAMPLE_QUESTIONS), "--top-k", "1", "--limit", "4"]
    code, out, err = run_cli([*args, "--max-new-tokens", "2", "--json"], monkeypatch, capfd)
    assert code == 1 and out == ""
    assert "stopped after 2 of 4 questions; those gave:\nquestions: 2" in err
    assert err.rstrip().splitlines()[-1].startswith("error: passage 'x': checksum mismatch")


def test_bench_refuses_an_even_repeat_count(cli_store, monkeypatch, capfd):
    """Every bench figure is a median of ``--repeats`` runs; an even count would make it the mean
    of the middle two, so it is refused before the engine opens."""
    store, _, _ = cli_store
    code, out, err = run_cli(["bench", "--store", str(store), "--repeats", "2"], monkeypatch, capfd)
    assert code == 1 and not out
    assert "--repeats takes an odd count" in err and "use 1 or 3" in err


@pytest.mark.parametrize("where", ["under-a-file", "a-folder", "not-an-image"])
def test_bench_refuses_a_plot_it_cannot_write_before_timing(cli_store, monkeypatch, capfd, tmp_path, where):
    """A ``--plot`` path that cannot be written, or not as an image (``out.txt``), is one error
    line before anything is measured, not a traceback after the whole run (which lost its table)."""
    store, _, _ = cli_store
    (tmp_path / "afile.txt").write_text("x")
    path = {
        "under-a-file": tmp_path / "afile.txt" / "x.png",
        "a-folder": tmp_path,
        "not-an-image": tmp_path / "out.txt",
    }[where]
    timed = []
    monkeypatch.setattr("ragcompress.bench.bench", lambda *a, **k: timed.append(1))
    code, out, err = run_cli(["bench", "--store", str(store), "--plot", str(path)], monkeypatch, capfd)
    assert code == 1 and not out and not timed
    written = f"a plot as {path.name}" if where == "not-an-image" else str(path)
    assert err.startswith(f"error: cannot write {written}") and err.count("\n") == 1


@pytest.mark.parametrize("name", ["ttft.png", "ttft"])
def test_bench_plot_without_matplotlib_refuses_before_the_model_loads(name, tmp_path, monkeypatch, capfd):
    """Without matplotlib (the bench extra) ``bench --plot`` once ended in a ModuleNotFoundError
    traceback (from the --plot check, or after the whole run for a path with no extension): it is
    one error line naming the extra before anything loads."""
    from ragcompress.runtime.engine import Engine

    def opened(*a, **k):
        raise AssertionError("the engine opened")

    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setattr(Engine, "open", classmethod(opened))
    args = ["bench", "--store", str(tmp_path), "--plot", str(tmp_path / name)]
    code, out, err = run_cli(args, monkeypatch, capfd)
    assert code == 1 and not out and err.count("\n") == 1, err
    assert err.startswith("error: --plot draws with matplotlib, which is not installed")
    assert "the bench extra (pip install -e '.[bench]' in a checkout); or leave out --plot" in err


def test_bench_reports_every_path_per_context_size(cli_store, monkeypatch, capfd, tmp_path):
    store, _, _ = cli_store
    plot = tmp_path / "bench.png"
    code, out, err = run_cli(
        [
            "bench",
            "--store",
            str(store),
            "--top-k",
            "1,2",
            "--limit",
            "1",
            "--repeats",
            "1",
            "--indexing-passages",
            "2",
            "--plot",
            str(plot),
            "--json",
        ],
        monkeypatch,
        capfd,
    )
    assert code == 0, err
    data = json.loads(out)
    rows = data["rows"]
    assert [r["top_k"] for r in rows] == [1, 2]
    assert rows[1]["context_tokens"] > rows[0]["context_tokens"]
    for r in rows:
        assert set(r["ttft_s"]) == {"full", "full_prefix_cached", "cached", "floor"}
        assert r["speedup"]["vs_full"] == pytest.approx(r["ttft_s"]["full"] / r["ttft_s"]["cached"])
        assert r["speedup"]["vs_prefix_cached"] == pytest.approx(
            r["ttft_s"]["full_prefix_cached"] / r["ttft_s"]["cached"]
        )
        assert r["cache_work_share"] == pytest.approx(r["cache_work_s"] / r["ttft_s"]["cached"])
        assert r["kv_bytes"]["stored"] < r["kv_bytes"]["fp16"]
    meta = data["meta"]
    assert set(meta) == {"git", "threads", "repeats", "limit", "questions", "model", "load_avg", "keep_freed_memory"}
    assert meta["repeats"] == 1 == meta["questions"] and isinstance(meta["keep_freed_memory"], bool)
    assert data["indexing"]["passages"] == 2 and data["indexing"]["ratio"] > 0
    assert plot.stat().st_size > 0
    packed = json.loads(out)["packed_attention"]  # the store is int8: both attention paths are timed
    assert packed["questions"] == 1 and packed["ratio"] == pytest.approx(
        packed["packed_ttft_s"] / packed["assembled_ttft_s"]
    )
    assert packed["same_first_token"] == 1.0


def test_version_and_usage_errors_are_one_line_without_traceback(monkeypatch, capfd):
    from importlib.metadata import version

    code, out, err = run_cli(["--version"], monkeypatch, capfd)
    assert (code, out, err) == (0, f"ragcompress {version('ragcompress-kv')}\n", "")
    for args, named, help_of in (
        (["ask", "--stor", "x"], "--stor", "ragcompress ask"),
        (["nope"], "nope", "ragcompress"),
        (["ask", "--top-k", "many"], "--top-k", "ragcompress ask"),
    ):
        code, out, err = run_cli(args, monkeypatch, capfd)
        assert code == 2 and out == ""
        assert err.startswith("error: ") and err.count("\n") == 1 and named in err and "Traceback" not in err
        assert err.endswith(f"(see {help_of} --help)\n")  # the help that lists the misused option


def test_version_in_an_environment_without_the_renamed_distribution_says_to_reinstall(monkeypatch, capfd):
    """A checkout pulled past the rename to ragcompress-kv but not reinstalled: --version raised
    PackageNotFoundError as a traceback."""
    import importlib.metadata

    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "version", missing)
    code, out, err = run_cli(["--version"], monkeypatch, capfd)
    assert code == 1 and out == "" and "Traceback" not in err and err.count("\n") == 1
    assert err.startswith("error: ragcompress-kv is not installed") and "pip install -e ." in err


def test_an_interrupted_command_exits_130_saying_so(monkeypatch, capfd, tmp_path):
    """Ctrl-C inside a command: typer hands back 130 instead of raising, which main() used to
    drop, so an interrupted run exited 0 as if it had finished."""
    import ragcompress.store.verify as verify_module

    def interrupted(path):
        raise KeyboardInterrupt

    (tmp_path / "manifest.json").write_text("{}")
    monkeypatch.setattr(verify_module, "verify_store", interrupted)
    code, out, err = run_cli(["verify", "--store", str(tmp_path)], monkeypatch, capfd)
    assert (code, out, err) == (130, "", "error: interrupted\n")  # the resume note is index's and train's

    import ragcompress.indexing as indexing

    monkeypatch.setattr(indexing, "index", lambda *args, **kwargs: interrupted(None))
    code, out, err = run_cli(["index", "--input", str(tmp_path), "--store", str(tmp_path / "s")], monkeypatch, capfd)
    assert (code, err) == (130, "error: interrupted (run it again: it resumes where it stopped)\n")


def test_sigterm_to_index_is_the_interrupted_line(tmp_path, tiny_model_dir):
    """SIGTERM (``kill``, ``timeout``, a scheduler) ended ``index`` at once, silently, with status
    -15 and no cleanup; it now stops the run as Ctrl-C does: the one line, exit status 130, and a
    store that verifies and resumes."""
    from ragcompress.store.verify import verify_store
    from ragcompress.testing import sigterm_once_marked

    corpus = tmp_path / "passages.jsonl"  # long enough to be running when the signal comes
    rows = [{"id": f"d{i}", "text": f"Passage {i} is about rivers and bridges. " * (1 + i % 5)} for i in range(400)]
    corpus.write_text("".join(json.dumps(row) + "\n" for row in rows))
    store = tmp_path / "store"
    command = [sys.executable, "-m", "ragcompress.cli", "index", "--input", str(corpus), "--store", str(store)]
    command += ["--model", str(tiny_model_dir("llama")), "--quant", "int8", "--batch-size", "2"]
    code, err = sigterm_once_marked(command, store, settle_s=1)
    assert code == 130, err[-2000:]
    assert err.rstrip().splitlines()[-1] == "error: interrupted (run it again: it resumes where it stopped)"
    assert "Traceback" not in err
    assert verify_store(store).ok


class _SwallowsSignal:
    """Sends this process ``signum`` from its ``__del__``: the handler's KeyboardInterrupt surfaces
    there, where Python prints "Exception ignored" and drops it (as in a Ray run, in a regex
    object's finalizer)."""

    def __init__(self, signum):
        self.signum = signum

    def __del__(self):
        import os
        import time

        os.kill(os.getpid(), self.signum)
        time.sleep(0.05)  # the handler runs here


@pytest.mark.parametrize("signame", ["SIGTERM", "SIGINT"])
def test_a_stop_signal_a_finalizer_swallowed_still_stops_index(signame, tmp_path, tiny_model_dir, monkeypatch, capfd):
    """The one SIGTERM of a scheduler, or a Ctrl-C, whose KeyboardInterrupt lands in a ``__del__``
    was lost and ``index`` ran to its end, exit 0; the next batch now stops it: Ctrl-C's line, 130,
    a store that verifies with the passages committed before it."""
    import signal

    import ragcompress.indexing.run as run
    from ragcompress import interrupts
    from ragcompress.store.verify import verify_store

    corpus = tmp_path / "passages.jsonl"
    corpus.write_text(
        "".join(json.dumps({"id": f"d{i}", "text": f"Passage {i} is about rivers."}) + "\n" for i in range(6))
    )
    store = tmp_path / "store"
    original = run.past_window

    def past_window_then_sigterm(*args, **kwargs):
        if not swallowed:  # once, after the first batch is committed
            _SwallowsSignal(getattr(signal, signame))  # dropped at once: its finalizer swallows the interrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(run, "past_window", past_window_then_sigterm)
    monkeypatch.setattr(interrupts, "_stop_requested", False)  # restored after the test too
    swallowed: list[type] = []
    monkeypatch.setattr(sys, "unraisablehook", lambda unraisable: swallowed.append(unraisable.exc_type))
    handlers = {signum: signal.getsignal(signum) for signum in (signal.SIGTERM, signal.SIGINT)}
    # Python's own SIGINT handler, as in a CLI process (a pytest-xdist worker ignores SIGINT)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        args = ["index", "--input", str(corpus), "--store", str(store), "--batch-size", "2"]
        code, _, err = run_cli([*args, "--model", str(tiny_model_dir("llama"))], monkeypatch, capfd)
    finally:
        for signum, handler in handlers.items():
            signal.signal(signum, handler)
    assert swallowed == [KeyboardInterrupt]  # the interrupt was dropped where it landed
    assert code == 130, err[-2000:]
    assert err.rstrip().splitlines()[-1] == "error: interrupted (run it again: it resumes where it stopped)"
    report = verify_store(store)
    assert report.ok and report.passages == 2, report


def test_a_resume_with_another_batch_size_is_one_line_naming_both(tmp_path, tiny_model_dir, monkeypatch, capfd):
    """A stopped run's batch size is kept by its resume (docs/guarantees.md): ``--batch-size``
    of another size is one line naming both and what to do, exit 1; none resumes with it."""
    import ragcompress.indexing.run as run
    from ragcompress.store.verify import verify_store

    corpus = tmp_path / "passages.jsonl"
    corpus.write_text(
        "".join(json.dumps({"id": f"d{i}", "text": f"Passage {i} is about rivers."}) + "\n" for i in range(6))
    )
    store = tmp_path / "store"
    original, calls = run.past_window, []

    def past_window_failing_second(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:  # after the second batch is committed
            raise RuntimeError("stopped mid-run")
        return original(*args, **kwargs)

    monkeypatch.setattr(run, "past_window", past_window_failing_second)
    args = ["index", "--input", str(corpus), "--store", str(store)]
    with pytest.raises(RuntimeError, match="mid-run"):
        run_cli([*args, "--batch-size", "2", "--model", str(tiny_model_dir("llama"))], monkeypatch, capfd)
    assert verify_store(store).passages == 4
    monkeypatch.setattr(run, "past_window", original)
    capfd.readouterr()
    code, _, err = run_cli([*args, "--batch-size", "3"], monkeypatch, capfd)
    assert (code, err) == (
        1,
        f"error: store {store}: the indexing run that stopped in it encoded batches of 2 passages, this "
        "run asks for --batch-size 3 (batch_size= in Python), and a cache's bytes depend on its batch; resume with "
        "--batch-size 2 (or none), or rebuild the store with --overwrite\n",
    )
    code, out, err = run_cli([*args, "--json"], monkeypatch, capfd)
    assert code == 0, err[-2000:]
    assert (json.loads(out)["indexed"], json.loads(out)["skipped"]) == (2, 4)


def test_an_interrupt_inside_exec_still_exits_130_under_python_m(tmp_path):
    """CPython marks a KeyboardInterrupt "unhandled" when it leaves a string run by ``exec`` (a
    dataclass being defined as a module imports), even if the run catches it, and ``python -m``
    then ended the process by SIGINT: CI saw ``index`` print its interrupted line and exit -2.
    Here the interrupt is raised inside ``exec`` where typer's would be caught, deterministically."""
    (tmp_path / "sitecustomize.py").write_text(
        "import ragcompress.cli.root as root\n"
        "def interrupted_app(**kwargs):\n"
        "    try:\n"
        "        exec('raise KeyboardInterrupt')\n"
        "    except KeyboardInterrupt:\n"
        "        return 130  # what typer returns for Ctrl-C under standalone_mode=False\n"
        "root.app = interrupted_app\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), *sys.path])}
    done = subprocess.run(
        [sys.executable, "-m", "ragcompress.cli", "verify", "--store", str(tmp_path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 130, done.stderr[-2000:]
    assert done.stderr.rstrip().splitlines()[-1] == "error: interrupted"


def test_an_output_encoding_without_the_characters_escapes_them(tmp_path):
    """A Latin-1 terminal (``PYTHONIOENCODING=latin-1``, a Latin-1 or cp1252 locale) turned a
    finished command into a UnicodeEncodeError traceback, exit 1, at its first non-Latin-1
    character: here ``verify``'s verdict line, which names a store called in Chinese."""
    store = tmp_path / "数据"
    store.mkdir()
    (store / "manifest.json").write_text("{}")  # damaged: verify prints its verdict and exits 1
    done = subprocess.run(
        [sys.executable, "-m", "ragcompress.cli", "verify", "--store", str(store)],
        env={**os.environ, "PYTHONIOENCODING": "latin-1"},
        capture_output=True,
        timeout=120,
    )
    assert done.returncode == 1 and b"Traceback" not in done.stderr, done.stderr.decode()[-2000:]
    assert done.stdout.startswith(f"FAILED: {tmp_path}/\\u6570\\u636e: ".encode()), done.stdout


@pytest.mark.parametrize("as_json", [[], ["--json"]])
def test_output_to_a_reader_that_has_gone_exits_141_silently(cli_store, as_json):
    """``ragcompress verify --store S | true``: click's broken-pipe handling exited 1 silently,
    which reads as verify's "damaged"; a shell reports 141 (128 + SIGPIPE) for such a writer."""
    command = [sys.executable, "-m", "ragcompress.cli", "verify", "--store", str(cli_store[0]), *as_json]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    process.stdout.close()  # the reader is gone before the command writes
    err = process.stderr.read()
    assert process.wait(timeout=120) == 141, err.decode()[-2000:]
    assert err == b""


@pytest.mark.parametrize("as_json", [[], ["--json"]])
def test_a_closed_stdout_drops_the_output_without_a_traceback(cli_store, as_json):
    """``ragcompress verify --json >&-``: Python's sys.stdout is None, and writing the JSON
    object ended a passing verify in an AttributeError traceback, exit 1."""
    command = [sys.executable, "-m", "ragcompress.cli", "verify", "--store", str(cli_store[0]), *as_json]
    done = subprocess.run(["sh", "-c", '"$@" >&-', "sh", *command], capture_output=True, timeout=120)
    assert (done.returncode, done.stderr) == (0, b"")


@pytest.mark.parametrize(
    "options, named",
    [
        (["--ratio", "0.3"], "needs an eviction --method"),
        (["--quant", "int3"], "int3"),
        (["--method", "bogus"], "bogus"),
        (["--lr", "-1e-3"], "lr (--lr) must be a positive number, not -0.001"),  # torch's traceback, after hours
        (["--lr", "0"], "lr (--lr) must be a positive number, not 0.0"),  # an untrained adaptor
    ],
)
def test_train_refuses_a_bad_compression_before_any_work(options, named, tmp_path, monkeypatch, capfd):
    from ragcompress.data import SAMPLE_PASSAGES

    questions = tmp_path / "q.jsonl"
    questions.write_text('{"id": "q", "question": "?", "answers": ["a"]}\n')
    args = ["train", "--passages", str(SAMPLE_PASSAGES), "--questions", str(questions), "--out", str(tmp_path / "o")]
    code, _, err = run_cli(args + options, monkeypatch, capfd)
    assert code == 1 and err.startswith("error: ") and err.count("\n") == 1 and named in err, err
    assert not (tmp_path / "o").exists()  # nothing written, no model loaded


@pytest.mark.parametrize("options, alpha", [(["--rank", "32"], 64), (["--rank", "32", "--alpha", "16"], 16)])
def test_train_alpha_defaults_to_twice_the_rank_and_can_be_set(options, alpha, tmp_path, monkeypatch, capfd):
    """``--alpha`` reaches the training config (the LoRA scale is alpha / rank); without it, twice
    the rank, as every packaged adaptor was trained."""
    import ragcompress.distill.train as train_module
    import ragcompress.models as models
    from ragcompress.data import SAMPLE_PASSAGES

    seen = {}

    class Stop(Exception):
        pass

    def fake_train(lm, passages, questions, out, config, progress):
        seen["rank"], seen["alpha"] = config.rank, config.alpha
        raise Stop

    monkeypatch.setattr(train_module, "train", fake_train)
    monkeypatch.setattr(models, "load_model", lambda ref, dtype=None: None)
    questions = tmp_path / "q.jsonl"
    questions.write_text('{"id": "q", "question": "?", "answers": ["a"]}\n')
    args = ["train", "--passages", str(SAMPLE_PASSAGES), "--questions", str(questions), "--out", str(tmp_path / "o")]
    with pytest.raises(Stop):
        run_cli(args + options, monkeypatch, capfd)
    assert seen == {"rank": 32, "alpha": alpha}


def test_train_without_matplotlib_refuses_before_loading_the_model(tmp_path, monkeypatch, capfd):
    """Without matplotlib (the train extra) ``train`` once trained for its full --minutes, saved
    the adaptor, then ended in a ModuleNotFoundError traceback at its loss curve: it is one error
    line naming the extra before the model loads."""
    import ragcompress.distill.train as train_module
    import ragcompress.models as models
    from ragcompress.data import SAMPLE_PASSAGES

    def loaded(*a, **k):
        raise AssertionError("the model loaded")

    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setattr(models, "load_model", loaded)
    monkeypatch.setattr(train_module, "train", loaded)
    questions = tmp_path / "q.jsonl"
    questions.write_text('{"id": "q", "question": "?", "answers": ["a"]}\n')
    args = ["train", "--passages", str(SAMPLE_PASSAGES), "--questions", str(questions), "--out", str(tmp_path / "o")]
    code, out, err = run_cli(args, monkeypatch, capfd)
    assert code == 1 and not out and err.count("\n") == 1, err
    assert err.startswith("error: train draws its loss curve with matplotlib, which is not installed")
    assert "the train extra (pip install -e '.[train]' in a checkout)" in err
    assert not (tmp_path / "o").exists()


def test_train_draws_no_progress_bar_off_a_terminal(tiny_model_dir, tmp_path, monkeypatch, capfd):
    """Progress bars only on a terminal, as every other command: ``train 2>log`` filled the log
    with its teacher, training and scorer bars (``progress=True`` was passed whatever stderr was,
    and the teacher's and scorer's bars took no ``disable`` at all)."""
    from ragcompress.data import SAMPLE_PASSAGES, SAMPLE_QUESTIONS

    model = str(tiny_model_dir("llama"))
    capfd.readouterr()  # building the test model (a session fixture) may draw transformers' bar
    args = ["train", "--model", model, "--passages", str(SAMPLE_PASSAGES), "--questions", str(SAMPLE_QUESTIONS)]
    args += ["--out", str(tmp_path / "run"), "--val-articles", "Apollo_program"]
    args += ["--steps", "1", "--batch", "1", "--train-questions", "1", "--val-examples", "1", "--rank", "2"]
    args += ["--continuation", "4", "--scorer-passages", "1", "--eval-every", "1"]
    code, out, err = run_cli(args, monkeypatch, capfd)
    assert code == 0, err[-2000:]
    assert out.startswith("adaptor ") and (tmp_path / "run" / "adaptor").is_dir()
    for bar in ("teacher (train)", "teacher (held-out)", "training", "scorer (KVzip targets)", "it/s", "s/it"):
        assert bar not in err, err[-2000:]


@pytest.mark.parametrize(
    "minutes, advice",
    [
        ("0.001", "--minutes 0.001 of step time ran out; run the same command again"),
        # the same command would take no step again
        ("0", "--minutes 0 takes no step; run it again with --minutes above 0 to continue"),
    ],
)
def test_train_says_when_minutes_ran_out_before_the_steps(minutes, advice, tmp_path, monkeypatch, capfd):
    """A run that --minutes stopped early ends with how far it got and how to continue."""
    from types import SimpleNamespace

    import ragcompress.distill.train as train_module
    import ragcompress.models as models
    from ragcompress.data import SAMPLE_PASSAGES

    def short_train(lm, passages, questions, out, config, progress):
        ends = {"kl_answer": 0.1, "top1_answer": 0.5}
        return SimpleNamespace(
            hash="a" * 64, meta={"metrics": {"steps": 1, "held_out_start": ends, "held_out_end": ends}}
        )

    monkeypatch.setattr(train_module, "train", short_train)
    monkeypatch.setattr(models, "load_model", lambda ref, dtype=None: None)
    questions = tmp_path / "q.jsonl"
    questions.write_text('{"id": "q", "question": "?", "answers": ["a"]}\n')
    args = ["train", "--passages", str(SAMPLE_PASSAGES), "--questions", str(questions), "--out", str(tmp_path / "o")]
    code, out, err = run_cli([*args, "--steps", "5", "--minutes", minutes], monkeypatch, capfd)
    assert code == 0, err
    assert f"stopped at step 1 of 5: {advice}" in out


def test_overwrite_without_settings_keeps_the_stores_own(cli_store, tmp_path, monkeypatch, capfd):
    """`index --overwrite` alone rebuilds with the store's settings (here int8), not the defaults."""
    import shutil

    from ragcompress.store import Manifest

    source, _, passages = cli_store
    store = tmp_path / "store"
    shutil.copytree(source, store)
    before = Manifest.read(store)
    code, out, err = run_cli(
        ["index", "--input", str(passages), "--store", str(store), "--overwrite"], monkeypatch, capfd
    )
    assert code == 0, err
    after = Manifest.read(store)
    assert after.compression == before.compression and after.compression["quant"] == "int8"
    assert after.model_ref == before.model_ref
    assert "x smaller)" in out


def test_a_store_larger_than_fp16_says_so(tiny_model_dir, tmp_path, monkeypatch, capfd):
    from ragcompress.data import SAMPLE_PASSAGES

    passages = tmp_path / "passages.jsonl"
    passages.write_text("\n".join(SAMPLE_PASSAGES.read_text().splitlines()[:2]) + "\n")
    args = ["index", "--input", str(passages), "--store", str(tmp_path / "s"), "--model", str(tiny_model_dir("llama"))]
    code, out, err = run_cli(args, monkeypatch, capfd)
    assert code == 0, err
    assert re.search(r"fp16 \(\d\.\d\dx larger\)", out)  # quant none keeps fp32 rows


def test_a_changed_model_is_named_with_the_way_to_rebuild(cli_store):
    from dataclasses import replace

    from ragcompress.errors import StoreMismatchError
    from ragcompress.store import Manifest

    manifest = Manifest.read(cli_store[0])
    with pytest.raises(StoreMismatchError, match=r"has changed since the store was built .* with --overwrite"):
        manifest.check_same_build(replace(manifest, model_fingerprint="0" * 64))


def test_the_librarys_warnings_print_as_one_line(tiny_model_dir, tmp_path):
    """A model without a packaged adaptor for ``--preset small`` is worth a warning, printed as
    ``warning: ...`` and not as Python's ``path:line: UserWarning`` with a source line."""
    from ragcompress.data import SAMPLE_PASSAGES

    passages = tmp_path / "passages.jsonl"
    passages.write_text("\n".join(SAMPLE_PASSAGES.read_text().splitlines()[:2]) + "\n")
    command = [sys.executable, "-m", "ragcompress.cli", "index", "--input", str(passages)]
    command += ["--store", str(tmp_path / "store"), "--model", str(tiny_model_dir("llama")), "--preset", "small"]
    result = subprocess.run(command, capture_output=True, text=True, check=True)
    lines = result.stderr.splitlines()
    assert [line for line in lines if "adaptor" in line] == [line for line in lines if line.startswith("warning: ")]
    assert any(line.startswith("warning: no adaptor is packaged for ") for line in lines), result.stderr
    assert "UserWarning" not in result.stderr


def test_only_the_librarys_own_warnings_print_as_its_one_line():
    """Other libraries' warnings keep Python's format even when their frame is ragcompress's: Ray's
    deprecation of an argument ``index --ray`` passes printed as ``warning: ...``, advice the user
    could not act on. ragcompress's own are :class:`RagCompressWarning` (a ``UserWarning``)."""
    from ragcompress.cli.root import _one_line_warning
    from ragcompress.errors import RagCompressWarning
    from ragcompress.indexing import ray_runner

    ours = _one_line_warning("do this", RagCompressWarning, ray_runner.__file__, 1)
    assert ours == "warning: do this\n"
    theirs = _one_line_warning("`x` is deprecated", DeprecationWarning, ray_runner.__file__, 1)
    assert "DeprecationWarning: `x` is deprecated" in theirs and not theirs.startswith("warning: ")
    assert "UserWarning" in _one_line_warning("a library's", UserWarning, ray_runner.__file__, 1)


def test_dtype_is_recorded_at_indexing_and_reused_for_answering(tiny_model_dir, tmp_path, monkeypatch, capfd):
    """``--dtype bfloat16`` loads the weights in bf16 (a model that does not fit in fp32); the
    store records it, answering and adding passages use it unless told otherwise, and a run that
    would add float32 caches to it is refused."""
    from ragcompress.data import SAMPLE_PASSAGES
    from ragcompress.store import Manifest

    lines = SAMPLE_PASSAGES.read_text().splitlines()
    first, more = tmp_path / "first.jsonl", tmp_path / "more.jsonl"
    first.write_text("\n".join(lines[:3]) + "\n")
    more.write_text("\n".join(lines[3:5]) + "\n")
    store, model = tmp_path / "store", str(tiny_model_dir("llama"))
    code, _, err = run_cli(
        ["index", "--input", str(first), "--store", str(store), "--model", model, "--dtype", "bfloat16"],
        monkeypatch,
        capfd,
    )
    assert code == 0, err
    assert Manifest.read(store).dtype == "bfloat16"
    import torch

    from ragcompress.runtime.engine import Engine

    with Engine.open(store) as engine:
        assert next(engine.lm.model.parameters()).dtype == torch.bfloat16
    # the API's writers (the LlamaIndex components, an engine opened with another dtype) add
    # through Indexer.for_store, which refuses a model in another dtype as the CLI does
    from ragcompress.errors import StoreMismatchError
    from ragcompress.indexing import Indexer
    from ragcompress.models import load_model

    with pytest.raises(StoreMismatchError, match="encoded with the model in bfloat16.*loaded in float32"):
        Indexer.for_store(Manifest.read(store), load_model(model))
    code, out, err = run_cli(["ask", "--store", str(store), "--question", "Where?", "--json"], monkeypatch, capfd)
    assert code == 0, err
    assert json.loads(out)["answer"] is not None
    code, _, err = run_cli(["index", "--input", str(more), "--store", str(store)], monkeypatch, capfd)
    assert code == 0, err  # the store's dtype, without repeating it
    code, _, err = run_cli(
        ["index", "--input", str(more), "--store", str(store), "--dtype", "float32"], monkeypatch, capfd
    )
    assert code == 1 and "passage encoding" in err and "bfloat16" in err, err
    code, _, err = run_cli(["ask", "--store", str(store), "--question", "x", "--dtype", "int8"], monkeypatch, capfd)
    assert code == 1 and err == "error: --dtype 'int8' is not one of: float32, bfloat16, float16\n", err


def test_device_places_the_model_or_names_why_it_cannot(tiny_model_dir, tmp_path, monkeypatch, capfd):
    """``--device`` loads the model there on every command that runs it (answering and indexing
    follow it: tests/test_engine_on_cuda.py checks both with the model on CUDA); a GPU torch does
    not see, or a name that is not a device, is one line naming it, raised before any weights load
    or anything is written."""
    import torch

    from ragcompress.data import SAMPLE_PASSAGES, SAMPLE_QUESTIONS

    passages, store = tmp_path / "passages.jsonl", tmp_path / "store"
    passages.write_text("\n".join(SAMPLE_PASSAGES.read_text().splitlines()[:3]) + "\n")
    model = str(tiny_model_dir("llama"))
    code, _, err = run_cli(
        ["index", "--input", str(passages), "--store", str(store), "--model", model], monkeypatch, capfd
    )
    assert code == 0, err
    ask = ["ask", "--store", str(store), "--question", "Where?", "--json", "--max-new-tokens", "4"]
    code, out, err = run_cli([*ask, "--device", "cpu"], monkeypatch, capfd)
    assert code == 0 and json.loads(out)["answer"] is not None, err
    evaluate = ["eval", "--store", str(store), "--questions", str(SAMPLE_QUESTIONS), "--limit", "1", "--json"]
    code, out, err = run_cli([*evaluate, "--max-new-tokens", "2", "--device", "cpu"], monkeypatch, capfd)
    assert code == 0 and json.loads(out)["device"] == "cpu", err
    bench = ["bench", "--store", str(store), "--top-k", "1", "--limit", "1", "--repeats", "1", "--no-packed"]
    commands = {
        "ask": ask,
        "eval": evaluate,
        "bench": bench,
        "calibrate": ["calibrate", "--store", str(store), "--samples", "1"],
        "serve": ["serve", "--store", str(store), "--port", "0"],
        "index": ["index", "--input", str(passages), "--store", str(tmp_path / "other"), "--model", model],
    }
    for name, command in commands.items():
        code, _, err = run_cli([*command, "--device", "tpu:x"], monkeypatch, capfd)
        assert code == 1 and err.startswith("error: device 'tpu:x' is not a torch device"), (name, err)
        assert err.count("\n") == 1, (name, err)
        if not torch.cuda.is_available():
            code, _, err = run_cli([*command, "--device", "cuda"], monkeypatch, capfd)
            assert code == 1 and err.startswith("error: device 'cuda': torch sees no CUDA GPU here"), (name, err)
    assert not (tmp_path / "other").exists()  # refused before anything was written
    # indexing with the device named is indexing there: on the CPU, the same store bit for bit
    from ragcompress.store.digest import store_digest

    code, _, err = run_cli([*commands["index"], "--device", "cpu"], monkeypatch, capfd)
    assert code == 0, err
    assert store_digest(tmp_path / "other") == store_digest(store)


def test_adding_to_a_store_of_an_unpackaged_adaptor_takes_its_folder_alone(
    tmp_path, tiny_model_dir, monkeypatch, capfd
):
    """A store built with the user's own adaptor (not packaged) could not be added to without
    restating every setting: with none, the adaptor's folder was asked for; with only
    ``--adaptor``, every other setting took its default and the store refused them. ``--adaptor``
    alone now keeps the store's other settings, and a folder of another adaptor is still refused."""
    from ragcompress.data import SAMPLE_PASSAGES
    from ragcompress.models import load_model
    from ragcompress.testing import noisy_adaptor

    model = str(tiny_model_dir("llama"))
    lines = SAMPLE_PASSAGES.read_text().splitlines()
    first, more = tmp_path / "first.jsonl", tmp_path / "more.jsonl"
    first.write_text("\n".join(lines[:3]) + "\n")
    more.write_text("\n".join(lines[:5]) + "\n")
    lm = load_model(model)
    ours, other = (
        noisy_adaptor(lm, 1).save(tmp_path / "ours"),
        noisy_adaptor(lm, 2).save(tmp_path / "other"),
    )
    store = tmp_path / "store"
    build = ["index", "--input", str(first), "--store", str(store), "--model", model, "--quant", "int4"]
    code, _, err = run_cli(
        [*build, "--method", "global:knorm", "--ratio", "0.5", "--adaptor", str(ours)], monkeypatch, capfd
    )
    assert code == 0, err
    add = ["index", "--input", str(more), "--store", str(store)]
    code, _, err = run_cli(add, monkeypatch, capfd)
    assert (
        code != 0 and "not packaged; pass its folder with --adaptor (alone, the store's other settings are kept)" in err
    )
    code, _, err = run_cli([*add, "--adaptor", str(other)], monkeypatch, capfd)
    assert code != 0 and "adaptor" in err and "built with" in err
    code, out, err = run_cli([*add, "--adaptor", str(ours), "--json"], monkeypatch, capfd)
    assert code == 0, err
    assert (json.loads(out)["indexed"], json.loads(out)["skipped"]) == (2, 3)
