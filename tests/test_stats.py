"""The statistics hold their promises: an interval's coverage is its level at the n a study
uses, TOST's false-equivalence rate is at most its level at the margin, the power figures are
the rejection rates they claim, and the verdicts follow the tests."""

import math

import numpy as np
import pytest
from scipy import stats as scipy_stats

from initstudy.stats import (ALPHA, LEVEL, detectable, mean_ci, n_to_detect, power, verdict,
                             welch)

DRAWS = 2000  # binomial sd of a 95% coverage estimate: 0.5 points
TOLERANCE = 0.02  # "within a point or two of the nominal level"


@pytest.mark.parametrize("n", [3, 5, 10])
def test_mean_interval_covers_its_level(n):
    rng = np.random.default_rng(n)
    true = 0.985  # a LeNet's accuracy, spread like seeds' (0.1 points)
    covered = [lo <= true <= hi for lo, hi in
               (mean_ci(rng.normal(true, 0.001, n)) for _ in range(DRAWS))]
    assert np.mean(covered) == pytest.approx(LEVEL, abs=TOLERANCE)


def test_an_accuracy_interval_stays_within_0_and_1():
    lo, hi = mean_ci([0.11, 0.60, 0.99])  # a lottery: t alone would reach past 100%
    assert 0 <= lo and hi == 1.0
    assert mean_ci([-5.0, 5.0, 1.0], bounds=(-math.inf, math.inf))[0] < -5


@pytest.mark.parametrize("n_a,n_b,sd_a,sd_b", [(3, 3, 1, 1), (5, 5, 1, 3), (10, 3, 2, 1)])
def test_welch_interval_covers_its_level_with_unequal_spreads(n_a, n_b, sd_a, sd_b):
    rng = np.random.default_rng(n_a * 100 + n_b)
    hits = []
    for _ in range(DRAWS):
        d = welch(rng.normal(0.3, sd_a, n_a), rng.normal(0.0, sd_b, n_b))
        hits.append(d.ci[0] <= 0.3 <= d.ci[1])
    assert np.mean(hits) == pytest.approx(LEVEL, abs=TOLERANCE)


def test_welch_interval_excludes_zero_exactly_when_p_is_below_alpha():
    rng = np.random.default_rng(1)
    for _ in range(200):
        d = welch(rng.normal(0.5, 1, 3), rng.normal(0, 1, 3))
        assert (d.ci[0] > 0 or d.ci[1] < 0) == (d.p < ALPHA)


@pytest.mark.parametrize("n", [3])
def test_tost_declares_equivalence_at_most_alpha_of_the_time_at_the_margin(n):
    rng = np.random.default_rng(7 + n)
    margin = 0.001
    false = [welch(rng.normal(margin, 0.001, n), rng.normal(0, 0.001, n), margin).tost_p < ALPHA
             for _ in range(DRAWS)]
    assert np.mean(false) <= ALPHA + 0.01


def test_tost_shows_equivalence_when_the_difference_is_far_inside_the_margin():
    a = [0.9900, 0.9901, 0.9902, 0.9900, 0.9901]
    b = [0.9901, 0.9900, 0.9902, 0.9901, 0.9900]
    assert welch(a, b, 0.001).tost_p < 1e-6
    assert welch(a, b, 0.00001).tost_p > ALPHA  # the same data, a margin inside the noise


def test_power_is_the_simulated_rejection_rate():
    rng = np.random.default_rng(3)
    n, sd = 5, 1.0
    d = detectable(sd, sd, n, n)
    assert power(d, sd, sd, n, n) == pytest.approx(0.8)
    rejected = [scipy_stats.ttest_ind(rng.normal(d, sd, n), rng.normal(0, sd, n),
                                      equal_var=False).pvalue < ALPHA for _ in range(DRAWS)]
    assert np.mean(rejected) == pytest.approx(0.8, abs=0.03)


def test_n_to_detect_is_the_fewest_runs_with_enough_power():
    n = n_to_detect(0.001, 0.001, 0.0005, alpha=0.0125)
    assert power(0.001, 0.001, 0.0005, n, n, 0.0125) >= 0.8
    assert power(0.001, 0.001, 0.0005, n - 1, n - 1, 0.0125) < 0.8
    assert n_to_detect(0.001, math.nan, 0.001) is None  # unknown spread
    assert math.isnan(detectable(math.nan, 1, 3, 3))


def test_groups_without_spread_take_the_tests_limits():
    chance = [0.1135] * 3
    same = welch(chance, chance, 0.001)
    assert (same.diff, same.p, same.tost_p) == (0, 1, 0)  # identical: equivalent
    apart = welch([0.9] * 3, chance, 0.001)
    assert apart.p == 0 and apart.tost_p == 1
    assert math.isnan(welch([0.9, 0.91], [0.9]).p)  # one run: no test


def test_verdicts_follow_the_adjusted_tests():
    assert verdict(0.003, 0.01, 0.9, 0.001) == "better"
    assert verdict(-0.003, 0.01, 0.9, 0.001) == "worse"
    assert verdict(0.0004, 0.01, 0.01, 0.001) == "better, within ±0.1 points"
    assert verdict(0.0001, 0.6, 0.01, 0.001) == "equivalent within ±0.1 points"
    assert verdict(0.0001, 0.6, 0.2, 0.001) == "inconclusive"
    assert verdict(math.nan, math.nan, math.nan, 0.001) == "inconclusive"

