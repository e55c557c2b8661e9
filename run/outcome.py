"""How a run ends on disk: the run directory made ready, a failure recorded, a non-finite stop explained,
and the closing report of what training did and where everything is."""
from __future__ import annotations

import errno
import fcntl
import os
import socket
import time
from pathlib import Path

from common.checkpoints import newest_loadable
from common import atomic
from common.errors import UserError
from common.failed import clear_failure, mark_failed
from records import HEATMAP_PNG, JSONL, PROFILE_PNG, read_records, training_table


LOCK = ".run.lock"


class RunDirLock:
    """One writer per run directory: an exclusive ``flock`` on ``<run dir>/.run.lock`` for the life of the run.
    The kernel drops it when its process ends, however it ends, so a killed run's lock is never stale; the
    file's text (pid, host, start) only names the holder in the refusal."""

    def __init__(self, out: Path):
        self.path, self.file = Path(out) / LOCK, None

    def acquire(self) -> "RunDirLock":
        file = open(self.path, "a+")
        try:
            fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            file.seek(0)
            holder = file.read().strip() or "another process"
            file.close()
            raise UserError(f"the run directory {self.path.parent} is in use by {holder}; wait for that run to end "
                            f"(a resume needs it stopped) or pass hydra.run.dir=<another folder>") from None
        file.seek(0)
        file.truncate()
        file.write(f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        file.flush()
        self.file = file
        return self

    def release(self) -> None:
        if self.file is not None:
            fcntl.flock(self.file, fcntl.LOCK_UN)
            self.file.close()
            self.file = None


def prepare_run_dir(out: Path) -> RunDirLock | None:
    """Fail early on an unwritable run dir or one another run is writing (its lock, returned held: release it
    when the run ends); on (re)start, clear what a killed or failed earlier run left: temp files of
    interrupted writes and the ``FAILED`` marker. Rank zero only: under DDP the other ranks start while rank
    zero is already writing."""
    from lightning.pytorch.utilities import rank_zero_only

    if problem := atomic.check_writable(out):
        raise UserError(f"cannot write to the run directory {out} ({problem}); pass hydra.run.dir=<a writable folder>")
    if rank_zero_only.rank != 0:
        return None
    lock = RunDirLock(out).acquire()  # before clearing anything: a second writer must not touch the first's files
    atomic.remove_stale_temps(out, out / "csv")
    clear_failure(out)
    return lock


def record_failure(out: Path, error: BaseException, step: int | None) -> str | None:
    """Write the run's ``FAILED`` marker: why (the one-line message, or the exception) and at which step. Never
    raises: returns None, or why the marker could not be written (an unwritable or full run directory)."""
    if isinstance(error, (KeyboardInterrupt, SystemExit)):
        reason = "interrupted"
    elif isinstance(error, UserError):
        reason = str(error)
    else:
        reason = f"{type(error).__name__}: {error}".strip().splitlines()[0]
    try:
        mark_failed(out, reason, getattr(error, "step", step))
    except OSError as e:
        return e.strerror or type(e).__name__
    return None


UNWRITABLE = {errno.EACCES, errno.EPERM, errno.EROFS}
FULL = {errno.ENOSPC, errno.EDQUOT}


def unwritable(out: Path, error: BaseException, step: int | None) -> UserError | None:
    """If ``error`` came from a write under the run directory that the filesystem refused (made read-only, its
    permissions taken away, or full), the one-line message for it: the file, why, at which step, and the fix.
    The first such write in the exception's chain is the one named (later ones fail for the same reason)."""
    root, found, seen = os.path.abspath(out), None, set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if (isinstance(error, OSError) and error.errno in UNWRITABLE | FULL and error.filename
                and os.path.abspath(os.fspath(error.filename)).startswith(root)):
            found = error
        error = error.__cause__ or error.__context__
    if found is None:
        return None
    path = Path(os.fspath(found.filename))
    if path.name.startswith(".") and atomic.TEMP_MARK in path.name:  # the temp file of an atomic write: its target
        path = path.with_name(path.name[1:].split(atomic.TEMP_MARK)[0])
    at = "" if step is None else f" at step {step}"
    if found.errno in FULL:
        return UserError(f"cannot write {path} ({found.strerror}){at}: the disk under the run directory is full; "
                         f"free space there and resume with ckpt_path=auto")
    return UserError(f"cannot write {path} ({found.strerror}){at}: the run directory {out} became unwritable while "
                     f"the run was writing it; make it writable again (e.g. chmod -R u+w {out}) and resume with "
                     f"ckpt_path=auto")


class NonFiniteError(UserError):
    def __init__(self, message: str, step: int):
        super().__init__(message)
        self.step = step


def check_finite(out: Path, failure: tuple[int, str] | None, checkpoints: Path) -> None:
    """After training: if it stopped on a non-finite loss or gradient, the one-line message of what happened,
    where the last good state is, and what to do."""
    if failure is None:
        return
    step, what = failure
    last, last_step, _ = newest_loadable(checkpoints)
    kept = f"last good checkpoint {last} (step {last_step})" if last else "no checkpoint was written before it"
    raise NonFiniteError(f"{what} became non-finite at step {step}; training stopped there with the weights of the "
                         f"step before. {kept}; metrics so far in {out / JSONL} and {out / 'csv'}. Fix: lower task.lr "
                         f"or keep trainer.gradient_clip_val on, and train again (a resume would restore the old "
                         f"learning rate with the optimiser state)", step)


def report(out: Path, print_table: bool = True) -> None:
    """Print what training did to the signature and where the outputs are."""
    records = read_records(out)
    if print_table and records:
        print(training_table(records[0], records[-1]))
    print(f"\nrun directory: {out}")
    for name in (JSONL, PROFILE_PNG, HEATMAP_PNG, "probe.pt", "checkpoints/last.ckpt", ".hydra/config.yaml",
                 "csv/metrics.csv", "profiler"):
        if (out / name).exists():
            print(f"  {name}")
    for wandb_run in sorted((out / "wandb").glob("offline-run-*")):
        print(f"  wandb/{wandb_run.name}   (upload: wandb sync {wandb_run})")
