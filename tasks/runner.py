"""What train.py needs beyond instantiation: run directories, loggers, checkpoints, failures, the final report."""
from __future__ import annotations

import hashlib
import sys
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.types import RunMode
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict

from callbacks.checkpointing import LAST, inspect, newest_loadable
from callbacks.collapse_monitor import HEATMAP_PNG, JSONL, PROFILE_PNG, read_records
from common import atomic, run_names
from common.errors import UserError
from common.failed import clear_failure, mark_failed
from common.loggers import WandbLogger
from tasks.summary import training_table


CONF = str(Path(__file__).resolve().parents[1] / "conf")


def compose_run(out: Path, overrides: list[str]) -> DictConfig:
    """The train config composed in-process, with Hydra's runtime set as if ``hydra.run.dir=out``.

    For tests, benchmarks and notebooks that train without a subprocess (each process pays ~8 s of imports).
    """
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose("train", overrides=overrides, return_hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(out)
        cfg.hydra.job.num = 0
    HydraConfig.instance().set_config(cfg)
    Path(out).mkdir(parents=True, exist_ok=True)
    with open_dict(cfg):
        del cfg["hydra"]
    return cfg


def run_dir() -> Path:
    return Path(HydraConfig.get().runtime.output_dir)


def in_multirun() -> bool:
    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def prepare_run_dir(out: Path) -> None:
    """Fail early on an unwritable run dir; on (re)start, clear what a killed or failed earlier run left:
    temp files of interrupted writes and the ``FAILED`` marker. Rank zero only: under DDP the other ranks
    start while rank zero is already writing."""
    from lightning.pytorch.utilities import rank_zero_only

    if problem := atomic.check_writable(out):
        raise UserError(f"cannot write to the run directory {out} ({problem}); pass hydra.run.dir=<a writable folder>")
    if rank_zero_only.rank == 0:
        atomic.remove_stale_temps(out, out / "csv")
        clear_failure(out)


def record_failure(out: Path, error: BaseException, step: int | None) -> None:
    """Write the run's ``FAILED`` marker: why (the one-line message, or the exception) and at which step."""
    if isinstance(error, (KeyboardInterrupt, SystemExit)):
        reason = "interrupted"
    elif isinstance(error, UserError):
        reason = str(error)
    else:
        reason = f"{type(error).__name__}: {error}".strip().splitlines()[0]
    mark_failed(out, reason, getattr(error, "step", step))


def check_training_length(trainer_cfg: DictConfig) -> None:
    steps = trainer_cfg.get("max_steps")
    if steps is None or steps <= 0:
        raise UserError(f"trainer.max_steps={steps} trains nothing (training length is in steps; the loader is "
                        f"endless); pass trainer.max_steps=<N> with N > 0")


def plain(cfg: DictConfig) -> dict:
    return OmegaConf.to_container(cfg, resolve=True)


def build(node: DictConfig, **kwargs):
    """Instantiate ``node`` with extra ``kwargs`` (objects like the model pass through untouched).

    Our one-line UserErrors come through unwrapped; a config key the target does not take becomes one too.
    """
    target = node.get("_target_", "?")
    try:
        factory = instantiate(node, _partial_=True)
    except InstantiationException as e:
        cause = e.__cause__
        if isinstance(cause, UserError):
            raise cause from None
        raise UserError(f"cannot load {target}: {cause or e}; check the config group's _target_") from None
    try:
        return factory(**kwargs)
    except TypeError as e:
        if "argument" not in str(e):
            raise
        raise UserError(f"bad config for {target}: {e}; check the keys of that config group") from None


def check_compatible(model, datamodule) -> None:
    data_len = getattr(datamodule, "context_length", None)
    model_len = getattr(model, "context_length", None)
    if data_len is not None and model_len is not None and data_len > model_len:
        raise UserError(f"data.context_length={data_len} exceeds the model's context_length={model_len}; "
                        f"lower data.context_length or raise router.context_length")


def build_loggers(logger_cfg: DictConfig, out: Path, run_cfg: DictConfig | None = None) -> list:
    """Instantiate the configured loggers; W&B gets a group per sweep, a name from the swept values, tags,
    job type "train" and a stable id (common.run_names)."""
    hydra_cfg = HydraConfig.get()
    sweep = Path(hydra_cfg.sweep.dir) if hydra_cfg.mode == RunMode.MULTIRUN else None
    choices = dict(hydra_cfg.runtime.choices)
    router, extra_tags = (plain(run_cfg.router), run_cfg.get("tags") or []) if run_cfg else ({}, [])
    loggers = []
    for key, node in logger_cfg.items():
        overrides = {}
        if node._target_.endswith("WandbLogger"):
            swept = run_names.swept_keys(sweep) if sweep else None
            overrides = {
                "group": node.group or (run_names.group(choices.get("experiment"), sweep) if sweep else None),
                "name": node.name or run_names.run_name(list(hydra_cfg.overrides.task), swept, out.name),
                # A fixed id per run dir: re-syncing an offline run updates it instead of duplicating it.
                "id": node.id or hashlib.sha1(str(out.resolve()).encode()).hexdigest()[:16],
                "tags": run_names.tags(router, choices, extra_tags),
                "job_type": "train",
            }
        loggers.append(build(node, **overrides))
    return loggers


def builtin_callbacks(trainer_cfg: DictConfig) -> list:
    """Callbacks every run gets, whatever conf/callbacks holds: validation at the last step and, when stdout
    is not a terminal, a progress bar that writes lines (Lightning's rich bar shows nothing in a log)."""
    from callbacks.final_validation import ValidateAtEnd
    from callbacks.progress import LogProgressBar
    from common.progress import is_terminal

    log_bar = trainer_cfg.get("enable_progress_bar", True) and not is_terminal(sys.stdout)
    return [ValidateAtEnd()] + ([LogProgressBar()] if log_bar else [])


def print_config(cfg: DictConfig) -> None:
    """``extras.print_config=true``: the composed config, resolved, before anything is built."""
    if (cfg.get("extras") or {}).get("print_config"):
        print(OmegaConf.to_yaml(cfg, resolve=True), flush=True)


def finish_loggers(loggers: list, status: str) -> None:
    """Flush every logger and end the W&B run as ``success``, ``failed`` or ``preempted``: one W&B run per
    Hydra job, also inside a multirun process, and never a crashed run recorded as finished."""
    for logger in loggers:
        logger.save()
        if isinstance(logger, WandbLogger):
            logger.finish(status)


def resolve_checkpoint(ckpt_path: str | None, folder: Path, task) -> str | None:
    """The checkpoint to resume from: ``ckpt_path`` checked, or with ``auto`` the newest loadable checkpoint
    in ``folder`` (None when there is none yet). Says which one and why; bad ones are one-line errors."""
    if ckpt_path is None:
        return None
    if ckpt_path == "auto":
        path, step, problems = newest_loadable(folder)
        if path is None and problems:
            found = "; ".join(f"{name}: {problem}" for name, problem in problems.items())
            raise UserError(f"ckpt_path=auto: no checkpoint in {folder} loads ({found}); delete them to train from "
                            f"step 0, or pass ckpt_path=<a good .ckpt>")
        if path is None:
            print(f"ckpt_path=auto: no checkpoint in {folder} yet; training from step 0")
            return None
        why = ""
        if path.name != LAST:
            last_state, last_problem = inspect(folder / LAST) if (folder / LAST).exists() else (None, "missing")
            why = f" (last.ckpt is {last_problem or 'older: step %d' % last_state['global_step']})"
        print(f"ckpt_path=auto: resuming from {path}, step {step}{why}")
        state, _ = inspect(path)
    else:
        path = Path(ckpt_path)
        if not path.is_file():
            raise UserError(f"checkpoint {path} does not exist; pass ckpt_path=<run dir>/checkpoints/last.ckpt "
                            f"or ckpt_path=auto")
        state, problem = inspect(path)
        if problem:
            other, step, _ = newest_loadable(path.parent, skip=path)
            hint = (f"resume from {other} (step {step}) instead" if other else
                    "no other checkpoint beside it loads: train from step 0 without ckpt_path")
            raise UserError(f"checkpoint {path} is corrupt or not a Lightning checkpoint ({problem}); {hint}")
    check_architecture(state, task, path)
    return str(path)


def check_architecture(state: dict, task, path: Path) -> None:
    """A resume must rebuild the model it saved: name the config that differs, not a state_dict error."""
    ours, theirs = task.state_dict(), state["state_dict"]
    differ = sorted(k for k in ours.keys() | theirs.keys()
                    if k not in ours or k not in theirs or ours[k].shape != theirs[k].shape)
    if not differ:
        return
    then = _flat(state.get("hyper_parameters", {}).get("config", {}).get("router", {}), "router.")
    now = _flat(task.hparams.get("config", {}).get("router", {}), "router.")
    changed = [f"{k}={then.get(k)} there, {now.get(k)} here" for k in sorted(then.keys() | now.keys())
               if then.get(k) != now.get(k)]
    what = ", ".join(changed[:3]) or f"{len(differ)} tensors differ, e.g. {differ[0]}"
    raise UserError(f"checkpoint {path} holds a different model ({what}); resume with the settings it was trained "
                    f"with, or train a new run without ckpt_path")


def _flat(config: dict, prefix: str) -> dict:
    flat = {}
    for key, value in config.items():
        flat.update(_flat(value, f"{prefix}{key}.") if isinstance(value, dict) else {f"{prefix}{key}": value})
    return flat


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
