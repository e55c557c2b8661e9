"""OmegaConf resolvers the configs use, registered once per process before Hydra composes."""
from __future__ import annotations

from omegaconf import OmegaConf


def local_jobs() -> int:
    """Jobs a local sweep runs at once: one per core on a CPU machine (each job then gets one torch thread,
    docs/decisions.md), one on a machine with a GPU (jobs would share it)."""
    import joblib
    import torch

    return 1 if torch.cuda.is_available() else joblib.cpu_count()


def register() -> None:
    if not OmegaConf.has_resolver("local_jobs"):
        OmegaConf.register_new_resolver("local_jobs", local_jobs)
