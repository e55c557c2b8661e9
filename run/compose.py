"""The composed config and where the run lives: Hydra's runtime, read in one place."""
from __future__ import annotations

from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf, open_dict

from common import resolvers

resolvers.register()
CONF = str(Path(__file__).resolve().parents[1] / "conf")


def compose_run(out: Path, overrides: list[str]) -> DictConfig:
    """The train config composed in-process, with Hydra's runtime set as if ``hydra.run.dir=out``.

    For tests, benchmarks and notebooks that train without a subprocess (each process pays ~8 s of imports).
    """
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose("train", overrides=overrides, return_hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(out)
        cfg.hydra.job.num = 0
    HydraConfig.instance().set_config(cfg)
    Path(out).mkdir(parents=True, exist_ok=True)
    with open_dict(cfg):
        del cfg["hydra"]
    return cfg


def run_dir() -> Path:
    """The run directory: Hydra's output dir for this job, and the one place it is read. train.py hands it on:
    to the trainer (``default_root_dir``, where the monitor writes its records), the W&B run id, the checkpoint
    folder's default and the closing report."""
    return Path(HydraConfig.get().runtime.output_dir)


def in_multirun() -> bool:
    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def print_config(cfg: DictConfig) -> None:
    """``extras.print_config=true``: the composed config, resolved, before anything is built."""
    if (cfg.get("extras") or {}).get("print_config"):
        print(OmegaConf.to_yaml(cfg, resolve=True), flush=True)
