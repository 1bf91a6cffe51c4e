"""``benchmarks/frontier_rows.py``: the row names of ``benchmarks/lowrank_frontier.py`` parsed in
one place for both of their readers, the frontier (``RowSpec.parse``, which builds each row's
store) and the report's protection table (``render_protection``, which reads the rows it published)."""

from __future__ import annotations

import importlib
import json
import re

import pytest

frontier = importlib.import_module("lowrank_frontier")  # benchmarks/, on pytest's pythonpath
report = importlib.import_module("report")

# suffixes the protection table never published, beside ``~keepF-L``
SYNTHETIC_ROWS = (
    "global:kvzip@0.21f0.2/int4v2g64/r32k+adaptor-early~vnorm~pool~entity~keep2-1",
    "kvzip@0.25/int2/e0.9~corpus~keep10-3",
    "adaptive:snapkv@0.5/int8/p0.9k",
)


def published_eviction_rows() -> list[str]:
    """Every eviction row of the published files in the frontier's shape (``calibration`` and
    named ``rows``): the rows both readers met."""
    names = set()
    for path in report.RESULTS.glob("*.json"):
        data = json.loads(path.read_text())
        if isinstance(data, dict) and "calibration" in data and isinstance(data.get("rows"), dict):
            names |= set(data["rows"])
    return sorted(name for name in names if not name.split("@")[0].endswith("none"))


def test_the_protection_table_reads_each_row_as_the_frontier_builds_its_store(tmp_path):
    """Each row's "protected first / last" in the report is the ``keep_first`` / ``keep_last``
    the frontier indexes that row's store with."""
    names = [*published_eviction_rows(), *SYNTHETIC_ROWS]
    assert len(names) > 40 and any("~keep" in name for name in names)
    # each row's KL is its index / 1000, so its table line can be found
    rows = {
        name: {
            "ratio": frontier.RowSpec.parse(name).ratio,
            "per_question_sub_em": [1, 0],
            "sub_em": 0.5,
            "agreement": 0.5,
            "kl_full_answer": i / 1000,
            "kl_questions": 2,
        }
        for i, name in enumerate(names)
    }
    (tmp_path / "protection_qwen_dev.json").write_text(json.dumps({"rows": rows, "full": {"sub_em": 0.5}}))
    text = report.render_protection(tmp_path)
    for i, name in enumerate(names):
        (first, last) = re.search(rf"\| (\d+) / (\d+) \| {i / 1000:.3f} \(2 q\)", text).groups()
        config = frontier.RowSpec.parse(name).index_config()
        assert (int(first), int(last)) == (config.keep_first, config.keep_last), name


@pytest.mark.parametrize(
    "name",
    [
        "global:kvzip@0.5/int4~keep4-4",  # no rank
        "global:kvzip@0.5/int4/-~keep4-4~merge",  # ~keep is the last suffix
        "global:kvzip@0.5/int3/-",  # no such width
    ],
)
def test_a_row_name_the_frontier_cannot_parse_fails_the_protection_table(tmp_path, name):
    """The report read ``~keepF-L`` with a pattern of its own, so a name the frontier rejects
    (and so cannot have written) was rendered as protecting whatever its tail said, or 1 and 0."""
    with pytest.raises(SystemExit, match="bad row"):
        frontier.RowSpec.parse(name)
    row = {"ratio": 0.5, "per_question_sub_em": [1], "sub_em": 1.0, "agreement": 1.0}
    data = {"rows": {name: row | {"kl_full_answer": 0.1, "kl_questions": 1}}, "full": {"sub_em": 1.0}}
    (tmp_path / "protection_qwen_dev.json").write_text(json.dumps(data))
    with pytest.raises(report.ReportError, match=r"^protection_qwen_dev.json: bad row .* expected METHOD@RATIO"):
        report.render_protection(tmp_path)
