"""Entry-point plumbing for train.py: compose the config, build the objects, resolve the checkpoint, and
record how the run ended. LightningModules live in ``tasks/``; the run record in ``records/``."""
from run.checkpoints import check_architecture, checkpoint_folder, resolve_checkpoint
from run.compose import CONF, compose_run, in_multirun, print_config, run_dir
from run.objects import (build, build_loggers, builtin_callbacks, check_compatible, check_sweep_strategy,
                         cluster_plugins, compile_router, finish_loggers, plain)
from run.outcome import NonFiniteError, check_finite, prepare_run_dir, record_failure, report, unwritable
from run.validate import check_config

__all__ = [
    "CONF", "NonFiniteError", "build", "build_loggers", "builtin_callbacks", "check_architecture",
    "check_compatible", "check_config", "check_finite", "check_sweep_strategy", "checkpoint_folder", "cluster_plugins",
    "compile_router", "compose_run",
    "finish_loggers", "in_multirun", "plain", "prepare_run_dir", "print_config", "record_failure", "report",
    "resolve_checkpoint", "run_dir", "unwritable",
]
