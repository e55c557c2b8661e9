"""The routing record: the one thing every router exposes to the collapse metrics.

The paper's thesis is that attention over tokens, graph attention over nodes, selective state spaces and
RWKV over time, and attention residuals over depth are all *content-based routers*. The record makes that an
interface: per routing layer, the weights each query puts on each source, and the keys that were scored.
Metrics (``collapse/``) read only this record, so they never special-case a router family.

Shapes (the leading ``units`` axis is whatever routes independently: attention heads, SSM/RWKV channels,
or a single depth router per sublayer):

    weights       [batch, units, queries, sources]   row = query, column = source
    keys          [batch, units, sources, d]         keys as scored (after any position transform)
    content_keys  [batch, units, sources, d]         keys before the position transform (pre-RoPE)
    mask          bool, broadcastable to weights     True where the query may route to the source

Operators too large to hold (Mamba/RWKV: channels x T x T) give ``weight_chunks`` instead of ``weights``:
a callable returning an iterator of ``[batch, units_chunk, queries, sources]`` tensors that together cover
all units in order. Graph routers give the sparse form (``edge_index``, ``edge_weight``) and never densify.

Beyond the operator and its keys, a family may hand over the raw tensors its own statistics are read from
(typed fields, all optional): ``features`` (a graph layer's pre-activation output), ``delta`` (a selective
SSM's step sizes Δ) and ``recency_bias`` (an AttnRes router's bias on the current source). The record
carries tensors only: every statistic is computed in ``collapse/`` (``collapse/family.py`` for the
family-specific ones, chosen by ``Routing.statistics``: the name of what they measure, which the family's
descriptor gives, routers/family.py), so routers import nothing from the metrics.

A router may also offer shortcuts that skip work a reader does not need, and every reader goes through
:func:`routing_of` / :func:`scored_keys_of`, which prefer them:
    routing(inputs) -> Routing            the record without e.g. the vocabulary head; a test must hold it
                                          equal to ``forward(..., return_routing=True)``
    scored_keys(inputs) -> list[Tensor]   each layer's scored keys alone (the shuffle null reads nothing else);
                                          a test must hold them to the record's up to float rounding
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator

import torch
from torch import Tensor

from common.errors import UserError

AXES = ("token", "node", "time", "depth")


@dataclass
class RoutingLayer:
    keys: Tensor
    weights: Tensor | None = None
    content_keys: Tensor | None = None
    mask: Tensor | None = None
    weight_chunks: Callable[[], Iterator[Tensor]] | None = None
    edge_index: Tensor | None = None  # [2, E]: row 0 = source, row 1 = target (PyG convention)
    edge_weight: Tensor | None = None  # [E, units]
    num_nodes: int | None = None
    name: str = ""
    features: Tensor | None = None      # [nodes, hidden]: a graph layer's pre-activation output
    delta: Tensor | None = None         # [batch, sources, channels]: a selective SSM's step sizes
    recency_bias: Tensor | None = None  # []: an AttnRes router's bias on the current source (plus any offset)
    statistics: str = ""                # the family statistics these tensors feed; Routing sets it

    def __post_init__(self):
        forms = [self.weights is not None, self.weight_chunks is not None, self.edge_weight is not None]
        if sum(forms) != 1:
            raise ValueError(f"RoutingLayer {self.name!r}: give exactly one of weights, weight_chunks, "
                             f"or (edge_index, edge_weight); got {sum(forms)}")
        if self.edge_weight is not None and (self.edge_index is None or self.num_nodes is None):
            raise ValueError(f"RoutingLayer {self.name!r}: sparse routing needs edge_index and num_nodes")
        if self.keys.dim() < 2:
            raise ValueError(f"RoutingLayer {self.name!r}: keys must be [..., sources, d], got {tuple(self.keys.shape)}")

    @property
    def is_sparse(self) -> bool:
        return self.edge_weight is not None

    @property
    def scored_keys(self) -> Tensor:
        """Keys whose geometry the metrics measure: the content (pre-position) keys where they differ."""
        return self.content_keys if self.content_keys is not None else self.keys

    def iter_weights(self) -> Iterator[Tensor]:
        """Dense weights as chunks over units; a single chunk when the layer holds them whole."""
        if self.weights is not None:
            yield self.weights
        elif self.weight_chunks is not None:
            yield from self.weight_chunks()
        else:
            raise ValueError(f"RoutingLayer {self.name!r} is sparse; use edge_index/edge_weight")


@dataclass
class Routing:
    """Per-layer routing of one forward pass, in depth order.

    ``family`` names the router family in records ("" where no family statistics ride along);
    ``statistics`` names the family statistics collapse/ adds (a key of ``collapse.family.STATISTICS``, checked
    there when measured; "" for none). A family's descriptor fills both (``Family.routing``,
    routers/family.py). Each layer carries ``statistics`` too: the metrics build one accumulator per layer."""
    layers: list[RoutingLayer]
    axis: str = "token"
    family: str = ""
    statistics: str = ""

    def __post_init__(self):
        if self.axis not in AXES:
            raise ValueError(f"unknown routing axis {self.axis!r}; choose one of {', '.join(AXES)}")
        for layer in self.layers:
            layer.statistics = self.statistics

    def __len__(self) -> int:
        return len(self.layers)

    def __getitem__(self, i: int) -> RoutingLayer:
        return self.layers[i]

    def __iter__(self):
        return iter(self.layers)

    def scored_keys(self) -> list[Tensor]:
        """Each layer's scored keys, in depth order."""
        return [layer.scored_keys for layer in self.layers]


def routing_of(router, inputs) -> Routing:
    """The routing record of ``inputs`` (tokens, or a graph for graph routers): the router's ``routing``
    shortcut where it offers one, else the full forward's (routers/protocols.py)."""
    shortcut = getattr(router, "routing", None)
    return shortcut(inputs) if shortcut is not None else router(inputs, return_routing=True)[1]


def scored_keys_of(router, inputs) -> list[Tensor]:
    """Each layer's scored keys on ``inputs``: the router's ``scored_keys`` shortcut where it offers one, else
    the record's."""
    shortcut = getattr(router, "scored_keys", None)
    return shortcut(inputs) if shortcut is not None else routing_of(router, inputs).scored_keys()


def check_tokens(tokens: Tensor, context_length: int) -> None:
    """The one-line errors every token/time router gives for badly shaped or too long input."""
    if tokens.dim() != 2:
        raise UserError(f"tokens must be [batch, time], got shape {tuple(tokens.shape)}; add a batch axis")
    if tokens.shape[1] > context_length:
        raise UserError(f"sequence length {tokens.shape[1]} exceeds context_length {context_length}; "
                        f"crop the input or raise router.context_length")


def causal_mask(n: int, device: torch.device | None = None, window: int | None = None) -> Tensor:
    """[n, n] bool, True where query i may route to source j <= i (and, with a sliding ``window``, i - j < window:
    the query and the window - 1 sources before it, as Hugging Face's sliding-window layers see them)."""
    mask = torch.ones(n, n, dtype=torch.bool, device=device).tril()
    return mask if window is None else mask.triu(-(window - 1))
