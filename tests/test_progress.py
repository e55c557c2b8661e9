"""Progress a researcher can follow without a terminal, runs that always validate, and the debug presets."""
from __future__ import annotations

import csv
import io
import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import CONF, TINY

ROOT = Path(CONF).parent


def test_a_redirected_progress_bar_writes_each_update_as_a_line(monkeypatch):
    from common import progress

    out = io.StringIO()
    monkeypatch.setattr(progress.sys, "stderr", out)
    monkeypatch.setattr(progress, "LOG_INTERVAL", 0)
    for _ in progress.progress(range(3), "probe pass", total=3):
        pass
    lines = out.getvalue().splitlines()
    assert "\r" not in out.getvalue() and lines[0].startswith("probe pass:   0%")
    assert lines[-1].startswith("probe pass: 100%") and "3/3" in lines[-1]
    assert len(lines) == len(set(lines))  # a repeated redraw is written once


def test_a_run_shorter_than_the_validation_interval_validates_at_its_last_step(tiny_run):
    out, _ = tiny_run("trainer.max_steps=7", "trainer.val_check_interval=200")
    rows = [r for r in csv.DictReader(open(out / "csv" / "metrics.csv")) if r.get("val/loss")]
    assert len(rows) == 1 and int(rows[0]["step"]) in (6, 7)  # Lightning logs it at the last step's index
    from records import read_records

    assert read_records(out)[-1]["step"] == 7 and read_records(out)[-1]["val_loss"] is not None


def test_debug_profile_writes_a_chrome_trace(tiny_run):
    out, cfg = tiny_run("debug=profile", "trainer.max_steps=8")
    assert cfg.trainer.profiler._target_.endswith("PyTorchProfiler") and "csv" in cfg.logger and "wandb" not in cfg.logger
    assert list((out / "profiler").glob("*.pt.trace.json"))


def test_debug_smoke_runs_end_to_end_with_progress_in_a_redirected_log(tmp_path):
    """One real `train.py debug=smoke` with stdout a pipe, as under SLURM or `> log`."""
    tiny = [o for o in TINY if o.startswith(("data", "router"))]  # the tiny model; smoke sets the rest
    env = {**os.environ, "ROUTECOLLAPSE_DATA": str(tmp_path / "cache")}
    cmd = [sys.executable, "train.py", "debug=smoke", "extras.print_config=true", "tags=[pilot]",
           f"hydra.run.dir={tmp_path / 'run'}", *tiny]
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    stdout, log = result.stdout, (tmp_path / "run" / "train.log").read_text()
    assert "extras:\n  print_config: true" in stdout and "- pilot" in stdout  # the composed tree, first
    for text in (stdout, log):  # one line per measurement, in both
        assert "collapse step 0:" in text and "collapse step 4:" in text
    bar = [line for line in stdout.splitlines() if line.startswith("Epoch 0:")]
    assert bar and "4/4" in bar[-1] and "\r" not in stdout  # the training bar as plain lines
    assert (tmp_path / "run" / "checkpoints" / "last.ckpt").is_file() and not (tmp_path / "run" / "wandb").exists()
    assert (tmp_path / "run" / "max_share_heatmap.png").is_file()
    rows = list(csv.DictReader(open(tmp_path / "run" / "csv" / "metrics.csv")))
    assert any(r.get("val/loss") for r in rows)
