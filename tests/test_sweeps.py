"""Local parallel sweeps: the default launcher, the sweep's size, and its progress log under concurrent jobs."""
from __future__ import annotations

import multiprocessing
import re
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf

from common import sweep_log
from common.hydra_callback import sweep_size
from tests.conftest import CONF


def hydra_config(*overrides):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        return compose("train", overrides=list(overrides), return_hydra_config=True).hydra


def test_multirun_defaults_to_the_joblib_launcher_with_one_job_per_core_on_a_cpu(monkeypatch):
    import joblib
    import torch

    launcher = hydra_config().launcher
    assert launcher._target_.endswith("JoblibLauncher")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert launcher.n_jobs == joblib.cpu_count()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # jobs would share the GPU: one at a time
    assert hydra_config().launcher.n_jobs == 1
    assert hydra_config("hydra/launcher=slurm").launcher._target_.endswith("SlurmLauncher")  # presets unchanged


@pytest.mark.parametrize("overrides, expected", [
    ([], 12),  # the experiment's own grid: 4 positions x 3 seeds
    (["router/position=nope,rope,alibi", "seed=range(5)"], 15),  # the command line replaces both axes
    (["router/position=nope,rope,alibi", "seed=range(5)", "data_seed=0,1"], 30),
    (["seed=7"], 4),
])
def test_sweep_size_is_the_basic_sweepers_cross_product_of_params_and_command_line(overrides, expected):
    config = OmegaConf.create({"hydra": {
        "sweeper": {"_target_": "hydra._internal.core_plugins.basic_sweeper.BasicSweeper",
                    "params": {"router/position": "nope,rope,alibi,learned", "seed": "0,1,2"}},
        "overrides": {"task": overrides}}})
    assert sweep_size(config) == expected


def test_sweep_size_is_unknown_for_another_sweeper():
    config = OmegaConf.create({"hydra": {"sweeper": {"_target_": "optuna.Sweeper"}, "overrides": {"task": []}}})
    assert sweep_size(config) is None


def test_progress_lines_count_done_and_failed_jobs_with_elapsed_and_eta(tmp_path, capsys):
    sweep_log.start(tmp_path, 3, "JoblibLauncher (2 at a time)")
    sweep_log.job_finished(tmp_path, "0 (nope·s0)", failed=False, job_seconds=61)
    sweep_log.job_finished(tmp_path, "1 (rope·s0)", failed=True, job_seconds=5)
    sweep_log.job_finished(tmp_path, "2 (alibi·s0)", failed=False, job_seconds=None)
    closing = sweep_log.finish(tmp_path)
    lines = (tmp_path / sweep_log.LOG).read_text().splitlines()
    assert "3 jobs on JoblibLauncher (2 at a time)" in lines[0]
    assert re.search(r"job 0 \(nope·s0\) finished in 1m01s: 1/3 done, 0 failed, elapsed \dm\d\ds, ETA", lines[1])
    assert "job 1 (rope·s0) FAILED in 0m05s: 2/3 done, 1 failed" in lines[2] and "ETA" in lines[2]
    assert "3/3 done, 1 failed" in lines[3] and "ETA" not in lines[3]
    assert closing == "sweep ended: 3/3 jobs done, 1 failed, in 0m00s" and closing in lines[4]
    assert capsys.readouterr().err.count("[sweep] ") == 5  # the same lines on stderr, for the launcher's log


def test_eta_extrapolates_the_sweeps_own_rate():
    state = {"done": 4, "total": 12, "failed": 0, "started": 0.0}
    assert sweep_log.progress_line(state, "3", False, None, now=600.0).endswith("elapsed 10m00s, ETA 20m00s")


def _finish_jobs(sweep: str, n: int) -> None:
    for i in range(n):
        sweep_log.job_finished(Path(sweep), str(i), failed=i % 2 == 0, job_seconds=1.0)


def test_jobs_ending_at_once_in_several_processes_lose_no_count(tmp_path):
    sweep_log.start(tmp_path, 40, "test")
    context = multiprocessing.get_context("spawn")
    workers = [context.Process(target=_finish_jobs, args=(str(tmp_path), 10)) for _ in range(4)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(60)
    assert [w.exitcode for w in workers] == [0] * 4
    lines = (tmp_path / sweep_log.LOG).read_text().splitlines()[1:]
    done = sorted(int(re.search(r": (\d+)/40 done", line).group(1)) for line in lines)
    assert done == list(range(1, 41))  # every count once: the lock serialises read-increment-write
    assert "40/40 done, 20 failed" in lines[-1] or any("40/40 done, 20 failed" in line for line in lines)


def test_a_progress_failure_is_a_warning_not_an_error(tmp_path, caplog):
    blocked = tmp_path / "file"
    blocked.write_text("")  # a file where the sweep folder should be
    sweep_log.job_finished(blocked, "0", failed=False, job_seconds=1.0)
    assert "sweep progress not written" in caplog.text


def test_subprocess_ddp_in_a_local_sweep_is_refused_in_one_line_but_not_under_slurm(monkeypatch):
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from common.errors import UserError
    from run import check_sweep_strategy

    trainer = OmegaConf.create({"strategy": "ddp"})
    monkeypatch.setattr(HydraConfig, "initialized", staticmethod(lambda: True))
    monkeypatch.setattr(HydraConfig, "get", staticmethod(lambda: OmegaConf.create({"mode": RunMode.MULTIRUN})))
    with pytest.raises(UserError, match="trainer.strategy=ddp_spawn"):
        check_sweep_strategy(trainer)
    check_sweep_strategy(OmegaConf.create({"strategy": "ddp_spawn"}))  # forks from the job: fine
    check_sweep_strategy(OmegaConf.create({"strategy": "auto"}))
    for key, value in {"SLURM_NTASKS": "4", "SLURM_JOB_NAME": "train", "SLURM_PROCID": "0", "SLURM_LOCALID": "0",
                       "SLURM_NODEID": "0"}.items():
        monkeypatch.setenv(key, value)
    check_sweep_strategy(trainer)  # SLURM launched the ranks: nothing is relaunched
