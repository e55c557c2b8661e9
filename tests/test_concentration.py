import math

import pytest
import torch

from collapse import (causal_uniform_share, completion_layer, max_share, max_share_sparse, onset_layer,
                      uniform_max_share, uniform_max_share_sparse)
from common.errors import UserError


def _causal_uniform(n):
    mask = torch.ones(n, n, dtype=torch.bool).tril()
    return mask / mask.sum(-1, keepdim=True), mask


def test_uniform_routing_gives_one_over_sources():
    shares = max_share(torch.full((2, 3, 16, 16), 1 / 16))
    assert shares.shape == (2, 3)
    assert shares.flatten().tolist() == pytest.approx([1 / 16] * 6)


def test_causal_uniform_routing_gives_harmonic_share():
    weights, mask = _causal_uniform(128)
    harmonic = sum(1 / k for k in range(1, 129))  # source 0 receives 1/(i+1) from every query i
    assert max_share(weights, mask).item() == pytest.approx(harmonic / 128)
    assert causal_uniform_share(128) == pytest.approx(0.0424, abs=5e-5)
    assert uniform_max_share(mask, 128) == pytest.approx(causal_uniform_share(128))


def test_exposure_variant_of_causal_uniform_is_uniform():
    weights, mask = _causal_uniform(32)
    assert max_share(weights, mask, exposure=True).item() == pytest.approx(1 / 32)


def test_exposure_keeps_a_sink_and_is_neutral_without_mask():
    weights, mask = _causal_uniform(8)
    sink = torch.zeros(8, 8)
    sink[:, 0] = 1.0
    assert max_share(sink, mask, exposure=True).item() == pytest.approx(1.0)
    assert max_share(weights, exposure=True).item() == pytest.approx(max_share(weights).item())


def test_one_hot_sink_column_gives_one():
    weights = torch.zeros(4, 10, 10)
    weights[..., 3] = 1.0
    assert max_share(weights).tolist() == pytest.approx([1.0] * 4)


def test_signed_and_unnormalised_operators_use_magnitudes():
    weights = torch.rand(5, 6, generator=torch.Generator().manual_seed(0))
    signs = torch.where(torch.rand(5, 6, generator=torch.Generator().manual_seed(1)) > 0.5, 1.0, -1.0)
    assert max_share(7.0 * signs * weights).item() == pytest.approx(max_share(weights).item())
    shares = weights.sum(0) / weights.sum()
    assert max_share(weights).item() == pytest.approx(shares.max().item())


def test_mask_zeroes_invisible_entries():
    weights = torch.ones(4, 4)
    _, mask = _causal_uniform(4)
    assert max_share(weights, mask).item() == pytest.approx(4 / 10)  # column 0 gets 4 of the 10 visible


def test_sparse_max_share_equals_dense_on_a_small_graph():
    generator = torch.Generator().manual_seed(0)
    n, units = 7, 3
    adjacency = (torch.rand(n, n, generator=generator) < 0.4) | torch.eye(n, dtype=torch.bool)  # [target, source]
    target, source = adjacency.nonzero(as_tuple=True)
    logits = torch.randn(len(target), units, generator=generator)
    dense_logits = torch.full((units, n, n), -math.inf)
    dense_logits[:, target, source] = logits.T
    dense = dense_logits.softmax(-1)  # softmax over each target's in-edges
    edge_index, edge_weight = torch.stack([source, target]), dense[:, target, source].T
    assert torch.allclose(max_share_sparse(edge_index, edge_weight, n), max_share(dense, adjacency))
    assert torch.allclose(max_share_sparse(edge_index, edge_weight, n, exposure=True),
                          max_share(dense, adjacency, exposure=True))
    uniform = adjacency / adjacency.sum(-1, keepdim=True)
    assert uniform_max_share_sparse(edge_index, n) == pytest.approx(max_share(uniform, adjacency).item())


def test_sparse_rejects_edges_beyond_num_nodes():
    with pytest.raises(UserError, match="num_nodes"):
        max_share_sparse(torch.tensor([[0, 5], [1, 2]]), torch.ones(2, 1), num_nodes=3)


def test_onset_and_completion_are_first_strict_crossings():
    curve = [0.05, 0.20, 0.31, 0.5, 0.62, 0.4]
    assert onset_layer(curve) == 2  # 0.20 itself does not cross: "exceeds 0.20"
    assert completion_layer(curve) == 4
    assert onset_layer(torch.tensor(curve), threshold=0.04) == 0


def test_onset_never_is_none_and_nan_never_crosses():
    assert onset_layer([0.04, 0.11, 0.09]) is None
    assert completion_layer([0.3, 0.45]) is None
    assert onset_layer([math.nan, 0.3]) == 1


def test_bad_inputs_raise_user_error():
    with pytest.raises(UserError, match="bool"):
        max_share(torch.ones(3, 3), torch.ones(3, 3))
    with pytest.raises(UserError, match="positive integer"):
        causal_uniform_share(0)
    with pytest.raises(UserError, match="1-D"):
        onset_layer(torch.zeros(2, 3))


def test_one_pass_variants_equal_the_separate_definitions():
    from collapse import max_share_variants

    weights = torch.rand(3, 5, 16, 16)
    mask = torch.ones(16, 16, dtype=torch.bool).tril()
    plain, exposed, ex0 = max_share_variants(weights, mask)
    torch.testing.assert_close(plain, max_share(weights, mask))
    torch.testing.assert_close(exposed, max_share(weights, mask, exposure=True))
    torch.testing.assert_close(ex0, max_share(weights[..., 1:], mask[..., 1:]))


def test_sink_is_the_source_with_the_largest_column_sum_and_causal_uniform_tops_source_0():
    from collapse.concentration import causal_uniform_share, concentration_pass

    weights = torch.full((2, 3, 4, 4), 0.25)
    weights[0, 1, :, 2] = 1.0  # unit 1 of sequence 0 routes everything extra to source 2
    plain, _, _, sink = concentration_pass(weights)
    assert sink.tolist() == [[0, 2, 0], [0, 0, 0]] and plain[0, 1] == pytest.approx(4 / 7)  # columns 1, 1, 4, 1
    n = 8
    causal = torch.tril(torch.ones(n, n)) / torch.arange(1, n + 1)[:, None]  # each query uniform over its past
    mask = torch.tril(torch.ones(n, n, dtype=torch.bool))
    plain, exposed, _, sink = concentration_pass(causal[None, None], mask)
    assert sink.item() == 0 and plain.item() == pytest.approx(causal_uniform_share(n))  # H_n / n
    assert exposed.item() == pytest.approx(1 / n)
