"""The README's Python example runs as written and prints what it says it prints."""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def _python_example() -> str:
    section = README.read_text().split("\n## Python\n", 1)[1]
    found = re.search(r"```python\n(.*?)```", section, re.S)
    assert found, "README's Python section has no python block"
    return found.group(1)


@pytest.mark.slow
def test_readme_python_example_streams_the_answer_it_returns(tmp_path, monkeypatch):
    """On the default model and eight bundled passages: the streamed pieces, joined, are the
    answer ``answer_cached`` gives with the same options (no word run into the next)."""
    from ragcompress.data import SAMPLE_PASSAGES

    monkeypatch.chdir(tmp_path)
    Path("passages.jsonl").write_text("\n".join(SAMPLE_PASSAGES.read_text().splitlines()[:8]) + "\n")
    namespace: dict = {}
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile(_python_example(), str(README), "exec"), namespace)
    engine, question, entries = namespace["engine"], namespace["question"], namespace["entries"]
    try:
        expected = engine.answer_cached(question, entries, engine.options.replace(recompute=0.15)).answer
        first_line, streamed = printed.getvalue().split("\n", 1)
        assert first_line.startswith(namespace["cached"].answer)
        assert streamed.strip() == expected
        assert " " in expected  # a one-word answer would not show run-together words
    finally:
        engine.close()
