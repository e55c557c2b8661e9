"""Config nodes made from the code's own defaults, so that a default is written once: in the signature.

A class's keyword defaults (a constructor's, or a dataclass's fields) are its one source. For each class a
config names in its defaults list, this registers the Hydra config group ``signature/<module>.<Class>`` in
the ConfigStore: one option per parameter (``{name: default}``) and ``all`` (every parameter that has a
default). A YAML composes the ones it exposes and writes only what differs from the code::

    defaults:
      - /signature/routers.rwkv.RWKV@_here_: [all]   # every keyword default of RWKV.__init__
      - _self_
    _target_: routers.rwkv.RWKV
    routing_chunk_channels: 64                       # only what differs from the code (or is pinned)

so ``python train.py --cfg job`` still shows every key with its value, every key stays overridable without
``+``, and a run's saved config holds concrete values (a later change of a code default does not rewrite
what an old run says it used). docs/decisions.md says why this and not YAML-only or dataclass schemas.

The defaults are read from the source with ``ast``, not by importing the class: composing a config must
not import torch, Lightning or PyG (``--help`` and ``--cfg job`` stay fast, a machine without PyG still
composes a Pythia run). A default may be a literal, a name from ``common.constants`` or a module-level
literal constant, or ``dataclasses.field(default_factory=dict|list|tuple)``; anything else is an error
naming the parameter. tests/test_defaults.py checks the result against ``inspect.signature``.
"""
from __future__ import annotations

import ast
import re
from functools import lru_cache
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
GROUP = "signature"
ALL = "all"
SKIPPED = ("self", "cls")
_ENTRY = re.compile(r"/" + GROUP + r"/([A-Za-z_][\w.]*)")


class DefaultError(ValueError):
    pass


def _module_source(module: str) -> tuple[Path, ast.Module]:
    path = ROOT.joinpath(*module.split(".")).with_suffix(".py")
    if not path.is_file():
        path = ROOT.joinpath(*module.split("."), "__init__.py")
    if not path.is_file():
        raise DefaultError(f"no module {module!r} under {ROOT} (a /{GROUP}/<module>.<Class> config entry)")
    return path, ast.parse(path.read_text(), filename=str(path))


def _names(tree: ast.Module) -> dict:
    """Names a default may use: ``common.constants``' imported names and the module's literal constants."""
    from common import constants

    names = {}
    for node in tree.body:
        if isinstance(node, ast.ImportFrom) and node.module == "common.constants":
            for alias in node.names:
                names[alias.asname or alias.name] = getattr(constants, alias.name)
        elif isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            try:
                names[node.targets[0].id] = ast.literal_eval(node.value)
            except ValueError:
                pass
    return names


def _value(expr: ast.expr, names: dict, where: str):
    if isinstance(expr, ast.Name) and expr.id in names:
        value = names[expr.id]
    elif (isinstance(expr, ast.Call) and getattr(expr.func, "attr", getattr(expr.func, "id", None)) == "field"
          and [k.arg for k in expr.keywords] == ["default_factory"]
          and getattr(expr.keywords[0].value, "id", None) in ("dict", "list", "tuple")):
        value = {"dict": {}, "list": [], "tuple": []}[expr.keywords[0].value.id]
    else:
        try:
            value = ast.literal_eval(expr)
        except ValueError:
            raise DefaultError(f"{where}: the default {ast.unparse(expr)!r} is not a literal, a constant of "
                               "common/constants.py or a module-level literal; config nodes cannot read it") from None
    return list(value) if isinstance(value, tuple) else value


def _class(tree: ast.Module, name: str, module: str) -> ast.ClassDef:
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and node.name == name:
            return node
    raise DefaultError(f"no class {name!r} in {module}")


@lru_cache(maxsize=None)
def code_defaults(target: str) -> dict:
    """``{parameter: default}`` of ``target`` ("module.Class"), in signature order: its ``__init__``'s keyword
    defaults (inherited from a base class of the same module when it has none), or its dataclass fields'."""
    module, _, name = target.rpartition(".")
    _, tree = _module_source(module)
    names = _names(tree)
    cls = _class(tree, name, module)
    while True:
        init = next((n for n in cls.body if isinstance(n, ast.FunctionDef) and n.name == "__init__"), None)
        if init is not None:
            args = init.args
            positional = args.posonlyargs + args.args
            pairs = list(zip(positional[len(positional) - len(args.defaults):], args.defaults))
            pairs += [(a, d) for a, d in zip(args.kwonlyargs, args.kw_defaults) if d is not None]
            return {a.arg: _value(d, names, f"{target}({a.arg}=...)") for a, d in pairs if a.arg not in SKIPPED}
        if any(getattr(d, "id", getattr(d, "attr", None)) == "dataclass" or
               getattr(getattr(d, "func", None), "id", None) == "dataclass" for d in cls.decorator_list):
            return {n.target.id: _value(n.value, names, f"{target}.{n.target.id}") for n in cls.body
                    if isinstance(n, ast.AnnAssign) and n.value is not None and isinstance(n.target, ast.Name)}
        bases = [b.id for b in cls.bases if isinstance(b, ast.Name)]
        if not bases:
            raise DefaultError(f"{target} has no __init__ of its own nor a base class in {module} with one")
        cls = _class(tree, bases[0], module)


def targets(conf: Path = CONF) -> list[str]:
    """Every ``module.Class`` a config under ``conf`` composes defaults from (``/signature/<target>``)."""
    found = set()
    for path in conf.rglob("*.yaml"):
        found.update(_ENTRY.findall(path.read_text()))
    return sorted(found)


def register(conf: Path = CONF) -> None:
    """Store ``signature/<target>/<parameter>`` and ``signature/<target>/all`` for every target the configs
    name. Idempotent; called by ``common.resolvers.register`` before anything composes."""
    from hydra.core.config_store import ConfigStore

    store = ConfigStore.instance()
    for target in targets(conf):
        defaults = code_defaults(target)
        group = f"{GROUP}/{target}"
        store.store(group=group, name=ALL, node=dict(defaults), provider="routecollapse")
        for key, value in defaults.items():
            store.store(group=group, name=key, node={key: value}, provider="routecollapse")
