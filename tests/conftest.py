"""Shared fixtures: compose the real Hydra config in-process and train tiny runs without a subprocess."""
from __future__ import annotations

import os

import pytest
import torch
from run import CONF, compose_run as compose_train  # noqa: F401  (tests compose in-process)

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(1)  # MKL threads thrash on shared 2-core CI machines; tests measure correctness

# A model and data small enough that a 20-step run takes seconds.
TINY = [
    "data=synthetic", "data.synthetic.vocab_size=64", "data.synthetic.n_tokens=20000", "data.context_length=32",
    "data.batch_size=4", "data.probe_sequences=8", "data.probe_length=32",
    "router.n_layer=2", "router.d_model=32", "router.n_head=2", "router.context_length=32",
    "trainer.max_steps=20", "trainer.val_check_interval=10", "trainer.limit_val_batches=2",
    "trainer.enable_progress_bar=false", "trainer.log_every_n_steps=1",
    "callbacks.collapse_monitor.every_n_steps=10", "callbacks.collapse_monitor.probe_batch_size=4",
    "callbacks.checkpoint.every_n_train_steps=10", "print_table=false",
]


@pytest.fixture
def tiny_run(tmp_path, monkeypatch):
    """Train a tiny run in ``tmp_path/run``; returns (run_dir, config)."""
    import train

    monkeypatch.setenv("ROUTECOLLAPSE_DATA", str(tmp_path / "cache"))

    def run(*overrides: str, name: str = "run"):
        out = tmp_path / name
        base = TINY
        if any(o.startswith("data=") and o != "data=synthetic" for o in overrides):
            base = [o for o in TINY if not o.startswith(("data=", "data.synthetic."))]
        cfg = compose_train(out, base + list(overrides))
        train.train(cfg)
        return out, cfg

    return run


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory):
    """A real single-node SLURM cluster on localhost (tests/slurm_cluster.py), for the whole session. Without one
    (not root, no apt-get, the install failed, no network) the tests that use it fail with the reason;
    `pytest -m 'not slurm'` leaves them out."""
    from tests.slurm_cluster import cluster_or_fail

    cluster = cluster_or_fail(tmp_path_factory.mktemp("slurm"))
    yield cluster
    cluster.stop()
