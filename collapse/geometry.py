"""Key geometry: norm stratification (norm-CV), low-rank collapse (VE@r) and its Gaussian null, subspaces.

Every function takes keys as ``[..., n, d]`` (n sources scored by one router unit, d key dimensions) and
reduces the last two axes, so a whole ``[batch, units, n, d]`` block is measured in one call.
Definitions follow docs/metrics.md; docs/metrics.md records the choices made where the paper is silent.
"""
from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch
from torch import Tensor

from common.errors import UserError

# Monte Carlo draws per Gaussian null: the per-draw std of VE@8 at n=128 is <= 0.01, so the mean's
# standard error is <= 0.0006, well inside the paper's 3-decimal ladder.
NULL_TRIALS = 256
_NULL_FLOATS_PER_CHUNK = 2 ** 24  # bounds the Monte Carlo's memory (128 MiB in float64) for large n*d


def _check_keys(keys: Tensor, what: str) -> None:
    if keys.dim() < 2:
        raise UserError(f"{what} needs keys shaped [..., n, d]; got shape {tuple(keys.shape)}")


def norm_cv(keys: Tensor) -> Tensor:
    """Coefficient of variation std/mean of the n key norms, ``[..., n, d] -> [...]``.

    Population std (ddof=0): the n keys are the whole population of one operator, not a sample of it.
    Isotropic Gaussian keys give about 1/sqrt(2d) (docs/metrics.md).
    """
    _check_keys(keys, "norm_cv")
    return cv_of_norms(keys.double().norm(dim=-1))


def cv_of_norms(norms: Tensor) -> Tensor:
    """:func:`norm_cv` from the key norms ``[..., n]`` already taken (the signature reuses them)."""
    return norms.std(dim=-1, correction=0) / norms.mean(dim=-1)


def key_spectrum(keys: Tensor) -> Tensor:
    """Eigenvalues of the centred Gram matrix X_c X_c^T, descending, ``[..., n, d] -> [..., min(n, d)]``.

    These equal the eigenvalues of the double-centred squared-distance matrix -JDJ/2 (JDJ = -2 X_c X_c^T),
    so this is the spectrum the paper's VE@r is read from. Computed on the small side (X_c^T X_c when
    d < n: same nonzero eigenvalues) in float64, because VE divides by the trace and tiny eigenvalues
    of a near-low-rank cloud would otherwise go negative in float32.
    """
    _check_keys(keys, "key_spectrum")
    # contiguous: a head's keys are a strided view of the fused qkv, and strided float64 math is ~3x slower
    x = keys.to(torch.float64, memory_format=torch.contiguous_format)
    x = x - x.mean(dim=-2, keepdim=True)
    n, d = x.shape[-2:]
    gram = x @ x.transpose(-1, -2) if n <= d else x.transpose(-1, -2) @ x
    return torch.linalg.eigvalsh(gram).flip(-1).clamp(min=0)


def _ve_from_spectrum(spectrum: Tensor, rank: int) -> Tensor:
    if not isinstance(rank, int) or rank < 1:
        raise UserError(f"VE rank must be a positive integer; got {rank!r}")
    return spectrum[..., :rank].sum(-1) / spectrum.sum(-1)


def ve_at_rank(keys: Tensor, rank: int) -> Tensor:
    """Variance explained by the top ``rank`` eigenvalues of X_c X_c^T (centred over n), ``[..., n, d] -> [...]``.

    A rank above the number of eigenvalues gives 1; identical keys (zero variance) give NaN.
    """
    return _ve_from_spectrum(key_spectrum(keys), rank)


@lru_cache(maxsize=None)
def _gaussian_ve_curve_mc(n: int, d: int, trials: int, seed: int) -> tuple[float, ...]:
    """Mean cumulative VE curve (ranks 1..min(n, d)) of ``trials`` draws of n x d isotropic Gaussian keys."""
    generator = torch.Generator().manual_seed(seed)
    chunk = max(1, _NULL_FLOATS_PER_CHUNK // (n * d))
    total = torch.zeros(min(n, d), dtype=torch.float64)
    for start in range(0, trials, chunk):
        draws = torch.randn(min(chunk, trials - start), n, d, generator=generator, dtype=torch.float64)
        spectrum = key_spectrum(draws)
        total += (spectrum.cumsum(-1) / spectrum.sum(-1, keepdim=True)).sum(0)
    return tuple((total / trials).tolist())


@lru_cache(maxsize=None)
def _gaussian_ve_mp(n: int, d: int, rank: int) -> float:
    """Marchenko-Pastur limit of VE@rank: the share of the MP law's mass-weighted top rank/p tail.

    Centring leaves n-1 degrees of freedom, so X_c X_c^T has p = min(d, n-1) nonzero eigenvalues whose
    empirical law tends to MP with ratio g = p / max(d, n-1) (mean 1). VE@r is then the mean of the
    eigenvalues above the law's (1 - r/p) quantile, times r/p. The integral uses x = (a+b)/2 + (b-a)/2 cos t,
    which removes the square-root edges of the density so the trapezoid rule converges fast.
    """
    p, big = min(d, n - 1), max(d, n - 1)
    if rank >= p:
        return 1.0
    g = p / big
    a, b = (1 - g ** 0.5) ** 2, (1 + g ** 0.5) ** 2
    t = np.linspace(np.pi, 0.0, 100_001)
    x = (a + b) / 2 + (b - a) / 2 * np.cos(t)
    density_dt = ((b - a) / 2) ** 2 * np.sin(t) ** 2 / (2 * np.pi * g * x)  # f(x) |dx/dt|

    def cumulative(values):
        return np.concatenate([[0.0], np.cumsum((values[1:] + values[:-1]) / 2 * np.abs(np.diff(t)))])

    cdf, first_moment = cumulative(density_dt), cumulative(density_dt * x)
    cdf, first_moment = cdf / cdf[-1], first_moment / cdf[-1]
    return float((first_moment[-1] - np.interp(1 - rank / p, cdf, first_moment)) / first_moment[-1])


def gaussian_null(n: int, d: int, rank: int, method: str = "mc", trials: int = NULL_TRIALS, seed: int = 0) -> float:
    """Expected VE@rank of n isotropic Gaussian keys in d dimensions (docs/metrics.md).

    The observed mean is removed by centring and the scale cancels in the ratio, so the null depends only
    on (n, d). ``method="mc"`` is the paper's simulation (deterministic in ``seed``, cached);
    ``method="mp"`` is the Marchenko-Pastur limit, within 0.002 of "mc" at n=128, d in 64..256.
    """
    if n < 2 or d < 1:
        raise UserError(f"gaussian_null needs n >= 2 sources and d >= 1 dims; got n={n}, d={d}")
    if not isinstance(rank, int) or rank < 1:
        raise UserError(f"VE rank must be a positive integer; got {rank!r}")
    if method == "mc":
        if trials < 1:
            raise UserError(f"gaussian_null needs trials >= 1; got {trials}")
        curve = _gaussian_ve_curve_mc(n, d, trials, seed)
        return curve[min(rank, len(curve)) - 1]
    if method == "mp":
        return _gaussian_ve_mp(n, d, rank)
    raise UserError(f"unknown gaussian_null method {method!r}; choose one of mc, mp")


def canonical_angles(U: Tensor, V: Tensor) -> Tensor:
    """Principal angles in degrees, ascending, between the column spaces of ``U [..., d, r1]`` and ``V [..., d, r2]``.

    Inputs are orthonormalised first (QR), so any spanning set works; singular values of U^T V are clamped
    to [0, 1] before arccos because rounding can push them just above 1 (docs/metrics.md).
    """
    if U.dim() < 2 or V.dim() < 2 or U.shape[-2] != V.shape[-2]:
        raise UserError(f"canonical_angles needs bases [..., d, r] in the same d; got {tuple(U.shape)} and {tuple(V.shape)}")
    qu, qv = torch.linalg.qr(U.double()).Q, torch.linalg.qr(V.double()).Q
    cosines = torch.linalg.svdvals(qu.transpose(-1, -2) @ qv).clamp(0.0, 1.0)
    return torch.rad2deg(torch.arccos(cosines))
