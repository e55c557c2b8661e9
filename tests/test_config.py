"""The Hydra tree composes for every router, position and score, and a sweep runs as a real multirun."""
from __future__ import annotations

import itertools
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.utils import instantiate

from tests.conftest import CONF, compose_train as compose_run

ROOT = Path(CONF).parent
ROUTERS = sorted(p.stem for p in (ROOT / "conf" / "router").glob("*.yaml"))
POSITIONS = sorted(p.stem for p in (ROOT / "conf" / "router" / "position").glob("*.yaml"))
SCORES = sorted(p.stem for p in (ROOT / "conf" / "router" / "score").glob("*.yaml"))


def composed(*overrides):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        return compose("train", overrides=list(overrides))


@pytest.mark.parametrize("router", ROUTERS)
def test_every_router_config_composes_with_a_target(router):
    cfg = composed(f"router={router}")
    assert cfg.router._target_.startswith("routers.")


def test_position_and_score_groups_cover_the_issue():
    assert {"nope", "rope", "alibi", "learned"} <= set(POSITIONS)
    assert {"dot", "euclidean", "learned_metric", "normalized"} <= set(SCORES)


@pytest.mark.parametrize("position, score", list(itertools.product(POSITIONS, SCORES)))
def test_every_position_score_combination_instantiates_and_routes(position, score):
    cfg = composed(f"router/position={position}", f"router/score={score}", "router.n_layer=2",
                   "router.d_model=32", "router.n_head=2", "router.context_length=16")
    model = instantiate(cfg.router, vocab_size=50)
    assert (model.position, model.score) == (position, score)
    logits, routing = model(torch.randint(0, 50, (2, 16)), return_routing=True)
    assert logits.shape == (2, 16, 50) and len(routing) == 2
    assert torch.allclose(routing[0].weights.sum(-1), torch.ones(2, 2, 16), atol=1e-5)


def test_multirun_sweep_makes_one_dir_per_job_and_one_wandb_group(tmp_path):
    from tests.conftest import TINY

    env = {**os.environ, "ROUTECOLLAPSE_DATA": str(tmp_path / "cache"), "WANDB_MODE": "offline",
           "WANDB_SILENT": "true"}
    sweep = tmp_path / "sweep"
    overrides = [o for o in TINY if not o.startswith(("trainer.max_steps", "callbacks.collapse_monitor.every"))]
    cmd = [sys.executable, "train.py", "-m", "router/position=nope,alibi", "seed=0,1",
           "trainer.max_steps=4", "callbacks.collapse_monitor.every_n_steps=4", f"hydra.sweep.dir={sweep}",
           *overrides]
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir() and (p / "collapse.jsonl").exists())
    assert len(jobs) == 4
    assert "sweep ended: 4/4 jobs done, 0 failed" in (sweep / "sweep.log").read_text()
    for job in jobs:
        (run,) = (job / "wandb").glob("offline-run-*")
        assert any(run.rglob("*.wandb"))


def test_wandb_runs_are_named_by_the_swept_values_grouped_by_experiment_and_date_and_tagged(tmp_path):
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode
    from omegaconf import OmegaConf, open_dict

    from run import build_loggers

    sweep = tmp_path / "multirun" / "2026-11-28" / "10-00-31"
    sweep.mkdir(parents=True)  # what Hydra records at the start of `train.py -m experiment=brake_ordering ...`
    OmegaConf.save({"hydra": {"sweeper": {"params": {"router/position": "nope,rope,alibi,learned", "seed": "0,1,2"}},
                              "overrides": {"task": ["experiment=brake_ordering", "trainer.max_steps=60", "threads=1"]},
                              "runtime": {"choices": {"experiment": "brake_ordering"}}}}, sweep / "multirun.yaml")
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose("train", overrides=["experiment=brake_ordering", "tags=[pilot]"], return_hydra_config=True)
    inits = {}
    for job, (position, seed) in enumerate([("nope", 0), ("alibi", 2)]):
        OmegaConf.set_readonly(cfg.hydra, False)
        with open_dict(cfg):
            cfg.hydra.mode = RunMode.MULTIRUN
            cfg.hydra.sweep.dir = str(sweep)
            cfg.hydra.runtime.output_dir = str(sweep / str(job))
            cfg.hydra.overrides.task = [f"router/position={position}", f"seed={seed}", "experiment=brake_ordering",
                                        "trainer.max_steps=60", "threads=1"]
            cfg.router.position = position
        HydraConfig.instance().set_config(cfg)
        inits[job] = build_loggers(cfg.logger, sweep / str(job), cfg)[0]._wandb_init
    first, second = inits.values()
    assert (first["name"], second["name"]) == ("nope·s0", "alibi·s2")
    assert first["group"] == second["group"] == "brake_ordering_2026-11-28_10-00-31"
    assert first["job_type"] == "train"
    assert first["tags"] == ["experiment:brake_ordering", "router:pythia", "family:transformer", "position:nope",
                             "score:dot", "data:copy", "regime:copy", "pilot"]
    assert first["id"] != second["id"] and len(first["id"]) == 16
    again = build_loggers(cfg.logger, sweep / "1", cfg)[0]._wandb_init
    assert again["id"] == second["id"]  # stable per run dir: a re-sync updates the run


def test_a_single_run_is_named_by_its_overrides_less_housekeeping(tmp_path):
    from run import build_loggers

    cfg = compose_run(tmp_path / "10-00-31", ["router/position=alibi", "seed=3", "threads=1", "trainer.max_steps=500"])
    init = build_loggers(cfg.logger, tmp_path / "10-00-31", cfg)[0]._wandb_init
    assert init["name"] == "alibi·s3" and init["group"] is None
    plain_run = compose_run(tmp_path / "10-05-00", ["threads=1"])
    assert build_loggers(plain_run.logger, tmp_path / "10-05-00", plain_run)[0]._wandb_init["name"] == "10-05-00"


@pytest.mark.parametrize("data", ["shakespeare", "synthetic", "text_files", "wikitext103"])
def test_root_data_seed_reaches_the_data_and_weight_seed_does_not(data):
    cfg = composed(f"data={data}", "seed=7", "data_seed=3")
    assert cfg.data.data_seed == 3 and cfg.seed == 7


def test_slurm_launcher_config_composes_through_the_submitit_plugin():
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose("train", overrides=["hydra/launcher=slurm"], return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    assert launcher.tasks_per_node == launcher.gpus_per_node  # Lightning: one task per GPU
    assert launcher.cpus_per_task and launcher.max_num_timeout > 0


def test_monitor_defaults_read_the_paper_constants_and_the_resolver_refuses_unknown_names():
    from omegaconf import OmegaConf

    from common import constants
    from common.resolvers import constant

    cfg = composed()
    monitor = cfg.callbacks.collapse_monitor
    assert (monitor.onset_threshold, monitor.completion_threshold, monitor.solved_margin) == (
        constants.ONSET_THRESHOLD, constants.COMPLETION_THRESHOLD, constants.SOLVED_MARGIN)
    assert tuple(monitor.ranks) == constants.RANKS  # CollapseMonitor's default, composed from its signature
    OmegaConf.resolve(cfg)  # in place, as `--cfg job --resolve` and print_config do
    with pytest.raises(ValueError, match="NOT_A_CONSTANT"):
        constant("NOT_A_CONSTANT")
    assert constant("RANKS") == list(constants.RANKS)  # configs saved with ${constant:RANKS} still read


def test_the_default_regime_is_the_copy_regime_and_another_data_replaces_its_windows():
    cfg = composed()
    assert cfg.data.generator.segment == "iid" and cfg.data.context_length == 32 and cfg.router.smear_keys
    other = composed("data=synthetic")
    assert "generator" not in other.data and other.data.context_length == 128
    assert not composed("router=pythia_70m").router.smear_keys  # the real Pythia shapes keep plain keys
