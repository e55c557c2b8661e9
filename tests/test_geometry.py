import math

import pytest
import torch

from collapse import (canonical_angles, gaussian_null, key_spectrum, norm_cv,
                      ve_at_rank)
from common.errors import UserError

PAPER_VE8_NULL = {64: 0.294, 80: 0.262, 128: 0.212, 256: 0.160}  # docs/metrics.md, n = 128


def _gaussian_keys(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize("d", [64, 256])
def test_norm_cv_of_gaussian_keys_is_one_over_sqrt_2d(d):
    cv = norm_cv(_gaussian_keys(64, 128, d)).mean()
    assert abs(cv - 1 / math.sqrt(2 * d)) < 0.05 / math.sqrt(2 * d)


def test_norm_cv_uses_population_std():
    keys = torch.tensor([[1.0, 0.0], [0.0, 3.0]])  # norms 1 and 3: std 1 (ddof=0), mean 2
    assert norm_cv(keys).item() == pytest.approx(0.5)


def test_norm_cv_is_zero_for_keys_on_a_sphere():
    keys = _gaussian_keys(3, 50, 16)
    assert torch.allclose(norm_cv(2.5 * keys / keys.norm(dim=-1, keepdim=True)), torch.zeros(3, dtype=torch.float64), atol=1e-12)


@pytest.mark.parametrize("d", sorted(PAPER_VE8_NULL))
def test_gaussian_null_mc_matches_paper_ladder(d):
    assert abs(gaussian_null(128, d, 8) - PAPER_VE8_NULL[d]) < 0.003


@pytest.mark.parametrize("d", sorted(PAPER_VE8_NULL))
def test_gaussian_null_matches_marchenko_pastur(d):
    for rank in (1, 4, 8):
        assert abs(gaussian_null(128, d, rank, method="mp") - gaussian_null(128, d, rank)) < 0.002


def test_gaussian_keys_ve_matches_gaussian_null():
    # Independent draws (seed 7) against the cached null (seed 0), with a non-zero mean and scale.
    keys = 3.0 * _gaussian_keys(200, 128, 64, seed=7) + 5.0
    assert abs(ve_at_rank(keys, 8).mean().item() - gaussian_null(128, 64, 8)) < 0.002


def test_gaussian_null_rejects_unknown_method():
    with pytest.raises(UserError, match="choose one of mc, mp"):
        gaussian_null(128, 64, 8, method="exact")


def test_ve_of_exact_rank_r_keys_is_one():
    r, n, d = 3, 40, 16
    keys = _gaussian_keys(n, r) @ _gaussian_keys(r, d, seed=1) + _gaussian_keys(1, d, seed=2)  # offset: centred away
    assert ve_at_rank(keys, r).item() == pytest.approx(1.0, abs=1e-12)
    assert ve_at_rank(keys, r - 1).item() < 0.99


@pytest.mark.parametrize("n, d", [(20, 8), (8, 20)])  # both sides of the small-side Gram switch
def test_ve_via_double_centred_distances_equals_svd(n, d):
    keys = _gaussian_keys(n, d) * torch.linspace(0.2, 3.0, d, dtype=torch.float64)
    distances = torch.cdist(keys, keys).square()
    centring = torch.eye(n, dtype=torch.float64) - 1.0 / n
    eigenvalues = torch.linalg.eigvalsh(-centring @ distances @ centring / 2).flip(0)
    singular = torch.linalg.svdvals(keys - keys.mean(0)).square()
    for rank in (1, 2, 5):
        from_distances = (eigenvalues[:rank].sum() / eigenvalues.sum()).item()
        assert ve_at_rank(keys, rank).item() == pytest.approx(from_distances, abs=1e-10)
        assert ve_at_rank(keys, rank).item() == pytest.approx((singular[:rank].sum() / singular.sum()).item(), abs=1e-10)


def test_ve_invariant_to_row_permutation():
    keys = _gaussian_keys(2, 30, 10)
    permuted = keys[:, torch.randperm(30, generator=torch.Generator().manual_seed(3))]
    assert torch.allclose(ve_at_rank(permuted, 4), ve_at_rank(keys, 4), atol=1e-12)


def test_ve_is_batched_over_leading_axes():
    keys = _gaussian_keys(2, 3, 12, 5)
    looped = torch.stack([torch.stack([ve_at_rank(keys[b, u], 2) for u in range(3)]) for b in range(2)])
    assert ve_at_rank(keys, 2).shape == (2, 3)
    assert torch.allclose(ve_at_rank(keys, 2), looped, atol=1e-12)


def test_ve_rank_beyond_spectrum_is_one_and_bad_rank_raises():
    keys = _gaussian_keys(10, 4)
    assert ve_at_rank(keys, 9).item() == pytest.approx(1.0)
    assert key_spectrum(keys).shape == (4,)
    with pytest.raises(UserError, match="positive integer"):
        ve_at_rank(keys, 0)


def test_canonical_angles_of_identical_subspaces_are_zero():
    U = _gaussian_keys(10, 3)
    assert canonical_angles(U, U @ _gaussian_keys(3, 3, seed=1)).tolist() == pytest.approx([0.0] * 3, abs=1e-5)


def test_canonical_angles_of_orthogonal_subspaces_are_ninety():
    eye = torch.eye(6, dtype=torch.float64)
    assert canonical_angles(eye[:, :2], 4.0 * eye[:, 2:5]).tolist() == pytest.approx([90.0, 90.0])


def test_canonical_angles_recover_a_known_rotation():
    theta = 0.3
    e1, e2, e3 = torch.eye(3, dtype=torch.float64)
    rotated = torch.stack([math.cos(theta) * e1 + math.sin(theta) * e3, e2], dim=1)
    angles = canonical_angles(torch.stack([e1, e2], dim=1), rotated)
    assert angles.tolist() == pytest.approx([0.0, math.degrees(theta)], abs=1e-6)
