"""Train one router under Lightning from a Hydra-composed config, with the collapse monitor running.

    python train.py                                              # default: small Pythia-style model, Shakespeare
    python train.py router/position=alibi router/score=learned_metric seed=3 data_seed=1 trainer.max_steps=500
    python train.py -m router/position=nope,rope,alibi seed=0,1,2   # a 9-run sweep, one W&B group
"""
import sys

import hydra
from omegaconf import DictConfig


@hydra.main(config_path="conf", config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from common.errors import UserError  # heavy imports only after Hydra has parsed the command line

    try:
        train(cfg)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


def train(cfg: DictConfig) -> None:
    import lightning.pytorch as pl
    import torch

    from tasks import runner

    run_dir = runner.run_dir()
    if cfg.threads:  # e.g. threads=1 on a shared machine, where OpenMP threads thrash on tiny ops
        torch.set_num_threads(cfg.threads)
    pl.seed_everything(cfg.seed, workers=True, verbose=False)  # weights; data order follows data_seed alone
    datamodule = runner.build(cfg.data)
    datamodule.prepare_data()
    datamodule.setup("fit")
    model = runner.build(cfg.router, **datamodule.model_kwargs())
    runner.check_compatible(model, datamodule)
    task = runner.build(cfg.task, model=model, config=runner.plain(cfg))
    loggers = runner.build_loggers(cfg.logger, run_dir)
    callbacks = [runner.build(c) for c in cfg.callbacks.values()]
    trainer = runner.build(cfg.trainer, logger=loggers, callbacks=callbacks)
    ckpt_path = runner.resolve_checkpoint(cfg.ckpt_path, run_dir)
    try:
        trainer.fit(task, datamodule=datamodule, ckpt_path=ckpt_path)
    except BaseException:
        runner.finish_loggers(loggers, failed=True)  # W&B would otherwise mark a crashed job "finished"
        raise
    runner.finish_loggers(loggers, failed=False)
    if trainer.is_global_zero:
        runner.report(run_dir, task, print_table=cfg.print_table)


if __name__ == "__main__":
    main()
