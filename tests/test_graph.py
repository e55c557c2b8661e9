"""Graph routers (GAT, GATv2, matched GCN), their sparse routing record, the graph data and the node task."""
from __future__ import annotations

import csv
import json
import urllib.error

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from collapse import signature
from common.errors import UserError
from datamodules.graph import CSBMDataModule, GraphProbe, PlanetoidDataModule, WebKBDataModule
from routers.graph import GAT, GCN
from routers.routing import Routing, RoutingLayer


def edge_homophily(edge_index, y) -> float:
    """Fraction of edges whose two ends share a class (what CSBM's homophily knob sets)."""
    return float((y[edge_index[0]] == y[edge_index[1]]).float().mean())


N = 12
# Undirected, no self-loops, node 11 isolated: every node still routes to itself through the added self-loop.
EDGES = [(0, 1), (0, 2), (1, 2), (2, 3), (3, 4), (4, 5), (5, 6), (6, 7), (7, 8), (8, 9), (9, 10), (0, 10), (2, 7)]


def small_graph(features: int = 5, seed: int = 0):
    pairs = torch.tensor(EDGES).T
    edge_index = torch.cat([pairs, pairs.flip(0)], dim=1)
    return torch.randn(N, features, generator=torch.Generator().manual_seed(seed)), edge_index


def dense(edge_index, edge_weight, n=N):
    """[units, target, source] operator from the sparse record (rows = queries, as in the dense record)."""
    out = torch.zeros(edge_weight.shape[1], n, n, dtype=edge_weight.dtype)
    out[:, edge_index[1], edge_index[0]] = edge_weight.T
    return out


def capture_conv_io(model):
    """(inputs, outputs) of every conv in the next forward, read with hooks (tests only)."""
    inputs, outputs = [], []

    def hook(module, args, output):
        inputs.append(args[0])
        outputs.append(output[0] if isinstance(output, tuple) else output)

    handles = [conv.register_forward_hook(hook) for conv in model.convs]
    return inputs, outputs, handles


@pytest.mark.parametrize("v2", [False, True])
def test_gat_weights_sum_to_one_over_each_nodes_incoming_edges(v2):
    x, edge_index = small_graph()
    model = GAT(5, 3, num_layers=3, hidden=16, heads=4, v2=v2).eval()
    _, routing = model(x, edge_index, return_routing=True)
    assert routing.axis == "node" and len(routing) == 3
    for layer in routing:
        assert layer.edge_weight.shape == (layer.edge_index.shape[1], 4)
        incoming = torch.zeros(N, 4).index_add_(0, layer.edge_index[1], layer.edge_weight)
        assert torch.allclose(incoming, torch.ones(N, 4), atol=1e-6)


def test_gat_record_equals_what_gatconv_returns_including_its_self_loops():
    x, edge_index = small_graph()
    model = GAT(5, 3, num_layers=2, hidden=16, heads=4).eval()
    _, routing = model(x, edge_index, return_routing=True)
    _, (returned_index, alpha) = model.convs[0](x, edge_index, return_attention_weights=True)
    assert torch.equal(routing[0].edge_index, returned_index)
    assert torch.equal(routing[0].edge_weight, alpha)
    # pyg #3550: the weights are over the input edges plus one self-loop per node, not the edges passed in.
    assert returned_index.shape[1] == edge_index.shape[1] + N
    loops = returned_index[0] == returned_index[1]
    assert sorted(returned_index[0, loops].tolist()) == list(range(N))


@pytest.mark.parametrize("v2", [False, True])
def test_gat_record_reproduces_every_layer_output(v2):
    # out_i = sum_j alpha_ij k_j + b per head: the weights and keys in the record are the layer's routing.
    x, edge_index = small_graph()
    model = GAT(5, 3, num_layers=3, hidden=16, heads=4, v2=v2).eval()
    inputs, outputs, handles = capture_conv_io(model)
    _, routing = model(x, edge_index, return_routing=True)
    [h.remove() for h in handles]
    for layer, out, conv in zip(routing, outputs, model.convs):
        keys = layer.keys[0]  # [heads, N, 4]
        rebuilt = (dense(layer.edge_index, layer.edge_weight) @ keys).transpose(0, 1).reshape(N, -1) + conv.bias
        assert torch.allclose(rebuilt, out, atol=1e-5)


def test_gcn_weights_equal_symmetric_normalised_adjacency_with_self_loops():
    x, edge_index = small_graph()
    model = GCN(5, 3, num_layers=2, hidden=8).eval()
    _, routing = model(x, edge_index, return_routing=True)
    adjacency = np.zeros((N, N))
    for i, j in EDGES:
        adjacency[i, j] = adjacency[j, i] = 1
    a_hat = adjacency + np.eye(N)
    d_inv_sqrt = np.diag(a_hat.sum(1) ** -0.5)
    expected = torch.tensor(d_inv_sqrt @ a_hat @ d_inv_sqrt, dtype=torch.float32)
    for layer in routing:
        assert layer.edge_weight.shape[1] == 1 and layer.keys.shape == (1, 1, N, 8)
        assert torch.allclose(dense(layer.edge_index, layer.edge_weight)[0], expected, atol=1e-6)


def test_gcn_record_reproduces_every_layer_output():
    x, edge_index = small_graph()
    model = GCN(5, 3, num_layers=3, hidden=8).eval()
    _, outputs, handles = capture_conv_io(model)
    _, routing = model(x, edge_index, return_routing=True)
    [h.remove() for h in handles]
    for layer, out, conv in zip(routing, outputs, model.convs):
        rebuilt = dense(layer.edge_index, layer.edge_weight)[0] @ layer.keys[0, 0] + conv.bias
        assert torch.allclose(rebuilt, out, atol=1e-5)


@pytest.mark.parametrize("cls", [GAT, GCN])
def test_residual_adds_each_layers_input_after_the_first(cls):
    x, edge_index = small_graph()
    model = cls(5, 3, num_layers=4, hidden=8, residual=True).eval()
    inputs, outputs, handles = capture_conv_io(model)
    model(x, edge_index)
    [h.remove() for h in handles]
    assert torch.allclose(inputs[1], F.elu(outputs[0]))  # width changes at layer 0: no skip there
    for i in (1, 2):
        assert torch.allclose(inputs[i + 1], F.elu(outputs[i]) + inputs[i])


@pytest.mark.parametrize("cls", [GAT, GCN])
def test_sparse_signature_equals_dense_signature_on_a_small_graph(cls):
    x, edge_index = small_graph()
    model = cls(5, 3, num_layers=3, hidden=16).eval()
    _, sparse = model(x, edge_index, return_routing=True)
    as_dense = Routing([RoutingLayer(keys=layer.keys, weights=dense(layer.edge_index, layer.edge_weight)[None],
                                     name=layer.name, features=layer.features) for layer in sparse],
                      axis="node", family=sparse.family, statistics=sparse.statistics)
    got, want = signature(sparse, ranks=(1, 4)).layers, signature(as_dense, ranks=(1, 4)).layers
    for g, w in zip(got, want):
        for key in ("max_share", "norm_cv", "ve@1", "ve@4", "ve@4_features", "ve@4_projected"):
            assert g[key] == pytest.approx(w[key], abs=1e-9), key
        assert g["max_share_units"] == pytest.approx(w["max_share_units"], abs=1e-9)


def test_gcn_operator_is_the_reference_of_the_gat_gcn_differential():
    # GCN's own max share is its reference exactly; GAT on the same graph is measured against that same number.
    x, edge_index = small_graph()
    gcn = signature(GCN(5, 3, num_layers=2, hidden=16).eval()(x, edge_index, return_routing=True)[1])
    gat = signature(GAT(5, 3, num_layers=2, hidden=16, heads=4).eval()(x, edge_index, return_routing=True)[1])
    for g, a in zip(gcn.layers, gat.layers):
        assert g["max_share"] == pytest.approx(g["baseline_gcn"], abs=1e-7)
        assert a["baseline_gcn"] == g["baseline_gcn"] and a["baseline"] == g["baseline"]
        assert a["max_share_ratio_gcn"] == pytest.approx(a["max_share"] / g["max_share"], rel=1e-6)
    assert gcn.summary["area_above_gcn"] == pytest.approx(0.0, abs=1e-7)


def test_full_width_feature_ve_is_the_layer_output_and_the_concatenated_heads():
    # GAT keys per head are 16/4 = 4 wide; the cross-model comparison uses the full 16-wide quantities.
    from collapse import gaussian_null, ve_at_rank

    x, edge_index = small_graph()
    model = GAT(5, 3, num_layers=2, hidden=16, heads=4).eval()
    _, outputs, handles = capture_conv_io(model)
    _, routing = model(x, edge_index, return_routing=True)
    [h.remove() for h in handles]
    layer = routing[1]
    assert torch.equal(layer.features, outputs[1])  # the record carries the raw pre-activation output
    concatenated = layer.keys[0].transpose(0, 1).reshape(N, 16)
    row = signature(routing, ranks=(1, 4)).layers[1]
    assert row["ve@4_features"] == pytest.approx(float(ve_at_rank(outputs[1].detach(), 4)), abs=1e-7)
    assert row["ve@4_projected"] == pytest.approx(float(ve_at_rank(concatenated, 4)), abs=1e-7)
    assert row["ve@4_features_gauss"] == pytest.approx(gaussian_null(N, 16, 4))


def test_graph_router_without_edges_names_the_node_task():
    with pytest.raises(UserError, match="task=node_classification"):
        GAT(5, 3)(torch.randint(0, 5, (2, 8)))


def test_node_task_on_token_batches_names_the_graph_data():
    from tasks.node_classification import NodeClassificationTask

    with pytest.raises(UserError, match="data=csbm"):
        NodeClassificationTask(GCN(5, 3)).probe_routing(torch.randint(0, 5, (2, 8)))


def test_heads_must_divide_hidden():
    with pytest.raises(UserError, match="divisible"):
        GAT(5, 3, hidden=64, heads=7)


@pytest.mark.parametrize("homophily", [0.1, 0.5, 0.9])
def test_csbm_edge_homophily_and_degree_match_the_settings(homophily):
    dm = CSBMDataModule(homophily=homophily, num_nodes=500, avg_degree=4.0)
    dm.setup()
    data = dm.data
    assert abs(edge_homophily(data.edge_index, data.y) - homophily) <= 0.05
    assert data.edge_index.shape[1] / data.num_nodes == pytest.approx(4.0, rel=0.15)
    assert not bool((data.edge_index[0] == data.edge_index[1]).any())


def test_csbm_class_means_are_feature_snr_apart():
    # Empirical means of n-node classes: E||m_a - m_b||^2 = snr^2 + F (1/n_a + 1/n_b).
    dm = CSBMDataModule(num_nodes=2000, num_classes=4, num_features=64, feature_snr=2.0)
    dm.setup()
    x, y = dm.data.x, dm.data.y
    means = torch.stack([x[y == c].mean(0) for c in range(4)])
    squared = [float((means[a] - means[b]).square().sum()) for a in range(4) for b in range(a + 1, 4)]
    assert np.mean(squared) == pytest.approx(2.0 ** 2 + 64 * (2 / 500), abs=0.3)


def test_csbm_graph_follows_graph_seed_and_split_only_moves_the_masks():
    def build(**kwargs):
        dm = CSBMDataModule(num_nodes=100, **kwargs)
        dm.setup()
        return dm.data

    a, b, c = build(), build(split=1), build(graph_seed=1)
    assert torch.equal(a.edge_index, b.edge_index) and torch.equal(a.x, b.x)
    assert not torch.equal(a.train_mask, b.train_mask)
    assert not torch.equal(a.x, c.x)
    masks = torch.stack([a.train_mask, a.val_mask, a.test_mask])
    assert torch.equal(masks.sum(0), torch.ones(100, dtype=torch.long))
    assert masks.sum(1).tolist() == [48, 32, 20]


@pytest.mark.parametrize("kwargs, message", [
    ({"homophily": 1.5}, "data.homophily"),
    ({"homophily": 0.9, "num_nodes": 20, "avg_degree": 10.0}, "lower data.avg_degree"),
])
def test_impossible_csbm_settings_are_user_errors(kwargs, message):
    with pytest.raises(UserError, match=message):
        CSBMDataModule(**kwargs).setup()


def write_webkb_raw(raw_dir, name: str, n: int = 10, features: int = 6) -> list[dict]:
    """Geom-GCN's raw format, as PyG's WebKB reads it; returns the 10 splits written."""
    raw_dir.mkdir(parents=True)
    rng = np.random.default_rng(0)
    lines = ["node_id\tfeature\tlabel"]
    lines += [f"{i}\t{','.join(str(int(v)) for v in rng.integers(0, 2, features))}\t{i % 5}" for i in range(n)]
    (raw_dir / "out1_node_feature_label.txt").write_text("\n".join(lines) + "\n")
    # Directed, one self-loop (3, 3) and one edge given both ways (1, 0)/(0, 1).
    edges = [(0, 1), (1, 0), (2, 1), (3, 3), (4, 5), (6, 7), (8, 9), (9, 2)]
    (raw_dir / "out1_graph_edges.txt").write_text("\n".join(["node_id\tnode_id"] + [f"{s}\t{t}" for s, t in edges]) + "\n")
    splits = []
    for i in range(10):
        order = rng.permutation(n)
        split = {name: np.isin(np.arange(n), part) for name, part in
                 zip(("train_mask", "val_mask", "test_mask"), (order[:6], order[6:8], order[8:]))}
        np.savez(raw_dir / f"{name}_split_0.6_0.2_{i}.npz", **split)
        splits.append(split)
    return splits


def test_webkb_loader_reads_geom_gcn_raw_files_and_selects_the_split(tmp_path):
    splits = write_webkb_raw(tmp_path / "texas" / "raw", "texas")
    dm = WebKBDataModule(name="texas", split=3, root=str(tmp_path), download=False)
    dm.setup()
    data = dm.data
    assert dm.model_kwargs() == {"in_channels": 6, "out_channels": 5}
    for mask in ("train_mask", "val_mask", "test_mask"):
        assert torch.equal(data[mask], torch.from_numpy(splits[3][mask]))
    pairs = {tuple(e) for e in data.edge_index.T.tolist()}
    assert pairs == {(0, 1), (1, 0), (1, 2), (2, 1), (4, 5), (5, 4), (6, 7), (7, 6), (8, 9), (9, 8), (2, 9), (9, 2)}


def test_webkb_missing_files_without_download_name_the_path_and_the_fallback(tmp_path):
    with pytest.raises(UserError) as info:
        WebKBDataModule(name="cornell", root=str(tmp_path), download=False).setup()
    message = str(info.value)
    assert str(tmp_path / "cornell" / "raw") in message and "data=csbm" in message and "\n" not in message


def test_webkb_failed_download_is_one_clear_error(tmp_path, monkeypatch):
    import torch_geometric.datasets.webkb as webkb

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(webkb, "download_url", offline)
    with pytest.raises(UserError, match="downloading it failed \\(URLError\\)") as info:
        WebKBDataModule(name="wisconsin", root=str(tmp_path)).setup()
    assert "wisconsin_split_0.6_0.2_{0..9}.npz" in str(info.value) and "\n" not in str(info.value)


def test_cora_missing_offline_names_the_planetoid_files(tmp_path):
    with pytest.raises(UserError, match="ind.cora.x") as info:
        PlanetoidDataModule(root=str(tmp_path), download=False).setup()
    assert str(tmp_path / "Cora" / "raw") in str(info.value)


@pytest.mark.parametrize("kwargs, message", [({"name": "harvard"}, "choose one of cornell, texas, wisconsin"),
                                             ({"split": 10}, "data.split=0..9")])
def test_bad_webkb_choice_is_a_user_error(kwargs, message):
    with pytest.raises(UserError, match=message):
        WebKBDataModule(**kwargs)


def test_graph_probe_round_trips_through_a_file(tmp_path):
    dm = CSBMDataModule(num_nodes=60)
    dm.setup()
    dm.probe.save(tmp_path / "probe.pt")
    loaded = GraphProbe.load(tmp_path / "probe.pt")
    (data, shuffled), = list(loaded.batches(50))
    assert shuffled is None
    for key in ("x", "edge_index", "y", "train_mask", "test_mask"):
        assert torch.equal(data[key], dm.data[key])


def test_train_py_composition_trains_a_gat_and_logs_node_routing(tmp_path, monkeypatch):
    import train
    from tests.conftest import compose_train

    monkeypatch.setenv("ROUTECOLLAPSE_DATA", str(tmp_path / "cache"))
    out = tmp_path / "run"
    cfg = compose_train(out, ["task=node_classification", "router=gat", "data=csbm", "data.homophily=0.9",
                              "data.num_nodes=200", "router.num_layers=2", "router.hidden=16", "router.heads=4",
                              "trainer.max_steps=40", "trainer.val_check_interval=10", "logger=csv",
                              "callbacks.collapse_monitor.every_n_steps=20", "trainer.enable_progress_bar=false",
                              "callbacks.checkpoint.every_n_train_steps=20", "trainer.log_every_n_steps=1",
                              "print_table=false"])
    train.train(cfg)
    records = [json.loads(line) for line in (out / "collapse.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [0, 20, 40]
    assert records[-1]["summary"]["axis"] == "node" and len(records[-1]["layers"]) == 2
    assert all(0 < layer["ve@4_features"] <= 1 for layer in records[-1]["layers"])
    rows = list(csv.DictReader(open(out / "csv" / "metrics.csv")))
    final = {k: float(v) for row in rows for k, v in row.items() if v and k.startswith(("val/", "test/"))}
    assert {"val/loss", "val/acc", "test/loss", "test/acc", "test/acc_at_best_val"} <= set(final)
    assert any(row.get("train/acc") for row in rows)
    assert final["test/acc_at_best_val"] > 0.5  # 5 classes: chance is 0.2 on this homophilic graph
    assert len(GraphProbe.load(out / "probe.pt").data.y) == 200


@pytest.mark.parametrize("experiment, data_target", [("gat_vs_gcn", "WebKBDataModule"),
                                                     ("csbm_homophily", "CSBMDataModule")])
def test_graph_experiments_compose_and_sweep_existing_options(experiment, data_target):
    from pathlib import Path

    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from tests.conftest import CONF

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose("train", overrides=[f"experiment={experiment}"], return_hydra_config=True)
    assert cfg.task._target_.endswith("NodeClassificationTask") and cfg.data._target_.endswith(data_target)
    params = cfg.hydra.sweeper.params
    assert set(params.router.split(",")) == {"gat", "gcn"}
    for group in ("router", "data"):
        for option in params.get(group, "").split(","):
            assert not option or (Path(CONF) / group / f"{option}.yaml").is_file(), option
