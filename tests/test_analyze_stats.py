"""Across-seed statistics: bootstrap intervals, ordering confidence, trend."""
from __future__ import annotations

import math

import numpy as np
import pytest

from analysis.stats import bootstrap_ci, bootstrap_difference_ci, order_probability, spearman


def test_bootstrap_ci_covers_a_known_mean_at_about_its_level():
    # 200 synthetic experiments of 30 draws from N(3, 1): a 95% interval should contain 3 in ~95% of them
    # (the percentile bootstrap runs a little narrow at n=30, so the band is 0.88..0.99).
    rng = np.random.default_rng(1)
    covered = 0
    for i in range(200):
        mean, low, high = bootstrap_ci(rng.normal(3.0, 1.0, size=30), n_boot=1000, seed=i)
        assert low < mean < high
        covered += low <= 3.0 <= high
    assert 0.88 <= covered / 200 <= 0.99


def test_bootstrap_ci_of_one_value_has_a_mean_but_no_interval():
    mean, low, high = bootstrap_ci([0.3, float("nan")])
    assert mean == 0.3 and math.isnan(low) and math.isnan(high)


def test_difference_ci_excludes_zero_for_separated_arms_and_has_the_right_sign():
    diff, low, high = bootstrap_difference_ci([1.0, 1.1, 0.9, 1.05], [2.0, 2.1, 1.9, 2.05])
    assert diff == pytest.approx(1.0) and 0.8 < low < diff < high < 1.2


def test_order_probability_is_one_for_a_separated_order_and_zero_for_its_reverse():
    groups = [[0.1, 0.12, 0.11], [0.3, 0.31, 0.29], [0.6, 0.62, 0.58]]
    assert order_probability(groups) == 1.0
    assert order_probability(groups[::-1]) == 0.0


def test_order_probabilities_of_two_overlapping_groups_sum_to_one_up_to_ties_and_resampling():
    a, b = [0.1, 0.5, 0.3, 0.2], [0.2, 0.4, 0.35, 0.6]
    forward, backward = order_probability([a, b], seed=3), order_probability([b, a], seed=3)
    assert 0.5 < forward < 0.95 and forward + backward == pytest.approx(1.0, abs=0.03)


def test_spearman_finds_a_monotone_trend_and_ignores_missing_points():
    rho, p = spearman([0, 0.5, 1, 2, 4, float("nan")], [0.3, 0.25, 0.2, 0.1, 0.05, 0.9])
    assert rho == pytest.approx(-1.0) and p < 0.05
