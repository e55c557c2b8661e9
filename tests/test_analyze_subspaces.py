"""Attractor-subspace angles (appendix C.6): closed cases, nulls, and the basis-free token-space angle."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from analysis.studies.subspaces import _LayerKeys, random_subspace_angle, sequence_angles
from pair_reference import PairAccumulator
from routers.routing import Routing, RoutingLayer, causal_mask


def routing_of(*layer_keys):
    """A routing record with uniform causal weights around the given ``[batch, units, T, d]`` keys."""
    layers = []
    for keys in layer_keys:
        t = keys.shape[-2]
        mask = causal_mask(t)
        weights = mask.double() / mask.sum(-1, keepdim=True)
        layers.append(RoutingLayer(keys=keys, weights=weights.expand(keys.shape[0], keys.shape[1], t, t), mask=mask))
    return Routing(layers=layers)


def low_rank_keys(rank=4, dim=16, tokens=32, batch=3, seed=0):
    """Keys spanning exactly e_1..e_rank in R^dim (one unit), so their principal subspace is known."""
    g = torch.Generator().manual_seed(seed)
    keys = torch.zeros(batch, 1, tokens, dim, dtype=torch.float64)
    keys[..., :rank] = torch.randn(batch, 1, tokens, rank, generator=g) * torch.arange(rank, 0, -1)
    return keys


def compare(keys_a, keys_b, rank):
    acc = PairAccumulator(rank)
    acc.update(routing_of(keys_a), routing_of(keys_b))
    return acc.compute()[0]


def givens(dim, rank, theta):
    """Rotation by theta in each plane (e_i, e_{rank+i}): every canonical angle of span(e_1..e_rank) is theta."""
    rot = torch.eye(dim, dtype=torch.float64)
    for i in range(rank):
        j = rank + i
        rot[i, i] = rot[j, j] = math.cos(theta)
        rot[j, i], rot[i, j] = math.sin(theta), -math.sin(theta)
    return rot


def test_identical_keys_give_zero_angles_and_zero_ve_difference():
    keys = low_rank_keys()
    row = compare(keys, keys.clone(), rank=4)
    assert row["key_angle"] == pytest.approx(0, abs=1e-3) and row["token_angle"] == pytest.approx(0, abs=1e-3)
    assert row["delta_ve@4"] == 0


def test_keys_in_orthogonal_subspaces_are_ninety_degrees_apart_in_key_space():
    keys = low_rank_keys(rank=4, dim=16)
    moved = keys @ givens(16, 4, math.pi / 2).T  # span(e_1..e_4) -> span(e_5..e_8)
    assert compare(keys, moved, rank=4)["key_angle"] == pytest.approx(90.0, abs=1e-6)


def test_a_known_rotation_gives_its_angle_in_key_space_and_zero_in_token_space():
    keys = low_rank_keys(rank=4, dim=16)
    row = compare(keys, keys @ givens(16, 4, math.radians(30)).T, rank=4)
    assert row["key_angle"] == pytest.approx(30.0, abs=1e-6)
    assert row["token_angle"] == pytest.approx(0.0, abs=1e-4)  # same tokens, same directions: basis-free


def test_random_subspace_null_matches_the_papers_baselines():
    # docs/metrics.md (inferred, r = 8): 72.3 deg (d=64), 77.7 (128), 85.1 (768)
    assert random_subspace_angle(64, 8) == pytest.approx(72.3, abs=0.5)
    assert random_subspace_angle(128, 8) == pytest.approx(77.7, abs=0.5)
    assert random_subspace_angle(768, 8) == pytest.approx(85.1, abs=0.5)
    assert random_subspace_angle(8, 8) == pytest.approx(0.0, abs=1e-5)  # the whole space: identical


def test_unrelated_gaussian_keys_sit_at_the_token_space_null():
    g = torch.Generator().manual_seed(0)
    a, b = (torch.randn(40, 2, 32, 16, generator=g, dtype=torch.float64) for _ in range(2))
    row = compare(a, b, rank=8)
    assert row["token_angle"] == pytest.approx(row["token_angle_null"], abs=1.5)
    assert row["token_angle_null"] == pytest.approx(random_subspace_angle(31, 8))


def test_a_random_rotation_of_the_same_keys_is_chance_in_key_space_but_zero_in_token_space():
    # What separates the two angles: two weight seeds differ (at least) by an arbitrary basis.
    keys = low_rank_keys(rank=8, dim=64, tokens=64, batch=8)
    q = torch.linalg.qr(torch.randn(64, 64, generator=torch.Generator().manual_seed(1), dtype=torch.float64)).Q
    row = compare(keys, keys @ q, rank=8)
    assert row["token_angle"] == pytest.approx(0.0, abs=1e-4)
    assert row["key_angle"] > 55 and row["key_angle_null"] == pytest.approx(72.3, abs=0.5)


def test_angles_from_bases_orthonormalised_once_per_model_are_canonical_angles_to_the_bit():
    from collapse import canonical_angles

    g = torch.Generator().manual_seed(3)
    a, b = torch.randn(2, 7, 40, 5, generator=g, dtype=torch.float64)
    side_a, side_b = _LayerKeys(), _LayerKeys()
    side_a.subspaces = [torch.linalg.qr(a[:4]).Q, torch.linalg.qr(a[4:]).Q]  # per probe batch, as add() keeps them
    side_b.subspaces = [torch.linalg.qr(b[:3]).Q, torch.linalg.qr(b[3:]).Q]
    assert torch.equal(sequence_angles(side_a.orthonormal(), side_b.orthonormal()), canonical_angles(a, b).mean(-1))


@pytest.mark.parametrize("tokens,dim,rank", [(32, 16, 4), (16, 40, 8), (12, 6, 8)])
def test_token_subspace_is_the_svds_left_singular_subspace(tokens, dim, rank):
    from analysis.studies.subspaces import token_subspace
    from collapse import canonical_angles

    g = torch.Generator().manual_seed(4)
    # a decaying spectrum, so the top-rank subspace is well defined
    keys = torch.randn(5, 2, tokens, dim // 2, generator=g, dtype=torch.float64) * torch.linspace(3, 0.2, dim // 2,
                                                                                                 dtype=torch.float64)
    x = keys.transpose(1, 2).reshape(5, tokens, dim)
    x = x - x.mean(dim=-2, keepdim=True)
    want = torch.linalg.svd(x, full_matrices=False).U[..., :rank]
    got = token_subspace(keys.transpose(1, 2).reshape(5, tokens, dim), rank)
    assert got.shape == want.shape
    torch.testing.assert_close(got.transpose(-1, -2) @ got, torch.eye(got.shape[-1], dtype=torch.float64).expand(5, -1, -1))
    assert canonical_angles(got, want).max() < 1e-4  # degrees: the same subspace up to arccos's resolution


def test_one_blas_thread_restores_each_openblas_thread_count():
    from analysis.studies.subspaces import _openblas_controls, one_blas_thread, token_subspace

    token_subspace(torch.randn(2, 16, 8, dtype=torch.float64), 2)  # scipy's LAPACK loaded
    before = [get() for _, get in _openblas_controls()]
    with one_blas_thread():
        assert all(get() == 1 for _, get in _openblas_controls())
    assert [get() for _, get in _openblas_controls()] == before


def seed_runs(root, vocab=32, tokens=16):
    """Four finished runs of a tiny 2-layer Transformer (weight seeds 0/1 x data seeds 0/1, random weights),
    each a run directory with checkpoints/last.ckpt and the one probe.pt: what the seed study reads."""
    from analysis.readers.runs import Run
    from datamodules.probe import TokenProbe
    from routers.transformer import Transformer

    args = {"_target_": "routers.transformer.Transformer", "vocab_size": vocab, "n_layer": 2, "d_model": 32,
            "n_head": 2, "context_length": tokens}
    probe = TokenProbe.from_tokens(torch.randint(0, vocab, (6, tokens), generator=torch.Generator().manual_seed(0)))
    runs = []
    for i, (seed, data_seed) in enumerate([(0, 0), (0, 1), (1, 0), (1, 1)]):
        path = root / str(i)
        (path / "checkpoints").mkdir(parents=True)
        torch.manual_seed(10 + i)
        router = Transformer(**{k: v for k, v in args.items() if k != "_target_"})
        config = {"seed": seed, "data_seed": data_seed, "router": args}
        torch.save({"state_dict": {f"model.{k}": v for k, v in router.state_dict().items()},
                    "hyper_parameters": {"config": config, "router": args}}, path / "checkpoints" / "last.ckpt")
        probe.save(path / "probe.pt")
        runs.append(Run(path=path, config={"seed": seed, "data_seed": data_seed},
                        records=[{"step": 1, "layers": [{"dim": 32}, {"dim": 32}]}]))
    return runs


def test_the_seed_study_gives_the_same_numbers_in_worker_processes_as_in_one(tmp_path):
    """Model passes shared between this process and spawned workers (each at one torch thread) give the rows
    of running them all here, to the bit, and leave no worker process behind."""
    import multiprocessing

    from analysis.studies.seeds import seed_study

    runs = seed_runs(tmp_path)
    serial = seed_study(runs, rank=4, batch_size=4, workers=1)
    pooled = seed_study(runs, rank=4, batch_size=4, workers=3)  # this process and 2 workers, 6 passes
    assert len(serial["rows"]) == 6 * 2  # 6 pairs (2 of each kind) x 2 layers
    assert pooled["rows"] == serial["rows"] and pooled["profiles"] == serial["profiles"]
    assert not multiprocessing.active_children()


def test_a_failing_pass_in_a_worker_is_one_line_and_leaves_no_worker(tmp_path):
    import multiprocessing

    from analysis.studies.seeds import _Pass, measure_passes
    from common.errors import UserError

    runs = seed_runs(tmp_path)
    good = _Pass(str(runs[0].path), str(runs[0].path / "probe.pt"), 4, 4, "good")
    bad = _Pass(str(tmp_path / "gone"), str(runs[0].path / "probe.pt"), 4, 4, "bad")
    with pytest.raises(UserError, match="no checkpoint at .*gone") as error:  # the worker's pass, from the front
        measure_passes([bad, good], workers=2)
    assert "\n" not in str(error.value)
    assert not multiprocessing.active_children()


def seed_rows(trained, untrained, shares, kind="weight"):
    """Hand-made per-(pair, layer) rows of the seed study: ``trained[p][l]`` the token angle of pair p at layer
    l, ``untrained[j][l]`` untrained pair j's, ``shares[run][l]`` each run's final max share (pairs of runs
    0-1, 2-3, ...)."""
    rows = []
    for p, angles in enumerate(trained):
        for layer, angle in enumerate(angles):
            row = {"kind": kind, "run_a": f"r{2 * p}", "run_b": f"r{2 * p + 1}", "layer": layer, "ve@8_a": 0.5,
                   "ve@8_b": 0.52, "delta_ve@8": 0.02, "token_angle": angle, "token_angle_null": 80.0,
                   "key_angle": 85.0, "key_angle_null": 86.0, "max_share_a": shares[2 * p][layer],
                   "max_share_b": shares[2 * p + 1][layer]}
            for space in ("token", "key"):
                values = [u[layer] for u in untrained]
                row.update({f"{space}_angle_untrained_{j}": v for j, v in enumerate(values)})
                row[f"{space}_angle_untrained"] = sum(values) / len(values)
            rows.append(row)
    return rows


def test_seed_direction_reads_concentrating_layers_apart_and_the_untrained_baseline_over_three_pairs():
    from scipy import stats

    from analysis.studies.seeds import concentrating_layers, kind_profiles, statement, summary_rows

    # Three layers; only L2 concentrates. There the trained pairs share direction (40 deg vs untrained ~60);
    # L0 and L1 sit at the untrained level, so the depth mean dilutes the effect.
    trained = [[60.0, 61.0, 40.0], [61.0, 60.0, 41.0], [59.0, 60.5, 39.0], [60.5, 59.5, 40.5]]
    untrained = [[60.0, 60.0, 60.0], [61.0, 59.0, 61.0], [59.0, 61.0, 59.0]]
    shares = [[0.05, 0.1, 0.4]] * 8
    rows = seed_rows(trained, untrained, shares)
    assert concentrating_layers(rows, 0.2) == [2] and concentrating_layers(rows, 0.5) == []
    result = {"rows": rows, "profiles": kind_profiles(rows), "rank": 8, "threshold": 0.2}
    (s,) = summary_rows(result)
    assert s["pairs"] == 4 and s["untrained pairs"] == 3 and s["concentrating layers"] == "L2"
    baseline = [sum(u) / 3 for u in untrained]  # each untrained pair's depth mean: the baseline's replicates
    low, high = stats.t.interval(0.95, 2, loc=np.mean(baseline), scale=stats.sem(baseline))
    assert (s["token untrained low"], s["token untrained high"]) == pytest.approx((low, high))
    depth = [sum(t) / 3 for t in trained]
    ci = stats.ttest_ind(depth, baseline, equal_var=False).confidence_interval(0.95)
    assert s["token angle - untrained"] == pytest.approx(np.mean(depth) - np.mean(baseline))
    assert (s["token angle - untrained low"], s["token angle - untrained high"]) == pytest.approx((ci.low, ci.high))
    assert s["token angle - untrained (conc.)"] == pytest.approx(np.mean([40, 41, 39, 40.5]) - 60.0)
    assert s["token angle - untrained (conc.) high"] < 0 < s["detectable (conc.)"]
    assert s["p perm (conc.)"] == pytest.approx(1 / 35)  # 4 vs 3 fully separated: only the observed one of C(7, 3)
    text = statement(result)
    assert "concentrating layers (L2): 19.9 deg" not in text and "concentrating layers (L2): 40.1 deg" in text
    assert "direction shared beyond what the input imposes; key-space" in text  # at L2, not diluted
    assert "over 3 pairs" in text


def test_seed_direction_without_a_concentrating_layer_says_so():
    from analysis.studies.seeds import kind_profiles, statement, summary_rows

    rows = seed_rows([[60.0, 61.0]] * 3, [[60.0, 60.0]] * 3, [[0.05, 0.1]] * 6)
    result = {"rows": rows, "profiles": kind_profiles(rows), "rank": 8, "threshold": 0.2}
    (s,) = summary_rows(result)
    assert s["concentrating layers"] == "none" and math.isnan(s["token angle - untrained (conc.)"])
    assert "no layer's final max share exceeds 0.2" in statement(result)
