"""Checkpoints that survive kills and preemption, and finding the one to resume from.

Three problems with Lightning's defaults that this module fixes (docs/errors.md, "What survives what"):

- fsspec writes a checkpoint through a temp file in ``$TMPDIR`` and moves it; across filesystems the move is
  a copy, so a kill leaves ``last.ckpt`` at 0 bytes. :class:`AtomicCheckpointIO` writes beside the target and
  renames. Lightning also swallows a ``PermissionError`` there (a run trains to the end with no checkpoint);
  here an unwritable folder is an error, before training starts.
- Lightning takes a step's checkpoint in ``on_train_batch_end``, before it hands that step's metrics to the
  loggers and before the step's validation, which a resumed run then skips. Both would be lost if the run
  died after the checkpoint. :class:`Checkpoint` therefore holds the checkpoint in memory and writes it only
  once the step's metrics are logged and flushed, and retakes it after the step's validation if one follows.
- Preemption (SLURM sends SIGUSR1/SIGUSR2 before the time limit, SIGTERM on preemption) would lose up to one
  checkpoint interval. :class:`Checkpoint` checkpoints at the end of the current step instead and stops with
  :class:`Preempted`; train.py then requeues the job (:func:`requeue`).

One handler owns preemption (slurm/README.md, docs/decisions.md): this callback, from the start of fit to the
end of the run. Lightning's SLURM auto-requeue is switched off where the trainer is built
(``run.objects.cluster_plugins``: ``SLURMEnvironment(auto_requeue=False)``), and the SIGTERM notifier Lightning
installs anyway is replaced when training starts. submitit's handler is never called by a signal while this
callback holds them: :func:`requeue` calls it, once, for a USR signal. SIGTERM is not requeued by the job:
SLURM requeues a job it preempts or that ``scontrol requeue`` names, and a ``scancel`` must stay cancelled.
"""
from __future__ import annotations

import io
import logging
import os
import signal
import subprocess
import threading
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO

from common import atomic
from common.checkpoints import LAST
from common.checksum import CHECKSUM, tensor_checksum
from common.errors import UserError

log = logging.getLogger(__name__)



class AtomicCheckpointIO(TorchCheckpointIO):
    """``torch.save`` into a temp file beside the target, fsync, rename. While ``held`` is a dict, checkpoints
    are serialised at once (the state of that moment) but only written by :meth:`write_held`."""

    def __init__(self):
        self.held: dict[str, bytes] | None = None

    def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
        checkpoint[CHECKSUM] = tensor_checksum(checkpoint)  # checked by inspect(): flipped bytes fall back
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)
        if self.held is not None:
            self.held[str(path)] = buffer.getvalue()
        else:
            self._write(Path(path), buffer.getvalue())

    def write_held(self) -> None:
        held, self.held = self.held or {}, None
        for path, data in held.items():  # in the order taken: step file first, last.ckpt after it
            self._write(Path(path), data)

    @staticmethod
    def _write(path: Path, data: bytes) -> None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic.write_bytes(path, data)
        except OSError as e:
            raise UserError(f"cannot write checkpoint {path} ({e.strerror or type(e).__name__}); free or fix that "
                            f"folder, or set callbacks.checkpoint.dirpath=<a writable folder>") from None


class Preempted(Exception):
    """Training stopped on a preemption signal after writing ``path`` (the state after ``step``)."""

    def __init__(self, signum: int, step: int, path: str):
        self.signum, self.step, self.path = signum, step, path
        super().__init__(f"{signal.Signals(signum).name} at step {step}: checkpoint {path}")


class Checkpoint(ModelCheckpoint):
    """``ModelCheckpoint`` whose files are complete, consistent with the logs, and written on preemption.

    Extra arguments: ``preempt_signals`` (names, e.g. ``[SIGUSR1, SIGUSR2, SIGTERM]``; empty to leave signals
    alone) and ``max_requeues`` (plain sbatch jobs: how often :func:`requeue` puts the job back in the queue).
    """

    def __init__(self, *args, preempt_signals: list[str] = ("SIGUSR1", "SIGUSR2", "SIGTERM"), max_requeues: int = 10,
                 **kwargs):
        super().__init__(*args, **kwargs)
        self.preempt_signals = [signal.Signals[name] for name in preempt_signals]
        self.max_requeues = max_requeues
        # Handlers in place before training (submitit's requeue handler, on USR2 or USR1): requeue() calls them.
        self.handlers_before = {s: signal.getsignal(s) for s in {*self.preempt_signals, signal.SIGUSR1, signal.SIGUSR2}}
        self._signal: int | None = None
        self._held_paths: list[str] = []  # checkpoints taken but not yet written (the same list on every rank)
        self._preempt_path: str | None = None

    # --- setup: atomic IO, writable folder -------------------------------------------------------------

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        self._take_signals()  # before Lightning registers its own handlers, which then find ours in place
        if not isinstance(trainer.strategy.checkpoint_io, AtomicCheckpointIO):
            trainer.strategy.checkpoint_io = AtomicCheckpointIO()
        if trainer.is_global_zero:
            if problem := atomic.check_writable(self.dirpath):
                raise UserError(f"cannot write checkpoints to {self.dirpath} ({problem}); make it writable or set "
                                f"callbacks.checkpoint.dirpath=<a writable folder>")
            atomic.remove_stale_temps(self.dirpath)

    def _io(self, trainer: pl.Trainer) -> AtomicCheckpointIO:
        return trainer.strategy.checkpoint_io

    def _save_checkpoint(self, trainer: pl.Trainer, filepath: str) -> None:
        if self._io(trainer).held is not None:
            self._held_paths.append(filepath)
        super()._save_checkpoint(trainer, filepath)

    # --- take at the end of a step, write once the step's metrics are out -------------------------------

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._io(trainer).held = {}
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if trainer.strategy.reduce_boolean_decision(self._signal is not None, all=False):
            self._preempt_path = os.path.join(self.dirpath, LAST)
            if self._preempt_path not in self._held_paths:  # unless this step's last.ckpt is taken already
                self._save_checkpoint(trainer, self._preempt_path)
        if not self._held_paths:
            self._io(trainer).held = None

    def on_validation_end(self, trainer, pl_module) -> None:
        super().on_validation_end(trainer, pl_module)
        if self._held_paths and not trainer.sanity_checking:
            # This step's validation ran after the checkpoint was taken: retake it, or a resume would skip it.
            paths, self._held_paths = self._held_paths, []
            self._io(trainer).held = None
            self._flush_loggers(trainer)
            for path in paths:
                trainer.save_checkpoint(path, self.save_weights_only)
            self._stop_if_preempted(trainer)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._write_held(trainer)
        self._stop_if_preempted(trainer)

    def on_train_end(self, trainer, pl_module) -> None:
        self._write_held(trainer)
        self._preempt_path = None  # training is complete: nothing left to requeue for
        self._flush_loggers(trainer)
        # Lightning saves last.ckpt at the end only if this process saved nothing before, so with max_steps not
        # a multiple of the interval the final weights were never written: save them whenever last.ckpt lags.
        # Not after a non-finite stop: its last good checkpoint stays the resume point the error message names.
        diverged = any(getattr(c, "failure", None) for c in trainer.callbacks)
        if self.save_last and self._last_global_step_saved != trainer.global_step and not diverged:
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
        else:
            super().on_train_end(trainer, pl_module)

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        # A step that raised may not have logged everything: keep the previous checkpoint as the resume point.
        self._io(trainer).held, self._held_paths = None, []
        super().on_exception(trainer, pl_module, exception)

    def _write_held(self, trainer: pl.Trainer) -> None:
        if not self._held_paths:
            return
        self._held_paths = []
        self._flush_loggers(trainer)
        if trainer.is_global_zero:
            self._io(trainer).write_held()

    @staticmethod
    def _flush_loggers(trainer: pl.Trainer) -> None:
        for logger in trainer.loggers:
            logger.save()

    # --- preemption ----------------------------------------------------------------------------------

    def on_train_start(self, trainer, pl_module) -> None:
        super().on_train_start(trainer, pl_module)
        # Lightning registered its handlers when fit started (a SIGTERM notifier always, which would end training
        # with SIGTERMException before this step's checkpoint is written): ours alone from here. A SIGTERM that
        # its notifier caught in between is taken over. Lightning restores the handlers of before fit (ours).
        connector = getattr(trainer, "_signal_connector", None)
        if getattr(connector, "received_sigterm", False) and signal.SIGTERM in self.preempt_signals:
            connector.received_sigterm = False
            self._on_signal(signal.SIGTERM, None)
        self._take_signals()

    def _take_signals(self) -> None:
        # Python takes signal handlers in the main thread only.
        if threading.current_thread() is threading.main_thread():
            for s in self.preempt_signals:
                signal.signal(s, self._on_signal)

    def release_signals(self) -> None:
        """Give the signals back to the handlers in place before this callback took them (train.py, at the end)."""
        if threading.current_thread() is not threading.main_thread():
            return
        for s in self.preempt_signals:
            if signal.getsignal(s) == self._on_signal:
                signal.signal(s, self.handlers_before.get(s, signal.SIG_DFL))

    def _on_signal(self, signum: int, frame) -> None:
        if self._signal is None:
            log.warning(f"received {signal.Signals(signum).name}: checkpointing at the end of this step, then stopping")
            self._signal = signum

    def _stop_if_preempted(self, trainer: pl.Trainer) -> None:
        if self._preempt_path is not None:
            raise Preempted(self._signal or signal.SIGTERM, trainer.global_step, self._preempt_path)


def requeue(checkpoint: Checkpoint, preempted: Preempted) -> str:
    """Hand a preempted job back to its scheduler, once; returns what was done. Never raises.

    A USR signal (the warning before a time limit, or ``scancel --signal=USR1``): under submitit its own
    handler requeues the job (it dumps the job, runs ``scontrol requeue`` and exits); a plain sbatch job is
    requeued with ``scontrol requeue`` (``#SBATCH --requeue``). SIGTERM: nothing, SLURM requeues a job it
    preempts or that ``scontrol requeue`` names by itself, and a job ended with ``scancel`` stays ended."""
    job = os.environ.get("SLURM_JOB_ID")
    if preempted.signum == signal.SIGTERM:
        if job is None:
            return "not a SLURM job: run the same command again with ckpt_path=auto to continue"
        return (f"SIGTERM: not requeued by the job (SLURM requeues job {job} itself if it preempted or requeued it; "
                f"a cancelled job stays cancelled); it resumes from {preempted.path} with ckpt_path=auto")
    if os.environ.get("SUBMITIT_EXECUTOR"):
        import submitit

        usr_signal = submitit.JobEnvironment._usr_sig()
        handler = checkpoint.handlers_before.get(usr_signal)
        if callable(handler):
            try:
                handler(usr_signal, None)  # submitit: dump the job, requeue it, sys.exit
            except Exception as e:  # e.g. scontrol failed: say so, never leave a result that reads as finished
                return f"submitit could not requeue the job ({type(e).__name__}: {e}); resubmit with ckpt_path=auto"
        return "submitit left no requeue handler; resubmit the job"
    if job is None:
        return "not a SLURM job: run the same command again with ckpt_path=auto to continue"
    restarts = int(os.environ.get("SLURM_RESTART_COUNT", 0))
    if restarts >= checkpoint.max_requeues:
        return f"requeued {restarts} times already (callbacks.checkpoint.max_requeues); resubmit with ckpt_path=auto"
    try:
        subprocess.run(["scontrol", "requeue", job], check=True, timeout=60)
    except (OSError, subprocess.SubprocessError) as e:
        return f"scontrol requeue {job} failed ({e}); resubmit with ckpt_path=auto"
    return f"requeued SLURM job {job}"
