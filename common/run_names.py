"""The names a researcher reads: W&B run names, groups and tags, and the arm labels of figures.

A run is named by what its sweep varies, in short aliases (``nope·s0``), not by its job number or the whole
override list; a sweep's W&B group is its experiment plus the sweep's date and time; tags carry the
experiment, router family, position, score and data. Figures label arms with the same aliases, so a legend,
a heatmap title and a W&B run name agree. Hydra records what a sweep varies in ``<sweep>/multirun.yaml``
(command-line sweeps and the experiment's ``hydra.sweeper.params``) and each job's own values in
``<job>/.hydra/overrides.yaml``; both are read here, so analysis names runs as training did.
"""
from __future__ import annotations

import re
from pathlib import Path

SEP = "·"
# Short names for keys that sweeps vary; any other key is shortened to its last dotted part.
ALIASES = {"seed": "s", "data_seed": "d", "data.data_seed": "d", "router.alibi_slope_scale": "slope",
           "task.lr": "lr", "task.weight_decay": "wd", "router.n_layer": "L", "router.recency_offset": "offset",
           "router.decay_scale": "decay"}
# Keys whose value names itself: a config group's choice or a categorical knob (router/position=nope -> nope).
VALUE_ONLY = ("router", "router.position", "router.score", "router.normalization", "data", "task", "experiment",
              "debug")
# Keys that say how a run was run, not what was trained: never part of a single run's name.
HOUSEKEEPING = ("trainer", "callbacks", "logger", "hydra", "extras", "tags", "threads", "print_table", "ckpt_path")
_DATE = re.compile(r"^\d{4}-\d{2}-\d{2}$")


def _key(key: str) -> str:
    return key.lstrip("+~").replace("/", ".")


def alias(key: str, value) -> str:
    """``router/position=nope`` -> ``nope``, ``seed=0`` -> ``s0``, ``router.freeze_delta=true`` -> ``freeze_delta``."""
    key, text = _key(key), str(value)
    if key in VALUE_ONLY:
        return text
    short = ALIASES.get(key, key.rsplit(".", 1)[-1])
    if text.lower() in ("true", "false"):
        return short if text.lower() == "true" else f"no_{short}"
    return f"{short}{text}"


def label(assignments: list[tuple[str, object]]) -> str:
    """Aliases joined with ``·``; a key interpolated from another (``data.data_seed``) is not repeated."""
    parts = list(dict.fromkeys(alias(k, v) for k, v in assignments))
    return SEP.join(parts)


def _split(override: str) -> tuple[str, str]:
    key, _, value = override.partition("=")
    return _key(key), value


def swept_keys(sweep_dir: Path) -> set[str] | None:
    """Keys the sweep varies, from its ``multirun.yaml`` (None when there is none to read)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from omegaconf import OmegaConf

    path = Path(sweep_dir) / "multirun.yaml"
    if not path.is_file():
        return None
    hydra = OmegaConf.load(path).hydra
    parse = OverridesParser.create().parse_overrides
    params = [f"{k}={v}" for k, v in (OmegaConf.select(hydra, "sweeper.params") or {}).items()]
    swept = {_key(o.key_or_group) for o in parse(params) if o.is_sweep_override()}
    for o in parse(list(OmegaConf.select(hydra, "overrides.task") or [])):  # the command line wins
        (swept.add if o.is_sweep_override() else swept.discard)(_key(o.key_or_group))
    return swept


def run_name(overrides: list[str], swept: set[str] | None, fallback: str) -> str:
    """A job's name: its values of the swept keys; a single run (``swept`` None): its overrides, less
    housekeeping (``trainer.*``, ``threads``, ...); ``fallback`` when nothing is left."""
    pairs = [_split(o) for o in overrides]
    if swept is None:
        pairs = [(k, v) for k, v in pairs if not k.startswith(HOUSEKEEPING)]
    else:
        pairs = [(k, v) for k, v in pairs if k in swept]
    return label(pairs) or fallback


def group(experiment: str | None, sweep_dir: Path) -> str:
    """``brake_ordering_2026-11-28_10-00-31`` for ``multirun/2026-11-28/10-00-31``; other folders keep
    their name, prefixed with the experiment unless it is in there already."""
    sweep_dir = Path(sweep_dir)
    name = f"{sweep_dir.parent.name}_{sweep_dir.name}" if _DATE.match(sweep_dir.parent.name) else sweep_dir.name
    prefix = experiment or "sweep"
    return name if prefix in name else f"{prefix}_{name}"


def tags(router: dict, choices: dict, extra=()) -> list[str]:
    """``experiment:``, ``router:`` (the shape chosen), ``family:`` (the router class), ``position:``,
    ``score:``, ``data:`` and ``regime:`` tags, where they apply, then the user's ``tags=[...]``. ``router``: the run's
    router config; ``choices``: Hydra's config-group choices."""
    found = {"experiment": choices.get("experiment"), "router": choices.get("router"),
             "family": str(router.get("_target_", "")).rsplit(".", 1)[-1].lower() or None,
             "position": router.get("position"), "score": router.get("score"), "data": choices.get("data"),
             "regime": choices.get("regime")}
    return [f"{k}:{v}" for k, v in found.items() if v] + [str(t) for t in extra]


def sweep_dir_of(run_dir: Path) -> Path | None:
    """The sweep folder a job lives in (the nearest parent with ``multirun.yaml``), or None."""
    return next((p for p in list(Path(run_dir).parents)[:3] if (p / "multirun.yaml").is_file()), None)


def sweep_group(sweep_dir: Path) -> str:
    """The W&B group training gave a sweep's runs, read back from its ``multirun.yaml``."""
    from omegaconf import OmegaConf

    path = Path(sweep_dir) / "multirun.yaml"
    experiment = OmegaConf.select(OmegaConf.load(path), "hydra.runtime.choices.experiment") if path.is_file() else None
    return group(experiment, Path(sweep_dir))


def run_label(run_dir: Path) -> str:
    """A finished run's name as W&B got it, from its ``.hydra`` files (the folder name if there are none)."""
    from omegaconf import OmegaConf

    run_dir = Path(run_dir)
    path = run_dir / ".hydra" / "overrides.yaml"
    if not path.is_file():
        return run_dir.name
    sweep = sweep_dir_of(run_dir)
    return run_name(list(OmegaConf.load(path)), swept_keys(sweep) if sweep else None, run_dir.name)
