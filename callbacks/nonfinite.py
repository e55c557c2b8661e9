"""Stop training at the first non-finite loss or gradient, with the weights still the last good ones."""
from __future__ import annotations

import lightning.pytorch as pl
import torch


class NonFiniteGuard(pl.Callback):
    """A non-finite loss is caught by the task (``training_step`` returns None: no backward, no step). A finite
    loss can still give non-finite gradients; this guard drops them before the optimiser step (AdamW then leaves
    every weight as it was) and stops training. ``failure`` = (step, "loss" | "gradient") for train.py's message.

    Not under fp16 loss scaling (``precision=16-mixed``), whose scaler expects and skips inf gradients itself.
    """

    def __init__(self):
        self.failure: tuple[int, str] | None = None

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer) -> None:
        if self.failure is not None or str(trainer.precision) == "16-mixed":
            return
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        if grads and not bool(torch.stack([g.isfinite().all() for g in grads]).all()):
            self.failure = (trainer.global_step, "gradient")
            optimizer.zero_grad(set_to_none=True)
            trainer.should_stop = True

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = getattr(pl_module, "nonfinite_step", None)
        if step is not None and self.failure is None:
            self.failure = (step, "loss")
