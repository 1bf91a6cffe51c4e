"""How sure a reported figure is: bootstrap intervals and paired tests over the same questions.

Quality figures here are means of per-question 0/1 outcomes (sub-EM, agreement) over a few
hundred questions, where one question moves a mean by 0.3-2.5 points. A figure is reported with
its 95 % percentile-bootstrap interval (:func:`bootstrap_ci`), and "setting A beats B" rests on a
paired comparison over the same questions (:func:`paired_comparison`: the mean difference with
its bootstrap interval, and McNemar's exact test on the questions where the two disagree).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from fractions import Fraction
from typing import Any

import numpy as np


def bootstrap_ci(
    values: Sequence[float], *, resamples: int = 10_000, level: float = 0.95, seed: int = 0
) -> tuple[float, float]:
    """Percentile-bootstrap interval of the mean of ``values`` (seeded: the same data gives the
    same interval)."""
    x = np.asarray(values, dtype=np.float64)
    if x.size == 0:
        raise ValueError("no values to bootstrap")
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, x.size, size=(resamples, x.size))].mean(axis=1)
    tail = (1.0 - level) / 2.0
    low, high = np.quantile(means, [tail, 1.0 - tail])
    return float(low), float(high)


def mcnemar_exact(wins: int, losses: int) -> float:
    """Two-sided exact McNemar p-value: of the ``wins + losses`` questions where two settings
    disagree, how unlikely a split at least this uneven is if neither is better."""
    n = wins + losses
    if n == 0:
        return 1.0
    # Exact integer arithmetic: 2.0**n overflows a float past n = 1023 discordant questions.
    tail = Fraction(sum(math.comb(n, k) for k in range(min(wins, losses) + 1)), 2**n)
    return float(min(Fraction(1), 2 * tail))


def paired_comparison(a: Sequence[float], b: Sequence[float], *, seed: int = 0) -> dict[str, Any]:
    """``a`` against ``b``, per-question outcomes of two settings on the same questions in the
    same order: mean difference, its 95 % bootstrap interval, and (for 0/1 outcomes) the exact
    McNemar p-value."""
    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if x.shape != y.shape:
        raise ValueError(f"paired outcomes need the same questions: {x.shape} vs {y.shape}")
    diff = x - y
    result: dict[str, Any] = {
        "n": int(x.size),
        "mean_difference": float(diff.mean()),
        "ci95": list(bootstrap_ci(diff.tolist(), seed=seed)),
    }
    if set(np.unique(np.concatenate([x, y]))) <= {0.0, 1.0}:
        wins, losses = int(((x == 1) & (y == 0)).sum()), int(((x == 0) & (y == 1)).sum())
        result.update(wins=wins, losses=losses, p_value=mcnemar_exact(wins, losses))
    return result


def paired_ratio(
    a: Sequence[float], b: Sequence[float], *, resamples: int = 10_000, level: float = 0.95, seed: int = 0
) -> dict[str, Any]:
    """``mean(a) / mean(b)`` over the same questions, with the percentile-bootstrap interval of
    the ratio (questions resampled together, so what a question does to both stays paired).
    For targets stated as a ratio of means, e.g. "KL at most half of the baseline's"."""
    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if x.shape != y.shape or x.size == 0:
        raise ValueError(f"paired outcomes need the same, non-empty questions: {x.shape} vs {y.shape}")
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, x.size, size=(resamples, x.size))
    ratios = x[idx].mean(axis=1) / np.maximum(y[idx].mean(axis=1), 1e-300)
    tail = (1.0 - level) / 2.0
    low, high = np.quantile(ratios, [tail, 1.0 - tail])
    return {"n": int(x.size), "ratio": float(x.mean() / y.mean()), "ci95": [float(low), float(high)]}
