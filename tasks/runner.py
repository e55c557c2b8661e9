"""What train.py needs beyond instantiation: run directories, loggers, checkpoints, the final report."""
from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.types import RunMode
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict

from callbacks.collapse_monitor import JSONL, PROFILE_PNG, read_records
from common.errors import UserError
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


def build_loggers(logger_cfg: DictConfig, out: Path) -> list:
    """Instantiate the configured loggers; W&B gets a sweep group, a readable name and a stable id."""
    hydra_cfg = HydraConfig.get()
    multirun = hydra_cfg.mode == RunMode.MULTIRUN
    loggers = []
    for key, node in logger_cfg.items():
        overrides = {}
        if node._target_.endswith("WandbLogger"):
            overrides = {
                "group": node.group or (Path(hydra_cfg.sweep.dir).name if multirun else None),
                "name": node.name or (hydra_cfg.job.override_dirname or out.name if multirun else out.name),
                # A fixed id per run dir: re-syncing an offline run updates it instead of duplicating it.
                "id": node.id or hashlib.sha1(str(out.resolve()).encode()).hexdigest()[:16],
            }
        loggers.append(build(node, **overrides))
    return loggers


def finish_loggers(loggers: list, failed: bool) -> None:
    for logger in loggers:
        logger.finalize("failed" if failed else "success")
    import wandb

    if wandb.run is not None:  # one W&B run per Hydra job, also inside a multirun process
        wandb.finish(exit_code=1 if failed else 0)


def resolve_checkpoint(ckpt_path: str | None, out: Path) -> str | None:
    if ckpt_path is None:
        return None
    if ckpt_path == "auto":  # requeued jobs: resume this run dir's last checkpoint if there is one
        last = out / "checkpoints" / "last.ckpt"
        return str(last) if last.exists() else None
    path = Path(ckpt_path)
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist; pass ckpt_path=<run dir>/checkpoints/last.ckpt "
                        f"or ckpt_path=auto")
    try:
        state = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
        if "state_dict" not in state or "loops" not in state:
            raise KeyError("state_dict/loops")
    except Exception as e:
        raise UserError(f"checkpoint {path} is corrupt or not a Lightning checkpoint ({type(e).__name__}); "
                        f"resume from another one, e.g. the run's checkpoints/last.ckpt") from None
    return str(path)


def report(out: Path, task, print_table: bool = True) -> None:
    """Print what training did to the signature and where the outputs are; fail loudly on a NaN stop."""
    records = read_records(out)
    if print_table and records:
        print(training_table(records[0], records[-1]))
    print(f"\nrun directory: {out}")
    for name in (JSONL, PROFILE_PNG, "probe.pt", "checkpoints/last.ckpt", ".hydra/config.yaml", "csv/metrics.csv"):
        if (out / name).exists():
            print(f"  {name}")
    for wandb_run in sorted((out / "wandb").glob("offline-run-*")):
        print(f"  wandb/{wandb_run.name}   (upload: wandb sync {wandb_run})")
    bad_step = getattr(task, "nonfinite_step", None)
    if bad_step is not None:
        raise UserError(f"loss became non-finite at step {bad_step}; training stopped there. The last good weights "
                        f"are in {out}/checkpoints/last.ckpt and all metrics so far in {out}/{JSONL}; "
                        f"lower task.lr or keep trainer.gradient_clip_val on")
