"""Correlation across (layer, unit) pairs: the paper's r_cv,sh between key-norm CV and max share."""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
from scipy import stats

from common.errors import UserError


def pearson(x: Sequence[float], y: Sequence[float]) -> tuple[float, float]:
    """Pearson r and its two-sided p-value over the pairs where both values are finite.

    Fewer than 3 pairs, or a constant side, has no defined correlation: (nan, nan) rather than an error,
    because a tiny or degenerate model is a legitimate measurement, not bad input.
    """
    return _correlation(stats.pearsonr, x, y)


def spearman(x: Sequence[float], y: Sequence[float]) -> tuple[float, float]:
    """Spearman rank correlation and two-sided p, with the same conventions as :func:`pearson`: the trend
    of a statistic along a continuous brake (e.g. peak max share vs ALiBi slope scale)."""
    return _correlation(stats.spearmanr, x, y)


def _correlation(test, x: Sequence[float], y: Sequence[float]) -> tuple[float, float]:
    x, y = np.asarray(x, dtype=np.float64).ravel(), np.asarray(y, dtype=np.float64).ravel()
    if x.shape != y.shape:
        raise UserError(f"a correlation needs paired values; got {x.size} and {y.size}")
    finite = np.isfinite(x) & np.isfinite(y)
    x, y = x[finite], y[finite]
    if x.size < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return math.nan, math.nan
    result = test(x, y)
    return float(result.statistic), float(result.pvalue)
