"""README.md's result tables equal what ``benchmarks/report.py`` renders from ``docs/results/*.json``."""

from __future__ import annotations

import importlib
import json
import shutil
from pathlib import Path

import pytest

report = importlib.import_module("report")  # benchmarks/report.py (no model, no torch)


@pytest.fixture
def results(tmp_path) -> Path:
    """A copy of docs/results to change (the real files are never edited)."""
    return Path(shutil.copytree(report.RESULTS, tmp_path / "results"))


def test_readme_tables_equal_the_rendering_of_docs_results():
    problem = report.check()
    assert problem is None, f"{problem}\nrun: .venv/bin/python benchmarks/report.py"


def test_docs_tables_equal_their_rendering():
    """Every document's Results tables are generated blocks equal to their rendering: a table
    typed by hand outside a block fails the check (docs/compression.md's first-round sweeps
    included, rendered from their results files)."""
    for path in report.DOCS:
        problem = report.check(path)
        assert problem is None, f"{problem}\nrun: .venv/bin/python benchmarks/report.py"
        assert report.blocks(path.read_text())


def test_a_changed_sweep_row_changes_the_compression_doc_table(results):
    kl = json.loads((results / "compression_kl_qwen.json").read_text())
    before = report.render_block("sweep:qwen-protected", results)
    assert "| 0.230 | 0.423 |" in before  # global:kvzip at 0.25 + int4
    kl["global-kvzip_0.25_int4"]["kl_answer"] = 0.5
    (results / "compression_kl_qwen.json").write_text(json.dumps(kl))
    after = report.render_block("sweep:qwen-protected", results)
    assert "| 0.230 | 0.500 |" in after and "| 0.230 | 0.423 |" not in after


def test_readme_has_the_generated_blocks():
    names = report.blocks(report.README.read_text())
    assert {"core", "compression-methods-100"} <= set(names)
    assert {"ttft", "ttft-curve"} & set(names)


def test_a_changed_result_changes_the_table_and_fails_the_check(results, tmp_path):
    rows = json.loads((results / "core_qwen.json").read_text())
    before = report.render_block("core", results)
    top3 = next(r for r in rows if r["quant"] == "none" and r["top_k"] == 3)
    top3["compressed"]["sub_em"] = 0.45  # of full prefill's 0.525: 86 %
    (results / "core_qwen.json").write_text(json.dumps(rows))
    after = report.render_block("core", results)
    assert after != before
    assert "| Qwen2.5-Coder-0.5B | none | 3 | 0.525 | 0.450 | 86 % |" in after
    problem = report.check(report.README, results)
    assert problem is not None and "report:core" in problem

    readme = tmp_path / "README.md"
    readme.write_text(report.README.read_text())
    assert report.main(["--readme", str(readme), "--results", str(results)]) == 0
    assert "| 0.450 | 86 % |" in readme.read_text()
    assert report.check(readme, results) is None
    assert report.main(["--check", "--readme", str(report.README), "--results", str(results)]) == 1


def test_missing_results_file_and_unknown_block_are_errors(results, tmp_path):
    (results / "compression_methods_qwen_100q.json").unlink()  # README's compression table
    assert "compression_methods_qwen_100q.json is missing" in (report.check(report.README, results) or "")
    readme = tmp_path / "README.md"
    readme.write_text("## Results\n\n<!-- report:nope -->\n<!-- /report:nope -->\n")
    assert "report:nope has no renderer" in (report.check(readme, report.RESULTS) or "")


def test_a_hand_typed_table_in_results_fails_the_check(tmp_path):
    readme = tmp_path / "README.md"
    text = report.README.read_text().replace("### Other capabilities", "| a | b |\n|---|---|\n| 1 | 2 |\n\n### Other")
    readme.write_text(text)
    assert "not generated" in (report.check(readme) or "")


def test_a_table_of_figures_typed_into_a_doc_fails_the_check_unless_marked(tmp_path):
    """Outside README's Results section too: a docs table whose cells read as measurements is
    either a report block or says, in a ``<!-- hand-typed: WHY -->`` line before it, why it is
    not; a reference table (flags, status codes, counts) needs neither."""
    doc = tmp_path / "doc.md"
    base = report.DOCS[0].read_text()
    figures = "| setting | sub-EM | TTFT |\n|---|---|---|\n| reuse | 0.350 | 1.8 s |\n"
    doc.write_text(base + "\n" + figures)
    assert "neither generated" in (report.check(doc) or "")
    doc.write_text(base + "\n<!-- hand-typed: the notebook's printed run -->\n\n" + figures)
    assert report.check(doc) is None
    doc.write_text(base + "\n| status | when |\n|---|---|\n| 409 | busy |\n| 12 | retries |\n")
    assert report.check(doc) is None


def bench_curve(model: str, speedup: float) -> dict:
    """The ``ragcompress bench --json`` shape (ragcompress/bench.py ``to_json`` plus the CLI's extras)."""
    cached = 0.2
    row = {
        "top_k": 4,
        "questions": 3,
        "context_tokens": 700.0,
        "ttft_s": {"full": cached * speedup, "full_prefix_cached": cached * 3, "cached": cached, "floor": 0.15},
        "speedup": {"vs_full": speedup, "vs_prefix_cached": 3.0},
        "cache_work_s": 0.05,
        "cache_work_share": 0.25,
        "kv_bytes": {"stored": 2048.0 * 600, "fp16": 4096.0 * 600},
        "same_first_token": 2 / 3,
    }
    return {
        "model": model,
        "store": "runs/store",
        "rows": [row],
        "meta": {"git": "abc1234", "threads": 2, "repeats": 3, "limit": 3, "load_avg": [0.5, 0.4, 0.3]},
        "indexing": {
            "passages": 8,
            "repeats": 3,
            "indexer_passages_per_s": 4.0,
            "forward_passages_per_s": 5.0,
            "ratio": 0.8,
        },
        "packed_attention": {
            "questions": 3,
            "repeats": 3,
            "assembled_ttft_s": 0.2,
            "packed_ttft_s": 0.21,
            "ratio": 1.05,
            "same_first_token": 1.0,
            "packed_backend": "packed-torch",
        },
    }


def test_the_new_bench_shape_renders_one_table_per_model(results):
    (results / "bench_curve_qwen.json").write_text(json.dumps(bench_curve("qwen2.5-coder-0.5b", 9.5)))
    (results / "bench_curve_smollm2.json").write_text(json.dumps(bench_curve("smollm2-135m", 6.0)))
    text = report.render_block("ttft-curve", results)
    assert text.index("**SmolLM2-135M**") < text.index("**Qwen2.5-Coder-0.5B**")
    assert text.count("| top-k | questions | context tokens | TTFT full (ms) |") == 2  # one table per model
    assert "| 4 | 3 | 700 | 1900 | 600 | 200 | 150 | 9.5x | 3.0x | 50 ms (25%) | 1200 / 2400 | 67% |" in text
    assert "git abc1234" in text and "Not recorded" not in text
    assert "| SmolLM2-135M | 3 | 3 | `packed-torch` | 200 ms | 210 ms | 1.05 | 100% |" in report.render_block(
        "packed-curve", results
    )
    assert "| Qwen2.5-Coder-0.5B | 8 | 3 | 4.0 | 5.0 | 0.80x |" in report.render_block("indexing-curve", results)
    # the first bench shape is still what the "ttft" block renders
    assert "bench_curve" not in report.render_block("ttft", results)


def test_files_without_run_metadata_are_named(results):
    notes = report.meta_notes(results)
    assert any("core_qwen.json does not record git, threads, repeats, limit" in n for n in notes)
    (results / "bench_curve_qwen.json").write_text(json.dumps(bench_curve("qwen2.5-coder-0.5b", 9.5)))
    assert not any("bench_curve_qwen.json" in n for n in report.meta_notes(results))


def test_a_faithful_run_of_an_adaptor_store_says_its_articles_adaptor_and_paired_outcome(results):
    data = json.loads((results / "faithful_smollm2_adaptor.json").read_text())
    text = report.render_block("faithful", results)
    assert "81 questions of Apollo program, United Methodist Church**" in text
    assert (
        f"`ad` store: passages encoded through the KV-Distill adaptor `{data['adaptors']['ad']['hash'][:16]}`" in text
    )
    measured = data["paired"]["top3 ad:reuse vs reuse"]["agreement"]["mean_difference"]
    assert f"`ad:reuse vs reuse`: agreement {measured:+.2f}" in text
    data["paired"]["top3 ad:reuse vs reuse"]["agreement"]["mean_difference"] = -0.5
    (results / "faithful_smollm2_adaptor.json").write_text(json.dumps(data))
    assert "`ad:reuse vs reuse`: agreement -0.50" in report.render_block("faithful", results)


def test_preset_measurements_cover_every_preset_and_name_its_evidence_files():
    """The README's preset measurements come from the files each preset names as its evidence."""
    import fnmatch
    import re

    from ragcompress.presets import PRESETS

    assert {preset for preset, *_ in report.PRESET_MEASUREMENTS} == set(PRESETS)
    for preset, name, _, _ in report.PRESET_MEASUREMENTS:
        patterns = [
            m.removeprefix("docs/results/")
            for m in re.findall(r"docs/results/[\w.*-]+\.json", PRESETS[preset].evidence)
        ]
        assert any(fnmatch.fnmatch(name, pattern) for pattern in patterns), (preset, name, patterns)


def test_preset_table_reads_the_named_rows_and_refuses_a_missing_one(tmp_path):
    rendered = report.render_presets(report.RESULTS)
    assert rendered.count("\n| `") == len(report.PRESET_MEASUREMENTS)
    results = tmp_path / "results"
    shutil.copytree(report.RESULTS, results)
    path = results / "lowrank_qwen.json"
    data = json.loads(path.read_text())
    row = next(row for preset, name, row, _ in report.PRESET_MEASUREMENTS if name == path.name)
    data["rows"][row]["sub_em"] = 0.123
    path.write_text(json.dumps(data))
    assert "0.12 (" in report.render_presets(results)
    del data["rows"][row]
    path.write_text(json.dumps(data))
    with pytest.raises(report.ReportError, match="has no row"):
        report.render_presets(results)


def test_pooled_preset_line_counts_every_question_once_and_refuses_shared_ones(tmp_path):
    """The README's pooled ``smallest`` figure is computed from both files' per-question outcomes."""
    results = tmp_path / "results"
    shutil.copytree(report.RESULTS, results)
    line, again, *ablations = report.pooled_presets(results)
    assert len(ablations) == len(report.POOLED_ABLATIONS)
    row = "global:kvzip@0.21/int4v2/r32k+adaptor"
    for text, remeasured in ((line, False), (again, True)):  # the first runs, and the same re-run later
        files = [
            json.loads((results / name).read_text())
            for preset, name, _, _ in report.PRESET_MEASUREMENTS
            if preset == "smallest" and "qwen" in name and name.startswith("remeasure") == remeasured
        ]
        right = sum(sum(d["rows"][row]["per_question_sub_em"]) for d in files)
        n = sum(len(d["key"]["questions"]) for d in files)
        assert f"sub-EM {right:.0f}/{n} " in text and ("re-measured" in text) == remeasured
    for (_, _, names, row, _), ablation in zip(report.POOLED_ABLATIONS, ablations, strict=True):
        pooled = [json.loads((results / name).read_text()) for name in names]
        right = sum(sum(d["rows"][row]["per_question_sub_em"]) for d in pooled)
        assert f"`{row}`" in ablation and f"sub-EM {right:.0f}/{n} " in ablation
    path = results / "confirm_smallest_qwen_33q.json"
    data = json.loads(path.read_text())
    data["key"]["questions"][0] = files[0]["key"]["questions"][0]  # one question in both files
    path.write_text(json.dumps(data))
    with pytest.raises(report.ReportError, match="shares questions"):
        report.pooled_presets(results)


def test_preset_note_reads_the_two_thread_ttft_range(tmp_path):
    """The presets note's two-thread ``faithful`` range comes from its results file."""
    results = tmp_path / "results"
    shutil.copytree(report.RESULTS, results)
    path = results / report.TWO_THREAD_TTFT
    data = json.loads(path.read_text())
    ratios = [run["r0.05+mixed"]["ttft_speedup"] for run in data["runs"].values()]
    assert f"at {min(ratios):.1f}–{max(ratios):.1f}x" in report.render_presets(results)
    next(iter(data["runs"].values()))["r0.05+mixed"]["ttft_speedup"] = 9.87
    path.write_text(json.dumps(data))
    assert f"at {min(ratios[1:]):.1f}–9.9x" in report.render_presets(results)


def test_faithful_disagreements_are_split_by_which_answer_is_right():
    """recompute_quality's split of the questions a setting answers differently from full prefill."""
    quality = importlib.import_module("recompute_quality")  # benchmarks/recompute_quality.py
    full = [{"sub_em": 1.0}, {"sub_em": 0.0}, {"sub_em": 1.0}, {"sub_em": 0.0}, {"sub_em": 1.0}]
    rows = [
        {"agree": 1.0, "sub_em": 1.0},  # agrees: not counted
        {"agree": 0.0, "sub_em": 0.0},
        {"agree": 0.0, "sub_em": 0.0},
        {"agree": 0.0, "sub_em": 1.0},
        {"agree": 0.0, "sub_em": 1.0},
    ]
    assert quality.disagreements(rows, full) == {
        "full_wrong_too": 1,
        "only_full_right": 1,
        "only_setting_right": 1,
        "both_right": 1,
    }


def test_faithful_pairs_settings_of_one_run_and_of_another_run_by_question(tmp_path):
    """recompute_quality --report-only: ``--compare A=B`` pairs two settings of this run and
    ``--pair-with`` pairs ``VARIANT:spec`` with ``spec`` of another run, question by question."""
    import argparse
    from types import SimpleNamespace

    quality = importlib.import_module("recompute_quality")

    def row(agree: float, kl: float) -> dict:
        return {"agree": agree, "sub_em": agree, "kl": kl, "answer": "x"}

    ours, theirs = tmp_path / "ours.jsonl", tmp_path / "theirs.jsonl"
    ours.write_text(
        "\n".join(
            json.dumps({"top_k": 3, "id": f"q{i}", "full": row(1, 0), "a:reuse": row(a, 0.1), "b:reuse": row(b, 0.3)})
            for i, (a, b) in enumerate([(1, 0), (1, 0), (0, 1), (1, 1)])
        )
    )
    theirs.write_text(
        "\n".join(json.dumps({"top_k": 3, "id": f"q{i}", "full": row(1, 0), "reuse": row(0, 0.2)}) for i in range(4))
    )
    args = argparse.Namespace(
        top_k=[3],
        checkpoint=ours,
        settings=["a:reuse", "b:reuse"],
        compare=["a:reuse=b:reuse"],
        pair_with=theirs,
        dtype=None,
        max_new_tokens=12,
        adaptor_dir=[],
    )
    questions = [SimpleNamespace(id=f"q{i}", article="Apollo_program") for i in range(4)]
    paired, runs = quality.paired_with(args, questions)
    assert runs == {"top3": {"run": "not recorded in its checkpoint (written before records named their run)"}}
    within = paired["top3 a:reuse vs b:reuse"]
    assert (within["agreement"]["wins"], within["agreement"]["losses"]) == (2, 1)
    assert within["kl_mean_difference"] == pytest.approx(-0.2) and within["n"] == 4
    across = paired["top3 a:reuse vs reuse"]
    assert (across["agreement"]["wins"], across["agreement"]["losses"]) == (3, 0)
    assert set(paired) == {"top3 a:reuse vs b:reuse", "top3 a:reuse vs reuse", "top3 b:reuse vs reuse"}


def test_a_pair_with_run_is_checked_as_this_runs_stores_are(tmp_path):
    """recompute_quality --pair-with: the other run's records name their stores and answer
    length; a run of another length does not pair, a store whose adaptor trained on the asked
    article is refused as this run's would be, a checkpoint mixing two runs is refused, and
    the pairing records what the other run was."""
    import argparse
    from types import SimpleNamespace

    from ragcompress.testing import manifest_only_store

    quality = importlib.import_module("recompute_quality")
    stores = {}
    for name, adaptor in (
        ("plain", None),
        ("adapted", "5d00aa4bbe9f8b2b9365876ef6b153eeff8662bce5788f9eae57ea094d9214a1"),
    ):
        stores[name] = manifest_only_store(tmp_path / name, {"adaptor": adaptor} if adaptor else {})
    theirs = tmp_path / "theirs.jsonl"

    def pair(store: Path, article: str, tokens: int = 12) -> dict:
        run = {"store": str(store), "variants": [], "max_new_tokens": 12, "git": "abc", "threads": 1}
        record = {"top_k": 3, "id": "q0", "full": {"answer": "x"}, "reuse": {"agree": 1.0}, "run": run}
        theirs.write_text(json.dumps(record) + "\n")
        args = argparse.Namespace(pair_with=theirs, max_new_tokens=tokens, adaptor_dir=[])
        question = SimpleNamespace(id="q0", article=article)
        records = quality.checkpointed(theirs, 3, [], None)
        return quality.paired_run(args, records, {question.article})

    assert pair(stores["plain"], "Yuan_dynasty") == {
        "run": {"store": str(stores["plain"]), "variants": [], "max_new_tokens": 12, "threads": 1},
        "adaptors": {},
    }
    assert pair(stores["adapted"], "Apollo_program")["adaptors"]["base"]["train_articles"] == [
        "Genghis_Khan",
        "Yuan_dynasty",
    ]
    with pytest.raises(SystemExit, match="store base's adaptor was trained on .*Yuan_dynasty"):
        pair(stores["adapted"], "Yuan_dynasty")
    with pytest.raises(SystemExit, match="--max-new-tokens 12, this run with 24"):
        pair(stores["plain"], "Apollo_program", tokens=24)
    other = {"top_k": 3, "id": "q1", "full": {}, "run": {"store": str(stores["adapted"]), "variants": []}}
    with pytest.raises(SystemExit, match="answered by 2 runs"):
        quality.one_run([other, {"run": {"store": "x"}}], theirs)


def test_faithful_curve_plots_every_setting_of_every_faithful_file(tmp_path):
    """benchmarks/faithful_curve.py: one series per table, every setting but full prefill, the
    speed-up and agreement read from the file; a folder without results is an error."""
    curve = importlib.import_module("faithful_curve")
    data = json.loads((report.RESULTS / "faithful_qwen_adaptor.json").read_text())
    (series,) = curve.curve(data, "qwen_adaptor")
    table = data["tables"]["top3"]
    assert {p.setting for p in series.points} == {name for name, r in table.items() if name != "full" and "sub_em" in r}
    point = next(p for p in series.points if p.setting == "ad:reuse")
    assert point.speedup == table["ad:reuse"]["ttft_speedup"]
    assert point.agreement == table["ad:reuse"]["agreement"]
    assert point.sub_em_pct == pytest.approx(100 * table["ad:reuse"]["sub_em"] / table["full"]["sub_em"])
    out = tmp_path / "curve.png"
    assert curve.main(["--out", str(out)]) == 0
    assert out.stat().st_size > 10_000
    with pytest.raises(SystemExit):
        curve.main(["--results", str(tmp_path), "--out", str(tmp_path / "none.png")])


def test_the_frontier_ttft_line_says_how_each_question_was_timed(results):
    """Published frontier files timed 2 runs a question and no warm-up (their median is the mean
    of both); a file written since says the runs were warm and how many."""
    before = report.render_block("lowrank-frontier", results)
    assert (
        "rotating between each question's runs, the same for every question, each question's mean of 2 runs" in before
    )
    path = results / "lowrank_qwen.json"
    data = json.loads(path.read_text())
    data["ttft"] |= {"repeats": 3, "warmup": 1}
    path.write_text(json.dumps(data))
    after = report.render_block("lowrank-frontier", results)
    assert "each question's median of 3 runs after 1 untimed warm-up run" in after
    assert "rotating from run to run and from question to question" in after


def test_the_protection_block_pairs_each_row_with_the_4_4_row_of_its_ratio(tmp_path):
    """``render_protection``: questions won and lost against the 4/4 row of the same ratio, with
    the exact McNemar p; a run without its results file is said to be unmeasured."""

    def row(ratio, outcomes, kl):
        return {"ratio": ratio, "per_question_sub_em": outcomes, "kl_full_answer": kl, "kl_questions": 4}

    def with_means(r):
        return {**r, "sub_em": sum(r["per_question_sub_em"]) / 4, "agreement": 0.5}

    rows = {
        "global:kvzip@0.5/int4/-~keep4-4": row(0.5, [1, 0, 0, 1], 0.3),
        "global:kvzip@0.5/int4/-": row(0.5, [1, 1, 1, 0], 0.2),
        "global:kvzip@0.25/int4/-~keep4-4": row(0.25, [0, 0, 0, 0], 0.9),
        "global:kvzip@0.25/int4/-~keep0-0": row(0.25, [1, 0, 0, 0], 0.8),
    }
    data = {"rows": {name: with_means(r) for name, r in rows.items()}, "full": {"sub_em": 0.5}}
    (tmp_path / "protection_qwen_dev.json").write_text(json.dumps(data))
    text = report.render_protection(tmp_path)
    assert "| 0.5 | 4 / 4 | 0.300 (4 q) | 0.50 | 0.50 | – |" in text
    assert "| 0.5 | 1 / 0 | 0.200 (4 q) | 0.75 | 0.50 | 2 / 1 (1) |" in text
    assert "| 0.25 | 0 / 0 | 0.800 (4 q) | 0.25 | 0.50 | 1 / 0 (1) |" in text
    assert text.index("| 0.5 | 4 / 4") < text.index("| 0.5 | 1 / 0") < text.index("| 0.25 | 4 / 4")
    assert "`protection_qwen_eval.json` absent" in text


def test_bad_inputs_are_one_error_line_and_exit_1(results, tmp_path, capsys):
    """A missing --readme, a missing --results folder and a malformed JSON anywhere in the
    results are each one ``error:`` line and exit status 1, not a traceback; the ``run:`` hint
    comes only when the docs have drifted from the results, which rendering again mends."""

    def run(*argv: str) -> list[str]:
        assert report.main(list(argv)) == 1
        return [line for line in capsys.readouterr().err.splitlines() if not line.startswith("note:")]

    missing = str(tmp_path / "nosuch.md")
    for argv in (["--check", "--readme", missing], ["--readme", missing]):
        assert run(*argv) == [f"error: {missing} is not an existing file"]
    nowhere = str(tmp_path / "nosuch_dir")
    for argv in (["--check", "--results", nowhere], ["--results", nowhere]):
        assert run(*argv) == [f"error: --results {nowhere} is not an existing folder"]

    (results / "zz_broken.json").write_text('{"truncated": ')
    readme = tmp_path / "README.md"
    readme.write_text(report.README.read_text())
    for argv in (["--check", "--readme", str(report.README)], ["--readme", str(readme)]):
        lines = run(*argv, "--results", str(results))
        assert len(lines) == 1 and lines[0].startswith("error: ") and "zz_broken.json is not valid JSON" in lines[0]
    (results / "zz_broken.json").unlink()

    (results / "compression_methods_qwen_100q.json").unlink()  # a block's file: not mended by rendering
    lines = run("--check", "--readme", str(report.README), "--results", str(results))
    assert lines == [f"error: {results / 'compression_methods_qwen_100q.json'} is missing"]

    rows = json.loads((results / "core_qwen.json").read_text())
    rows[0]["compressed"]["sub_em"] = 0.123  # drift: rendering again mends it
    (results / "core_qwen.json").write_text(json.dumps(rows))
    shutil.copy(report.RESULTS / "compression_methods_qwen_100q.json", results)
    lines = run("--check", "--readme", str(report.README), "--results", str(results))
    assert (
        lines[0].startswith("error: README block report:core differs")
        and lines[-1] == "run: python benchmarks/report.py"
    )
