"""The Lightning loop's cost over a bare PyTorch loop: same model, same data, same work (target: <= 5 %).

    python bench/train_loop.py                        # default run's model and data, 1 thread
    python bench/train_loop.py --rounds 5 --steps 30 router=mamba

The Lightning side is the run train.py builds (run.compose_run and the same objects: task, datamodule,
trainer, loggers, callbacks), with the collapse monitor and checkpoints off (their costs are
bench/monitor_overhead.py's) and no validation. The bare side trains the same task's router on the same
loader with what Lightning does per step: the task's loss, backward, gradient clipping at the trainer's
value, the configured optimiser and scheduler. Rounds of ``--steps`` steps alternate between the two in one
process; a Lightning step is the time between consecutive batch starts (so its per-step logging, callbacks
and data fetching count), a bare step the whole iteration; medians over steps.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import lightning.pytorch as pl  # noqa: E402

from bench.harness import QUIET, load_average  # noqa: E402

OFF = ["~callbacks.collapse_monitor", "~callbacks.checkpoint", "trainer.limit_val_batches=0"]


class StepClock(pl.Callback):
    """Times from one batch start to the next: everything the loop does per step."""

    def __init__(self):
        self.starts: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.starts.append(time.perf_counter())

    def steps(self) -> list[float]:
        return [b - a for a, b in zip(self.starts, self.starts[1:])]


def lightning_round(cfg, out: Path, task, datamodule, steps: int) -> list[float]:
    import run

    clock = StepClock()
    callbacks = [run.build(c) for c in cfg.callbacks.values()] + run.builtin_callbacks(cfg.trainer) + [clock]
    trainer = run.build(cfg.trainer, logger=run.build_loggers(cfg.logger, out, cfg), callbacks=callbacks,
                        default_root_dir=str(out), max_steps=steps, enable_model_summary=False)
    trainer.fit(task, datamodule=datamodule)
    return clock.steps()[1:]  # the first interval carries the loop's start-up


def bare_round(task, datamodule, clip: float | None, steps: int) -> list[float]:
    import torch

    optimizer, scheduler = _configured(task, steps)
    batches = iter(datamodule.train_dataloader())
    seconds = []
    for _ in range(steps):
        start = time.perf_counter()
        loss = task._loss(next(batches))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(task.parameters(), clip)
        optimizer.step()
        scheduler.step()
        loss.item()  # Lightning reads the loss back every step too (progress bar, logging)
        seconds.append(time.perf_counter() - start)
    return seconds[1:]


def _configured(task, steps: int):
    from types import SimpleNamespace

    task._trainer = SimpleNamespace(max_steps=steps)  # what configure_optimizers reads
    try:
        configured = task.configure_optimizers()
    finally:
        task._trainer = None
    return configured["optimizer"], configured["lr_scheduler"]["scheduler"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20, help="steps per round")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1)
    args, overrides = parser.parse_known_args()
    import torch

    import run

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        cfg = run.compose_run(out, [*QUIET, *OFF, *overrides])
        pl.seed_everything(cfg.seed, verbose=False)
        datamodule = run.build(cfg.data)
        datamodule.prepare_data()
        datamodule.setup("fit")
        model = run.compile_router(run.build(cfg.router, **datamodule.model_kwargs()), cfg.compile)
        task = run.build(cfg.task, model=model, config=run.plain(cfg))
        seconds = {"lightning": [], "bare": []}
        bare_round(task, datamodule, cfg.trainer.gradient_clip_val, 3)  # warm-up
        for i in range(args.rounds):
            order = ["lightning", "bare"] if i % 2 == 0 else ["bare", "lightning"]
            for name in order:
                if name == "lightning":
                    seconds[name] += lightning_round(cfg, out / f"round{i}", task, datamodule, args.steps)
                else:
                    seconds[name] += bare_round(task, datamodule, cfg.trainer.gradient_clip_val, args.steps)
    light, bare = statistics.median(seconds["lightning"]), statistics.median(seconds["bare"])
    print(f"# {load_average()}, {args.threads} thread(s), {args.rounds} rounds of {args.steps} steps each side")
    print(f"lightning step {1e3 * light:7.1f} ms   bare step {1e3 * bare:7.1f} ms   "
          f"Lightning overhead {100 * (light / bare - 1):+5.1f} %  (target <= 5 %)")


if __name__ == "__main__":
    main()
