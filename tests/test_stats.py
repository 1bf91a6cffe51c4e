"""Bootstrap intervals and the paired test behind every "A beats B"."""

from __future__ import annotations

import pytest

from ragcompress.stats import bootstrap_ci, mcnemar_exact, paired_comparison


def test_bootstrap_interval_covers_the_mean_and_narrows_with_more_questions():
    small = [1, 0] * 10
    large = [1, 0] * 200
    low, high = bootstrap_ci(small)
    assert low < 0.5 < high and bootstrap_ci(small) == (low, high)  # seeded
    big_low, big_high = bootstrap_ci(large)
    assert big_high - big_low < (high - low) / 3
    assert bootstrap_ci([1, 1, 1]) == (1.0, 1.0)
    with pytest.raises(ValueError):
        bootstrap_ci([])


def test_mcnemar_exact_matches_the_binomial():
    assert mcnemar_exact(0, 0) == 1.0
    assert mcnemar_exact(5, 5) == 1.0
    assert mcnemar_exact(10, 0) == pytest.approx(2 / 1024)  # two-sided: 2 * 0.5**10
    assert mcnemar_exact(2, 8) == pytest.approx(2 * (1 + 10 + 45) / 1024)


def test_paired_comparison_counts_discordant_questions():
    a = [1, 1, 1, 0, 1, 0, 1, 1]
    b = [1, 0, 0, 0, 1, 0, 0, 1]
    result = paired_comparison(a, b)
    assert (result["n"], result["wins"], result["losses"]) == (8, 3, 0)
    assert result["mean_difference"] == pytest.approx(3 / 8)
    assert result["p_value"] == pytest.approx(0.25)
    assert result["ci95"][0] >= 0.0
    with pytest.raises(ValueError, match="same questions"):
        paired_comparison([1], [1, 0])


def test_paired_ratio_of_means_and_its_interval():
    from ragcompress.stats import paired_ratio

    base = [0.2, 0.4, 0.1, 0.3, 0.5, 0.2, 0.3, 0.4]
    half = [v / 2 for v in base]
    exact = paired_ratio(half, base)
    assert exact["ratio"] == pytest.approx(0.5) and exact["ci95"] == pytest.approx([0.5, 0.5])  # paired: no spread
    noisy = paired_ratio([0.05, 0.4, 0.02, 0.1, 0.3, 0.01, 0.2, 0.1], base)
    low, high = noisy["ci95"]
    assert low < noisy["ratio"] < high and paired_ratio([0.05, 0.4, 0.02, 0.1, 0.3, 0.01, 0.2, 0.1], base) == noisy
    with pytest.raises(ValueError, match="same"):
        paired_ratio([0.1], [0.1, 0.2])


def test_mcnemar_exact_past_a_thousand_discordant_questions():
    # 2.0**n overflows a float past n = 1023; the p-value is computed exactly.
    # 0.0028195449914364284 is scipy.stats.binomtest(600, 1100).pvalue.
    assert mcnemar_exact(600, 500) == pytest.approx(0.0028195449914364284, rel=1e-9)
    assert mcnemar_exact(500, 600) == mcnemar_exact(600, 500)
    assert mcnemar_exact(520, 504) == pytest.approx(mcnemar_exact(504, 520))
    assert 0.0 < mcnemar_exact(520, 504) <= 1.0
    assert mcnemar_exact(2000, 2000) == 1.0
    assert mcnemar_exact(5000, 0) == 0.0  # underflows to zero, does not raise
    a = [1] * 600 + [0] * 500 + [1] * 100
    b = [0] * 600 + [1] * 500 + [1] * 100
    result = paired_comparison(a, b)
    assert (result["n"], result["wins"], result["losses"]) == (1200, 600, 500)
    assert result["p_value"] == pytest.approx(0.0028195449914364284, rel=1e-9)
