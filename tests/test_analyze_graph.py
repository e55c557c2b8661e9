"""Checkpoints rebuild their router from the arguments stored with them: a graph run (GAT on the CSBM graph)
trained in-process, then ``analyze.py run=`` on it, and a checkpoint from before the arguments were stored."""
from __future__ import annotations

import json

import pytest
import torch

import analyze
from analysis.readers.runs import load_router
from tests.conftest import compose_train

GRAPH = ["task=node_classification", "router=gat", "data=csbm", "data.homophily=0.9", "data.num_nodes=200",
         "regime=none", "router.num_layers=2", "router.hidden=16", "router.heads=4", "trainer.max_steps=20",
         "trainer.val_check_interval=10", "logger=csv", "callbacks.collapse_monitor.every_n_steps=20",
         "trainer.enable_progress_bar=false", "callbacks.checkpoint.every_n_train_steps=20", "print_table=false"]


@pytest.fixture(scope="module")
def graph_run(tmp_path_factory):
    import train

    root = tmp_path_factory.mktemp("graph")
    with pytest.MonkeyPatch.context() as env:  # module-scoped, so no monkeypatch fixture
        env.setenv("ROUTECOLLAPSE_DATA", str(root / "cache"))
        train.train(compose_train(root / "run", GRAPH))
    return root / "run"


def test_the_checkpoint_stores_the_routers_resolved_arguments(graph_run):
    state = torch.load(graph_run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    args = state["hyper_parameters"]["router"]
    assert args["_target_"] == "routers.graph.GAT"
    assert (args["in_channels"], args["out_channels"]) == (64, 5)  # filled from the graph at build time
    assert (args["num_layers"], args["hidden"], args["heads"]) == (2, 16, 4)


def test_analyze_run_measures_a_graph_run_on_its_graph_as_the_monitor_did(graph_run, tmp_path):
    assert analyze.main([f"run={graph_run}", f"out={tmp_path}"]) == 0
    logged = json.loads((graph_run / "collapse.jsonl").read_text().splitlines()[-1])
    again = json.loads((tmp_path / "signature.json").read_text())
    assert again["step"] == logged["step"] == 20 and "graph" in again["probe"]
    for ours, theirs in zip(again["layers"], logged["layers"], strict=True):
        for key in ("max_share", "norm_cv", "ve@4", "ve@4_features"):
            assert ours[key] == pytest.approx(theirs[key], abs=1e-6), key
    assert (tmp_path / "summary.md").is_file() and (tmp_path / "signature.png").stat().st_size


def test_a_text_probe_for_a_graph_run_is_refused_with_one_line(graph_run, capsys):
    assert analyze.main([f"run={graph_run}", "probe=wikitext103"]) == 2
    assert "a graph run is measured on its graph" in capsys.readouterr().err


def test_a_checkpoint_without_stored_arguments_asks_its_data_what_train_py_asked(graph_run, tmp_path, monkeypatch):
    monkeypatch.setenv("ROUTECOLLAPSE_DATA", str(graph_run.parent / "cache"))
    state = torch.load(graph_run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    del state["hyper_parameters"]["router"]  # as written before the arguments were stored
    torch.save(state, tmp_path / "old.ckpt")
    router, _, step = load_router(tmp_path / "old.ckpt")
    trained, _, _ = load_router(graph_run)
    assert step == 20 and all(torch.equal(a, b) for a, b in zip(router.state_dict().values(),
                                                                 trained.state_dict().values(), strict=True))


@pytest.fixture(scope="module")
def homophily_sweep(tmp_path_factory):
    """A multirun-shaped folder: GAT and GCN x homophily 0.2 / 0.8 x 3 seeds of a tiny CSBM run."""
    import train

    root = tmp_path_factory.mktemp("csbm")
    base = [o for o in GRAPH if not o.startswith(("router=", "data.homophily=", "router.heads="))]
    with pytest.MonkeyPatch.context() as env:
        env.setenv("ROUTECOLLAPSE_DATA", str(root / "cache"))
        job = 0
        for router in ("gat", "gcn"):
            for homophily in (0.2, 0.8):
                for seed in range(3):
                    heads = ["router.heads=4"] if router == "gat" else []
                    train.train(compose_train(root / "multirun" / str(job), base + heads + [
                        f"router={router}", f"data.homophily={homophily}", f"seed={seed}"]))
                    job += 1
    return root / "multirun"


def test_gat_vs_gcn_is_judged_within_each_homophily_against_independent_welch_intervals(homophily_sweep):
    import csv

    from scipy import stats

    assert analyze.main([f"sweep={homophily_sweep}", "study=csbm_homophily"]) == 0
    out = homophily_sweep / "analysis" / "csbm_homophily"
    rows = list(csv.DictReader(open(out / "strata.csv")))
    assert sorted({r["data.homophily"] for r in rows}) == ["0.2", "0.8"]
    for homophily in ("0.2", "0.8"):
        runs = list(csv.DictReader(open(out / f"data.homophily={homophily}" / "runs.csv")))
        gat = [float(r["ve@4_features"]) for r in runs if r["arm"] == "routers.graph.GAT"]
        gcn = [float(r["ve@4_features"]) for r in runs if r["arm"] == "routers.graph.GCN"]
        assert len(gat) == len(gcn) == 3
        for r in runs:  # each run's value is the depth mean of the per-layer VE@4 its last record logged
            layers = json.loads((homophily_sweep / r["run"] / "collapse.jsonl").read_text().splitlines()[-1])["layers"]
            assert float(r["ve@4_features"]) == pytest.approx(sum(x["ve@4_features"] for x in layers) / len(layers))
        row = next(r for r in rows if r["data.homophily"] == homophily and r["key"] == "ve@4_features")
        welch = stats.ttest_ind(gat, gcn, equal_var=False).confidence_interval(0.95)
        assert float(row["difference"]) == pytest.approx(sum(gat) / 3 - sum(gcn) / 3)
        assert (float(row["low"]), float(row["high"])) == pytest.approx((welch.low, welch.high))
    assert (out / "strata.png").stat().st_size and "GAT vs GCN" in (out / "strata.md").read_text()
