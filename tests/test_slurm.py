"""The SLURM recipe against a real SLURM: a single-node cluster on localhost (tests/slurm_cluster.py, fixture
``slurm_cluster`` in conftest.py). Sweeps go through ``python train.py -m hydra/launcher=slurm_cpu``, as a
user's would; jobs are preempted with ``scancel --signal=USR1`` and ``scontrol requeue``, and each ends in the
same records, metrics and weights as an uninterrupted run (tests/test_reliability.py's comparison).

Without a cluster (not root, no apt-get) these tests skip, saying why; CI sets ROUTECOLLAPSE_REQUIRE_SLURM=1,
where they fail instead.
"""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from common.slurm_wait import queue_state
from tests.test_reliability import SLOW, SMALL, assert_same_run, cache, forked, records, reference  # noqa: F401

pytestmark = pytest.mark.slurm  # `pytest -m 'not slurm'` leaves them out where no cluster can be had

ROOT = Path(__file__).resolve().parents[1]
# One CPU and a little memory per job (the cluster is this machine); a limit far from submitit's "timed out"
# guess (80 % of it), so a signal reads as a preemption, not a time-out.
LAUNCHER = ["hydra/launcher=slurm_cpu", "hydra.launcher.cpus_per_task=1", "hydra.launcher.mem_gb=1",
            "hydra.launcher.timeout_min=60", "threads=1"]


class Sweep:
    """``python train.py -m`` on the SLURM launcher, in the background, its output in ``<sweep>.log``."""

    def __init__(self, cluster, sweep: Path, cache: str, *overrides: str):
        self.cluster, self.dir, self.log = cluster, sweep, sweep.parent / f"{sweep.name}.log"
        env = {**cluster.env(), "ROUTECOLLAPSE_DATA": cache, "WANDB_MODE": "offline", "WANDB_SILENT": "true",
               "ROUTECOLLAPSE_SLURM_GRACE_S": "2"}
        command = [sys.executable, "train.py", "-m", *LAUNCHER, f"hydra.sweep.dir={sweep}", "ckpt_path=auto",
                   *SMALL, *overrides]
        # Ctrl-C must reach the parent as KeyboardInterrupt even where the suite itself runs with SIGINT ignored
        # (a shell's background job: `cmd &` ignores SIGINT, children inherit it, and Python then keeps it off).
        self.process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=open(self.log, "w"),
                                        stderr=subprocess.STDOUT,
                                        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        self.started = time.monotonic()

    def output(self) -> str:
        return self.log.read_text()

    def job_logs(self) -> str:
        return "".join(p.read_text() for p in sorted(self.dir.glob(".submitit/*/*_log.*")))

    def job_id(self, number: int = 0) -> str:
        """The SLURM id of job ``number`` once submitted: ``<array>_<number>``, or ``<id>`` for a one-job sweep
        (submitit submits a single job without an array)."""
        def submitted():
            folders = [p.name for p in self.dir.glob(".submitit/*") if p.name.isdigit()]
            queued = self.cluster.command("squeue", "-h", "-r", "-O", "JobArrayID:40").split() if folders else []
            return next((i for i in queued if i in (folders[0], f"{folders[0]}_{number}")), None)
        return self.cluster.wait_for(submitted, 60, "the sweep's submission")

    def wait_for_step(self, step: int, number: int = 0) -> None:
        job = self.dir / str(number)
        self.cluster.wait_for(
            lambda: (job / "collapse.jsonl").exists() and any(r["step"] >= step for r in records(job)), 120,
            f"job {number} reaching step {step}:\n{self.output()[-2000:]}\n{self.job_logs()[-3000:]}")

    def release_requeued(self, job_id: str) -> None:
        """SLURM holds a requeued job back for about two minutes (its BeginTime); start it at once."""
        def requeued():
            state = queue_state(job_id)
            return state is not None and state[1] >= 1 and state[0] == "PENDING"
        self.cluster.wait_for(requeued, 60, f"the requeue of job {job_id}:\n{self.job_logs()[-3000:]}")
        self.cluster.command("scontrol", "update", f"JobId={job_id}", "StartTime=now")

    def wait(self, timeout: float = 240) -> int:
        try:
            return self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            raise AssertionError(f"the sweep did not end in {timeout} s:\n{self.output()[-3000:]}\n"
                                 f"{self.job_logs()[-3000:]}") from None

    def restarts(self, job_id: str) -> int:
        return int(re.search(r"Restarts=(\d+)", self.cluster.command("scontrol", "show", "job", job_id)).group(1))


def requeue_events(cluster, job_id: str) -> int:
    """How often slurmctld put ``job_id`` back in the queue (it logs ``Requeuing JobId=<array>_<task>(<id>)``)."""
    text = (cluster.folder / "slurmctld.log").read_text()
    return len(re.findall(rf"Requeuing JobId={re.escape(job_id)}\b", text))


def test_without_a_cluster_the_slurm_tests_fail_saying_why_even_without_network(tmp_path, monkeypatch):
    from tests import slurm_cluster

    monkeypatch.setattr(slurm_cluster, "installed", lambda: False)
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    monkeypatch.delenv(slurm_cluster.REQUIRE, raising=False)
    with pytest.raises(pytest.fail.Exception, match="no local SLURM cluster: a local SLURM cluster needs root"):
        slurm_cluster.cluster_or_fail(tmp_path)
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    monkeypatch.setattr(slurm_cluster.shutil, "which", lambda name: None)  # no apt-get
    with pytest.raises(pytest.fail.Exception, match="SLURM is not installed and there is no apt-get"):
        slurm_cluster.cluster_or_fail(tmp_path)
    # apt-get present but the registry unreachable: a failure too (never a skip), naming the network.
    monkeypatch.setattr(slurm_cluster.shutil, "which", lambda name: "/usr/bin/apt-get")
    unreachable = subprocess.CompletedProcess([], 100, "", "E: Failed to fetch http://deb.debian.org/... Could not resolve")
    monkeypatch.setattr(slurm_cluster.subprocess, "run", lambda *a, **k: unreachable)
    with pytest.raises(pytest.fail.Exception, match="package registry is unreachable.*-m 'not slurm'"):
        slurm_cluster.cluster_or_fail(tmp_path)
    monkeypatch.setenv(slurm_cluster.REQUIRE, "1")
    with pytest.raises(pytest.fail.Exception, match="ROUTECOLLAPSE_REQUIRE_SLURM=1 asks for one"):
        slurm_cluster.cluster_or_fail(tmp_path)


def test_a_sweep_of_two_jobs_completes_on_a_real_slurm(slurm_cluster, reference, tmp_path, cache):
    sweep = Sweep(slurm_cluster, tmp_path / "sweep", cache, "seed=0,1")
    assert sweep.wait() == 0, sweep.output()[-3000:]
    for job in ("0", "1"):
        assert [r["step"] for r in records(sweep.dir / job)][-1] == 24
        assert not (sweep.dir / job / "FAILED").exists()
    assert_same_run(sweep.dir / "0", reference)  # seed 0 is the reference's
    progress = (sweep.dir / "sweep.log").read_text()
    assert "2 jobs on SlurmLauncher" in progress and "sweep ended: 2/2 jobs done, 0 failed" in progress
    # The parent asks squeue, not sacct: no warning per poll on a cluster without accounting.
    assert "sacct" not in sweep.output(), sweep.output()[-2000:]
    print(f"two-job sweep on SLURM: {time.monotonic() - sweep.started:.0f} s")


@pytest.mark.parametrize("how", ["scancel --signal=USR1", "scontrol requeue"])
def test_a_preempted_slurm_job_is_requeued_once_and_ends_like_an_uninterrupted_run(slurm_cluster, reference,
                                                                                   tmp_path, cache, how):
    sweep = Sweep(slurm_cluster, tmp_path / "sweep", cache, *SLOW)
    job_id = sweep.job_id()
    sweep.wait_for_step(4)
    if how == "scancel --signal=USR1":
        slurm_cluster.command("scancel", "--signal=USR1", job_id)
    else:
        slurm_cluster.command("scontrol", "requeue", job_id)
    sweep.release_requeued(job_id)
    assert sweep.wait() == 0, sweep.output()[-3000:]  # the parent waited for the requeued job
    logs = sweep.job_logs()
    signal_name = "SIGUSR1" if how.startswith("scancel") else "SIGTERM"
    stopped = int(re.search(rf"preempted: {signal_name} at step (\d+)", logs).group(1))
    assert 4 <= stopped < 24, logs[-3000:]
    assert f"resuming from {sweep.dir / '0' / 'checkpoints' / 'last.ckpt'}, step {stopped}" in logs
    assert_same_run(sweep.dir / "0", reference)
    assert not (sweep.dir / "0" / "FAILED").exists()

    # Exactly one handler owned the signal: ours checkpointed; one requeue, by submitit's machinery through
    # requeue() for USR1, by SLURM itself for scontrol's SIGTERM; Lightning's auto-requeue never ran.
    assert logs.count(f"received {signal_name}: checkpointing at the end of this step") == 1, logs[-3000:]
    assert "SLURM auto-requeueing enabled" not in logs and "Handling auto-requeue signal" not in logs
    requeues = re.findall(r"^submitit INFO .* - Requeued job", logs, re.MULTILINE)  # submitit's own log lines
    assert len(requeues) == (1 if signal_name == "SIGUSR1" else 0), logs[-3000:]
    if signal_name == "SIGTERM":
        assert "not requeued by the job" in logs
    assert "Bypassing signal SIGTERM" not in logs  # submitit's SIGTERM handler never saw it
    assert requeue_events(slurm_cluster, job_id) == 1 and sweep.restarts(job_id) == 1
    assert f"job {job_id} was requeued (restart 1" in sweep.output()
    print(f"{how}: {time.monotonic() - sweep.started:.0f} s")


def test_a_stopped_sweep_parent_names_the_jobs_it_leaves_in_slurm(slurm_cluster, tmp_path, cache):
    """A sweep's parent stopped while its job waits in the queue (held here) ends in one line naming it."""
    sweep = Sweep(slurm_cluster, tmp_path / "sweep", cache, "+hydra.launcher.additional_parameters.hold=true")
    job_id = sweep.job_id()
    try:
        slurm_cluster.wait_for(lambda: (queue_state(job_id) or ("",))[0] == "PENDING", 60, "the held job")
        # The parent says when it is in its wait (a fixed sleep raced it on a loaded machine).
        slurm_cluster.wait_for(lambda: "[sweep] waiting for SLURM job(s)" in sweep.output(), 120, "the parent's wait")
        sweep.process.send_signal(signal.SIGINT)
        assert sweep.wait(120) == 130, sweep.output()[-3000:]
        errors = [line for line in sweep.output().splitlines() if line.startswith("error: ")]
        assert len(errors) == 1, sweep.output()[-3000:]
        assert f"SLURM still holds job(s) {job_id} (pending)" in errors[0]
        assert f"squeue -j {job_id.split('_')[0]}" in errors[0]
        assert "Traceback" not in sweep.output()
    finally:
        slurm_cluster.command("scancel", job_id.split("_")[0], check=False)


def test_a_job_slurm_ends_without_a_result_is_listed_as_failed_and_the_sweep_ends(slurm_cluster, tmp_path, cache):
    """scancel (or an out-of-memory kill, a lost node) leaves no result: the parent does not wait for ever, on a
    cluster without accounting either; the job's folder gets FAILED and the sweep ends listing it, exit 1."""
    sweep = Sweep(slurm_cluster, tmp_path / "sweep", cache, *SLOW, "seed=0,1")
    job_id = sweep.job_id(1)
    sweep.wait_for_step(4, number=1)
    slurm_cluster.command("scancel", job_id)
    assert sweep.wait() == 1, sweep.output()[-3000:]
    assert f"SLURM job {job_id} ended without a result" in (sweep.dir / "1" / "FAILED").read_text()
    assert "1 job(s) of the sweep failed" in sweep.output() and "Traceback" not in sweep.output()
    assert [r["step"] for r in records(sweep.dir / "0")][-1] == 24 and not (sweep.dir / "0" / "FAILED").exists()
