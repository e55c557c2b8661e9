"""Across-seed statistics for the studies: percentile-bootstrap intervals, orderings and trends.

Seeds are the unit of replication: each run contributes one number per statistic, and every interval here
resamples runs (with replacement, within each arm independently). With the 2-5 seeds a study can afford the
intervals are coarse; they say how far the seeds disagree, not a population truth. Non-finite values (an
onset that never happened, a loss that was not logged) are dropped before resampling.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from collapse.stats import spearman  # noqa: F401  (re-exported: the studies read trends with it)
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


def bootstrap_ci(values: Sequence[float], level: float = 0.95, n_boot: int = N_BOOT,
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


def bootstrap_difference_ci(a: Sequence[float], b: Sequence[float], level: float = 0.95, n_boot: int = N_BOOT,
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


def spearman_ci(x: Sequence[float], y: Sequence[float], level: float = 0.95, n_boot: int = N_BOOT,
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
