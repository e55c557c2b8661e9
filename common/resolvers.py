"""OmegaConf resolvers the configs use, and the config nodes made from the code's defaults (common/schema.py),
registered once per process before Hydra composes."""
from __future__ import annotations

from omegaconf import ListConfig, OmegaConf


def local_jobs() -> int:
    """Jobs a local sweep runs at once: one per core on a CPU machine (each job then gets one torch thread,
    docs/decisions.md), one on a machine with a GPU (jobs would share it)."""
    import joblib
    import torch

    return 1 if torch.cuda.is_available() else joblib.cpu_count()


def constant(name: str):
    """``${constant:ONSET_THRESHOLD}``: a paper constant from common/constants.py, so YAML never restates one."""
    from common import constants

    if not name.isupper() or not hasattr(constants, name):
        raise ValueError(f"unknown constant {name!r}; common/constants.py defines "
                         f"{', '.join(n for n in dir(constants) if n.isupper())}")
    value = getattr(constants, name)
    # A tuple comes back as a ListConfig, not a list: OmegaConf.resolve (in place, as `--cfg job --resolve` and
    # print_config do) refuses a plain list from a resolver but puts a container in the interpolation's place.
    return ListConfig(list(value)) if isinstance(value, tuple) else value


def register() -> None:
    if not OmegaConf.has_resolver("local_jobs"):
        OmegaConf.register_new_resolver("local_jobs", local_jobs)
    if not OmegaConf.has_resolver("constant"):
        OmegaConf.register_new_resolver("constant", constant)
    from common import schema

    schema.register()  # /signature/<module>.<Class> config nodes: each default read from its code
