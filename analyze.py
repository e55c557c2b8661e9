"""Post-hoc analysis of checkpoints, sweeps and Hugging Face models, and the studies (docs/analysis.md).

    python analyze.py run=<run dir or .ckpt> [probe=wikitext103] [--wandb]
    python analyze.py model=hf:EleutherAI/pythia-160m[@step4000] [revisions=[step0,step1000]] [compare=<run dir>]
    python analyze.py sweep=<multirun dir or wandb:entity/project/group> [study=brake_ordering|alibi_slope|metric_study|seed_direction]

Arguments are Hydra overrides of conf/analyze.yaml, composed in-process (no output dir of its own);
--help lists them.
"""
import sys
from pathlib import Path

CONF = str(Path(__file__).resolve().parent / "conf")


PATHS = ("run", "model", "sweep", "probe", "probe_path", "compare", "out", "tokenizer")


def _quote_path(arg: str) -> str:
    """Quote a path value for Hydra's override grammar: multirun job folders are named like
    ``0_router/position=nope,seed=0``, whose ``=`` and ``,`` would otherwise parse as syntax."""
    key, sep, value = arg.partition("=")
    if key not in PATHS or not sep or value[:1] in ("'", '"'):
        return arg
    return f"{key}='" + value.replace("'", "\\'") + "'"


def compose(argv: list[str]):
    from hydra import compose as hydra_compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from analysis.studies.spec import study_override
    from common import resolvers
    from common.errors import UserError

    resolvers.register()  # ${constant:...} in conf/study/*.yaml and in the runs' saved configs

    overrides = [study_override(_quote_path(a)) for a in argv if a != "--wandb"]
    overrides += ["wandb=true"] if "--wandb" in argv else []
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=CONF, version_base="1.3"):
            return hydra_compose("analyze", overrides=overrides)
    except (HydraException, OmegaConfBaseException) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"{first}; arguments are key=value overrides of conf/analyze.yaml "
                        "(python analyze.py --help lists them)") from None


def analyze(cfg):
    import torch

    from analysis import commands
    from common.errors import UserError

    if cfg.threads:  # as train.py: small models' ops run faster on one thread than split over a few
        torch.set_num_threads(cfg.threads)
    if cfg.workers is not None and (not isinstance(cfg.workers, int) or isinstance(cfg.workers, bool)
                                    or cfg.workers < 1):
        raise UserError(f"workers must be a positive integer (1: no worker processes); got {cfg.workers!r}")

    targets = [key for key in ("run", "model", "sweep") if cfg[key]]
    if len(targets) != 1:
        raise UserError(f"give exactly one of run=, model=, sweep= (got {', '.join(targets) or 'none'}); "
                        "e.g. python analyze.py run=outputs/<date>/<time>")
    if cfg.study and targets != ["sweep"]:
        raise UserError(f"study={cfg.study.name} analyses a sweep; pass sweep=<multirun dir>")
    if cfg.out:  # before any model pass: an output folder that cannot be written fails now, in one line
        from common.atomic import check_writable

        if problem := check_writable(cfg.out):
            raise UserError(f"cannot write to out={cfg.out} ({problem}); pass out=<a writable folder>")
    return {"run": commands.analyse_run, "model": commands.analyse_hf, "sweep": commands.analyse_sweep}[targets[0]](cfg)


def usage() -> str:
    """The module's usage lines, then every key of conf/analyze.yaml with its comment (the file is the spec)."""
    keys = (Path(CONF) / "analyze.yaml").read_text()
    return f"{__doc__.strip()}\n\nKeys (key=value; defaults from conf/analyze.yaml):\n\n{keys}"


def main(argv: list[str]) -> int:
    from common.errors import UserError

    if {"-h", "--help"} & set(argv):  # before Hydra, whose override parser would reject them
        print(usage())
        return 0
    try:
        out = analyze(compose(argv))
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"analysis written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
