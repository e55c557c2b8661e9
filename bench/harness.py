"""What the benches share: a family's default run built the way train.py builds it, one training step of it,
and side-by-side timing (interleaved, medians) that holds up on a machine shared with other jobs."""
from __future__ import annotations

import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

# Each family at its default config: the router alone for token routers; graph attention as its studies train
# it (CSBM is generated, so no download).
FAMILIES = {
    "pythia": ["router=pythia"],
    "mamba": ["router=mamba"],
    "rwkv": ["router=rwkv"],
    "attnres": ["router=attnres"],
    "gat": ["router=gat", "data=csbm", "task=node_classification", "regime=none"],
}
QUIET = ["logger=csv", "print_table=false", "trainer.enable_progress_bar=false"]


@dataclass
class Built:
    cfg: object
    datamodule: object
    task: object
    optimizer: object
    batches: object  # an endless iterator of training batches

    def step(self) -> float:
        """One optimiser step of the task's own loss, as Lightning's automatic optimisation runs it."""
        loss = training_loss(self.task, next(self.batches))
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return loss.item()


def build_family(family: str, out: Path, overrides: list[str] = ()) -> Built:
    """The config, data, router and task that ``python train.py <family's overrides>`` builds, plus the
    optimiser its task configures (and its scheduler's first learning rate)."""
    import lightning.pytorch as pl

    import run

    cfg = run.compose_run(out, [*FAMILIES[family], *QUIET, *overrides])
    pl.seed_everything(cfg.seed, verbose=False)
    datamodule = run.build(cfg.data)
    datamodule.prepare_data()
    datamodule.setup("fit")
    model = run.build(cfg.router, **datamodule.model_kwargs())
    task = run.build(cfg.task, model=model, config=run.plain(cfg))
    return Built(cfg, datamodule, task, optimizer_of(task, cfg.trainer.max_steps), endless(datamodule))


def training_loss(task, batch):
    """What the task's ``training_step`` returns, without the logging that needs a trainer."""
    if hasattr(task, "loss_and_accuracy"):  # node classification: full-batch, training nodes only
        return task.loss_and_accuracy(task(batch), batch.y, batch.train_mask)[0]
    return task._loss(batch)


def optimizer_of(task, max_steps: int):
    """The task's configured optimiser; the LM task reads ``trainer.max_steps`` for its schedule."""
    task._trainer = SimpleNamespace(max_steps=max_steps)  # the one trainer attribute configure_optimizers reads
    try:
        configured = task.configure_optimizers()
    finally:
        task._trainer = None
    return configured["optimizer"] if isinstance(configured, dict) else configured


def endless(datamodule):
    while True:
        yield from datamodule.train_dataloader()


def interleaved(timers: dict, rounds: int) -> dict[str, list[float]]:
    """Seconds of each timer, run alternately (first one first, then reversed) for ``rounds`` rounds, so
    load from other processes hits all alike."""
    seconds = {name: [] for name in timers}
    for i in range(rounds):
        for name in (list(timers) if i % 2 == 0 else list(reversed(timers))):
            start = time.perf_counter()
            timers[name]()
            seconds[name].append(time.perf_counter() - start)
    return seconds


def median(values) -> float:
    return statistics.median(values)


def load_average() -> str:
    try:
        return "load average %.2f %.2f %.2f" % tuple(float(x) for x in Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "load average unknown"
