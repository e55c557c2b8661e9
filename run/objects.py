"""Objects from config nodes: data, model, task, trainer, callbacks and loggers, with one-line errors."""
from __future__ import annotations

import hashlib
import sys
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.types import RunMode
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from common import run_names
from common.errors import UserError
from common.loggers import WandbLogger


def check_sweep_strategy(trainer_cfg: DictConfig) -> None:
    """Lightning's subprocess DDP relaunches ``sys.argv``, which in a sweep is the whole ``-m`` command line: each
    rank would start the sweep again. ``ddp_spawn`` forks from the job instead, and under SLURM (or torchrun)
    the ranks are launched outside, so nothing is relaunched."""
    from lightning.fabric.plugins.environments import SLURMEnvironment, TorchElasticEnvironment

    from run.compose import in_multirun

    strategy = str(trainer_cfg.get("strategy") or "")
    if SLURMEnvironment.detect() or TorchElasticEnvironment.detect():
        return
    if in_multirun() and strategy.startswith("ddp") and not strategy.startswith("ddp_spawn"):
        raise UserError(f"trainer.strategy={strategy} relaunches the command line, which in a sweep restarts the "
                        "sweep; pass trainer.strategy=ddp_spawn, or send the sweep to SLURM (hydra/launcher=slurm)")


def cluster_plugins(trainer_cfg: DictConfig) -> dict:
    """Under SLURM, Lightning's cluster environment with its auto-requeue off: one handler owns preemption, the
    checkpoint callback (callbacks/checkpointing.py), which checkpoints at the end of the step and requeues once.
    Lightning's own would save an ``hpc_ckpt`` and run ``scontrol requeue`` a second time. Returns the extra
    trainer arguments (none outside SLURM, or where the trainer config sets its own ``plugins``)."""
    from lightning.fabric.plugins.environments import SLURMEnvironment

    if not SLURMEnvironment.detect() or trainer_cfg.get("plugins"):
        return {}
    return {"plugins": [SLURMEnvironment(auto_requeue=False)]}


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


def compile_router(model, compile: bool | str):
    """``compile=true`` (inductor) or ``compile=<backend>``: torch.compile the router's forward in place.
    ``nn.Module.compile`` keeps the state_dict keys (a wrapper would prefix them), so checkpoints load either
    way; the monitor's ``routing`` path stays eager."""
    if compile:
        model.compile(**({} if compile is True else {"backend": compile}))
    return model


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


def finish_loggers(loggers: list, status: str) -> None:
    """Flush every logger and end the W&B run as ``success``, ``failed`` or ``preempted``: one W&B run per
    Hydra job, also inside a multirun process, and never a crashed run recorded as finished. After a failure a
    logger that cannot flush (its folder became unwritable) is passed over: the failure is what gets reported."""
    for logger in loggers:
        try:
            logger.save()
        except OSError:
            if status == "success":
                raise
        if isinstance(logger, WandbLogger):
            logger.finish(status)


def builtin_callbacks(trainer_cfg: DictConfig) -> list:
    """Callbacks every run gets, whatever conf/callbacks holds: validation at the last step and, when stdout
    is not a terminal, a progress bar that writes lines (Lightning's rich bar shows nothing in a log)."""
    from callbacks.final_validation import ValidateAtEnd
    from common.progress import is_terminal, log_progress_bar

    log_bar = trainer_cfg.get("enable_progress_bar", True) and not is_terminal(sys.stdout)
    return [ValidateAtEnd()] + ([log_progress_bar()] if log_bar else [])
