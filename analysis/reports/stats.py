"""Across-seed statistics for the studies: intervals, tests, detectable effects, orderings and trends.

Seeds are the unit of replication: each run contributes one number per statistic. A comparison of two arms
leads with Student's (Welch's) t-interval of the difference of means and the exact permutation test, which
hold at the 5 seeds a study can afford, and states the smallest effect the design detects (t-test power);
the percentile bootstrap (runs resampled within each arm) stays beside them. docs/statistics.md says what
each one is and why. Non-finite values (an onset that never happened, a loss that was not logged, a run that
never solved its task) are dropped before any of them.
"""
from __future__ import annotations

import itertools
import math
from typing import Sequence

import numpy as np

from collapse.stats import spearman  # noqa: F401  (re-exported: the studies read trends with it)
from common.constants import LEVEL
from common.errors import UserError

N_BOOT = 4000  # resamples: the Monte Carlo error of a 95% percentile bound is then well under its width


def nanmean(values: Sequence[float]) -> float:
    """Mean of the values that are not NaN (a layer or a run that was not measured); NaN when none are."""
    kept = [v for v in values if not math.isnan(v)]
    return sum(kept) / len(kept) if kept else math.nan


def _finite(values: Sequence[float]) -> np.ndarray:
    x = np.asarray(values, dtype=np.float64).ravel()
    return x[np.isfinite(x)]


def _resampled_means(x: np.ndarray, n_boot: int, rng: np.random.Generator) -> np.ndarray:
    return x[rng.integers(0, x.size, size=(n_boot, x.size))].mean(axis=1)


def _check_level(level: float) -> None:
    if not 0 < level < 1:
        raise UserError(f"confidence level must be in (0, 1); got {level}, e.g. level=0.95")


def bootstrap_ci(values: Sequence[float], level: float = LEVEL, n_boot: int = N_BOOT,
                 seed: int = 0) -> tuple[float, float, float]:
    """(mean, low, high): the sample mean and its percentile-bootstrap interval.

    One finite value has a mean but no spread: the interval is (nan, nan). No finite value: all nan.
    """
    _check_level(level)
    x = _finite(values)
    if x.size == 0:
        return math.nan, math.nan, math.nan
    if x.size == 1:
        return float(x[0]), math.nan, math.nan
    means = _resampled_means(x, n_boot, np.random.default_rng(seed))
    alpha = (1 - level) / 2
    low, high = np.quantile(means, [alpha, 1 - alpha])
    return float(x.mean()), float(low), float(high)


def bootstrap_difference_ci(a: Sequence[float], b: Sequence[float], level: float = LEVEL, n_boot: int = N_BOOT,
                            seed: int = 0) -> tuple[float, float, float]:
    """(mean(b) - mean(a), low, high), resampling the two arms independently."""
    _check_level(level)
    x, y = _finite(a), _finite(b)
    if x.size == 0 or y.size == 0:
        return math.nan, math.nan, math.nan
    if x.size == 1 and y.size == 1:
        return float(y[0] - x[0]), math.nan, math.nan
    rng = np.random.default_rng(seed)
    diffs = _resampled_means(y, n_boot, rng) - _resampled_means(x, n_boot, rng)
    alpha = (1 - level) / 2
    low, high = np.quantile(diffs, [alpha, 1 - alpha])
    return float(y.mean() - x.mean()), float(low), float(high)


def spearman_ci(x: Sequence[float], y: Sequence[float], level: float = LEVEL, n_boot: int = N_BOOT,
                seed: int = 0) -> tuple[float, float]:
    """Percentile-bootstrap interval of Spearman's rho between ``x`` (an arm's value, e.g. the ALiBi slope
    scale) and ``y``, resampling the runs within each value of ``x``, as every interval here resamples seeds
    within arms. (nan, nan) with fewer than 3 finite pairs."""
    from scipy.stats import rankdata

    _check_level(level)
    x, y = np.asarray(x, dtype=np.float64).ravel(), np.asarray(y, dtype=np.float64).ravel()
    keep = np.isfinite(x) & np.isfinite(y)
    x, y = x[keep], y[keep]
    if x.size < 3:
        return math.nan, math.nan
    rng = np.random.default_rng(seed)
    index = np.concatenate([rng.choice(np.flatnonzero(x == v), size=(n_boot, int((x == v).sum())))
                            for v in np.unique(x)], axis=1)
    rx, ry = rankdata(x[index], axis=1), rankdata(y[index], axis=1)
    rx, ry = rx - rx.mean(1, keepdims=True), ry - ry.mean(1, keepdims=True)
    norm = np.sqrt((rx ** 2).sum(1) * (ry ** 2).sum(1))
    with np.errstate(invalid="ignore", divide="ignore"):
        rho = np.where(norm > 0, (rx * ry).sum(1) / norm, np.nan)  # a resample with constant y has no rho
    if np.isnan(rho).all():
        return math.nan, math.nan
    alpha = (1 - level) / 2
    low, high = np.nanquantile(rho, [alpha, 1 - alpha])
    return float(low), float(high)


def order_probability(groups: Sequence[Sequence[float]], n_boot: int = N_BOOT, seed: int = 0) -> float:
    """Share of bootstrap resamples in which the group means are strictly increasing in the given order.

    The confidence behind a predicted ordering such as onset(NoPE) < onset(RoPE) < onset(ALiBi): each
    group is resampled on its own, so a group of one run contributes its value with no spread. nan when a
    group has no finite value.
    """
    arrays = [_finite(g) for g in groups]
    if len(arrays) < 2:
        raise UserError(f"an ordering needs at least two groups; got {len(arrays)}")
    if any(a.size == 0 for a in arrays):
        return math.nan
    rng = np.random.default_rng(seed)
    means = np.stack([_resampled_means(a, n_boot, rng) for a in arrays])
    return float(np.all(np.diff(means, axis=0) > 0, axis=0).mean())


# --- intervals and tests that hold at n = 5 --------------------------------------------------------------------
# The percentile bootstrap of a mean runs narrow at n = 3-5 (it cannot see beyond the values it has: at n = 3
# its 95% interval covers the mean in roughly 80% of experiments). Student's t is exact for normal data at any
# n, and the permutation test is exact with no distributional assumption; the studies lead with them.

ALPHA = 0.05       # two-sided size of every test and of the detectable effect
POWER = 0.8        # the power at which the design's detectable effect is stated
EXACT_LIMIT = 20_000  # relabelings enumerated exactly up to this many (5 vs 5: 252; 8 vs 8: 12,870)
N_PERM = 20_000    # Monte Carlo relabelings above it: the p-value's standard error is then <= 0.0035


def t_interval(values: Sequence[float], level: float = LEVEL) -> tuple[float, float, float]:
    """(mean, low, high): Student's t-interval of the mean, mean +- t_{n-1} s / sqrt(n). nan bounds below 2 values."""
    from scipy.stats import t

    x = _finite(values)
    _check_level(level)
    if x.size == 0:
        return math.nan, math.nan, math.nan
    mean = float(x.mean())
    if x.size < 2:
        return mean, math.nan, math.nan
    half = float(t.ppf((1 + level) / 2, x.size - 1)) * float(x.std(ddof=1)) / math.sqrt(x.size)
    return mean, mean - half, mean + half


def welch_df(a: np.ndarray, b: np.ndarray) -> float:
    """Welch-Satterthwaite degrees of freedom of mean(b) - mean(a) (arms with unequal spread)."""
    va, vb = a.var(ddof=1) / a.size, b.var(ddof=1) / b.size
    return float((va + vb) ** 2 / (va ** 2 / (a.size - 1) + vb ** 2 / (b.size - 1)))


def welch_interval(a: Sequence[float], b: Sequence[float], level: float = LEVEL) -> tuple[float, float, float]:
    """(mean(b) - mean(a), low, high): Welch's t-interval of a difference of two arm means. Both arms need 2
    finite values; arms with no spread at all give the zero-width interval at the difference (nothing varied)."""
    from scipy.stats import t

    x, y = _finite(a), _finite(b)
    _check_level(level)
    if x.size == 0 or y.size == 0:
        return math.nan, math.nan, math.nan
    diff = float(y.mean() - x.mean())
    if x.size < 2 or y.size < 2:
        return diff, math.nan, math.nan
    se = math.sqrt(x.var(ddof=1) / x.size + y.var(ddof=1) / y.size)
    if se == 0:
        return diff, diff, diff
    half = float(t.ppf((1 + level) / 2, welch_df(x, y))) * se
    return diff, diff - half, diff + half


def permutation_p(a: Sequence[float], b: Sequence[float], exact_limit: int = EXACT_LIMIT, n_perm: int = N_PERM,
                  seed: int = 0) -> float:
    """Two-sided permutation p-value of mean(b) - mean(a): the share of relabelings of the pooled runs into arms
    of the same sizes whose |difference| is at least the observed one. Every relabeling is enumerated when there
    are at most ``exact_limit`` (exact); otherwise ``n_perm`` random ones, p = (1 + hits) / (1 + n_perm). nan
    when an arm has no finite value. At 3 vs 3 the smallest possible p is 2/20 = 0.1; at 5 vs 5, 2/252."""
    x, y = _finite(a), _finite(b)
    if x.size == 0 or y.size == 0:
        return math.nan
    pooled, n = np.concatenate([x, y]), x.size + y.size
    observed = abs(y.mean() - x.mean())
    tolerance = 1e-12 * max(1.0, float(np.abs(pooled).max()))  # ties in floating point count as ties
    if math.comb(n, y.size) <= exact_limit:
        index = np.array(list(itertools.combinations(range(n), y.size)), dtype=np.int64)
        hits = _relabeled_hits(pooled, index, observed, tolerance)
        return hits / len(index)
    rng = np.random.default_rng(seed)
    index = np.argsort(rng.random((n_perm, n)), axis=1)[:, :y.size]
    return (1 + _relabeled_hits(pooled, index, observed, tolerance)) / (1 + n_perm)


def _relabeled_hits(pooled: np.ndarray, b_index: np.ndarray, observed: float, tolerance: float) -> int:
    """How many relabelings (rows of ``b_index``: the runs called arm b) differ at least as much as observed."""
    b_sum = pooled[b_index].sum(axis=1)
    n_b, n_a = b_index.shape[1], pooled.size - b_index.shape[1]
    diffs = b_sum / n_b - (pooled.sum() - b_sum) / n_a
    return int((np.abs(diffs) >= observed - tolerance).sum())


def pooled_sd(a: Sequence[float], b: Sequence[float]) -> float:
    """The two arms' pooled standard deviation (nan below 3 finite values in all, or an arm without one)."""
    x, y = _finite(a), _finite(b)
    if x.size == 0 or y.size == 0 or x.size + y.size < 3:
        return math.nan
    ss = ((x - x.mean()) ** 2).sum() + ((y - y.mean()) ** 2).sum()
    return float(math.sqrt(ss / (x.size + y.size - 2)))


def hedges_g(a: Sequence[float], b: Sequence[float]) -> float:
    """Standardised effect of b over a: (mean(b) - mean(a)) / pooled sd, times Hedges' small-sample correction
    J = 1 - 3 / (4 (n_a + n_b) - 9) (Cohen's d overstates the effect at small n). inf for separated arms with no
    spread; nan without a pooled sd."""
    x, y = _finite(a), _finite(b)
    sd = pooled_sd(x, y)
    if math.isnan(sd):
        return math.nan
    diff = float(y.mean() - x.mean())
    if sd == 0:
        return 0.0 if diff == 0 else math.copysign(math.inf, diff)
    return diff / sd * (1 - 3 / (4 * (x.size + y.size) - 9))


def _two_sided_power(ncp: float, df: int, alpha: float) -> float:
    """P(|T| > t_{1-alpha/2, df}) for T ~ noncentral t(df, ncp): a two-sided t-test's power."""
    from scipy.stats import nct, t

    critical = float(t.ppf(1 - alpha / 2, df))
    tails = (float(nct.sf(critical, df, ncp)), float(nct.sf(critical, df, -ncp)))  # the two rejection tails
    return sum(p for p in tails if not math.isnan(p))  # scipy's far tail can be nan where it is ~0


def _smallest_detectable(df: int, scale: float, alpha: float, power: float) -> float:
    """The effect delta whose t-test (noncentral t, ncp = delta / scale) has the given power: the exact root,
    searched around its familiar approximation (t_{1-alpha/2,df} + t_{power,df}) scale, within a few percent."""
    from scipy.optimize import brentq
    from scipy.stats import t

    guess = (float(t.ppf(1 - alpha / 2, df)) + float(t.ppf(power, df))) * scale
    return float(brentq(lambda d: _two_sided_power(d / scale, df, alpha) - power, 0.5 * guess, 2 * guess,
                        xtol=1e-12 * guess))


def t_test_power(effect: float, n_a: int, n_b: int, sd: float, alpha: float = ALPHA) -> float:
    """Power of the two-sided two-sample t-test (equal variances) to detect a true difference ``effect``:
    P(|T| > t_{1-alpha/2, df}) with T ~ noncentral t(df = n_a + n_b - 2, ncp = effect / (sd sqrt(1/n_a + 1/n_b)))."""
    return _two_sided_power(effect / (sd * math.sqrt(1 / n_a + 1 / n_b)), n_a + n_b - 2, alpha)


def min_detectable_effect(n_a: int, n_b: int, sd: float, alpha: float = ALPHA, power: float = POWER) -> float:
    """The smallest true difference of arm means the design detects with probability ``power`` by a two-sided
    t-test at ``alpha``: the root of t_test_power(delta) = power (noncentral t, exact). nan with fewer than 2
    runs per arm or no sd; 0 when the runs do not vary."""
    if n_a < 2 or n_b < 2 or not math.isfinite(sd):
        return math.nan
    if sd == 0:
        return 0.0
    return _smallest_detectable(n_a + n_b - 2, sd * math.sqrt(1 / n_a + 1 / n_b), alpha, power)


def compare_arms(a: Sequence[float], b: Sequence[float], level: float = LEVEL) -> dict:
    """Everything a verdict states about arm b against arm a: runs with a value, the difference of means with
    its Welch t-interval (primary) and bootstrap interval (beside it), Hedges' g, the exact permutation p and
    the detectable effect of this design (``mde``, at the arms' n and pooled sd)."""
    x, y = _finite(a), _finite(b)
    diff, low, high = welch_interval(x, y, level)
    _, boot_low, boot_high = bootstrap_difference_ci(x, y, level)
    return {"n_a": int(x.size), "n_b": int(y.size), "difference": diff, "low": low, "high": high,
            "boot_low": boot_low, "boot_high": boot_high, "hedges_g": hedges_g(x, y), "p_perm": permutation_p(x, y),
            "mde": min_detectable_effect(x.size, y.size, pooled_sd(x, y))}


def paired_power(effect: float, n: int, sd: float, alpha: float = ALPHA) -> float:
    """Power of the two-sided paired (one-sample) t-test on ``n`` differences of spread ``sd`` to detect a
    true mean difference ``effect``: noncentral t with df = n - 1, ncp = effect sqrt(n) / sd."""
    return _two_sided_power(effect * math.sqrt(n) / sd, n - 1, alpha)


def paired_mde(n: int, sd: float, alpha: float = ALPHA, power: float = POWER) -> float:
    """The smallest true mean difference a paired t-test on ``n`` differences of spread ``sd`` detects with
    probability ``power`` (root of paired_power). nan below 2 pairs or with no sd; 0 when they do not vary."""
    if n < 2 or not math.isfinite(sd):
        return math.nan
    if sd == 0:
        return 0.0
    return _smallest_detectable(n - 1, sd / math.sqrt(n), alpha, power)


def sign_flip_p(differences: Sequence[float]) -> float:
    """Exact two-sided sign-flip (paired permutation) p-value of the mean difference: the share of the 2^n sign
    assignments whose |mean| is at least the observed one. With 3 pairs the smallest p is 2/8 = 0.25; with 5,
    2/32 = 0.0625. nan without a finite difference."""
    d = _finite(differences)
    if d.size == 0:
        return math.nan
    signs = np.array(list(itertools.product((1.0, -1.0), repeat=d.size)))
    observed, tolerance = abs(d.mean()), 1e-12 * max(1.0, float(np.abs(d).max()))
    return float((np.abs(signs @ d / d.size) >= observed - tolerance).mean())


def compare_paired(reference: Sequence[float], treated: Sequence[float], level: float = LEVEL) -> dict:
    """A within-model comparison (the same checkpoint read with and without an intervention), paired by run:
    the mean of treated - reference with its t-interval, the exact sign-flip p and the paired design's
    detectable effect. Pairs with a non-finite side are dropped."""
    a, b = np.asarray(reference, dtype=float), np.asarray(treated, dtype=float)
    if a.shape != b.shape:
        raise UserError(f"paired comparison needs one treated value per reference value; got {a.size} and {b.size}")
    d = (b - a)[np.isfinite(a) & np.isfinite(b)]
    mean, low, high = t_interval(d, level)
    sd = float(d.std(ddof=1)) if d.size > 1 else math.nan
    return {"n": int(d.size), "difference": mean, "low": low, "high": high, "p_sign_flip": sign_flip_p(d),
            "mde": paired_mde(int(d.size), sd)}


def verdict_word(low: float, high: float, mde: float, expected: int | None = None) -> str:
    """The verdict on one difference, from its t-interval: ``expected`` +1 / -1 (the prediction's sign): the
    interval on that side of zero "supports", on the other "contradicts"; None (nothing predicted): "higher" /
    "lower". An interval that spans zero is "inconclusive", with the effect the design could have detected."""
    if math.isnan(low) or math.isnan(high):
        return "undetermined (no interval: fewer than 2 runs with a value in an arm)"
    side = +1 if low > 0 else -1 if high < 0 else 0
    if side == 0:
        return f"inconclusive (interval spans 0; detectable >= {_g(mde)})"
    if expected is None:
        return "higher" if side > 0 else "lower"
    return "supports" if side == expected else "contradicts"


def _g(value: float) -> str:
    return "-" if math.isnan(value) else f"{value:.3g}"


def spearman_interval(x: Sequence[float], y: Sequence[float], level: float = LEVEL) -> tuple[float, float]:
    """Interval of Spearman's rho by Fisher's z with Fieller et al.'s (1957) variance 1.06 / (n - 3): the
    closed-form counterpart of spearman_ci's bootstrap. (nan, nan) below 4 finite pairs or at |rho| = 1."""
    from scipy.stats import norm

    rho, _ = spearman(x, y)
    n = int(np.sum(np.isfinite(np.asarray(x, float)) & np.isfinite(np.asarray(y, float))))
    if n < 4 or not math.isfinite(rho):
        return math.nan, math.nan
    if abs(rho) == 1:  # a perfect ranking: z is infinite, the interval collapses onto it
        return rho, rho
    half = float(norm.ppf((1 + level) / 2)) * math.sqrt(1.06 / (n - 3))
    z = math.atanh(rho)
    return math.tanh(z - half), math.tanh(z + half)


def min_detectable_rho(n: int, alpha: float = ALPHA, power: float = POWER) -> float:
    """The smallest |Spearman rho| n runs detect with probability ``power`` (two-sided, ``alpha``), by the same
    Fisher-z approximation: tanh((z_{1-alpha/2} + z_power) sqrt(1.06 / (n - 3))). nan below 4 runs."""
    from scipy.stats import norm

    if n < 4:
        return math.nan
    return math.tanh((float(norm.ppf(1 - alpha / 2)) + float(norm.ppf(power))) * math.sqrt(1.06 / (n - 3)))
