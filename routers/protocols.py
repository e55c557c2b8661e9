"""The router interface, written down: what the tasks, the monitor and analysis call, as ``typing.Protocol``s.

Nothing inherits from these; they are structural (duck) types, checked by tests/test_router_protocols.py
against every registered family (routers/family.py) with ``isinstance`` and by calling them.

Router side (``routers/``):
    Router            ``forward(inputs, return_routing=False)``: the output, or ``(output, Routing)`` with
                      ``return_routing=True``. ``inputs`` is what the family routes over: tokens [batch, time]
                      for token/time/depth routers, a graph (``.x``, ``.edge_index``) for graph routers.
    RoutingShortcut   optional ``routing(inputs) -> Routing``: the record without work a reader does not need
                      (equal to the full forward's; ``routers.routing.routing_of`` prefers it)
    ScoredKeysShortcut optional ``scored_keys(inputs) -> list[Tensor]``: each layer's scored keys alone
                      (``routers.routing.scored_keys_of`` prefers it)
    HFAdapter         ``from_hf(hf_model) -> router`` for the Hugging Face model types its family names

Task and data side (``tasks/``, ``datamodules/``, read by ``collapse/measure.py`` and the monitor):
    ProbedModule      ``probe_routing(inputs) -> Routing``, and, where the probe has a shuffled copy,
                      ``probe_keys(inputs) -> list[Tensor]`` (ShuffleNullModule)
    Probe             ``batches(batch_size)`` -> iterator of ``(inputs, shuffled inputs or None)``
    RouterData        ``model_kwargs() -> dict``: the router's data-given constructor arguments (vocabulary,
                      channels)
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Iterator, Protocol, runtime_checkable

if TYPE_CHECKING:
    from torch import Tensor

    from routers.routing import Routing


@runtime_checkable
class Router(Protocol):
    def forward(self, inputs: Any, return_routing: bool = False) -> "Tensor | tuple[Tensor, Routing]": ...

    def __call__(self, inputs: Any, return_routing: bool = False) -> "Tensor | tuple[Tensor, Routing]": ...


@runtime_checkable
class RoutingShortcut(Protocol):
    def routing(self, inputs: Any) -> "Routing": ...


@runtime_checkable
class ScoredKeysShortcut(Protocol):
    def scored_keys(self, inputs: Any) -> "list[Tensor]": ...


@runtime_checkable
class HFAdapter(Protocol):
    def from_hf(self, hf_model: Any, **overrides: Any) -> Router: ...


@runtime_checkable
class ProbedModule(Protocol):
    def probe_routing(self, inputs: Any) -> "Routing": ...


@runtime_checkable
class ShuffleNullModule(ProbedModule, Protocol):
    def probe_keys(self, inputs: Any) -> "list[Tensor]": ...


@runtime_checkable
class Probe(Protocol):
    def batches(self, batch_size: int) -> Iterator[tuple[Any, Any]]: ...


@runtime_checkable
class RouterData(Protocol):
    def model_kwargs(self) -> dict: ...
