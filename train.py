"""Train one router under Lightning from a Hydra-composed config, with the collapse monitor running.

    python train.py                                              # default: small Pythia-style model, Shakespeare
    python train.py router/position=alibi router/score=learned_metric seed=3 data_seed=1 trainer.max_steps=500
    python train.py -m router/position=nope,rope,alibi seed=0,1,2   # a 9-run sweep, one W&B group
"""
import logging
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig


@hydra.main(config_path="conf", config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from common.errors import UserError  # heavy imports only after Hydra has parsed the command line
    from tasks.runner import in_multirun

    # A failed job of a sweep returns normally, so Hydra runs the other jobs: its FAILED file and the sweep's
    # closing summary (common.hydra_callback) report it. A single run exits 2 on bad input.
    try:
        train(cfg)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        if not in_multirun():
            sys.exit(2)
    except Exception:
        if not in_multirun():
            raise
        logging.getLogger(__name__).exception("this job failed; the sweep goes on")


def train(cfg: DictConfig) -> None:
    from callbacks.checkpointing import Preempted, requeue
    from tasks import runner

    out = runner.run_dir()
    runner.prepare_run_dir(out)
    trainer = None
    try:
        trainer, task, datamodule, loggers, ckpt_path = setup(cfg, out)
        fit(trainer, task, datamodule, loggers, ckpt_path, out)
    except Preempted as p:
        print(f"preempted: {p}", file=sys.stderr, flush=True)
        print(requeue(trainer.checkpoint_callback, p), file=sys.stderr)  # under submitit, this exits
        sys.exit(128 + p.signum)  # what a shell reports for a process ended by that signal
    except BaseException as e:
        runner.record_failure(out, e, None if trainer is None else trainer.global_step)
        raise
    if trainer.is_global_zero:
        runner.report(out, print_table=cfg.print_table)


def setup(cfg: DictConfig, out):
    import lightning.pytorch as pl
    import torch

    from tasks import runner

    runner.print_config(cfg)
    runner.check_training_length(cfg.trainer)
    if cfg.threads:  # e.g. threads=1 on a shared machine, where OpenMP threads thrash on tiny ops
        torch.set_num_threads(cfg.threads)
    pl.seed_everything(cfg.seed, workers=True, verbose=False)  # weights; data order follows data_seed alone
    datamodule = runner.build(cfg.data)
    datamodule.prepare_data()
    datamodule.setup("fit")
    model = runner.build(cfg.router, **datamodule.model_kwargs())
    runner.check_compatible(model, datamodule)
    task = runner.build(cfg.task, model=model, config=runner.plain(cfg))
    loggers = runner.build_loggers(cfg.logger, out, cfg)
    callbacks = [runner.build(c) for c in cfg.callbacks.values()] + runner.builtin_callbacks(cfg.trainer)
    trainer = runner.build(cfg.trainer, logger=loggers, callbacks=callbacks)
    ckpt_path = runner.resolve_checkpoint(cfg.ckpt_path, checkpoint_folder(trainer, out), task)
    return trainer, task, datamodule, loggers, ckpt_path


def checkpoint_folder(trainer, out) -> Path:
    return Path(getattr(trainer.checkpoint_callback, "dirpath", None) or out / "checkpoints")


def fit(trainer, task, datamodule, loggers: list, ckpt_path, out) -> None:
    from callbacks.checkpointing import Preempted
    from callbacks.nonfinite import NonFiniteGuard
    from tasks import runner

    status = "failed"
    try:
        trainer.fit(task, datamodule=datamodule, ckpt_path=ckpt_path)
        guard = next((c for c in trainer.callbacks if isinstance(c, NonFiniteGuard)), None)
        loss_step = getattr(task, "nonfinite_step", None)
        failure = guard.failure if guard else (None if loss_step is None else (loss_step, "loss"))
        runner.check_finite(out, failure, checkpoint_folder(trainer, out))
        status = "success"
    except Preempted:
        status = "preempted"
        raise
    finally:
        runner.finish_loggers(loggers, status)  # W&B would otherwise record a crashed job as finished


if __name__ == "__main__":
    main()
