"""Measure the collapse signature on a fixed probe set while a router trains."""
from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import WandbLogger

from collapse import SignatureAccumulator

log = logging.getLogger(__name__)

JSONL = "collapse.jsonl"
PROFILE_PNG = "collapse_profile.png"


def read_records(run_dir: str | Path) -> list[dict]:
    """The monitor's measurements of a run, in step order (empty if none were written)."""
    path = Path(run_dir) / JSONL
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@torch.no_grad()
def measure_signature(module, probe, ranks=(1, 4, 8), batch_size: int = 50, onset_threshold: float = 0.2,
                      completion_threshold: float = 0.5):
    """The signature of ``module.probe_routing`` on ``probe``, in eval mode, micro-batched; the module's
    train/eval mode is restored afterwards."""
    was_training = module.training
    module.eval()
    try:
        accumulator = SignatureAccumulator(ranks=tuple(ranks))
        for inputs, shuffled in probe.batches(batch_size):
            routing = module.probe_routing(inputs)
            null = module.probe_routing(shuffled) if shuffled is not None else None
            accumulator.update(routing, null)
        return accumulator.compute(onset_threshold=onset_threshold, completion_threshold=completion_threshold)
    finally:
        module.train(was_training)


def progress_line(record: dict) -> str:
    """One line per measurement, readable in a redirected log: step, losses, peak concentration, onset."""
    s = record["summary"]

    def num(value, digits=3):
        return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"

    peak = "-" if s.get("peak_layer") is None else (
        f"{num(s.get('peak_max_share'))} at L{s['peak_layer']}"
        + ("" if s.get("peak_sink_source") is None else f" (source {s['peak_sink_source']})"))
    onset = "never" if s.get("onset_layer") is None else f"L{s['onset_layer']}"
    return (f"collapse step {record['step']}: train loss {num(record.get('train_loss'))}, val loss "
            f"{num(record.get('val_loss'))}, peak max share {peak}, onset {onset}"
            + ("" if s.get("onset_step") is None else f" (first at step {s['onset_step']})")
            + f" [{record['seconds']:.1f}s]")


class CollapseMonitor(pl.Callback):
    """At step 0, every ``every_n_steps`` and at the end of training, in eval mode and without gradients:
    route the probe set (and its position-shuffled copy, for the shuffle null), compute the per-layer
    signature, log it to every logger, and append one JSON line to ``<run dir>/collapse.jsonl``.

    Rank zero computes alone and no collective is called, so DDP cannot deadlock here; the other ranks
    simply wait for rank zero at the next gradient all-reduce.
    """

    def __init__(self, every_n_steps: int = 200, ranks: tuple[int, ...] = (1, 4, 8), probe_batch_size: int = 50,
                 onset_threshold: float = 0.2, completion_threshold: float = 0.5):
        if every_n_steps <= 0:
            raise ValueError(f"every_n_steps must be positive, got {every_n_steps}")
        self.every_n_steps = every_n_steps
        self.ranks = tuple(ranks)
        self.probe_batch_size = probe_batch_size
        self.onset_threshold = onset_threshold
        self.completion_threshold = completion_threshold
        self.measured_steps: set[int] = set()
        self.onset_step: int | None = None  # first measured step whose depth profile crossed onset
        self._loss_sum, self._loss_count = 0.0, 0  # training loss since the last measurement

    def run_dir(self, trainer: pl.Trainer) -> Path:
        return Path(trainer.default_root_dir)

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if trainer.is_global_zero:
            run_dir = self.run_dir(trainer)
            run_dir.mkdir(parents=True, exist_ok=True)
            probe_path = run_dir / "probe.pt"
            if not probe_path.exists():
                trainer.datamodule.probe.save(probe_path)
            # A resumed run appends to the same file and skips steps it already measured.
            records = read_records(run_dir)
            self.measured_steps = {r["step"] for r in records}
            self.onset_step = next((r["summary"].get("onset_step") for r in reversed(records)
                                    if r["summary"].get("onset_step") is not None), None)

    def on_train_start(self, trainer, pl_module) -> None:
        self._measure(trainer, pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if loss is not None and bool(torch.isfinite(loss)):
            self._loss_sum += float(loss)
            self._loss_count += 1
        if trainer.global_step % self.every_n_steps == 0:
            self._measure(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        self._measure(trainer, pl_module)
        if trainer.is_global_zero:
            self._plot(trainer)

    def _measure(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        step = trainer.global_step
        if not trainer.is_global_zero or step in self.measured_steps:
            return
        start = time.perf_counter()
        signature = measure_signature(pl_module, trainer.datamodule.probe, self.ranks, self.probe_batch_size,
                                      self.onset_threshold, self.completion_threshold)
        seconds = time.perf_counter() - start
        if self.onset_step is None and signature.summary["onset_layer"] is not None:
            self.onset_step = step
        signature.summary["onset_step"] = self.onset_step
        # Mean training loss since the previous measurement: what the studies match arms on.
        train_loss = self._loss_sum / self._loss_count if self._loss_count else math.nan
        self._loss_sum, self._loss_count = 0.0, 0
        val_loss = trainer.callback_metrics.get("val/loss")
        record = {"step": step, "epoch": trainer.current_epoch, "seconds": seconds,
                  "train_loss": None if math.isnan(train_loss) else train_loss,
                  "val_loss": None if val_loss is None else float(val_loss), **signature.to_dict()}
        with open(self.run_dir(trainer) / JSONL, "a") as f:
            f.write(json.dumps(record) + "\n")
        self.measured_steps.add(step)
        log.info(progress_line(record))
        metrics = {**signature.flat(), "collapse/seconds": seconds}
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)
            logger.save()

    def _plot(self, trainer: pl.Trainer) -> None:
        from analysis.plots import depth_profile_figure  # matplotlib only when a plot is drawn

        records = read_records(self.run_dir(trainer))
        if not records:
            return
        path = self.run_dir(trainer) / PROFILE_PNG
        depth_profile_figure(records, title=self.run_dir(trainer).name).savefig(path, dpi=120)
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.log_image(key="collapse/depth_profile", images=[str(path)])
