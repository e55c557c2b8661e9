"""Lightning's CSV and W&B loggers, made safe for resumes and failures.

- ``CSVLogger`` keeps the history of a resumed run: Lightning's, given a fixed version, deletes the existing
  ``metrics.csv`` when a run restarts. Here rows are appended (fsynced); a change of columns rewrites the file
  atomically; a row torn by a kill is dropped when the run resumes. A resumed run logs again the steps after
  its checkpoint, so a step can appear twice with the same values: readers take the last row of a step.
- ``WandbLogger`` is a view that may fail without taking training with it: the first exception from W&B (at
  init or mid-run: its service died, its folder is unwritable) is reported once and turns W&B off for the rest
  of the run, while training and the local files go on. W&B's own log files (``debug.log``) fail differently:
  Python's logging prints a ``--- Logging error ---`` traceback for every line W&B logs (21 on a full disk,
  from ``wandb.init`` alone). Those errors go to the same one warning (:func:`_wandb_logging_error`); later
  ones are counted, not printed.
"""
from __future__ import annotations

import csv
import functools
import io
import errno
import logging
import os
import sys
from typing import Any

from lightning.fabric.loggers.logger import _DummyExperiment
from lightning.pytorch.core.saving import save_hparams_to_yaml
from lightning.pytorch.loggers import CSVLogger as _CSVLogger, WandbLogger as _WandbLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter

from common import atomic

log = logging.getLogger(__name__)


class _ResumableWriter(ExperimentWriter):
    def _check_log_dir_exists(self) -> None:
        # Called once at start: keep what a previous (killed, preempted or finished) run of this dir logged.
        lines = atomic.read_lines(self.metrics_file_path, repair=True)
        if lines:
            self.metrics_keys = next(csv.reader(lines[:1]))

    def save(self) -> None:
        if not self.metrics:
            return
        new_keys = self._record_new_keys()
        if new_keys or not os.path.isfile(self.metrics_file_path):
            self._rewrite_with_new_header(self.metrics_keys)
        else:
            atomic.append_lines(self.metrics_file_path, self._rows(self.metrics, header=False))
        self.metrics = []

    def _rewrite_with_new_header(self, fieldnames: list[str]) -> None:
        old = list(csv.DictReader(atomic.read_lines(self.metrics_file_path)))
        atomic.write_text(self.metrics_file_path, "".join(line + "\n" for line in self._rows(old + self.metrics)))

    def _rows(self, rows: list[dict], header: bool = True) -> list[str]:
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=self.metrics_keys, lineterminator="\n")
        if header:
            writer.writeheader()
        writer.writerows(rows)
        return buffer.getvalue().splitlines()

    def log_hparams(self, params: dict[str, Any]) -> None:
        self.hparams.update(params)
        with atomic.atomic_path(os.path.join(self.log_dir, self.NAME_HPARAMS_FILE)) as tmp:
            save_hparams_to_yaml(tmp, self.hparams)


class CSVLogger(_CSVLogger):
    """``CSVLogger`` whose ``metrics.csv`` survives resumes and kills (module docstring). Local paths only."""

    @property
    def experiment(self) -> _ResumableWriter:
        if self._experiment is None:
            os.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _ResumableWriter(log_dir=self.log_dir)
        return self._experiment


def _guarded(method):
    @functools.wraps(method)
    def call(self, *args, **kwargs):
        if self.failure is not None:
            return None
        try:
            return method(self, *args, **kwargs)
        except Exception as e:  # anything W&B raises; training must not see it
            self._fail(e)
            return None
    return call


_handle_error = logging.Handler.handleError  # Python's: a traceback on stderr per failed log line
_active: "WandbLogger | None" = None  # the W&B logger of the run this process trains


def _wandb_logging_error(handler: logging.Handler, record: logging.LogRecord) -> None:
    """``logging.Handler.handleError`` for W&B's own log lines (logger ``wandb``): the first failure becomes the
    run's one W&B warning, later ones are counted. Every other logger's errors are reported as Python does."""
    if not record.name.startswith("wandb"):
        return _handle_error(handler, record)
    error = sys.exc_info()[1] or OSError("unknown logging error")
    logger = _active
    if logger is None:
        return None  # no run of ours: W&B logging outside training is not ours to report
    logger.suppressed_errors += 1
    if logger.failure is None:
        where = getattr(handler, "baseFilename", None)
        logger._fail(error, where=where)
    return None


class WandbLogger(_WandbLogger):
    """``WandbLogger`` that turns itself off at its first failure (module docstring)."""

    def __init__(self, *args, **kwargs):
        global _active
        super().__init__(*args, **kwargs)
        self.failure: str | None = None
        self.suppressed_errors = 0  # W&B's own logging errors after the first, counted instead of printed
        _active = self
        logging.Handler.handleError = _wandb_logging_error

    def _fail(self, error: BaseException, where: str | None = None) -> None:
        self.failure = f"{type(error).__name__}: {error}".strip().splitlines()[0]
        if where and str(where) not in self.failure:
            self.failure += f" writing {where}"
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
            fix = f"free space under {self.save_dir}"
        elif isinstance(error, OSError) and error.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            fix = f"make {self.save_dir} writable"
        else:
            fix = "check W&B's service and settings"
        log.warning(f"W&B failed ({self.failure}); W&B is off for the rest of this run (later W&B errors are "
                    f"counted, not shown). Training goes on and collapse.jsonl, csv/metrics.csv and the checkpoints "
                    f"stay complete. Fix: {fix}, or pass logger=csv to train without W&B.")

    @property
    def experiment(self):
        if self.failure is None:
            try:
                return super().experiment
            except Exception as e:  # e.g. wandb.init cannot start its service or write its folder
                self._fail(e)
        return _DummyExperiment()

    log_hyperparams = _guarded(_WandbLogger.log_hyperparams)
    log_metrics = _guarded(_WandbLogger.log_metrics)
    log_table = _guarded(_WandbLogger.log_table)
    log_text = _guarded(_WandbLogger.log_text)
    log_image = _guarded(_WandbLogger.log_image)
    log_audio = _guarded(_WandbLogger.log_audio)
    log_video = _guarded(_WandbLogger.log_video)
    watch = _guarded(_WandbLogger.watch)
    after_save_checkpoint = _guarded(_WandbLogger.after_save_checkpoint)
    finalize = _guarded(_WandbLogger.finalize)

    @_guarded
    def finish(self, status: str) -> None:
        """End the W&B run with the run's real outcome: ``success``, ``failed`` or ``preempted`` (Lightning's own
        ``finalize("success")`` comes before train.py's non-finite check, so it cannot be the one to say)."""
        if self._experiment is None:
            return
        if status == "preempted":
            self._experiment.mark_preempting()
        self._experiment.finish(exit_code=0 if status == "success" else 1)
        self._experiment = None
