"""The statistics of a report: bootstrap intervals over seeds, tests against a baseline, and
Holm's adjustment for comparing many schemes with one baseline."""

from __future__ import annotations

import math
import statistics
import warnings

import numpy as np

BOOTSTRAP_RESAMPLES = 10_000
BOOTSTRAP_SEED = 0  # the intervals are the same every time a report is made


def _resampled_means(values: list[float], rng: np.random.Generator) -> np.ndarray:
    data = np.asarray(values, dtype=float)
    return data[rng.integers(0, len(data), (BOOTSTRAP_RESAMPLES, len(data)))].mean(1)


def bootstrap_ci(values: list[float], seed: int = BOOTSTRAP_SEED) -> tuple[float, float]:
    """95% percentile bootstrap interval of the mean, resampling the runs (seeds)."""
    if len(values) < 2:
        return (float(values[0]), float(values[0])) if values else (math.nan, math.nan)
    lo, hi = np.percentile(_resampled_means(values, np.random.default_rng(seed)), [2.5, 97.5])
    return float(lo), float(hi)


def bootstrap_diff_ci(a: list[float], b: list[float],
                      seed: int = BOOTSTRAP_SEED) -> tuple[float, float]:
    """95% bootstrap interval of mean(a) - mean(b), resampling each group's runs."""
    if not a or not b:
        return math.nan, math.nan
    rng = np.random.default_rng(seed)
    diffs = _resampled_means(a, rng) - _resampled_means(b, rng)
    lo, hi = np.percentile(diffs, [2.5, 97.5])
    return float(lo), float(hi)


def prob_beats(a: list[float], b: list[float]) -> float:
    """P(a run of A beats a run of B): over all pairs, wins plus half the ties."""
    if not a or not b:
        return math.nan
    wins = sum((x > y) + 0.5 * (x == y) for x in a for y in b)
    return wins / (len(a) * len(b))


def welch_p(a: list[float], b: list[float]) -> float:
    """Two-sided p-value of Welch's t-test; NaN where it is undefined (fewer than two runs, or
    no variance in either group)."""
    from scipy import stats

    if len(a) < 2 or len(b) < 2 or (statistics.pstdev(a) == 0 and statistics.pstdev(b) == 0):
        return math.nan
    with warnings.catch_warnings():  # one constant group (all at chance) is a valid case
        warnings.simplefilter("ignore", RuntimeWarning)
        return float(stats.ttest_ind(a, b, equal_var=False).pvalue)


def holm(pvalues: list[float]) -> list[float]:
    """Holm's step-down adjustment of a family of p-values (NaNs stay NaN and do not count in
    the family's size): controls the chance of any false rejection at the nominal level."""
    defined = sorted((p, i) for i, p in enumerate(pvalues) if math.isfinite(p))
    adjusted = [math.nan] * len(pvalues)
    running = 0.0
    for rank, (p, i) in enumerate(defined):
        running = max(running, min(1.0, (len(defined) - rank) * p))
        adjusted[i] = running
    return adjusted
