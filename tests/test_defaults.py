"""Each default is written once (docs/decisions.md, "Each default in one place"): a router's, the monitor's and a
study's defaults are their code's (constructor signature, dataclass fields), composed into the configs by
``/signature/<module>.<Class>`` entries (common/schema.py); paper constants come from common/constants.py."""
from __future__ import annotations

import dataclasses
import importlib
import inspect
import json
import re
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf

from common import constants, resolvers, schema

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
OWNED = ["router", "callbacks", "study"]  # the groups whose nodes build a class with defaults of its own
PINNED = "pinned"  # a line that restates a code default on purpose says so: `n_layer: 6  # pinned: <why>`

resolvers.register()


def _class(target: str):
    module, _, name = target.rpartition(".")
    return getattr(importlib.import_module(module), name)


def _signature_defaults(target: str) -> dict:
    cls = _class(target)
    if dataclasses.is_dataclass(cls):
        out = {}
        for f in dataclasses.fields(cls):
            if f.default is not dataclasses.MISSING:
                out[f.name] = f.default
            elif f.default_factory is not dataclasses.MISSING:
                out[f.name] = f.default_factory()
        return out
    return {n: p.default for n, p in inspect.signature(cls).parameters.items()
            if p.default is not inspect.Parameter.empty}


def _plain(value):
    return list(value) if isinstance(value, tuple) else value


@pytest.mark.parametrize("target", schema.targets())
def test_config_nodes_hold_exactly_the_code_defaults(target):
    """The source-read defaults (no import at compose time) equal what Python itself sees."""
    assert schema.code_defaults(target) == {k: _plain(v) for k, v in _signature_defaults(target).items()}


def _in_repo(target: str) -> bool:
    module = target.rpartition(".")[0].split(".")
    return (ROOT.joinpath(*module).with_suffix(".py")).is_file() or (ROOT.joinpath(*module) / "__init__.py").is_file()


def _yaml_files():
    return sorted(p for group in OWNED for p in (CONF / group).rglob("*.yaml"))


def _entries(text: str) -> list[str]:
    return re.findall(r"/" + schema.GROUP + r"/([\w.]+)", text)


def _targets(path: Path) -> set[str]:
    """The classes whose defaults a config file's keys stand for: its own signature entries and _target_, those
    of a base config it extends (``- pythia``), or, for a subgroup option (router/position/alibi.yaml), those of
    the configs that select from that subgroup."""
    text = path.read_text()
    data = yaml.safe_load(text) or {}
    found = set(_entries(text)) | ({data["_target_"]} if isinstance(data.get("_target_"), str) else set())
    for entry in data.get("defaults") or []:
        if isinstance(entry, str) and (path.parent / f"{entry}.yaml").is_file():
            found |= _targets(path.parent / f"{entry}.yaml")
    if not found and path.parent.parent.name == "router":
        subgroup = path.parent.name
        for parent in path.parent.parent.glob("*.yaml"):
            defaults = (yaml.safe_load(parent.read_text()) or {}).get("defaults") or []
            if any(isinstance(d, dict) and subgroup in d for d in defaults):
                found |= _targets(parent)
    return found


def _nodes(data: dict):
    """(key path, node) of every mapping that builds a class: the file itself, or its ``_target_`` children."""
    if "_target_" in data or "name" in data or not any(isinstance(v, dict) for v in data.values()):
        yield "", data
    for key, value in data.items():
        if isinstance(value, dict) and "_target_" in value:
            yield key, value


def test_no_config_repeats_a_code_default_unless_it_says_it_is_pinned():
    """A key whose value equals its class's own default is written twice: drop it (the file's /signature/
    entry composes it from the code) or, where the value must not follow the code (a real model's shape),
    mark the line ``# pinned: <why>``. A subgroup option may name itself (``position: rope`` in rope.yaml)."""
    repeats = []
    for path in _yaml_files():
        text = path.read_text()
        data = yaml.safe_load(text) or {}
        targets = _targets(path)
        lines = text.splitlines()
        for prefix, node in _nodes(data):
            node_targets = {node["_target_"]} if "_target_" in node else targets
            if prefix:
                node_targets |= set(_entries(text))
            for target in sorted(node_targets):
                if not _in_repo(target):
                    continue  # Lightning's own classes: their defaults are not ours to write once
                defaults = schema.code_defaults(target)
                for key, value in node.items():
                    if key in ("_target_", "defaults") or key not in defaults:
                        continue
                    if isinstance(value, str) and "${" in value:
                        continue  # an interpolation: a value of the config, not a restated default
                    if value != defaults[key] or value == path.stem:
                        continue
                    line = next((ln for ln in lines if re.match(rf"^\s*{re.escape(key)}\s*:", ln)), "")
                    if PINNED not in line.partition("#")[2]:
                        repeats.append(f"{path.relative_to(ROOT)}: {key}: {value!r} repeats {target}'s default")
    assert not repeats, "\n".join(repeats)


def test_signature_entries_name_real_parameters():
    """A typo in an entry's option list fails here in one line, not as Hydra's 'could not find' at run time."""
    for path in _yaml_files():
        data = yaml.safe_load(path.read_text()) or {}
        for entry in data.get("defaults") or []:
            if not isinstance(entry, dict):
                continue
            for key, options in entry.items():
                match = re.match(r"^/" + schema.GROUP + r"/([\w.]+)", key)
                if match:
                    known = set(schema.code_defaults(match.group(1))) | {schema.ALL}
                    options = options if isinstance(options, list) else [options]
                    assert set(options) <= known, f"{path}: {sorted(set(options) - known)} not in {match.group(1)}"


def _compose(root: str, overrides: list[str]):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(root, overrides=overrides)


def _chain(path: Path) -> list[Path]:
    """A router config and the configs it extends (``- pythia``), and every subgroup option it may select."""
    files = [path]
    for entry in (yaml.safe_load(path.read_text()) or {}).get("defaults") or []:
        if isinstance(entry, str) and (path.parent / f"{entry}.yaml").is_file():
            files += _chain(path.parent / f"{entry}.yaml")
    return files + sorted(path.parent.glob("*/*.yaml"))


def _override(value) -> str:
    return json.dumps(OmegaConf.to_container(value) if OmegaConf.is_config(value) else value)


@pytest.mark.parametrize("router", sorted(p.stem for p in (CONF / "router").glob("*.yaml")))
def test_every_router_key_is_shown_with_the_code_default_and_overridable_without_plus(router):
    node = _compose("train", [f"router={router}"]).router
    defaults = schema.code_defaults(node._target_)
    written = {k for f in _chain(CONF / "router" / f"{router}.yaml") for k in (yaml.safe_load(f.read_text()) or {})}
    shown = [k for k in node if k in defaults]
    assert shown, f"router={router} composes none of {node._target_}'s defaults"
    for key in shown:  # the code's value, unless a config writes the key
        assert node[key] == defaults[key] or key in written, (router, key)
    plain = [k for k in shown if not OmegaConf.is_interpolation(node, k)]
    again = _compose("train", [f"router={router}", *(f"router.{k}={_override(node[k])}" for k in plain)]).router
    assert all(again[k] == node[k] for k in plain)


def test_the_monitor_reads_every_default_from_its_constructor_and_constants():
    from callbacks.collapse_monitor import CollapseMonitor

    monitor = _compose("train", ["regime=none"]).callbacks.collapse_monitor  # the regimes set their own cadence
    signature = inspect.signature(CollapseMonitor).parameters
    for key in ("every_n_steps", "probe_batch_size", "onset_threshold", "completion_threshold", "solved_margin"):
        assert monitor[key] == signature[key].default
    assert tuple(monitor.ranks) == constants.RANKS
    assert monitor.live_probe_sequences == 8  # the config's own choice, not the constructor's (None)


def test_analyze_and_studies_read_the_paper_constants():
    from analysis.studies import spec

    cfg = _compose("analyze", ["sweep=/tmp/x"])
    assert (tuple(cfg.ranks), cfg.threshold, cfg.completion, cfg.level) == (
        constants.RANKS, constants.ONSET_THRESHOLD, constants.COMPLETION_THRESHOLD, constants.LEVEL)
    OmegaConf.resolve(cfg)  # in place, as `--cfg job --resolve` does: a list constant resolves too
    assert list(cfg.ranks) == list(constants.RANKS)
    for name in spec.names():
        composed = _compose("analyze", ["sweep=/tmp/x", f"study={name}"]).study
        from_compose = spec.from_config(OmegaConf.to_container(composed, resolve=True)).at()
        assert from_compose == spec.load(name), name  # the raw-file reader fills the same defaults
        assert from_compose.rank == constants.RANK and from_compose.solved_margin == constants.SOLVED_MARGIN


def test_a_code_default_that_is_not_a_literal_is_refused_in_one_line(tmp_path, monkeypatch):
    package = tmp_path / "toydefaults"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "model.py").write_text("import math\nclass Toy:\n    def __init__(self, a: int = 3, b=math.pi):\n"
                                      "        pass\n")
    monkeypatch.setattr(schema, "ROOT", tmp_path)
    schema.code_defaults.cache_clear()
    try:
        with pytest.raises(schema.DefaultError, match=r"Toy\(b=\.\.\.\).*math\.pi"):
            schema.code_defaults("toydefaults.model.Toy")
    finally:
        schema.code_defaults.cache_clear()
