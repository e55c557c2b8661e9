"""Reading finished runs: run directories, sweeps (multirun folders or W&B groups), configs and checkpoints.

A run directory holds ``collapse.jsonl`` (the monitor's records, the source of truth), ``probe.pt``,
``checkpoints/*.ckpt`` (each storing the resolved run config in ``hyper_parameters.config`` and the router's
constructor arguments in ``hyper_parameters.router``),
``.hydra/config.yaml`` and ``csv/metrics.csv``, and ``FAILED`` if it failed. A sweep is a folder of such
directories; its failed or unfinished jobs are never results (:func:`failed_jobs`). This module only reads;
the studies turn what it reads into tables.
"""
from __future__ import annotations

import copy
import csv
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from common.checkpoints import newest_checkpoint, newest_loadable
from common.checksum import CHECKSUM, tensor_checksum
from common.configs import flatten
from common.errors import UserError
from common.failed import FAILED, read_failure
from records import JSONL, Record, from_history, read_records, typed
from tasks.router_args import KEY as ROUTER_KEY

# Config keys that name where a run lives or how it resumes, not what was trained: never an arm's identity.
# Thread count, tags and print switches change how a run was executed or labelled, never the experiment, so
# runs that differ only there are replicates (e.g. one arm trained with threads=2, another with threads=1).
_NOT_A_FACTOR = ("ckpt_path", "print_table", "hydra", "logger", "callbacks.checkpoint.dirpath",
                 "trainer.default_root_dir", "trainer.enable_progress_bar", "data.cache_dir", "threads", "tags",
                 "extras")
# Which replicate seed each config key is: weights (``seed``) or training-data order (``data_seed``).
SEED_KEYS = {"seed": "weight", "data_seed": "data", "data.data_seed": "data"}


@dataclass
class Run:
    """One finished run: its directory, its flat config (dotted keys) and the monitor's records."""
    path: Path
    config: dict
    records: list[Record] = field(repr=False)
    logged_val_loss: float | None = None  # runs read back from W&B carry it; local runs read csv/metrics.csv
    label: str = ""  # the job's path inside its sweep

    def __post_init__(self):
        self.records = [typed(r) for r in self.records]  # read through fields, however the records were built

    @property
    def name(self) -> str:
        return self.label or self.path.name

    @property
    def final(self) -> Record:
        return self.records[-1]

    def get(self, key: str, default=None):
        return self.config.get(key, default)


class ChecksumMismatch(Exception):
    """A checkpoint whose tensors changed after it was written (common/checksum.py)."""


def load_checkpoint(path: str | Path) -> dict:
    try:
        # Our own Lightning checkpoints (hparams, loop state): not weights-only. mmap keeps big ones cheap.
        state = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
        state["state_dict"], state["hyper_parameters"]["config"]
        if CHECKSUM in state and tensor_checksum(state) != state[CHECKSUM]:
            raise ChecksumMismatch
    except Exception as e:
        other, step, _ = newest_loadable(Path(path).parent, skip=Path(path))
        hint = f"pass run={other} (step {step}) instead" if other else "pass a .ckpt written by train.py"
        what = "its tensors' checksum does not match" if isinstance(e, ChecksumMismatch) else type(e).__name__
        raise UserError(f"{path} is not a routecollapse checkpoint ({what}); {hint}") from None
    return state


def _stamp(path: Path) -> tuple | None:
    """What says a file is unchanged since it was read: (resolved path, mtime in ns, size); None if absent."""
    try:
        stat = path.stat()
    except OSError:
        return None
    return str(path.resolve()), stat.st_mtime_ns, stat.st_size


_READ: dict = {}  # (what, stamp) -> parsed content: a sweep's files are read once per process, not once per use


def _cached(what: str, path: Path, read):
    """``read(path)``, remembered while the file's stamp is unchanged (a rewritten file is read again)."""
    stamp = _stamp(path)
    if stamp is None:
        return read(path)
    key = (what, stamp)
    if key not in _READ:
        _READ[key] = read(path)
    return _READ[key]


def _records(run_dir: Path) -> list[Record]:
    """The run's monitor records (parsed once per process while ``collapse.jsonl`` is unchanged); a copy of
    the list, so a caller may reorder or extend it."""
    return list(_cached("records", Path(run_dir) / JSONL, lambda _: read_records(run_dir)))


def run_config(run_dir: Path) -> dict:
    """The run's resolved config: from its last checkpoint (exactly what ran, interpolations resolved at
    training time), else from ``.hydra/config.yaml``, resolved too (``data.data_seed: ${data_seed}`` -> 1)."""
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    if ckpt.is_file():
        # unpickling a checkpoint costs ~0.1 s; a sweep asks for each run's config three times (jobs, runs, failures)
        return copy.deepcopy(_cached("config", ckpt, lambda c: load_checkpoint(c)["hyper_parameters"]["config"]))
    hydra_file = run_dir / ".hydra" / "config.yaml"
    if hydra_file.is_file():
        from omegaconf import OmegaConf

        from common import resolvers

        resolvers.register()  # ${constant:...} and the launcher's ${local_jobs:} resolve here too
        raw = OmegaConf.to_container(OmegaConf.load(hydra_file), resolve=False)
        # ${hydra:...} (output dirs) resolve only inside a Hydra job: escaped, they stay as written.
        return OmegaConf.to_container(OmegaConf.create(_escape_hydra(raw)), resolve=True)
    return {}


def _escape_hydra(value):
    if isinstance(value, dict):
        return {k: _escape_hydra(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_escape_hydra(v) for v in value]
    return value.replace("${hydra:", "\\${hydra:") if isinstance(value, str) else value


def read_run(path: str | Path) -> Run:
    path = Path(path)
    records = _records(path)
    if not records:
        raise UserError(f"{path} has no {JSONL}; pass a run directory written by train.py")
    return Run(path=path, config=flatten(run_config(path)), records=records)


def find_runs(sweep: str | Path) -> list[Run]:
    """Every finished run below ``sweep`` (a multirun folder, or any folder of runs), in job order; failed
    and unfinished jobs are left out (:func:`failed_jobs` lists them)."""
    if str(sweep).startswith("wandb:"):
        return wandb_runs(str(sweep).removeprefix("wandb:"))
    jobs = _jobs(sweep)
    finished = [job for job in jobs if job_failure(Path(sweep) / job) is None]
    if not finished:
        raise UserError(f"no finished runs under {sweep}: all {len(jobs)} jobs failed or are unfinished (a job's "
                        f"{FAILED} file says why); fix them and resume with ckpt_path=auto")
    runs = [read_run(Path(sweep) / job) for job in finished]
    for run, job in zip(runs, finished):
        run.label = str(job)
    return runs


def failed_jobs(sweep: str | Path) -> list[tuple[str, dict]]:
    """(job, ``{"reason", "step", "command"}``) for each job of a local sweep that is not a result: failed or
    unfinished (:func:`job_failure`), or never started (:func:`never_started`), in job order. ``command``
    completes the job in its own folder (for a failed one, once its cause is fixed)."""
    if str(sweep).startswith("wandb:"):
        return []
    rows = [(str(job), {**failure, "command": _resume_command(Path(sweep) / job, _job_overrides(Path(sweep) / job))})
            for job in _jobs(sweep) if (failure := job_failure(Path(sweep) / job))]
    return sorted(rows + never_started(sweep), key=lambda row: _job_order(Path(row[0])))


def never_started(sweep: str | Path) -> list[tuple[str, dict]]:
    """Jobs the sweep's ``multirun.yaml`` asked for that left no record and no ``FAILED`` (a sweep stopped or
    killed before them): one row each with the command that runs it. Only for Hydra's basic sweeper and job
    folders named by job number (this project's ``hydra.sweep.subdir``)."""
    from omegaconf import OmegaConf

    from common.hydra_callback import sweep_jobs

    sweep = Path(sweep)
    path = sweep / "multirun.yaml"
    if not path.is_file():
        return []
    config = OmegaConf.load(path)
    jobs = sweep_jobs(config)
    subdir = OmegaConf.to_container(config, resolve=False).get("hydra", {}).get("sweep", {}).get("subdir")
    if jobs is None or subdir != "${hydra.job.num}":
        return []
    found = {p.parent.relative_to(sweep).parts[0] for name in (JSONL, FAILED) for p in sweep.rglob(name)}
    return [(str(number), {"reason": "never started: the sweep stopped before this job", "step": None,
                           "command": _resume_command(sweep / str(number), overrides)})
            for number, overrides in enumerate(jobs) if str(number) not in found]


def _job_overrides(run_dir: Path) -> list[str]:
    path = run_dir / ".hydra" / "overrides.yaml"
    if not path.is_file():
        return []
    from omegaconf import OmegaConf

    return [str(o) for o in OmegaConf.load(path)]


def _resume_command(run_dir: Path, overrides: list[str]) -> str:
    """The command that runs (or resumes) one job of a sweep by itself, in the job's own folder."""
    import shlex

    return " ".join(["python train.py", *(shlex.quote(o) for o in overrides),
                     shlex.quote(f"hydra.run.dir={run_dir}"), "ckpt_path=auto"])


def job_failure(run_dir: Path) -> dict | None:
    """Why a job is not a result: its ``FAILED`` marker, or (killed before it could write one) records that
    stop short of its ``trainer.max_steps``. None for a finished run."""
    if failure := read_failure(run_dir):
        return failure
    records = _records(run_dir)
    last = records[-1].step if records else None
    max_steps = flatten(run_config(run_dir)).get("trainer.max_steps")
    if isinstance(max_steps, int) and max_steps > 0 and (last is None or last < max_steps):
        return {"reason": f"unfinished: the last record is at step {last} of trainer.max_steps={max_steps} (killed? "
                          f"resume it with ckpt_path=auto)", "step": last}
    return None


def _jobs(sweep: str | Path) -> list[Path]:
    sweep = Path(sweep)
    if not sweep.is_dir():
        raise UserError(f"sweep folder {sweep} does not exist; pass sweep=<multirun dir> or sweep=wandb:<entity/project/group>")
    if (sweep / JSONL).exists() or (sweep / FAILED).exists():
        raise UserError(f"{sweep} is a single run, not a sweep; analyse it with run={sweep}")
    # Hydra names a job <num>_<override_dirname>; a group override (router/position=nope) nests it one deeper.
    found = {p.parent.relative_to(sweep) for name in (JSONL, FAILED) for p in sweep.rglob(name)}
    jobs = sorted((job for job in found if "analysis" not in job.parts), key=_job_order)
    if not jobs:
        raise UserError(f"no runs under {sweep} (no {JSONL} found); pass the folder `train.py -m` wrote")
    return jobs


def _job_order(job: Path):
    number = re.match(r"^(\d+)_?", job.parts[0])  # sort job 10 after job 9
    return (int(number.group(1)) if number else math.inf, str(job))


def factors(runs: list[Run]) -> list[str]:
    """Config keys whose values differ between the runs (the sweep's axes), seeds included.

    A key present in only some runs with one value wherever present (``router.rotary_pct`` exists only
    under RoPE) follows from another axis and is left out.
    """
    keys = sorted({key for run in runs for key in run.config})
    axes = []
    for key in keys:
        present = [repr(run.config[key]) for run in runs if key in run.config]
        if len(set(present)) > 1 and not key.startswith(_NOT_A_FACTOR):
            axes.append(key)
    return axes


def val_loss(run: Run) -> float:
    """The last logged ``val/loss`` in the run's CSV metrics (nan when it was never logged)."""
    if run.logged_val_loss is not None:
        return run.logged_val_loss
    path = run.path / "csv" / "metrics.csv"
    if not path.is_file():
        return math.nan
    values = [row["val/loss"] for row in csv.DictReader(path.open()) if row.get("val/loss")]
    return float(values[-1]) if values else math.nan


def router_args(state: dict, path: Path) -> dict:
    """The router's constructor arguments (``_target_`` included) a checkpoint stores (tasks.router_args).

    Checkpoints written before they were stored: the run's datamodule, rebuilt from the stored config, is
    asked what train.py asked it (``model_kwargs()``: vocabulary size, graph in/out dims); a graph is read in
    its ``setup``. When that fails too, the one-line fix is to retrain.
    """
    from hydra.utils import instantiate

    hparams = state["hyper_parameters"]
    if hparams.get(ROUTER_KEY):
        return hparams[ROUTER_KEY]
    config = hparams["config"]
    try:
        datamodule = instantiate(config["data"])
        try:
            data_args = datamodule.model_kwargs()
        except AttributeError:  # graph datamodules load their graph in setup()
            datamodule.setup("fit")
            data_args = datamodule.model_kwargs()
    except Exception as e:
        reason = str(e).split(";")[0] if isinstance(e, UserError) else type(e).__name__
        raise UserError(f"{path} predates checkpoints that store their router's arguments, and its data cannot be "
                        f"rebuilt to recover them ({reason}); retrain the run with this train.py") from None
    return {**config["router"], **data_args}


def load_router(path: str | Path, untrained_seed: int | None = None):
    """(router in eval mode, resolved config, step) from a run directory or a ``.ckpt``: the router rebuilt
    from the arguments stored with it, then its weights.

    ``untrained_seed``: the same architecture freshly initialised under that torch seed instead of the
    trained weights (step -1), e.g. the untrained-pair baseline of the seed-direction study.
    """
    from hydra.utils import instantiate

    ckpt = newest_checkpoint(path)
    state = load_checkpoint(ckpt)
    config, args = state["hyper_parameters"]["config"], router_args(state, ckpt)
    if untrained_seed is not None:
        with torch.random.fork_rng():
            torch.manual_seed(untrained_seed)
            return instantiate(args).eval(), config, -1
    router = instantiate(args)
    weights = state["state_dict"]
    router.load_state_dict({k.removeprefix("model."): v for k, v in weights.items() if k.startswith("model.")})
    return router.eval(), config, int(state.get("global_step", -1))


# --- a sweep read back from W&B (its flat metrics; per-unit lists are absent) --------------------------------

def wandb_runs(path: str):
    """``entity/project/group`` -> our ``Run`` objects (config from the logged hparams, records from history)."""
    parts = path.strip("/").split("/")
    if len(parts) != 3:
        raise UserError(f"sweep=wandb:{path} must be wandb:<entity>/<project>/<group>")
    import wandb

    try:
        api = wandb.Api(timeout=30)
        found = list(api.runs(f"{parts[0]}/{parts[1]}", filters={"group": parts[2]}))
    except Exception as e:
        raise UserError(f"cannot read W&B group {path} ({type(e).__name__}); run `wandb login` online, or pass the "
                        "local multirun folder as sweep=<dir>") from None
    if not found:
        raise UserError(f"W&B group {path} has no runs; check the group name (the multirun folder's name)")
    from common.progress import progress

    runs = []
    for item in progress(found, f"reading W&B group {path}", unit="run"):  # one history download per run
        history = [dict(row) for row in item.scan_history()]
        records = from_history(history)
        if records:
            losses = [row["val/loss"] for row in history if row.get("val/loss") is not None]
            runs.append(Run(path=Path(item.name), config=flatten(dict(item.config).get("config", {})),
                            records=records, logged_val_loss=losses[-1] if losses else math.nan))
    return runs
