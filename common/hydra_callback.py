"""Hydra callbacks for train.py: unwritable output folders as one-line errors, and a sweep's failed jobs.

Hydra creates the run or sweep folder (and writes ``.hydra/``) before train.py runs, so an unwritable
``hydra.run.dir`` would otherwise end in Hydra's traceback. A failed multirun job returns normally (so the
sweep goes on) after writing its ``FAILED`` marker; ``on_multirun_end`` lists them and exits 1.
"""
from __future__ import annotations

import sys
from pathlib import Path

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from common.atomic import check_writable
from common.failed import FAILED, read_failure


def _check(folder: str, key: str) -> None:
    if problem := check_writable(folder):
        print(f"error: cannot write to {folder} ({problem}); pass {key}=<a writable folder>", file=sys.stderr)
        sys.exit(2)  # SystemExit passes through Hydra's error reporting, which catches Exception only


class RunGuard(Callback):
    def on_run_start(self, config: DictConfig, **kwargs) -> None:
        _check(config.hydra.run.dir, "hydra.run.dir")

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        _check(config.hydra.sweep.dir, "hydra.sweep.dir")

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        sweep = Path(config.hydra.sweep.dir)
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
