"""Real-model tests skip without ``../shared/data`` on a user's clone, and fail in CI."""

from __future__ import annotations

import pytest

import conftest


def test_missing_real_data_skips_or_fails_when_required(monkeypatch, tmp_path):
    monkeypatch.setattr(conftest, "SQUAD", tmp_path / "absent")
    monkeypatch.delenv("RAGCOMPRESS_REQUIRE_REAL_DATA", raising=False)
    with pytest.raises(pytest.skip.Exception):
        conftest.require_squad()
    monkeypatch.setenv("RAGCOMPRESS_REQUIRE_REAL_DATA", "1")
    with pytest.raises(pytest.fail.Exception, match="RAGCOMPRESS_REQUIRE_REAL_DATA"):
        conftest.require_squad()
