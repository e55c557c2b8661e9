"""Train one router under Lightning from a Hydra-composed config, with the collapse monitor running.

    python train.py                                              # default: small Pythia-style model, Shakespeare
    python train.py router/position=alibi router/score=learned_metric seed=3 data_seed=1 trainer.max_steps=500
    python train.py -m router/position=nope,rope,alibi seed=0,1,2   # a 9-run sweep, one W&B group
"""
import logging
import sys

import hydra
from omegaconf import DictConfig

from common import resolvers

resolvers.register()  # before Hydra composes: the local launcher's job count (conf/hydra/launcher/local.yaml)

@hydra.main(config_path="conf", config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from common.errors import UserError  # heavy imports only after Hydra has parsed the command line
    from run import in_multirun

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
    import os
    import signal

    from callbacks.checkpointing import Preempted, requeue
    from common.errors import UserError
    from run import prepare_run_dir, record_failure, report, run_dir, unwritable

    out = run_dir()  # the one source of the run directory; everything below is handed it
    lock = prepare_run_dir(out)  # one writer per run dir, held until this function returns
    trainer, preempted = None, False
    try:
        trainer, task, datamodule, loggers, ckpt_path = setup(cfg, out)
        fit(trainer, task, datamodule, loggers, ckpt_path, out)
    except Preempted as p:
        preempted = True
        print(f"preempted: {p}", file=sys.stderr, flush=True)
        if lock:
            lock.release()  # the requeued job may start while this process still winds down
        outcome = requeue(trainer.checkpoint_callback, p)  # under submitit, a requeue exits here
        print(outcome, file=sys.stderr, flush=True)
        if os.environ.get("SUBMITIT_EXECUTOR") and p.signum != signal.SIGTERM:
            # Not requeued: end with a result, or the sweep's parent would wait for a job that never comes back.
            failure = UserError(f"preempted at step {p.step} and not requeued ({outcome})")
            record_failure(out, failure, p.step)
            raise failure from None
        sys.exit(128 + p.signum)  # what a shell reports for a process ended by that signal
    except BaseException as e:
        step = None if trainer is None else trainer.global_step
        # A run dir that became unwritable (or full) mid-run: one line naming the file and the fix, not the
        # traceback of whichever write hit it first.
        error = unwritable(out, e, step) or e
        not_written = record_failure(out, error, step)
        if isinstance(error, UserError) and not_written:
            error = UserError(f"{error} (FAILED could not be written in {out} either: {not_written})")
        if error is not e:
            raise error from None
        raise
    finally:
        if lock:
            lock.release()
        # Give the signals back, unless the job is handing itself to SLURM: the kill that comes with its requeue
        # must find our handler (a no-op by then), not submitit's.
        release = getattr(trainer and trainer.checkpoint_callback, "release_signals", None)
        if release and not preempted:
            release()
    if trainer.is_global_zero:
        report(out, print_table=cfg.print_table)


def setup(cfg: DictConfig, out):
    import lightning.pytorch as pl
    import torch

    import run

    run.print_config(cfg)
    run.check_config(cfg)
    run.check_sweep_strategy(cfg.trainer)
    if cfg.threads:  # e.g. threads=1 on a shared machine, where OpenMP threads thrash on tiny ops
        torch.set_num_threads(cfg.threads)
    pl.seed_everything(cfg.seed, workers=True, verbose=False)  # weights; data order follows data_seed alone
    datamodule = run.build(cfg.data)
    datamodule.prepare_data()
    datamodule.setup("fit")
    model = run.build(cfg.router, **datamodule.model_kwargs())
    run.check_compatible(model, datamodule)
    model = run.compile_router(model, cfg.get("compile", False))
    task = run.build(cfg.task, model=model, config=run.plain(cfg))
    loggers = run.build_loggers(cfg.logger, out, cfg)
    callbacks = [run.build(c) for c in cfg.callbacks.values()] + run.builtin_callbacks(cfg.trainer)
    # The monitor writes its records under default_root_dir: the run directory, not a config key of its own.
    trainer = run.build(cfg.trainer, logger=loggers, callbacks=callbacks, default_root_dir=str(out),
                        **run.cluster_plugins(cfg.trainer))
    ckpt_path = run.resolve_checkpoint(cfg.ckpt_path, run.checkpoint_folder(trainer, out), task)
    return trainer, task, datamodule, loggers, ckpt_path


def fit(trainer, task, datamodule, loggers: list, ckpt_path, out) -> None:
    from callbacks.checkpointing import Preempted
    from callbacks.nonfinite import NonFiniteGuard
    from run import check_finite, checkpoint_folder, finish_loggers

    status = "failed"
    try:
        trainer.fit(task, datamodule=datamodule, ckpt_path=ckpt_path)
        guard = next((c for c in trainer.callbacks if isinstance(c, NonFiniteGuard)), None)
        loss_step = getattr(task, "nonfinite_step", None)
        failure = guard.failure if guard else (None if loss_step is None else (loss_step, "loss"))
        check_finite(out, failure, checkpoint_folder(trainer, out))
        status = "success"
    except Preempted:
        status = "preempted"
        raise
    finally:
        finish_loggers(loggers, status)  # W&B would otherwise record a crashed job as finished


if __name__ == "__main__":
    main()
