"""Hydra callbacks for train.py: unwritable output folders as one-line errors, a sweep's progress and its
failed jobs.

Hydra creates the run or sweep folder (and writes ``.hydra/``) before train.py runs, so an unwritable
``hydra.run.dir`` would otherwise end in Hydra's traceback. Each job of a sweep writes one progress line as it
ends (``common.sweep_log``; the job hooks run in the process that ran the job, a parallel launcher's worker
included). On SLURM the parent waits for requeued jobs and names what it leaves running (``common.slurm_wait``). A failed multirun job returns normally (so the sweep goes on) after writing its ``FAILED``
marker; ``on_multirun_end`` lists them and exits 1.
"""
from __future__ import annotations

import logging
import sys
import time
from pathlib import Path

from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig

from common import sweep_log
from common.atomic import check_writable
from common.failed import FAILED, read_failure

log = logging.getLogger(__name__)


def _check(folder: str, key: str) -> None:
    if problem := check_writable(folder):
        print(f"error: cannot write to {folder} ({problem}); pass {key}=<a writable folder>", file=sys.stderr)
        sys.exit(2)  # SystemExit passes through Hydra's error reporting, which catches Exception only


def sweep_jobs(config: DictConfig) -> list[list[str]] | None:
    """Each job's overrides as Hydra's basic sweeper makes them of the command line and the config's sweeper
    params (its own parsing and cross product), in job-number order; None for another sweeper or anything it
    cannot parse. ``config`` is the sweep's Hydra config, or ``<sweep>/multirun.yaml`` read back."""
    if not str(config.hydra.sweeper.get("_target_", "")).endswith("BasicSweeper"):
        return None
    try:
        from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
        from hydra.core.override_parser.overrides_parser import OverridesParser

        params = [f"{key}={value}" for key, value in (config.hydra.sweeper.get("params") or {}).items()]
        parsed = OverridesParser.create().parse_overrides(params + list(config.hydra.overrides.task))
        return [list(job) for batch in BasicSweeper.split_arguments(parsed, None) for job in batch]
    except Exception as e:  # a progress count must never stop a sweep
        log.warning(f"sweep jobs unknown ({type(e).__name__}: {e})")
        return None


def sweep_size(config: DictConfig) -> int | None:
    """How many jobs the sweep makes (:func:`sweep_jobs`)."""
    jobs = sweep_jobs(config)
    return None if jobs is None else len(jobs)


class RunGuard(Callback):
    def __init__(self):
        self._job_started: float | None = None

    def on_run_start(self, config: DictConfig, **kwargs) -> None:
        _check(config.hydra.run.dir, "hydra.run.dir")

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        _check(config.hydra.sweep.dir, "hydra.sweep.dir")
        launcher = str(config.hydra.launcher.get("_target_", "")).rsplit(".", 1)[-1]
        if launcher == "SlurmLauncher":  # wait for requeued jobs, or say what is left running (common.slurm_wait)
            from common import slurm_wait

            slurm_wait.install()
        jobs = config.hydra.launcher.get("n_jobs")
        sweep_log.start(Path(config.hydra.sweep.dir), sweep_size(config),
                        f"{launcher}{f' ({jobs} at a time)' if jobs else ''}")

    def on_job_start(self, config: DictConfig, **kwargs) -> None:
        self._job_started = time.monotonic()

    def on_job_end(self, config: DictConfig, job_return, **kwargs) -> None:
        if config.hydra.mode != RunMode.MULTIRUN:
            return
        from common.run_names import run_label

        job = Path(config.hydra.runtime.output_dir)
        try:
            name = f"{job.name} ({label})" if (label := run_label(job)) != job.name else job.name
        except Exception:  # a label is a nicety; the count is what matters
            name = job.name
        failed = (job / FAILED).is_file() or getattr(job_return.status, "name", "") == "FAILED"
        seconds = None if self._job_started is None else time.monotonic() - self._job_started
        sweep_log.job_finished(Path(config.hydra.sweep.dir), name, failed, seconds)

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        sweep = Path(config.hydra.sweep.dir)
        sweep_log.finish(sweep)
        failed = sorted(p.parent for p in sweep.rglob(FAILED))
        if not failed:
            return
        print(f"\n{len(failed)} job(s) of the sweep failed (the others finished); each folder's {FAILED} says why:",
              file=sys.stderr)
        for job in failed:
            failure = read_failure(job)
            at = "" if failure["step"] is None else f" at step {failure['step']}"
            print(f"  {job.relative_to(sweep)}{at}: {failure['reason']}", file=sys.stderr)
        sys.exit(1)
