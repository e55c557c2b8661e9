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
