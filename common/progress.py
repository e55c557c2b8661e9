"""Progress that stays readable when the output is a file (SLURM logs, nohup, ``> log``): the analysis's bars
and the training loop's bar, in one place.

On a terminal these are ordinary tqdm bars. Redirected, a bar redraws itself with carriage returns, which a
log shows as one ever-growing line; there each redraw becomes a line of its own instead, at most one every
``LOG_INTERVAL`` seconds, plus the final count.
"""
from __future__ import annotations

import functools
import math
import re
import sys
import time
from typing import Iterable

from tqdm import tqdm

LOG_INTERVAL = 30.0  # seconds between progress lines in a log
_TIMING = re.compile(r"\[[\d:]+<[\d:?]+, [^,\]]+")  # tqdm's "[elapsed<remaining, rate"


class LineStream:
    """A stream for tqdm that writes each redraw of the bar as one plain line; a redraw that only updates the
    timing (tqdm's closing redraw) is not repeated."""

    def __init__(self, stream):
        self.stream, self.last = stream, None

    def write(self, text: str) -> None:
        text = text.replace("\r", "").strip()  # tqdm writes "\r" + bar + padding
        progress = _TIMING.sub("[", text)  # what changed apart from the clock: count, bar, postfix metrics
        if text and progress != self.last:
            self.stream.write(text + "\n")
            self.last = progress

    def flush(self) -> None:
        self.stream.flush()


def is_terminal(stream=None) -> bool:
    stream = stream or sys.stderr
    return hasattr(stream, "isatty") and stream.isatty()


def bar_options(stream=None) -> dict:
    """tqdm keyword arguments for ``stream`` (default stderr): a live bar on a terminal, lines in a log."""
    stream = stream or sys.stderr
    if is_terminal(stream):
        return {"file": stream}
    return {"file": LineStream(stream), "mininterval": LOG_INTERVAL, "ascii": True, "ncols": 100}


def progress(iterable: Iterable, desc: str, total: int | None = None, unit: str = "batch") -> tqdm:
    """``iterable`` with a progress bar named ``desc`` on stderr."""
    return tqdm(iterable, desc=desc, total=total, unit=unit, **bar_options())


def log_progress_bar():
    """The training loop's bar for a redirected log: one line at most every ``LOG_INTERVAL`` seconds.

    Lightning picks a rich progress bar when rich is installed, and rich writes nothing to a file until training
    ends; a plain tqdm bar writes one carriage-return redraw per step. Off a terminal, train.py uses this bar
    instead: the step count out of ``max_steps``, rate, time left and the progress-bar metrics (train and val
    loss), as a plain line. Lightning is imported here, not when this module is: analysis never needs it."""
    return _log_progress_bar_class()()


@functools.cache
def _log_progress_bar_class():
    from lightning.pytorch.callbacks import TQDMProgressBar
    from lightning.pytorch.callbacks.progress.tqdm_progress import Tqdm

    class LogProgressBar(TQDMProgressBar):
        def __init__(self):
            super().__init__()
            self._last_line = -math.inf

        def init_train_tqdm(self) -> Tqdm:
            return Tqdm(desc=self.train_description, disable=self.is_disabled, leave=True, smoothing=0,
                        bar_format=self.BAR_FORMAT, **bar_options(sys.stdout))

        def init_validation_tqdm(self) -> Tqdm:
            return Tqdm(disable=True)  # a few batches; the line after validation shows its loss

        def on_train_epoch_start(self, trainer, *args) -> None:
            super().on_train_epoch_start(trainer, *args)
            if self.train_progress_bar.total is None and trainer.max_steps > 0:  # endless loader: count to max_steps
                self.train_progress_bar.total = trainer.max_steps

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            self.train_progress_bar.n = trainer.global_step  # current also for the line after a validation
            now = time.monotonic()
            if now - self._last_line >= LOG_INTERVAL or trainer.global_step >= trainer.max_steps:
                self._last_line = now
                self.train_progress_bar.set_postfix(self.get_metrics(trainer, pl_module))  # redraws: one line

    return LogProgressBar
