"""The statistics of a report (docs/statistics.md): Student-t intervals of a mean over seeds,
Welch's test and interval for a difference of means, two one-sided tests (TOST) for equivalence
within a margin, Holm's adjustment, the verdict they add up to, and the power of the design
(the smallest difference it detects, the n that would detect the margin).

Every test and interval comes from scipy; what scipy has not (the power of Welch's test) is the
noncentral t distribution from scipy with the Welch-Satterthwaite degrees of freedom.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from dataclasses import dataclass

import numpy as np

from .config import MARGIN_POINTS

LEVEL = 0.95  # confidence of every interval; tests are two-sided at 1 - LEVEL
ALPHA = 1 - LEVEL
POWER = 0.8  # the power at which a design "detects" a difference
MAX_N = 100_000  # beyond this many seeds per scheme a design is reported as out of reach


@contextlib.contextmanager
def _quiet():
    """scipy warns of precision loss when the runs nearly agree (accuracies equal to the last
    image); the tests are still right there, and a report is not the place for the warning."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        yield


def _clean(values) -> np.ndarray:
    return np.asarray([v for v in values if v is not None and math.isfinite(v)], dtype=float)


def mean_ci(values, level: float = LEVEL,
            bounds: tuple[float, float] = (0.0, 1.0)) -> tuple[float, float]:
    """Student-t interval of the mean over runs (seeds), cut to ``bounds`` (an accuracy lies in
    [0, 1]: the cut drops only values the mean cannot take, so the coverage is unchanged).
    NaNs for fewer than two runs; a zero-width interval at the value when every run gave the
    same number."""
    data = _clean(values)
    if len(data) < 2:
        return math.nan, math.nan
    if np.ptp(data) == 0:
        return float(data[0]), float(data[0])
    from scipy import stats

    with _quiet():
        ci = stats.ttest_1samp(data, data.mean()).confidence_interval(level)
    return float(max(ci.low, bounds[0])), float(min(ci.high, bounds[1]))


@dataclass(frozen=True)
class Difference:
    """mean(a) - mean(b) with Welch's two-sided p and its interval at ``LEVEL``, and TOST's p
    for equivalence within ±``margin``. Where neither group varies, the tests take their
    limits: a difference of exactly zero is p = 1 and equivalent, any other is p = 0."""

    diff: float
    ci: tuple[float, float]
    p: float
    tost_p: float
    margin: float


def welch(a, b, margin: float = MARGIN_POINTS / 100, level: float = LEVEL) -> Difference:
    """Welch's t-test of mean(a) - mean(b) and its interval (scipy's ``ttest_ind`` with
    ``equal_var=False``), and two one-sided Welch tests against ±``margin``. NaN where a group
    has fewer than two runs."""
    a, b = _clean(a), _clean(b)
    diff = float(a.mean() - b.mean()) if len(a) and len(b) else math.nan
    if len(a) < 2 or len(b) < 2:
        return Difference(diff, (math.nan, math.nan), math.nan, math.nan, margin)
    if np.ptp(a) == 0 and np.ptp(b) == 0:
        return Difference(diff, (diff, diff), float(diff == 0),
                          float(abs(diff) >= margin), margin)
    from scipy import stats

    with _quiet():
        test = stats.ttest_ind(a, b, equal_var=False)
        ci = test.confidence_interval(level)
        # H0: diff <= -margin (a shifted up by the margin) and H0: diff >= +margin; TOST's p
        # is the larger of the two one-sided p-values.
        above = stats.ttest_ind(a + margin, b, equal_var=False, alternative="greater").pvalue
        below = stats.ttest_ind(a - margin, b, equal_var=False, alternative="less").pvalue
    return Difference(diff, (float(ci.low), float(ci.high)), float(test.pvalue),
                      float(max(above, below)), margin)


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


def verdict(diff: float, p_holm: float, tost_holm: float, margin: float,
            alpha: float = ALPHA) -> str:
    """*better* / *worse* when Welch's Holm-adjusted p is below ``alpha`` (", within ±margin"
    added when TOST also shows the difference smaller than the margin), *equivalent within
    ±margin* when only TOST's Holm-adjusted p is, else *inconclusive*."""
    within = f"within ±{100 * margin:.2g} points"
    if math.isfinite(p_holm) and p_holm < alpha:
        side = "better" if diff > 0 else "worse"
        return f"{side}, {within}" if math.isfinite(tost_holm) and tost_holm < alpha else side
    if math.isfinite(tost_holm) and tost_holm < alpha:
        return f"equivalent {within}"
    return "inconclusive"


def _welch_df(va: float, vb: float, na: int, nb: int) -> float:
    """Welch-Satterthwaite degrees of freedom from the two variances and sizes."""
    qa, qb = va / na, vb / nb
    return (qa + qb) ** 2 / (qa ** 2 / (na - 1) + qb ** 2 / (nb - 1))


def power(diff: float, sd_a: float, sd_b: float, n_a: int, n_b: int,
          alpha: float = ALPHA) -> float:
    """The chance that a two-sided Welch test at ``alpha`` rejects when the true difference is
    ``diff`` and the spreads are ``sd_a``, ``sd_b`` (noncentral t)."""
    from scipy import stats

    va, vb = sd_a ** 2, sd_b ** 2
    se = math.sqrt(va / n_a + vb / n_b)
    if se == 0:
        return float(diff != 0)
    df = _welch_df(va, vb, n_a, n_b)
    crit = stats.t.ppf(1 - alpha / 2, df)
    nc = abs(diff) / se
    # The far tail (rejecting on the wrong side) is below 1e-10 where scipy returns NaN.
    return float(stats.nct.sf(crit, df, nc) + np.nan_to_num(stats.nct.cdf(-crit, df, nc)))


def detectable(sd_a: float, sd_b: float, n_a: int, n_b: int, alpha: float = ALPHA,
               at: float = POWER) -> float:
    """The smallest difference a two-sided Welch test at ``alpha`` detects with power ``at``
    at these spreads and sizes; NaN where a spread is unknown."""
    if not all(map(math.isfinite, (sd_a, sd_b))) or min(n_a, n_b) < 2:
        return math.nan
    se = math.sqrt(sd_a ** 2 / n_a + sd_b ** 2 / n_b)
    if se == 0:
        return 0.0
    from scipy.optimize import brentq

    gap = lambda d: power(d, sd_a, sd_b, n_a, n_b, alpha) - at
    hi = se
    while gap(hi) < 0:  # power grows with the difference: bracket the root
        hi *= 2
    return float(brentq(gap, 0, hi))


def n_to_detect(diff: float, sd_a: float, sd_b: float, alpha: float = ALPHA,
                at: float = POWER) -> int | None:
    """The fewest runs per scheme (the same in both) at which a two-sided Welch test at
    ``alpha`` detects ``diff`` with power ``at``, at these spreads; None where a spread is
    unknown or more than ``MAX_N`` runs would be needed."""
    if not all(map(math.isfinite, (sd_a, sd_b))) or diff <= 0:
        return None
    enough = lambda n: power(diff, sd_a, sd_b, n, n, alpha) >= at
    lo, hi = 1, 2  # enough(hi) once found; lo is not enough (or below the minimum of 2)
    while not enough(hi):
        lo, hi = hi, 2 * hi
        if hi > MAX_N:
            return None
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if enough(mid) else (mid, hi)
    return hi


def prob_beats(a: list[float], b: list[float]) -> float:
    """P(a run of A beats a run of B): over all pairs, wins plus half the ties (the Mann-Whitney
    U of A, over the number of pairs)."""
    if not a or not b:
        return math.nan
    from scipy import stats

    return float(stats.mannwhitneyu(a, b).statistic) / (len(a) * len(b))
