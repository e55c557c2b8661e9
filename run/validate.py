"""The composed config checked before anything is built: a malformed number is one line naming the fix, not
a traceback from deep inside Lightning or a router (and not a silently different run, such as 1.5 steps
becoming 2 or a probe of -3 sequences becoming 147)."""
from __future__ import annotations

import math

from omegaconf import DictConfig, OmegaConf

from common.errors import UserError

# key -> (kind, lowest allowed). Keys a config does not have (a graph run has no data.probe_length) are skipped,
# and so is null wherever null means "the default" (threads, live probe, gradient clipping).
RULES = {
    "trainer.max_steps": ("int", 1),
    "trainer.val_check_interval": ("number", 0),
    "threads": ("int", 1),
    "seed": ("int", 0),
    "data_seed": ("int", 0),
    "probe_sequences": ("int", 1),
    "data.batch_size": ("int", 1),
    "data.context_length": ("int", 1),
    "data.probe_sequences": ("int", 1),
    "data.probe_length": ("int", 1),
    "router.n_layer": ("int", 1),
    "router.d_model": ("int", 1),
    "router.n_head": ("int", 1),
    "router.context_length": ("int", 1),
    "task.lr": ("positive", 0),
    "task.weight_decay": ("number", 0),
    "task.warmup_steps": ("int", 0),
    "trainer.gradient_clip_val": ("positive", 0),
    "callbacks.collapse_monitor.probe_batch_size": ("int", 1),
    "callbacks.collapse_monitor.live_probe_sequences": ("int", 1),
    "callbacks.checkpoint.every_n_train_steps": ("int", 1),
}


def _problem(value, kind: str, low: float) -> str | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return "is not a number"
    if kind == "int" and (isinstance(value, float) and not value.is_integer()):
        return "is not a whole number"
    if not math.isfinite(value):
        return "is not finite"
    if kind == "positive" and value <= low:
        return f"must be above {low}"
    if value < low:
        return f"must be at least {low}"
    return None


def check_config(cfg: DictConfig) -> None:
    steps = OmegaConf.select(cfg, "trainer.max_steps")
    if steps is None or (isinstance(steps, (int, float)) and not isinstance(steps, bool) and steps <= 0):
        raise UserError(f"trainer.max_steps={steps} trains nothing (training length is in steps; the loader is "
                        f"endless); pass trainer.max_steps=<N> with N > 0")
    for key, (kind, low) in RULES.items():
        value = OmegaConf.select(cfg, key, default=None)
        if value is None:
            continue
        if problem := _problem(value, kind, low):
            wanted = {"int": f"a whole number >= {low}", "number": f"a number >= {low}",
                      "positive": f"a number > {low}"}[kind]
            raise UserError(f"{key}={value!r} {problem}; pass {key}=<{wanted}>")
