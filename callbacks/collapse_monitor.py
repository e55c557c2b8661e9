"""Measure the collapse signature on a fixed probe set while a router trains.

The record it writes, and how that is read, tabulated and drawn, live in ``records``; this is the Lightning
glue that decides when to measure and where to log.
"""
from __future__ import annotations

import logging
import math
import time
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import WandbLogger

from common import atomic
from common.constants import COMPLETION_THRESHOLD, ONSET_THRESHOLD, RANKS, SOLVED_MARGIN
from common.errors import UserError
from common.run_names import run_label
from records import (HEATMAP_PNG, PROFILE_PNG, Record, append_record, flat_metrics, measurement_metrics, new_record,
                     progress_line, read_records, save_run_figures, skipped_record)
from collapse.measure import measure_signature

log = logging.getLogger(__name__)


def full_probe_at(step: int, max_steps: int | None, full_every: int | None) -> bool:
    """Whether a scheduled measurement at ``step`` takes the full probe: the last step, or a multiple of
    ``full_every`` (the checkpoint steps); with a live probe, every other step takes its head."""
    last = bool(max_steps and max_steps > 0 and step >= max_steps)
    return last or bool(full_every and step > 0 and step % full_every == 0)


def measurement_plan(max_steps: int, every: int, full_every: int | None, live: bool) -> tuple[int, int]:
    """(live passes, full passes) of an uninterrupted run: step 0, every ``every`` steps and the last step."""
    steps = sorted({*range(0, max_steps + 1, every), max_steps})
    full = [s for s in steps if not live or full_probe_at(s, max_steps, full_every)]
    return len(steps) - len(full), len(full)


class CollapseMonitor(pl.Callback):
    """At step 0, every ``every_n_steps`` and at the end of training, in eval mode and without gradients:
    route the probe set (and its position-shuffled copy, for the shuffle null), compute the per-layer
    signature, log it to every logger, and append one JSON line to ``<run dir>/collapse.jsonl``.

    With ``live_probe_sequences`` set, the measurements in between run on the probe's first that many
    sequences (a live view, several times cheaper), and the full probe is measured at every
    ``full_probe_every_n_steps`` (the checkpoint interval by default) and always at the last step, so a run's
    final record is the paper's probe. Each record says how many sequences it measured
    (``probe_sequences``).

    Rank zero computes alone and no collective is called, so DDP cannot deadlock here; the other ranks
    simply wait for rank zero at the next gradient all-reduce.
    """

    def __init__(self, every_n_steps: int = 250, ranks: tuple[int, ...] = RANKS, probe_batch_size: int = 50,
                 onset_threshold: float = ONSET_THRESHOLD, completion_threshold: float = COMPLETION_THRESHOLD,
                 live_probe_sequences: int | None = None, full_probe_every_n_steps: int | None = None,
                 solved_margin: float = SOLVED_MARGIN):
        if every_n_steps <= 0:
            raise UserError(f"callbacks.collapse_monitor.every_n_steps must be positive, got {every_n_steps}; "
                            "pass e.g. callbacks.collapse_monitor.every_n_steps=250")
        if live_probe_sequences is not None and live_probe_sequences <= 0:
            raise UserError(f"callbacks.collapse_monitor.live_probe_sequences must be positive or null (the full "
                            f"probe every time), got {live_probe_sequences}")
        self.every_n_steps = every_n_steps
        self.live_probe_sequences = live_probe_sequences
        self.full_probe_every_n_steps = full_probe_every_n_steps
        self.ranks = tuple(ranks)
        self.probe_batch_size = probe_batch_size
        self.onset_threshold = onset_threshold
        self.completion_threshold = completion_threshold
        self.measured_steps: set[int] = set()
        self.onset_step: int | None = None  # first measured step whose depth profile crossed onset
        self.solved_margin = solved_margin
        self.solved_step: int | None = None  # first measured step whose validation loss is within the margin of solved
        self._loss_sum, self._loss_count = 0.0, 0  # training loss since the last measurement
        self._pending = None  # (sum, count) tensors not yet folded into the floats above
        self._val_loss: float | None = None  # the latest validation loss (kept in checkpoints, like the sums)

    def run_dir(self, trainer: pl.Trainer) -> Path:
        # train.py gives the trainer the run directory (run.run_dir()), so the records land beside the config.
        return Path(trainer.default_root_dir)

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if trainer.is_global_zero:
            run_dir = self.run_dir(trainer)
            run_dir.mkdir(parents=True, exist_ok=True)
            probe_path = run_dir / "probe.pt"
            if not probe_path.exists():
                with atomic.atomic_path(probe_path) as tmp:
                    trainer.datamodule.probe.save(tmp)
            # A resumed run appends to the same file and skips steps it already measured.
            records = read_records(run_dir, skipped=True, repair=True)
            self.measured_steps = {r.step for r in records}
            measured = [r for r in reversed(records) if r.skipped is None]
            self.onset_step = next((r.summary.onset_step for r in measured if r.summary.onset_step is not None), None)
            self.solved_step = next((r.summary.solved_step for r in measured if r.summary.solved_step is not None), None)

    def state_dict(self) -> dict:
        # In every checkpoint, so a resumed run's records equal an uninterrupted run's.
        self._flush()
        return {"loss_sum": self._loss_sum, "loss_count": self._loss_count, "val_loss": self._val_loss}

    def load_state_dict(self, state: dict) -> None:
        self._loss_sum, self._loss_count = state["loss_sum"], state["loss_count"]
        self._pending = None
        self._val_loss = state["val_loss"]

    def on_train_start(self, trainer, pl_module) -> None:
        # Step 0; a resume at a scheduled step that the killed run did not get to measure; never other steps.
        if trainer.global_step % self.every_n_steps == 0:
            self._measure(trainer, pl_module)

    def _probe(self, trainer: pl.Trainer, final: bool):
        """The full probe at the last step, at full-probe steps and without a live size; else its live head."""
        probe = trainer.datamodule.probe
        if (final or self.live_probe_sequences is None or not hasattr(probe, "head")
                or full_probe_at(trainer.global_step, trainer.max_steps, self.full_probe_every_n_steps)):
            return probe
        return probe.head(self.live_probe_sequences)

    def _flush(self) -> None:
        if self._pending is not None:
            total, count = self._pending
            self._loss_sum += float(total)
            self._loss_count += int(count)
            self._pending = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if loss is not None:
            # Summed on the loss's device: no host sync per step; folded into floats when read (_flush).
            finite = torch.isfinite(loss.detach())
            total, count = self._pending or (0, 0)
            self._pending = (total + torch.where(finite, loss.detach(), 0.0), count + finite.long())
        if trainer.global_step % self.every_n_steps == 0:
            self._measure(trainer, pl_module)

    def on_validation_end(self, trainer, pl_module) -> None:
        val_loss = trainer.callback_metrics.get("val/loss")
        if val_loss is not None and not trainer.sanity_checking:
            self._val_loss = float(val_loss)

    def on_train_end(self, trainer, pl_module) -> None:
        self._measure(trainer, pl_module, final=True)

    def on_fit_end(self, trainer, pl_module) -> None:
        # Also called when a resume finds training already done (Lightning then skips on_train_end): a run killed
        # between its last checkpoint and its final record or figures completes them here instead of never.
        if trainer.global_step not in self.measured_steps:
            # The loop that would have ended the epoch did not run: record the epoch the uninterrupted run ends in.
            self._measure(trainer, pl_module, final=True, epoch=trainer.current_epoch + 1)
        if trainer.is_global_zero:
            self._plot(trainer)

    def _measure(self, trainer: pl.Trainer, pl_module: pl.LightningModule, final: bool = False,
                 epoch: int | None = None) -> None:
        step = trainer.global_step
        # Mean training loss since the previous measurement: what the studies match arms on. Reset at every
        # measured step, also one a resumed run finds already measured, so the next mean covers the same steps.
        self._flush()
        train_loss = self._loss_sum / self._loss_count if self._loss_count else math.nan
        self._loss_sum, self._loss_count = 0.0, 0
        if not trainer.is_global_zero or step in self.measured_steps:
            return
        if not all(bool(torch.isfinite(p).all()) for p in pl_module.parameters()):
            log.warning(f"collapse step {step}: weights are not finite, measurement skipped")
            self._append(trainer, skipped_record(step, "non-finite weights"))
            return
        probe = self._probe(trainer, final)
        start = time.perf_counter()
        try:
            signature = measure_signature(pl_module, probe, self.ranks, self.probe_batch_size,
                                          self.onset_threshold, self.completion_threshold)
        except torch.linalg.LinAlgError as e:
            # Finite but huge weights (a diverging run) can overflow the keys' spectra: the run's own guard
            # reports the divergence; the monitor records why this step has no signature and goes on.
            reason = f"key spectra failed ({str(e).splitlines()[0][:120]}); the weights are likely diverging"
            log.warning(f"collapse step {step}: measurement skipped: {reason}")
            self._append(trainer, skipped_record(step, reason))
            return
        seconds = time.perf_counter() - start
        task = trainer.datamodule.task_levels() if hasattr(trainer.datamodule, "task_levels") else None
        epoch = trainer.current_epoch if epoch is None else epoch
        record = new_record(step, epoch, seconds, train_loss, self._val_loss, signature, probe_sequences=len(probe),
                            task=task)
        if self.onset_step is None and record.summary.onset_layer is not None:
            self.onset_step = step
        if self.solved_step is None and record.solved(self.solved_margin):
            self.solved_step = step
        record.summary.mark_steps(self.onset_step, self.solved_step)
        metrics = {**flat_metrics(record), **measurement_metrics(seconds, len(probe))}
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)
            logger.save()
        # The record goes last: once it exists, a resume skips this step, so the logged metrics must be on disk.
        self._append(trainer, record)
        log.info(progress_line(record))

    def _append(self, trainer: pl.Trainer, record: Record) -> None:
        append_record(self.run_dir(trainer), record)
        self.measured_steps.add(record.step)

    def _plot(self, trainer: pl.Trainer) -> None:
        run_dir = self.run_dir(trainer)
        records = read_records(run_dir)
        if not records:
            return
        name = run_label(run_dir)  # the arm, as W&B names the run (nope·s0), not the job number
        paths = save_run_figures(run_dir, records, self.onset_threshold, name)
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.log_image(key="collapse/depth_profile", images=[str(paths[PROFILE_PNG])])
                logger.log_image(key="collapse/max_share_heatmap", images=[str(paths[HEATMAP_PNG])])
