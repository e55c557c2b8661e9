"""A sweep's own log: one line per finished job, in ``<sweep>/sweep.log`` and on stderr.

Jobs of a parallel sweep run in worker processes (hydra-joblib-launcher) or on other machines (SLURM), so the
count lives in the sweep folder, not in memory: ``.sweep_progress.json`` holds the number of jobs, the launch
time and how many finished and failed, updated under a file lock by each job as it ends. Nothing here may
stop a job: a failure to write progress is a warning.
"""
from __future__ import annotations

import fcntl
import json
import logging
import sys
import time
from contextlib import contextmanager
from pathlib import Path

from common import atomic

log = logging.getLogger(__name__)

LOG = "sweep.log"
STATE = ".sweep_progress.json"


def duration(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, seconds = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m{seconds:02d}s" if hours else f"{minutes}m{seconds:02d}s"


@contextmanager
def _locked(sweep: Path):
    with open(sweep / f"{STATE}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _write(sweep: Path, line: str) -> None:
    atomic.append_lines(sweep / LOG, [f"[{time.strftime('%Y-%m-%d %H:%M:%S')}] {line}"])
    print(f"[sweep] {line}", file=sys.stderr, flush=True)


def start(sweep: Path, total: int | None, launcher: str) -> None:
    """The sweep begins: ``total`` jobs (None when the sweeper cannot say) on ``launcher``."""
    try:
        sweep.mkdir(parents=True, exist_ok=True)
        with _locked(sweep):
            atomic.write_text(sweep / STATE, json.dumps({"total": total, "started": time.time(), "done": 0,
                                                         "failed": 0}))
            _write(sweep, f"{total if total is not None else 'an unknown number of'} jobs on {launcher}")
    except OSError as e:
        log.warning(f"sweep progress not written ({e})")


def job_finished(sweep: Path, job: str, failed: bool, job_seconds: float | None) -> None:
    """One job ended: count it and write done / total, elapsed, ETA and failed so far."""
    try:
        with _locked(sweep):
            state = json.loads((sweep / STATE).read_text()) if (sweep / STATE).is_file() else \
                {"total": None, "started": time.time(), "done": 0, "failed": 0}
            state["done"] += 1
            state["failed"] += int(failed)
            atomic.write_text(sweep / STATE, json.dumps(state))
            _write(sweep, progress_line(state, job, failed, job_seconds))
    except (OSError, ValueError, KeyError) as e:
        log.warning(f"sweep progress not written ({type(e).__name__}: {e})")


def progress_line(state: dict, job: str, failed: bool, job_seconds: float | None, now: float | None = None) -> str:
    done, total, elapsed = state["done"], state["total"], (now or time.time()) - state["started"]
    took = "" if job_seconds is None else f" in {duration(job_seconds)}"
    line = f"job {job} {'FAILED' if failed else 'finished'}{took}: {done}/{total or '?'} done, " \
           f"{state['failed']} failed, elapsed {duration(elapsed)}"
    if total and done < total:
        # Jobs finish at the sweep's own parallel rate, so the mean time per finished job extrapolates.
        line += f", ETA {duration(elapsed / done * (total - done))}"
    return line


def finish(sweep: Path) -> str | None:
    """The closing line (also returned), or None when the sweep wrote no progress."""
    try:
        state = json.loads((sweep / STATE).read_text())
        line = (f"sweep ended: {state['done']}/{state['total'] or '?'} jobs done, {state['failed']} failed, "
                f"in {duration(time.time() - state['started'])}")
        with _locked(sweep):
            _write(sweep, line)
        return line
    except (OSError, ValueError, KeyError):
        return None
