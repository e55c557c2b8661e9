"""Progress bars that stay readable when the output is a file (SLURM logs, nohup, ``> log``).

On a terminal these are ordinary tqdm bars. Redirected, a bar redraws itself with carriage returns, which a
log shows as one ever-growing line; there each redraw becomes a line of its own instead, at most one every
``LOG_INTERVAL`` seconds, plus the final count.
"""
from __future__ import annotations

import re
import sys
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
