"""``ragcompress.provenance``: what a results file records of the run that measured it."""

from __future__ import annotations

import pytest


def test_git_revision_ignores_a_repository_that_encloses_an_installed_package(tmp_path, monkeypatch):
    """Installed from a wheel into a virtual environment inside a user's own git repository,
    ``git_revision`` once reported that project's commit (``-dirty`` and all) as the code's
    revision: only the package's own checkout has one."""
    import subprocess

    import ragcompress.provenance as provenance

    project = tmp_path / "project"
    site = project / ".venv" / "lib" / "python3.12" / "site-packages"
    (site / "ragcompress").mkdir(parents=True)
    (site / "ragcompress" / "__init__.py").write_text("")
    (project / "pyproject.toml").write_text('[project]\nname = "theirs"\n')
    (project / "main.py").write_text("print(1)\n")
    git = ["git", "-C", str(project), "-c", "user.name=t", "-c", "user.email=t@t", "-c", "commit.gpgsign=false"]
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "add", "-A"], check=True)
    subprocess.run([*git, "commit", "-q", "-m", "theirs"], check=True)
    (project / "main.py").write_text("print(2)\n")  # their uncommitted work
    monkeypatch.setattr(provenance, "__file__", str(site / "ragcompress" / "provenance.py"))  # as installed there
    assert provenance.git_revision() == "unknown"
    (site / "pyproject.toml").write_text('[project]\nname = "ragcompress"\n')  # even one that looks like a checkout
    assert provenance.git_revision() == "unknown"


def test_git_revision_of_the_source_checkout_is_its_commit():
    import re
    import subprocess
    from pathlib import Path

    from ragcompress.provenance import git_revision

    root = Path(__file__).resolve().parents[1]
    try:
        subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not run from a git checkout")
    assert re.fullmatch(r"[0-9a-f]{4,40}(-dirty)?", git_revision()), git_revision()


def test_a_run_given_every_value_records_every_key_the_report_checks():
    """``benchmarks/report.py`` checks results files against the keys this module writes; a run
    that gives every value leaves none unrecorded, and rows record the same revision and threads."""
    from pathlib import Path

    import report  # benchmarks/report.py, on pytest's pythonpath

    from ragcompress.provenance import META_KEYS, ROW_KEYS, row_run, run_meta

    meta = run_meta(repeats=3, limit=5, questions=Path("questions.jsonl"), model="m")
    assert set(report.recorded_meta({"meta": meta})) == set(META_KEYS)
    assert meta["questions"] == "questions.jsonl" and isinstance(meta["keep_freed_memory"], bool)
    assert {key: meta[key] for key in ROW_KEYS} == row_run()
    assert run_meta(git="abc1234", threads=7)["git"] == "abc1234" and row_run(threads=7)["threads"] == 7
