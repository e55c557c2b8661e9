"""The parent of a SLURM sweep waits for its jobs, requeued ones included, and never leaves silently.

submitit's parent waits for each job's result file and asks ``sacct`` about its state: on a cluster without
accounting every poll prints three warnings, and a job that SLURM ends without a result (``scancel``, out of
memory, a node lost) is waited for for ever; where ``sacct`` works, it becomes a traceback that ends the
sweep. :func:`install` (called by ``common.hydra_callback.RunGuard`` when a sweep starts on the submitit SLURM
launcher) replaces that wait in the parent with :func:`wait_for`, which asks ``squeue`` (no accounting needed):

- a requeued job (preemption, a time limit, ``scontrol requeue``) is waited for: one line says so;
- a job that leaves the queue without a result gets ``FAILED`` in its folder (why, and how to resume), and
  the sweep goes on to end listing it, like any failed job (exit 1);
- a parent stopped while jobs are still queued or running (Ctrl-C, SIGTERM, SIGHUP) ends with one line naming
  them and how to check them, exit 130: the jobs go on without it.
"""
from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

log = logging.getLogger(__name__)

# A job that left the queue may still be writing its result file on a slow filesystem: give it this long.
GONE_GRACE_S = float(os.environ.get("ROUTECOLLAPSE_SLURM_GRACE_S", 20))
INTERRUPTED = 130


def queue_state(job_id: str) -> tuple[str, int] | None:
    """``(state, restarts)`` of ``job_id`` in SLURM's queue, ``("", 0)`` if it is not (or no longer) there,
    None if ``squeue`` cannot answer."""
    try:
        result = subprocess.run(["squeue", "-h", "-r", "-j", job_id, "-O", "JobArrayID:40,State:20,RestartCnt:10"],
                                capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    if result.returncode != 0:
        return ("", 0) if "Invalid job id" in result.stderr else None
    for line in result.stdout.splitlines():
        fields = line.split()
        if len(fields) >= 3 and fields[0] == job_id:
            return fields[1], int(fields[2]) if fields[2].isdigit() else 0
    return "", 0


def _job_folder(job) -> Path | None:
    """The sweep job's own folder (``<sweep>/<job number>``), read from what submitit submitted."""
    try:
        overrides, _, number, *_ = job.submission().args
        launcher = job.submission().function
        return Path(str(launcher.config.hydra.sweep.dir)) / str(number)
    except Exception:
        return None


class _Stopped(Exception):
    pass


def _stop(signum, frame):
    raise _Stopped(signal.Signals(signum).name)


def wait_for(job, poll_s: float = 1.0) -> bool:
    """Wait until ``job`` has a result file (True) or has left SLURM's queue without one (False)."""
    announced, unanswered, gone_since = 0, 0, None
    while True:
        if job.paths.result_pickle.exists():
            return True
        state = queue_state(job.job_id)
        if state is None:
            unanswered += 1
            if unanswered == 3:
                log.warning(f"squeue does not answer about job {job.job_id}; waiting for its result file "
                            f"{job.paths.result_pickle}")
        else:
            unanswered = 0
            name, restarts = state
            if restarts > announced:
                announced = restarts
                print(f"[sweep] job {job.job_id} was requeued (restart {restarts}, now {name.lower() or 'queued'}); "
                      f"waiting for it", file=sys.stderr, flush=True)
            if name == "":
                gone_since = gone_since or time.monotonic()
                if time.monotonic() - gone_since > GONE_GRACE_S:
                    return False
            else:
                gone_since = None
        time.sleep(poll_s)
        poll_s = min(poll_s * 1.2, 10.0)


def _left_running(job_ids: list[str]) -> str:
    states = []
    for job_id in job_ids:
        state = queue_state(job_id)
        if state is None or state[0]:
            states.append(f"{job_id} ({state[0].lower() if state else 'state unknown'})")
    return ", ".join(states)


def install() -> None:
    """In this (the sweep's parent) process: submitit SLURM jobs' ``results()`` wait with :func:`wait_for`."""
    from hydra.core.utils import JobReturn, JobStatus
    from submitit.slurm.slurm import SlurmJob

    if getattr(SlurmJob.results, "routecollapse_wait", False):
        return
    results = SlurmJob.results

    def wait_then_results(job):
        handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGHUP)}
        try:
            for s in handlers:
                signal.signal(s, _stop)
            if not getattr(SlurmJob, "routecollapse_announced", False):  # once per sweep: where the parent waits
                SlurmJob.routecollapse_announced = True
                print(f"[sweep] waiting for SLURM job(s) {', '.join(sorted(SlurmJob.watcher._registered))} "
                      f"(Ctrl-C leaves them running and names them)", file=sys.stderr, flush=True)
            has_result = wait_for(job)
        except (KeyboardInterrupt, _Stopped) as e:
            # Every job submitted from this process (the whole array): submitit's watcher registers each one.
            _report_stop(e, sorted(SlurmJob.watcher._registered | {job.job_id}))
        finally:
            for s, handler in handlers.items():
                signal.signal(s, handler)
        if has_result:
            return results(job)
        return [_ended_without_result(job, JobReturn, JobStatus)]

    wait_then_results.routecollapse_wait = True
    SlurmJob.results = wait_then_results


def _report_stop(reason: BaseException, job_ids: list[str]) -> None:
    left = _left_running(job_ids)
    what = "interrupted" if isinstance(reason, KeyboardInterrupt) else f"stopped by {reason}"
    if left:
        array = sorted({job_id.split("_")[0] for job_id in job_ids})
        print(f"error: the sweep's parent was {what} while SLURM still holds job(s) {left}; they go on without it "
              f"and write their folders: check with `squeue -j {','.join(array)}`, then `python analyze.py "
              f"sweep=<sweep dir>` once they end (scancel {' '.join(array)} to stop them)", file=sys.stderr, flush=True)
    else:
        print(f"error: the sweep's parent was {what}; no job of it is left in SLURM's queue", file=sys.stderr, flush=True)
    raise SystemExit(INTERRUPTED)


def _ended_without_result(job, JobReturn, JobStatus):
    """A job SLURM ended without a result: FAILED in its folder, and a normal return so the sweep goes on."""
    from common.failed import mark_failed, read_failure

    folder = _job_folder(job)
    reason = (f"SLURM job {job.job_id} ended without a result (cancelled, out of memory, time limit or a lost node; "
              f"its log: {job.paths.stderr}); resume it with ckpt_path=auto in its folder")
    print(f"[sweep] {reason}", file=sys.stderr, flush=True)
    if folder is not None and folder.is_dir() and read_failure(folder) is None:
        try:
            mark_failed(folder, reason, None)
        except OSError:
            pass
    return JobReturn(working_dir=str(folder) if folder else None, status=JobStatus.COMPLETED, _return_value=None)
