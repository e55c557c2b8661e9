"""Across-seed statistics: bootstrap intervals, ordering confidence, trend."""
from __future__ import annotations

import math

import numpy as np
import pytest

from analysis.reports.stats import bootstrap_ci, bootstrap_difference_ci, order_probability, spearman


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


# --- intervals and tests that hold at n = 5 (docs/statistics.md) ------------------------------------------------

A5, B5 = [1.0, 1.1, 0.9, 1.05, 0.97], [1.2, 1.3, 1.1, 1.25, 1.4]


def test_t_interval_is_scipys_student_t_interval():
    from scipy import stats

    from analysis.reports.stats import t_interval

    mean, low, high = t_interval(A5 + [float("nan")], level=0.9)
    expected = stats.t.interval(0.9, 4, loc=np.mean(A5), scale=stats.sem(A5))
    assert mean == pytest.approx(np.mean(A5)) and (low, high) == pytest.approx(expected, rel=1e-12)
    assert all(math.isnan(v) for v in t_interval([0.3])[1:])


def test_t_interval_covers_at_its_level_at_n_3_where_the_bootstrap_runs_narrow():
    from analysis.reports.stats import t_interval

    rng = np.random.default_rng(7)
    t_hits = boot_hits = 0
    for i in range(400):
        x = rng.normal(0.0, 1.0, size=3)
        _, low, high = t_interval(x)
        t_hits += low <= 0 <= high
        _, low, high = bootstrap_ci(x, n_boot=500, seed=i)
        boot_hits += low <= 0 <= high
    assert 0.92 <= t_hits / 400 <= 0.98 and boot_hits / 400 < 0.85


def test_welch_interval_is_scipys_welch_test_inverted():
    from scipy import stats

    from analysis.reports.stats import welch_interval

    a, b = A5, [1.2, 1.9, 0.7, 1.25, 1.4, 1.6]  # unequal sizes and spreads
    diff, low, high = welch_interval(a, b)
    ci = stats.ttest_ind(b, a, equal_var=False).confidence_interval(0.95)
    assert diff == pytest.approx(np.mean(b) - np.mean(a)) and (low, high) == pytest.approx((ci.low, ci.high), rel=1e-10)


def test_permutation_p_at_5_vs_5_is_the_brute_force_count_over_all_252_relabelings():
    import itertools

    from analysis.reports.stats import permutation_p

    pooled = A5 + B5
    observed = abs(np.mean(B5) - np.mean(A5))
    hits = 0
    for chosen in itertools.combinations(range(10), 5):
        b = [pooled[i] for i in chosen]
        a = [pooled[i] for i in range(10) if i not in chosen]
        hits += abs(np.mean(b) - np.mean(a)) >= observed - 1e-12
    assert permutation_p(A5, B5) == hits / 252
    assert permutation_p([1, 2, 3, 4, 5], [6, 7, 8, 9, 10]) == 2 / 252  # fully separated: the smallest p at 5 vs 5
    assert permutation_p([1, 2, 3], [4, 5, 6]) == pytest.approx(0.1)  # at 3 vs 3 no test can reach 0.05


def test_permutation_p_above_the_exact_limit_is_monte_carlo_close_to_the_exact_value():
    from analysis.reports.stats import permutation_p

    rng = np.random.default_rng(3)
    a, b = rng.normal(0, 1, 7), rng.normal(0.8, 1, 7)  # C(14, 7) = 3432 relabelings
    exact = permutation_p(a, b)
    sampled = permutation_p(a, b, exact_limit=100, n_perm=20_000)
    assert sampled == pytest.approx(exact, abs=0.015) and sampled > 0


def test_minimum_detectable_effect_solves_the_power_equation_of_scipys_noncentral_t():
    from scipy import stats

    from analysis.reports.stats import min_detectable_effect

    for n_a, n_b, sd in ((5, 5, 0.04), (3, 3, 1.0), (5, 8, 2.5)):
        mde = min_detectable_effect(n_a, n_b, sd)
        df, ncp = n_a + n_b - 2, mde / (sd * math.sqrt(1 / n_a + 1 / n_b))
        critical = stats.t.ppf(0.975, df)
        power = stats.nct.sf(critical, df, ncp) + stats.nct.cdf(-critical, df, ncp)
        assert power == pytest.approx(0.8, abs=1e-9)
        approx = (stats.t.ppf(0.975, df) + stats.t.ppf(0.8, df)) * sd * math.sqrt(1 / n_a + 1 / n_b)
        assert mde == pytest.approx(approx, rel=0.08)  # the textbook formula is close, not exact
    assert min_detectable_effect(5, 5, 1.0) == pytest.approx(2.024, abs=1e-3)  # ~2 sd at 5 seeds per arm
    assert math.isnan(min_detectable_effect(1, 5, 1.0)) and min_detectable_effect(5, 5, 0.0) == 0.0


def test_hedges_g_is_the_pooled_sd_difference_with_the_small_sample_correction():
    from analysis.reports.stats import hedges_g

    sa, sb = np.std(A5, ddof=1), np.std(B5, ddof=1)
    pooled = math.sqrt((4 * sa ** 2 + 4 * sb ** 2) / 8)
    assert hedges_g(A5, B5) == pytest.approx((np.mean(B5) - np.mean(A5)) / pooled * (1 - 3 / 31))
    assert hedges_g(B5, A5) == pytest.approx(-hedges_g(A5, B5))


def test_verdict_word_reads_the_t_interval_against_the_prediction():
    from analysis.reports.stats import compare_arms, verdict_word

    c = compare_arms(A5, B5)
    assert c["low"] > 0 and verdict_word(c["low"], c["high"], c["mde"], +1) == "supports"
    assert verdict_word(c["low"], c["high"], c["mde"], -1) == "contradicts"
    assert verdict_word(c["low"], c["high"], c["mde"]) == "higher"
    overlap = compare_arms(A5, [0.95, 1.05, 1.0, 1.1, 0.9])
    assert verdict_word(overlap["low"], overlap["high"], overlap["mde"], +1) == \
        f"inconclusive (interval spans 0; detectable >= {overlap['mde']:.3g})"
    assert c["boot_low"] > c["low"] and c["boot_high"] < c["high"]  # the bootstrap beside it, narrower at n = 5
    assert c["n_a"] == c["n_b"] == 5 and c["p_perm"] == pytest.approx(4 / 252)


def test_spearman_fisher_interval_and_detectable_rho_follow_their_closed_forms():
    from scipy import stats

    from analysis.reports.stats import min_detectable_rho, spearman_interval

    x, y = [0, 1, 2, 3, 4, 5, 6, 7], [0.1, 0.3, 0.2, 0.5, 0.4, 0.7, 0.6, 0.9]
    rho = stats.spearmanr(x, y).statistic
    half = stats.norm.ppf(0.975) * math.sqrt(1.06 / 5)
    z = math.atanh(rho)
    assert spearman_interval(x, y) == pytest.approx((math.tanh(z - half), math.tanh(z + half)))
    mdr = min_detectable_rho(30)
    z = math.atanh(mdr) / math.sqrt(1.06 / 27)  # power of the z-test at rho = mdr is 0.8
    assert stats.norm.sf(stats.norm.ppf(0.975) - z) == pytest.approx(0.8, abs=1e-3)
