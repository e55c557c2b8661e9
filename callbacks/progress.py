"""Training progress in a redirected log: one line at most every ``LOG_INTERVAL`` seconds.

Lightning picks a rich progress bar when rich is installed, and rich writes nothing to a file until training
ends; a plain tqdm bar writes one carriage-return redraw per step. Off a terminal, train.py uses this bar
instead: the step count out of ``max_steps``, rate, time left and the progress-bar metrics (train and val
loss), as a plain line.
"""
from __future__ import annotations

import math
import sys
import time

from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.callbacks.progress.tqdm_progress import Tqdm

from common import progress


class LogProgressBar(TQDMProgressBar):
    def __init__(self):
        super().__init__()
        self._last_line = -math.inf

    def init_train_tqdm(self) -> Tqdm:
        return Tqdm(desc=self.train_description, disable=self.is_disabled, leave=True, smoothing=0,
                    bar_format=self.BAR_FORMAT, **progress.bar_options(sys.stdout))

    def init_validation_tqdm(self) -> Tqdm:
        return Tqdm(disable=True)  # a few batches; the line after validation shows its loss

    def on_train_epoch_start(self, trainer, *args) -> None:
        super().on_train_epoch_start(trainer, *args)
        if self.train_progress_bar.total is None and trainer.max_steps > 0:  # endless loader: count to max_steps
            self.train_progress_bar.total = trainer.max_steps

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.train_progress_bar.n = trainer.global_step  # current also for the line after a validation
        now = time.monotonic()
        if now - self._last_line >= progress.LOG_INTERVAL or trainer.global_step >= trainer.max_steps:
            self._last_line = now
            self.train_progress_bar.set_postfix(self.get_metrics(trainer, pl_module))  # redraws: one line
