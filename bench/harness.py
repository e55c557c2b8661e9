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

from routers.family import families  # noqa: E402

# Each registered family at its default run: the overrides its descriptor gives (routers/family.py), e.g. the
# router alone for token routers, graph attention as its studies train it.
FAMILIES = {family.name: list(family.bench) for family in families() if family.bench}
QUIET = ["logger=csv", "print_table=false", "trainer.enable_progress_bar=false"]


@dataclass
class Built:
    cfg: object
    datamodule: object
    task: object
    optimizer: object
    batches: object  # an endless iterator of training batches
    device: str = "cpu"
    bf16: bool = False  # bf16 autocast around the loss, as trainer=gpu's precision bf16-mixed

    def step(self) -> float:
        """One optimiser step of the task's own loss, as Lightning's automatic optimisation runs it."""
        import torch

        batch = next(self.batches)
        if self.device != "cpu":
            batch = batch.to(self.device)
        with torch.autocast(torch.device(self.device).type, dtype=torch.bfloat16, enabled=self.bf16):
            loss = training_loss(self.task, batch)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return loss.item()  # .item() synchronises on GPU, so timing a step holds all of it


def build_family(family: str, out: Path, overrides: list[str] = (), device: str = "cpu",
                 bf16: bool = False, vocab_size: int | None = None) -> Built:
    """The config, data, router and task that ``python train.py <family's overrides>`` builds, plus the
    optimiser its task configures (and its scheduler's first learning rate); the task moved to ``device``.
    Token batches only go to a GPU (graph batches stay where their datamodule puts them). ``vocab_size``
    replaces the data's vocabulary in the router (a larger one keeps every token valid): a preset's real head
    over synthetic data, whose generator holds a V x V table and cannot reach a 50k vocabulary."""
    import lightning.pytorch as pl

    import run

    from routers.family import family as registered

    # The registry at call time, not FAMILIES: a family registered after this module was imported (a test's toy
    # router) benches too; its config may come from a Hydra search path given in ``overrides``.
    cfg = run.compose_run(out, [*registered(family).bench, *QUIET, *overrides])
    pl.seed_everything(cfg.seed, verbose=False)
    datamodule = run.build(cfg.data)
    datamodule.prepare_data()
    datamodule.setup("fit")
    model = run.build(cfg.router, **{**datamodule.model_kwargs(), **({"vocab_size": vocab_size} if vocab_size else {})})
    task = run.build(cfg.task, model=model, config=run.plain(cfg)).to(device)
    return Built(cfg, datamodule, task, optimizer_of(task, cfg.trainer.max_steps), endless(datamodule), device, bf16)


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
