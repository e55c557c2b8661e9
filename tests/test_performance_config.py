"""Configuration that decides what a run costs: the probe size each router family gets."""
from __future__ import annotations

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from tests.conftest import CONF


def composed(*overrides):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        return compose("train", overrides=list(overrides))


@pytest.mark.parametrize("router, sequences", [
    ("pythia", 150), ("pythia_160m", 150),                                # attention: the paper's 150 x 128
    ("mamba", 16), ("mamba_130m", 16), ("rwkv", 16), ("rwkv_169m", 16),  # reconstructed operators: 16 x 128
    ("attnres", 16), ("attnres_0.6b", 16), ("qwen3", 16),                # qwen3: attnres's matched control
])
def test_each_router_family_sets_its_probe_size(router, sequences):
    assert composed(f"router={router}").data.probe_sequences == sequences


def test_the_command_line_and_experiment_files_win_over_the_router_default():
    assert composed("router=mamba", "data.probe_sequences=5").data.probe_sequences == 5
    assert composed("router=pythia", "probe_sequences=20").data.probe_sequences == 20
    assert composed("router=mamba", "experiment=regime_search").data.probe_sequences == 64


def test_graph_data_has_no_probe_size():
    cfg = composed("router=gat", "data=cora", "regime=none", "task=node_classification")
    assert "probe_sequences" not in cfg.data


def test_compiled_and_eager_routers_give_the_same_loss(tmp_path, monkeypatch):
    """compile=<backend> goes through run.compile_router, as train.py builds the router. aot_eager keeps the
    test fast (inductor's first C++ build takes a minute; its loss was equal here too: docs/performance.md)."""
    import torch
    import torch.nn.functional as F

    import run
    from tests.conftest import TINY, compose_train

    monkeypatch.setenv("ROUTECOLLAPSE_DATA", str(tmp_path / "cache"))
    cfg = compose_train(tmp_path / "run", [*TINY, "compile=aot_eager"])
    datamodule = run.build(cfg.data)
    datamodule.prepare_data()
    datamodule.setup("fit")
    batch = next(iter(datamodule.train_dataloader()))
    losses = []
    for compile in (False, cfg.compile):
        torch.manual_seed(0)
        model = run.compile_router(run.build(cfg.router, **datamodule.model_kwargs()), compile)
        logits = model(batch[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))
        loss.backward()
        losses.append((loss.item(), model.wte.weight.grad.clone(), list(model.state_dict())))
    (eager, eager_grad, eager_keys), (compiled, compiled_grad, compiled_keys) = losses
    assert compiled == pytest.approx(eager, rel=1e-5)
    torch.testing.assert_close(compiled_grad, eager_grad, rtol=1e-4, atol=1e-6)
    assert compiled_keys == eager_keys  # checkpoints of compiled runs load into eager routers
