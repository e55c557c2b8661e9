"""Validate at the last training step, whatever ``trainer.val_check_interval`` says.

Training length is in steps over an endless loader, so Lightning validates only at multiples of the interval:
a run shorter than the interval (``max_steps=60``, interval 200) never validated and a study read its val loss
as missing; a run whose length is not a multiple lost its last stretch. Asking the trainer to stop at
``max_steps`` makes Lightning run its stop-time validation (as for early stopping) after that step.
"""
from __future__ import annotations

import lightning.pytorch as pl


class ValidateAtEnd(pl.Callback):
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module, outputs, batch, batch_idx) -> None:
        if 0 < trainer.max_steps <= trainer.global_step:
            trainer.should_stop = True
