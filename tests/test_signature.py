import json
import math

import numpy as np
import pytest
import torch
from scipy import stats

from collapse import (Signature, SignatureAccumulator, gaussian_null, max_share_sparse, norm_cv, pearson,
                      signature, uniform_max_share_sparse, ve_at_rank)
from common.errors import UserError
from records import flat_metrics, signature_parts, signature_table
from routers.routing import Routing, RoutingLayer, causal_mask

N_SOURCES = 64
HARMONIC_SHARE = sum(1 / k for k in range(1, N_SOURCES + 1)) / N_SOURCES  # causal-uniform max share, 0.074


def _randn(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _causal_softmax(batch, units, n, seed):
    logits = 3 * _randn(batch, units, n, n, seed=seed)
    return logits.masked_fill(~causal_mask(n), -math.inf).softmax(-1)


def _two_layer_routing(batch, seed=0, chunked=False):
    """Layer 0: causal softmax with pre/post-position keys; layer 1: per-unit mask, maybe chunked."""
    n, units, d = 16, 4, 8
    keys0, weights0 = _randn(batch, units, n, d, seed=seed), _causal_softmax(batch, units, n, seed + 1)
    content0 = _randn(batch, units, n, d, seed=seed + 2)
    unit_mask = causal_mask(n).expand(batch, units, n, n).clone()
    unit_mask[:, 2:, 1:, 0] = False  # in units 2 and 3 only query 0 sees position 0: a mask that differs per unit
    weights1 = (3 * _randn(batch, units, n, n, seed=seed + 3)).masked_fill(~unit_mask, -math.inf).softmax(-1)
    chunks = {"weight_chunks": lambda: iter(weights1.split(2, dim=1))} if chunked else {"weights": weights1}
    return Routing([
        RoutingLayer(keys=keys0, content_keys=content0, weights=weights0, mask=causal_mask(n), name="attn0"),
        RoutingLayer(keys=_randn(batch, units, n, d, seed=seed + 4), mask=unit_mask, name="attn1", **chunks),
    ])


def _sink_routing(sink_fractions, batch=2, units=3, d=8):
    """Each layer mixes causal-uniform routing with a sink on source 0: max share = f + (1 - f) H_n / n."""
    uniform = causal_mask(N_SOURCES) / causal_mask(N_SOURCES).sum(-1, keepdim=True)
    sink = torch.zeros(N_SOURCES, N_SOURCES)
    sink[:, 0] = 1.0
    direction = _randn(d, seed=9)
    layers = []
    for i, f in enumerate(sink_fractions):
        weights = (f * sink + (1 - f) * uniform).expand(batch, units, N_SOURCES, N_SOURCES)
        keys = _randn(batch, units, N_SOURCES, 1, seed=i) * direction  # rank-1 key cloud: VE@1 = 1
        layers.append(RoutingLayer(keys=keys, weights=weights, mask=causal_mask(N_SOURCES)))
    return Routing(layers)


def _assert_same(a: dict, b: dict):
    assert a.keys() == b.keys()
    for key in a:
        if isinstance(a[key], str):
            assert a[key] == b[key], key
            continue
        assert np.allclose(np.asarray(a[key], dtype=float), np.asarray(b[key], dtype=float), equal_nan=True), key


def test_pearson_matches_numpy_corrcoef_and_t_test():
    x, y = _randn(30, seed=0).double().numpy(), _randn(30, seed=1).double().numpy()
    y = y + 0.5 * x
    r, p = pearson(x, y)
    assert r == pytest.approx(np.corrcoef(x, y)[0, 1], abs=1e-12)
    t = r * math.sqrt(28 / (1 - r * r))  # two-sided t-test with n - 2 degrees of freedom
    assert p == pytest.approx(2 * stats.t.sf(abs(t), 28), rel=1e-6)


def test_pearson_is_nan_when_undefined():
    assert all(math.isnan(v) for v in pearson([1.0, 2.0, 3.0], [4.0, 4.0, 4.0]))
    assert all(math.isnan(v) for v in pearson([1.0, 2.0], [3.0, 5.0]))


def test_accumulator_over_two_micro_batches_equals_one_batch():
    whole, shuffled = _two_layer_routing(6), _two_layer_routing(6, seed=10)

    def part(routing, rows):
        return Routing([RoutingLayer(keys=l.keys[rows], content_keys=None if l.content_keys is None else l.content_keys[rows],
                                     weights=l.weights[rows], mask=l.mask if l.mask.dim() == 2 else l.mask[rows],
                                     name=l.name)
                        for l in routing.layers])

    accumulator = SignatureAccumulator()
    for rows in (slice(0, 2), slice(2, 6)):  # unequal micro-batches
        accumulator.update(part(whole, rows), part(shuffled, rows))
    streamed, single = accumulator.compute(), signature(whole, shuffled)
    for a, b in zip(streamed.layers, single.layers):
        _assert_same(a, b)
    _assert_same(streamed.summary, single.summary)


def test_chunked_weights_equal_whole_weights():
    chunked, whole = signature(_two_layer_routing(3, chunked=True)), signature(_two_layer_routing(3))
    _assert_same(chunked.layers[1], whole.layers[1])
    assert chunked.layers[1]["max_share_ex0"] != chunked.layers[1]["max_share"]


def test_geometry_columns_match_direct_computation():
    routing = _two_layer_routing(5)
    row = signature(routing).layers[0]
    keys, content = routing.layers[0].keys, routing.layers[0].content_keys
    assert row["norm_cv"] == pytest.approx(norm_cv(content).mean().item())  # scored = pre-position keys
    pooled = content.transpose(0, 1).reshape(4, -1, 8)  # all sequences' keys of a unit together
    assert row["norm_cv_pooled"] == pytest.approx(norm_cv(pooled).mean().item())
    assert row["ve@4"] == pytest.approx(ve_at_rank(content, 4).mean().item())
    assert row["ve@4_post"] == pytest.approx(ve_at_rank(keys, 4).mean().item())
    assert row["ve@8_gauss"] == gaussian_null(16, 8, 8)
    assert math.isnan(row["ve@8_shuffle"]) and math.isnan(row["content@8"])


def test_content_and_marginal_split_real_minus_gauss():
    row = signature(_two_layer_routing(2), _two_layer_routing(2, seed=5)).layers[1]
    assert row["content@8"] == pytest.approx(row["ve@8"] - row["ve@8_shuffle"])
    assert row["marginal@8"] == pytest.approx(row["ve@8_shuffle"] - row["ve@8_gauss"])
    assert math.isnan(row["ve@8_post"])  # no content keys in this layer


def test_r_cv_share_is_pearson_over_layer_unit_pairs():
    routing = _two_layer_routing(4)
    cvs, shares = [], []
    for layer in routing.layers:
        norms = layer.scored_keys.double().norm(dim=-1).numpy()  # [batch, units, n]
        cvs += list((norms.std(-1) / norms.mean(-1)).mean(0))
        columns = layer.weights.double().sum(-2).numpy()
        shares += list((columns.max(-1) / columns.sum(-1)).mean(0))
    summary = signature(routing).summary
    assert summary["r_cv_share"] == pytest.approx(np.corrcoef(cvs, shares)[0, 1], abs=1e-10)


def test_synthetic_routing_gives_expected_table():
    routing = _sink_routing([0.0, 0.25, 1.0])
    sig = signature(routing)
    expected = [HARMONIC_SHARE, 0.25 + 0.75 * HARMONIC_SHARE, 1.0]
    assert [row["max_share"] for row in sig.layers] == pytest.approx(expected)
    assert [row["baseline"] for row in sig.layers] == pytest.approx([HARMONIC_SHARE] * 3)
    assert sig.layers[0]["max_share_ratio"] == pytest.approx(1.0)
    assert sig.layers[0]["max_share_exposure"] == pytest.approx(1 / N_SOURCES)
    assert [row["ve@1"] for row in sig.layers] == pytest.approx([1.0] * 3)
    s = sig.summary
    assert (s["onset_layer"], s["onset_depth"], s["completion_layer"], s["peak_layer"]) == (1, 1 / 3, 2, 2)
    assert s["area_above_baseline"] == pytest.approx(sum(e - HARMONIC_SHARE for e in expected) / 3)
    lines = signature_table(sig).splitlines()
    assert lines[0].split() == ["layer", "norm-CV", "VE@8", "gauss", "shuffle", "max", "share"]
    assert lines[3].split() == ["L2", f"{norm_cv(routing.layers[2].keys).mean():.3f}", "1.000", f"{gaussian_null(N_SOURCES, 8, 8):.3f}", "-", "1.000"]
    assert "onset (max share > 0.20): L1 (33% depth)" in lines
    assert "completion (max share > 0.50): L2 (67% depth)" in lines


def test_never_crossing_reads_never_everywhere():
    sig = signature(_sink_routing([0.0, 0.05]))
    assert sig.summary["onset_layer"] is None and sig.summary["completion_depth"] is None
    assert "onset (max share > 0.20): never" in signature_table(sig)
    assert math.isnan(flat_metrics(sig)["collapse/onset_layer"])
    assert json.loads(json.dumps(signature_parts(sig), allow_nan=False))["summary"]["onset_layer"] is None


def test_flat_has_per_layer_and_summary_floats_only():
    flat = flat_metrics(signature(_two_layer_routing(2)))
    assert {"collapse/max_share/L1", "collapse/ve@8/L0", "collapse/onset_layer"} <= flat.keys()
    assert all(type(v) is float for v in flat.values())
    assert not any("units" in key or "name" in key for key in flat)


def test_family_statistics_are_sequence_weighted_means():
    # Depth routing over 3 sources: a batch of 1 puts all weight on the embeddings, a batch of 3 on the stream.
    accumulator = SignatureAccumulator()
    for batch, source, bias in ((1, 0, 1.0), (3, 2, 3.0)):
        weights = torch.zeros(batch, 1, 4, 3)
        weights[..., source] = 1.0
        layer = RoutingLayer(keys=_randn(batch, 1, 3, 2, seed=batch), weights=weights, recency_bias=torch.tensor(bias))
        accumulator.update(Routing([layer], axis="depth", family="attnres", statistics="depth_hubs"))
    sig = accumulator.compute()
    row = sig.layers[0]
    assert row["embedding_share"] == pytest.approx(1 / 4) and row["current_share"] == pytest.approx(3 / 4)
    assert row["block1_share"] == 0.0 and row["uniform_share"] == pytest.approx(1 / 3)
    assert row["recency_bias"] == pytest.approx((1 * 1.0 + 3 * 3.0) / 4)
    assert sig.summary["family"] == "attnres"


def test_no_family_adds_no_columns_and_unknown_statistics_are_refused():
    plain = signature(_two_layer_routing(2)).layers[0]
    assert not {"embedding_share", "content_r", "delta_cv", "ve@4_features"} & set(plain)
    unknown = _two_layer_routing(2)
    unknown = Routing(unknown.layers, family="toy", statistics="attention_entropy")
    with pytest.raises(UserError, match="unknown family statistics 'attention_entropy'"):
        signature(unknown)
    from collapse.family import STATISTICS
    from routers.family import families
    # every statistics a registered family asks for exists, and each exists for some family
    assert {f.statistics for f in families()} - {""} == set(STATISTICS)


def test_sparse_layer_uses_edges_and_all_nodes():
    generator = torch.Generator().manual_seed(0)
    n, units = 12, 2
    edge_index = torch.randint(0, n, (2, 40), generator=generator)
    edge_weight = torch.rand(40, units, generator=generator)
    keys = torch.randn(1, units, n, 5, generator=generator)
    routing = Routing([RoutingLayer(keys=keys, edge_index=edge_index, edge_weight=edge_weight, num_nodes=n)], axis="node")
    row = signature(routing).layers[0]
    assert row["max_share_units"] == pytest.approx(max_share_sparse(edge_index, edge_weight, n).tolist())
    assert row["baseline"] == pytest.approx(uniform_max_share_sparse(edge_index, n))
    assert row["ve@4"] == pytest.approx(ve_at_rank(keys, 4).mean().item())
    assert math.isnan(row["max_share_ex0"])


def test_mismatched_shuffled_routing_raises():
    routing = _two_layer_routing(2)
    with pytest.raises(UserError, match="shuffled routing has 1 layers"):
        signature(routing, Routing(routing.layers[:1]))


def test_uniform_baseline_is_exact_in_float64():
    layer = RoutingLayer(keys=_randn(2, 1, 3, 2, seed=0), weights=torch.full((2, 1, 5, 3), 1 / 3))
    assert signature(Routing([layer])).layers[0]["baseline"] == 1 / 3  # not float32's 0.3333333433


def test_signature_type():
    assert isinstance(signature(_sink_routing([0.0])), Signature)
