"""A router family, declared once: in its own module, as ``FAMILY = register(Family(...))``.

Every list of families derives from these declarations (:func:`families`): the family statistics a routing
record selects (``Routing.statistics``, computed in ``collapse/family.py`` and keyed there by what they
measure, so the metrics never name a family), the Hugging Face model types our own routers adapt
(``analysis/readers/hf.py``), the benches' default runs (``bench/harness.py``) and the interface test
(tests/test_router_protocols.py). Adding a family is its module, its config (``conf/router/<name>.yaml``) and
its test; anything that registers a family, a test module included, is seen by all of them.

What a family's config holds (shapes, the probe size: conf/router/probe/) stays in its config; the descriptor
holds only what code needs to find the family.
"""
from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass
from typing import Any, Callable

from common.errors import UserError
from routers.routing import AXES, Routing, RoutingLayer


@dataclass(frozen=True)
class Family:
    """One router family.

    name            how runs, records and benches name it (``summary["family"]`` where it has statistics)
    axis            what it routes over: one of ``routers.routing.AXES``
    statistics      the family statistics its routing carries, by what they measure (a key of
                    ``collapse.family.STATISTICS``); "" for none beyond the shared signature
    hf_model_types  Hugging Face ``model_type`` values that ``from_hf`` turns into this family's router
    from_hf         ``callable(hf_model) -> router`` for those model types (a classmethod of the router)
    bench           Hydra overrides of the family's default run for the benches (bench/harness.py)
    example         ``callable() -> (router, inputs)``: a tiny router and inputs it takes, for the interface
                    test (tests/test_router_protocols.py); ``routing_of(router, inputs)`` must work on them
    """
    name: str
    axis: str
    statistics: str = ""
    hf_model_types: tuple[str, ...] = ()
    from_hf: Callable[[Any], Any] | None = None
    bench: tuple[str, ...] = ()
    example: Callable[[], tuple[Any, Any]] | None = None

    def __post_init__(self):
        if not self.name:
            raise ValueError("a router family needs a name")
        if self.axis not in AXES:
            raise ValueError(f"family {self.name!r}: unknown routing axis {self.axis!r}; choose one of {', '.join(AXES)}")
        if self.hf_model_types and self.from_hf is None:
            raise ValueError(f"family {self.name!r} adapts {self.hf_model_types} but gives no from_hf")

    def routing(self, layers: list[RoutingLayer], axis: str | None = None) -> Routing:
        """This family's routing record: its axis (or ``axis``) and its statistics. The record names the family
        only where its statistics ride along ("" otherwise, as records always have)."""
        return Routing(layers, axis=axis or self.axis, family=self.name if self.statistics else "",
                       statistics=self.statistics)


_REGISTRY: dict[str, Family] = {}


def register(family: Family) -> Family:
    """Declare ``family`` (once, at module level); a second, different family under the same name is an error
    (re-importing the same module re-declares an equal one, which is harmless)."""
    known = _REGISTRY.get(family.name)
    if known is not None and (known.axis, known.statistics, known.bench) != (family.axis, family.statistics, family.bench):
        raise UserError(f"router family {family.name!r} is declared twice; give the new family another name")
    _REGISTRY[family.name] = family
    return family


def families() -> tuple[Family, ...]:
    """Every registered family: each module of the ``routers`` package is imported (so each declares its own),
    plus whatever else registered one (e.g. a test's toy router), in registration order."""
    import routers

    for module in pkgutil.iter_modules(routers.__path__):
        importlib.import_module(f"routers.{module.name}")
    return tuple(_REGISTRY.values())


def family(name: str) -> Family:
    """The registered family called ``name``; a one-line error naming the known ones otherwise."""
    found = {f.name: f for f in families()}
    if name not in found:
        raise UserError(f"unknown router family {name!r}; choose one of {', '.join(found)}")
    return found[name]


def hf_adapters() -> dict[str, Family]:
    """Hugging Face ``model_type`` -> the family whose ``from_hf`` builds our router for it."""
    return {model_type: f for f in families() for model_type in f.hf_model_types}
