"""What a researcher reads: run names from the swept values, sweep groups, tags, and figure titles."""
from __future__ import annotations

from omegaconf import OmegaConf

from common import run_names


def write_sweep(folder, params=None, task=()):
    folder.mkdir(parents=True, exist_ok=True)
    OmegaConf.save({"hydra": {"sweeper": {"params": params or {}}, "overrides": {"task": list(task)},
                              "runtime": {"choices": {"experiment": "alibi_slope"}}}}, folder / "multirun.yaml")
    return folder


def test_aliases_are_short_and_say_what_varied():
    assert run_names.alias("router/position", "nope") == "nope"
    assert run_names.alias("router.score", "learned_metric") == "learned_metric"
    assert run_names.alias("seed", 0) == "s0" and run_names.alias("data_seed", 1) == "d1"
    assert run_names.alias("router.alibi_slope_scale", 0.5) == "slope0.5"
    assert run_names.alias("router.freeze_delta", "true") == "freeze_delta"
    assert run_names.alias("router.freeze_delta", False) == "no_freeze_delta"
    assert run_names.alias("data.homophily", 0.9) == "homophily0.9"
    # data.data_seed is interpolated from data_seed: the label names it once
    assert run_names.label([("data_seed", 1), ("data.data_seed", 1), ("seed", 0)]) == "d1·s0"


def test_swept_keys_come_from_the_experiment_and_the_command_line_which_wins(tmp_path):
    sweep = write_sweep(tmp_path / "sweep", {"router.alibi_slope_scale": "0,0.5,1", "seed": "0,1"},
                        ["experiment=alibi_slope", "seed=3", "data_seed=0,1", "trainer.max_steps=60"])
    assert run_names.swept_keys(sweep) == {"router.alibi_slope_scale", "data_seed"}
    assert run_names.run_name(["router.alibi_slope_scale=0.5", "data_seed=1", "seed=3", "trainer.max_steps=60"],
                              run_names.swept_keys(sweep), "7") == "slope0.5·d1"
    assert run_names.swept_keys(tmp_path / "no_sweep") is None


def test_groups_join_experiment_date_and_time():
    assert run_names.group("brake_ordering", "multirun/2026-11-28/10-00-31") == "brake_ordering_2026-11-28_10-00-31"
    assert run_names.group(None, "multirun/2026-11-28/10-00-31") == "sweep_2026-11-28_10-00-31"
    assert run_names.group("regime_search", "/work/runs/regime_search") == "regime_search"


def test_a_finished_job_is_labelled_from_its_hydra_files_as_wandb_named_it(tmp_path):
    sweep = write_sweep(tmp_path / "multirun" / "2026-11-28" / "10-00-31", {"router.alibi_slope_scale": "0,0.5"})
    job = sweep / "1"
    (job / ".hydra").mkdir(parents=True)
    OmegaConf.save(OmegaConf.create(["router.alibi_slope_scale=0.5", "experiment=alibi_slope"]),
                   job / ".hydra" / "overrides.yaml")
    assert run_names.run_label(job) == "slope0.5"
    assert run_names.sweep_group(sweep) == "alibi_slope_2026-11-28_10-00-31"
    assert run_names.run_label(tmp_path / "bare") == "bare"  # no .hydra: the folder's name


def test_tags_name_experiment_router_family_position_score_data_and_the_users():
    router = {"_target_": "routers.ssm.Mamba", "n_layer": 4}
    assert run_names.tags(router, {"router": "mamba", "data": "synthetic", "experiment": None}, ["pilot"]) == [
        "router:mamba", "family:mamba", "data:synthetic", "pilot"]


def test_a_wandb_run_ends_with_its_depth_profile_and_layer_by_step_heatmap(tiny_run):
    out, _ = tiny_run("trainer.max_steps=4", "callbacks.collapse_monitor.every_n_steps=2")
    assert (out / "max_share_heatmap.png").stat().st_size and (out / "collapse_profile.png").stat().st_size
    (run,) = (out / "wandb").glob("offline-run-*")
    logged = {p.name.rsplit("_", 2)[0] for p in (run / "files" / "media" / "images" / "collapse").glob("*.png")}
    assert logged == {"depth_profile", "max_share_heatmap"}
