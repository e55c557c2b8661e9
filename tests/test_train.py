"""End to end: real Hydra composition, real Lightning training, real W&B offline logging."""
from __future__ import annotations

import csv
import json

import pytest
import torch

from common.errors import UserError


def read_losses(run_dir):
    rows = list(csv.DictReader(open(run_dir / "csv" / "metrics.csv")))
    return {int(r["step"]): float(r["train/loss"]) for r in rows if r.get("train/loss")}


def test_training_run_writes_monitor_records_checkpoints_and_wandb_offline_run(tiny_run):
    out, _ = tiny_run("logger=wandb")
    records = [json.loads(line) for line in (out / "collapse.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [0, 10, 20]
    assert len(records[0]["layers"]) == 2
    assert all(0.0 < layer["max_share"] <= 1.0 for r in records for layer in r["layers"])
    assert records[0]["layers"][0]["max_share"] != records[-1]["layers"][0]["max_share"]  # training moved it
    assert (out / "probe.pt").is_file() and (out / "collapse_profile.png").is_file()
    assert (out / "checkpoints" / "last.ckpt").is_file()
    offline_runs = list((out / "wandb").glob("offline-run-*"))
    assert len(offline_runs) == 1 and any(offline_runs[0].rglob("*.wandb"))
    logged = open(out / "csv" / "metrics.csv").readline()
    assert "collapse/max_share/L1" in logged and "collapse/onset_layer" in logged


def test_resume_from_checkpoint_reproduces_the_uninterrupted_loss_curve(tiny_run):
    full, _ = tiny_run("logger=csv", name="full")
    resumed, _ = tiny_run("logger=csv", f"ckpt_path={full}/checkpoints/step000010.ckpt", name="resumed")
    expected, got = read_losses(full), read_losses(resumed)
    assert sorted(got) == list(range(10, 20))
    for step in got:
        assert got[step] == pytest.approx(expected[step], abs=1e-6), step


def test_nan_loss_stops_with_a_message_and_keeps_checkpoint_and_metrics(tiny_run, tmp_path):
    with pytest.raises(UserError, match="non-finite at step 12"):
        tiny_run("logger=csv", "+router.nan_after_steps=12", "router._target_=tests.nan_router.NaNAfter")
    out = tmp_path / "run"
    last = torch.load(out / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert all(torch.isfinite(v).all() for v in last["state_dict"].values())
    steps = [json.loads(line)["step"] for line in (out / "collapse.jsonl").read_text().splitlines()]
    assert steps[:2] == [0, 10] and steps[-1] in (12, 13)  # Lightning still counts the skipped step


@pytest.mark.parametrize("override, message", [
    ("router.position=spiral", "choose one of"),
    ("router.n_head=3", "n_head"),
    ("data.context_length=64", "context_length"),
])
def test_bad_model_input_gives_one_line_error_naming_the_fix(tiny_run, override, message):
    with pytest.raises(UserError, match=message) as info:
        tiny_run("logger=csv", override)
    assert "\n" not in str(info.value)


def test_corrupt_checkpoint_gives_one_line_error(tiny_run, tmp_path):
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="corrupt"):
        tiny_run("logger=csv", f"ckpt_path={bad}")


def test_missing_text_folder_gives_one_line_error(tiny_run, tmp_path):
    with pytest.raises(UserError, match="data.path"):
        tiny_run("logger=csv", "data=text_files", f"data.path={tmp_path}/nowhere", "data.context_length=32")


def test_optimizer_decays_matrices_but_not_gains_biases_or_no_weight_decay_parameters():
    from torch import nn

    from tasks.lm import LanguageModelTask

    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))
    model.A_log = nn.Parameter(torch.zeros(4, 2))
    model.A_log._no_weight_decay = True
    task = LanguageModelTask(model, weight_decay=0.1)
    task.trainer = type("T", (), {"max_steps": 10})()  # configure_optimizers reads the schedule length
    decayed, kept = task.configure_optimizers()["optimizer"].param_groups
    assert decayed["weight_decay"] == 0.1 and [p.shape for p in decayed["params"]] == [(4, 4)]
    assert kept["weight_decay"] == 0.0 and len(kept["params"]) == 4


def test_ddp_on_two_cpu_processes_trains_and_the_monitor_writes_each_step_once(tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    from tests.conftest import TINY

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "ROUTECOLLAPSE_DATA": str(tmp_path / "cache")}
    cmd = [sys.executable, "train.py", "trainer=ddp_cpu", "logger=csv", "threads=1", *TINY,
           f"hydra.run.dir={tmp_path / 'run'}"]
    result = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    steps = [json.loads(line)["step"] for line in (tmp_path / "run" / "collapse.jsonl").read_text().splitlines()]
    assert steps == [0, 10, 20]  # rank zero alone measures: no duplicate lines from the second process


def test_the_live_probe_measures_its_head_between_full_probe_steps_and_the_last_record_is_the_full_probe(tiny_run):
    """Probe of 8, live head of 4; full probe every 20 steps and at the last step (25, not a multiple)."""
    from analysis.readers.runs import load_router
    from analysis.readers.model import _Probed
    from datamodules.probe import TokenProbe
    from collapse.measure import measure_signature
    from records import signature_parts

    out, _ = tiny_run("logger=csv", "trainer.max_steps=25", "callbacks.collapse_monitor.live_probe_sequences=4",
                      "callbacks.collapse_monitor.full_probe_every_n_steps=20")
    records = [json.loads(line) for line in (out / "collapse.jsonl").read_text().splitlines()]
    assert [(r["step"], r["probe_sequences"]) for r in records] == [(0, 4), (10, 4), (20, 8), (25, 8)]
    from callbacks.collapse_monitor import measurement_plan

    assert measurement_plan(25, 10, 20, live=True) == (2, 2)  # what the bench costs a run at: the same schedule
    assert measurement_plan(25, 10, 20, live=False) == (0, 4)
    probe = TokenProbe.load(out / "probe.pt")
    router, _, step = load_router(out / "checkpoints" / "step000010.ckpt")
    assert step == 10
    for sequences, record in ((4, records[1]), (8, None)):  # the live record is the head's own signature
        signature = measure_signature(_Probed(router), probe.head(sequences), batch_size=4)
        if record is not None:
            for ours, logged in zip(signature_parts(signature)["layers"], record["layers"]):
                for key in ("max_share", "norm_cv", "ve@8", "ve@8_shuffle", "ve@1", "max_share_exposure"):
                    assert ours[key] == pytest.approx(logged[key], rel=1e-12), key
        else:  # and it is not the full probe's: the head is a different measurement
            assert signature.layers[0]["norm_cv"] != records[1]["layers"][0]["norm_cv"]
    metrics = list(csv.DictReader(open(out / "csv" / "metrics.csv")))
    assert sorted({r["collapse/probe_sequences"] for r in metrics if r.get("collapse/probe_sequences")}) == ["4.0", "8.0"]


def test_the_live_probe_changes_no_digit_of_training_or_of_the_final_record(tiny_run):
    """The monitor reads in eval mode without gradients: measuring a live head (step 0; 10 and 20 are checkpoint
    and last steps, so full) cannot change the
    weights, so the final record (the full probe) is the one a full-probe-every-time run writes."""
    live, _ = tiny_run("logger=csv", "callbacks.collapse_monitor.live_probe_sequences=4", name="live")
    full, _ = tiny_run("logger=csv", "callbacks.collapse_monitor.live_probe_sequences=null", name="full")
    a, b = ([json.loads(line) for line in (run / "collapse.jsonl").read_text().splitlines()] for run in (live, full))
    assert [r["probe_sequences"] for r in a] == [4, 8, 8] and [r["probe_sequences"] for r in b] == [8, 8, 8]
    strip = lambda r: {k: v for k, v in r.items() if k not in ("seconds", "summary")}  # noqa: E731
    assert strip(a[-1]) == strip(b[-1])
    assert {k: v for k, v in a[-1]["summary"].items() if k != "onset_step"} == \
        {k: v for k, v in b[-1]["summary"].items() if k != "onset_step"}
    assert read_losses(live) == read_losses(full)


@pytest.mark.parametrize("router, overrides", [
    ("pythia", ["router/score=dot"]), ("pythia", ["router/score=learned_metric"]),
    ("pythia", ["router/score=normalized"]), ("pythia", ["router/position=learned"]),
    ("pythia", ["router.smear_keys=true"]),
    ("mamba", []), ("rwkv", []), ("attnres", []), ("qwen3", []),
])
def test_weight_decay_holds_only_linear_embedding_and_conv_weights_for_every_lm_router(router, overrides):
    """Which parameters each optimiser group holds: the metric's factor L (init I) and the query gain are
    parameters of the score, not weights to shrink toward zero; a 2-D shape alone must not decide."""
    from hydra.utils import instantiate
    from torch import nn

    from tasks.lm import LanguageModelTask
    from tests.test_config import composed

    cfg = composed(f"router={router}", *overrides)
    small = {k: v for k, v in {"n_layer": 2, "d_model": 32, "n_head": 2}.items() if k in cfg.router}
    model = instantiate(cfg.router, **small, vocab_size=50)
    task = LanguageModelTask(model, weight_decay=0.1)
    task.trainer = type("T", (), {"max_steps": 10})()
    decayed, kept = task.configure_optimizers()["optimizer"].param_groups
    names = {id(p): n for n, p in task.named_parameters()}
    matrices = {id(m.weight) for m in task.modules() if isinstance(m, (nn.Linear, nn.Embedding, nn.Conv1d))}
    assert decayed["weight_decay"] == 0.1 and kept["weight_decay"] == 0.0
    assert decayed["params"] and all(id(p) in matrices for p in decayed["params"]), \
        sorted(names[id(p)] for p in decayed["params"] if id(p) not in matrices)
    kept_names = {names[id(p)] for p in kept["params"]}
    for special in ("metric_factor", "query_gain", "A_log", "smear_gate"):
        assert not any(special in names[id(p)] for p in decayed["params"]), special
    if "learned_metric" in str(overrides):
        assert any("metric_factor" in n for n in kept_names)
    if "normalized" in str(overrides):
        assert any("query_gain" in n for n in kept_names)


@pytest.mark.parametrize("normalization", ["softmax1", "sigmoid"])
def test_the_sink_controls_train_and_are_measured(tiny_run, normalization):
    out, cfg = tiny_run("logger=csv", f"router/normalization={normalization}")
    assert cfg.router.normalization == normalization
    records = [json.loads(line) for line in (out / "collapse.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [0, 10, 20]
    assert all(0 < layer["max_share"] <= 1 for r in records for layer in r["layers"])
    losses = read_losses(out)
    assert losses[max(losses)] < losses[min(losses)]  # it learns


def test_records_on_generated_data_carry_the_tasks_levels_and_the_solved_step(tiny_run):
    from datamodules.generated import RepeatedSegments

    out, cfg = tiny_run("logger=csv", "data=repeat", "data.generator.vocab_size=16", "data.generator.segment=iid",
                        "data.generator.idle_fraction=0.5", "router.smear_keys=true",
                        "callbacks.collapse_monitor.solved_margin=10")  # any measured loss counts: solved at once
    records = [json.loads(line) for line in (out / "collapse.jsonl").read_text().splitlines()]
    task = RepeatedSegments(vocab_size=16, segment="iid", idle_fraction=0.5)
    assert all(r["solved_loss"] == pytest.approx(task.solved_loss(33)) for r in records)
    assert all(r["idle_fraction"] == 0.5 == task.idle_fraction(32) for r in records)
    first_val = next(r["step"] for r in records if r["val_loss"] is not None)
    assert [r["summary"]["solved_step"] for r in records] == [None if r["step"] < first_val else first_val
                                                              for r in records]
    layer = records[-1]["layers"][0]
    assert len(layer["sink_source_units"]) == len(layer["sink_fraction_units"]) == cfg.router.n_head
