"""A real single-node SLURM cluster on localhost for the test suite (tests/test_slurm.py).

    cluster = LocalSlurm(folder).start()   # installs slurm-wlm + munge if absent (root + apt-get), starts the
    ...                                    # daemons, waits until the node is idle
    cluster.stop()

Debian's ``slurm-wlm`` (22.05) with a minimal ``slurm.conf``: one node (``localhost``, this machine's CPUs and
memory), one partition, no cgroups, accounting off (no ``slurmdbd``/database: ``sacct`` answers with an error,
which submitit bypasses; its parent waits on the job's result file instead). The config lives in ``folder``
and reaches every client (sbatch, scontrol, submitit's calls, the jobs) through ``SLURM_CONF``; nothing under
/etc/slurm is written. ``Unavailable`` says in one line why there is no cluster (not root, no apt-get, the
install or a daemon failed); the tests fail with it (`pytest -m 'not slurm'` leaves them out).

Also a script: ``python tests/slurm_cluster.py install`` installs the packages (what .ci/run does before the
suite, so the install is not charged to a test's time).
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

REQUIRE = "ROUTECOLLAPSE_REQUIRE_SLURM"
PACKAGES = ["slurm-wlm", "munge"]
DAEMONS = ("slurmctld", "slurmd", "munged")


class Unavailable(Exception):
    """No local cluster can be had here; the message says why in one line. ``network``: only because the
    package registry could not be reached, which the failure names as the cause."""

    def __init__(self, message: str, network: bool = False):
        super().__init__(message)
        self.network = network


# apt-get's words for a registry it cannot reach
_NETWORK_ERRORS = ("Could not resolve", "Temporary failure resolving", "Failed to fetch", "Unable to fetch",
                   "Network is unreachable", "Connection timed out")


def _run(*cmd: str, timeout: float = 30, check: bool = True, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=check, env=env)


def installed() -> bool:
    return all(shutil.which(d) or Path(f"/usr/sbin/{d}").exists() for d in DAEMONS)


def install(timeout: float = 600) -> None:
    """``apt-get install slurm-wlm munge`` (quiet, non-interactive, no recommended extras) when absent."""
    if installed():
        return
    if os.geteuid() != 0:
        raise Unavailable("SLURM is not installed and installing it needs root (apt-get install slurm-wlm munge)")
    if not shutil.which("apt-get"):
        raise Unavailable("SLURM is not installed and there is no apt-get to install it (install slurm-wlm, munge)")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    command = ["apt-get", "install", "-y", "-q", "--no-install-recommends", *PACKAGES]
    result = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env)
    if result.returncode != 0:  # an old package list: update once and try again
        subprocess.run(["apt-get", "update", "-q"], capture_output=True, timeout=timeout, env=env)
        result = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env)
    if result.returncode != 0 or not installed():
        output = result.stderr + result.stdout
        tail = output.strip().splitlines()[-1:] or ["?"]
        raise Unavailable(f"apt-get install {' '.join(PACKAGES)} failed ({tail[0]})",
                          network=any(marker in output for marker in _NETWORK_ERRORS))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _memory_mb() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) // 1024 - 512  # leave the OS some
    return 1024


class LocalSlurm:
    """slurmctld + slurmd (+ munged if none runs) on localhost, configured in ``folder``."""

    NODE = "localhost"
    PARTITION = "debug"

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.conf = self.folder / "slurm.conf"
        self.cpus = os.cpu_count() or 1
        self.memory_mb = _memory_mb()
        self._processes: dict[str, int] = {}  # daemon -> pid, the ones this object started
        self._env_before: str | None = None

    # --- the configuration ------------------------------------------------------------------------------

    def write_conf(self) -> None:
        for sub in ("state", "spool"):
            (self.folder / sub).mkdir(parents=True, exist_ok=True)
        f = self.folder
        self.conf.write_text(f"""\
ClusterName=routecollapse
SlurmctldHost={self.NODE}
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation={f}/state
SlurmdSpoolDir={f}/spool
SlurmctldPidFile={f}/slurmctld.pid
SlurmdPidFile={f}/slurmd.pid
SlurmctldLogFile={f}/slurmctld.log
SlurmdLogFile={f}/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SwitchType=switch/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
KillWait=5
MinJobAge=300
SchedulerParameters=sched_interval=1
NodeName={self.NODE} NodeAddr=127.0.0.1 CPUs={self.cpus} RealMemory={self.memory_mb} State=UNKNOWN
PartitionName={self.PARTITION} Nodes={self.NODE} Default=YES MaxTime=INFINITE State=UP
""")

    # --- daemons ----------------------------------------------------------------------------------------

    @staticmethod
    def _munge_works() -> bool:
        try:
            token = _run("munge", "-n", timeout=10).stdout
            return subprocess.run(["unmunge"], input=token, capture_output=True, text=True, timeout=10).returncode == 0
        except (OSError, subprocess.SubprocessError):
            return False

    def _start_munge(self) -> None:
        if self._munge_works():
            return
        run_dir = Path("/run/munge")
        run_dir.mkdir(parents=True, exist_ok=True)
        shutil.chown(run_dir, "munge", "munge")
        if not Path("/etc/munge/munge.key").exists():
            _run("/usr/sbin/mungekey", "--create", check=False)  # Debian's package makes one on install
            shutil.chown("/etc/munge/munge.key", "munge", "munge")
        process = subprocess.Popen(["/usr/sbin/munged", "--foreground"], user="munge", group="munge",
                                   stdout=subprocess.DEVNULL, stderr=open(self.folder / "munged.log", "w"),
                                   start_new_session=True)
        self._processes["munged"] = process.pid
        self._wait(self._munge_works, 20, "munged did not start (see munged.log)")

    def _start(self, daemon: str, *args: str) -> None:
        process = subprocess.Popen([f"/usr/sbin/{daemon}", "-D", "-f", str(self.conf), *args],
                                   stdout=open(self.folder / f"{daemon}.out", "w"), stderr=subprocess.STDOUT,
                                   start_new_session=True)
        self._processes[daemon] = process.pid

    def _wait(self, ready, seconds: float, what: str) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if ready():
                return
            time.sleep(0.2)
        self.stop()
        raise Unavailable(f"{what} within {seconds:.0f} s ({self.folder})")

    def env(self) -> dict[str, str]:
        return {**os.environ, "SLURM_CONF": str(self.conf)}

    def command(self, *cmd: str, timeout: float = 30, check: bool = True) -> str:
        """Run a SLURM client command (sinfo, squeue, scontrol, scancel, ...) against this cluster: its stdout."""
        return _run(*cmd, timeout=timeout, check=check, env=self.env()).stdout

    def node_state(self) -> str:
        try:
            return self.command("sinfo", "-h", "-N", "-o", "%T", timeout=10).strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    def start(self, timeout: float = 60) -> "LocalSlurm":
        if os.geteuid() != 0:
            raise Unavailable("a local SLURM cluster needs root (slurmd runs jobs as their users)")
        install()
        self.write_conf()
        self._start_munge()
        self._start("slurmctld", "-i")  # -i: ignore state a previous test session saved
        self._start("slurmd", "-N", self.NODE)
        self._wait(lambda: self.node_state() == "idle", timeout, "the node did not come up idle")
        self._env_before = os.environ.get("SLURM_CONF")
        os.environ["SLURM_CONF"] = str(self.conf)  # sbatch, sacct and scontrol of this process and its children
        return self

    def stop(self) -> None:
        if self._processes.get("slurmctld"):
            self.command("scancel", "--user", "root", check=False, timeout=10)
        for daemon in ("slurmd", "slurmctld", "munged"):
            pid = self._processes.pop(daemon, None)
            if pid is None:
                continue
            try:
                os.killpg(pid, signal.SIGTERM)  # its own session: the daemon and what it started
            except ProcessLookupError:
                continue
            for _ in range(50):
                try:
                    os.waitpid(pid, os.WNOHANG)
                    os.kill(pid, 0)
                except (ProcessLookupError, ChildProcessError):
                    break
                time.sleep(0.1)
            else:
                try:
                    os.killpg(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        if os.environ.get("SLURM_CONF") == str(self.conf):
            if self._env_before is None:
                os.environ.pop("SLURM_CONF", None)
            else:
                os.environ["SLURM_CONF"] = self._env_before

    def wait_for(self, ready, seconds: float, what: str):
        """Poll ``ready()`` until it returns something true; AssertionError naming ``what`` after ``seconds``."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if value := ready():
                return value
            time.sleep(0.2)
        raise AssertionError(f"{what} did not happen within {seconds:.0f} s; slurmctld.log:\n"
                             + "\n".join((self.folder / "slurmctld.log").read_text().splitlines()[-20:]))


def cluster_or_fail(folder: Path) -> LocalSlurm:
    """A started cluster in ``folder``. Without one the test fails, never skips (a skipped test proves nothing):
    the message says why (no root or apt-get, or the package registry unreachable) and that
    ``pytest -m 'not slurm'`` leaves these tests out on a machine that cannot have a cluster."""
    import pytest

    try:
        return LocalSlurm(folder).start()
    except Unavailable as e:
        if os.environ.get(REQUIRE) == "1":
            pytest.fail(f"no local SLURM cluster, and {REQUIRE}=1 asks for one: {e}", pytrace=False)
        if e.network:
            pytest.fail(f"no local SLURM cluster: the package registry is unreachable ({e}); restore the network, "
                        f"or leave these tests out with `pytest -m 'not slurm'`", pytrace=False)
        pytest.fail(f"no local SLURM cluster: {e}; run the suite as root with apt-get, or leave these tests out "
                    f"with `pytest -m 'not slurm'`", pytrace=False)


if __name__ == "__main__":
    if sys.argv[1:] == ["install"]:
        try:
            install()
        except Unavailable as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(1)
        print("slurm-wlm and munge installed" if installed() else "?")
    else:
        print(__doc__)
