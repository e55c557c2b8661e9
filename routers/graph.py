"""Graph routers: GAT and its depth- and width-matched GCN control (paper Section 5.1).

A GAT layer is a content-based router over nodes: each node's softmax over its incoming edges scores the
projected source features (the keys). The GCN control keeps the graph, the depth and the width but routes
with the fixed symmetric-normalised aggregation D^{-1/2}(A+I)D^{-1/2}, so whatever collapse it shows is
oversmoothing on that topology; the GAT - GCN differential is what learned attention adds on top.

Both stacks: ``num_layers`` message-passing layers of width ``hidden`` (GAT: ``heads`` concatenated heads of
``hidden // heads`` channels: 8 x 8 = 64, docs/decisions.md), ELU between layers, then a linear
classifier. Every routing layer is therefore ``hidden`` wide, so their feature geometry compares layer by layer
and model to model. The routing record is sparse (edge index with the self-loops the layer adds, one weight per
edge and head): an N x N matrix is never built.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch_geometric.nn import GATConv, GATv2Conv, GCNConv
from torch_geometric.nn.conv.gcn_conv import gcn_norm

from common.errors import UserError
from routers.family import Family, register
from routers.routing import RoutingLayer

class GraphRouter(nn.Module):
    """The shared stack; subclasses say how one layer routes (``make_conv`` and ``route``)."""

    def __init__(self, in_channels: int, out_channels: int, num_layers: int = 6, hidden: int = 64,
                 dropout: float = 0.5, residual: bool = False):
        super().__init__()
        if num_layers < 1 or hidden < 1:
            raise UserError(f"num_layers={num_layers} and hidden={hidden} must be positive; "
                            f"set router.num_layers / router.hidden to at least 1")
        if not 0.0 <= dropout < 1.0:
            raise UserError(f"dropout={dropout} is outside [0, 1); set router.dropout to e.g. 0.5")
        self.dropout = dropout
        self.residual = residual
        self.convs = nn.ModuleList(self.make_conv(in_channels if i == 0 else hidden, hidden)
                                   for i in range(num_layers))
        self.classifier = nn.Linear(hidden, out_channels)

    def make_conv(self, in_channels: int, hidden: int) -> nn.Module:
        raise NotImplementedError

    def route(self, conv: nn.Module, h: Tensor, edge_index: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """One layer with its routing: (output, edge index routed over, edge weights [E, units],
        keys [units, N, d])."""
        raise NotImplementedError

    def forward(self, x, edge_index: Tensor | None = None, return_routing: bool = False):
        """``(x, edge_index)``, or a graph with ``.x`` and ``.edge_index`` as ``x`` (a PyG ``Data``: the one
        ``inputs`` every router takes, so ``routing_of(router, graph)`` works, routers/protocols.py)."""
        if edge_index is None and hasattr(x, "edge_index"):
            x, edge_index = x.x, x.edge_index
        if edge_index is None:  # called as a token model, e.g. by the LM task
            raise UserError("graph routers take (x, edge_index); train them with task=node_classification")
        layers = []
        h = x
        for i, conv in enumerate(self.convs):
            h_in = F.dropout(h, self.dropout, self.training)
            if return_routing:
                out, routed_index, weight, keys = self.route(conv, h_in, edge_index)
                layers.append(self.routing_layer(i, out, routed_index, weight, keys))
            else:
                out = conv(h_in, edge_index)
            # The first layer changes width (input features -> hidden), so the skip starts at layer 1.
            h = F.elu(out) + h if self.residual and i > 0 else F.elu(out)
        logits = self.classifier(F.dropout(h, self.dropout, self.training))
        if return_routing:
            return logits, FAMILY.routing(layers)
        return logits

    def routing_layer(self, i: int, out: Tensor, edge_index: Tensor, weight: Tensor, keys: Tensor) -> RoutingLayer:
        # The pre-activation output travels with the record: the paper compares GAT with GCN on its
        # full-width geometry (collapse/family.py), not on the per-head keys.
        return RoutingLayer(keys=keys.unsqueeze(0), edge_index=edge_index, edge_weight=weight, num_nodes=out.shape[0],
                            name=f"layer{i}.{type(self.convs[i]).__name__}", features=out.detach())


class GAT(GraphRouter):
    """Graph attention: each node routes over its in-neighbours and itself with a learned softmax per head.

    ``v2=True`` uses GATv2's dynamic attention (score a^T LeakyReLU(W_l h_j + W_r h_i)) instead of GAT's
    static a_l^T W h_j + a_r^T W h_i; in both the key is the projected source feature.
    """

    def __init__(self, in_channels: int, out_channels: int, num_layers: int = 6, hidden: int = 64,
                 heads: int = 8, dropout: float = 0.5, attention_dropout: float = 0.0, residual: bool = False,
                 v2: bool = False):
        if heads < 1 or hidden % heads:
            raise UserError(f"hidden={hidden} is not divisible by heads={heads}; pick heads that divide "
                            f"router.hidden (the heads are concatenated back to the hidden width)")
        # Set before the base class builds the stack: make_conv reads them.
        self.heads, self.attention_dropout, self.v2 = heads, attention_dropout, v2
        super().__init__(in_channels, out_channels, num_layers, hidden, dropout, residual)

    def make_conv(self, in_channels: int, hidden: int) -> nn.Module:
        conv = GATv2Conv if self.v2 else GATConv
        return conv(in_channels, hidden // self.heads, heads=self.heads, dropout=self.attention_dropout)

    def route(self, conv, h, edge_index):
        # The returned edge index is the one the softmax ran over: the layer removes any self-loops given and
        # adds one per node (pyg #3550), so it differs from the input edge index.
        out, (routed_index, alpha) = conv(h, edge_index, return_attention_weights=True)
        lin = conv.lin_l if self.v2 else conv.lin
        keys = lin(h).view(h.shape[0], conv.heads, conv.out_channels).transpose(0, 1)
        return out, routed_index, alpha, keys


class GCN(GraphRouter):
    """The control: the same stack with fixed symmetric-normalised aggregation, D^{-1/2}(A+I)D^{-1/2}."""

    def make_conv(self, in_channels: int, hidden: int) -> nn.Module:
        return GCNConv(in_channels, hidden)

    def route(self, conv, h, edge_index):
        # The exact normalisation GCNConv applies (self-loops added where missing, degrees at the target).
        routed_index, weight = gcn_norm(edge_index, None, h.shape[0], add_self_loops=True, flow=conv.flow)
        keys = conv.lin(h).unsqueeze(0)  # one routing unit: the projected node features
        return conv(h, edge_index), routed_index, weight.unsqueeze(-1), keys


def _example() -> tuple[GAT, object]:
    from torch_geometric.data import Data

    x = torch.randn(6, 5, generator=torch.Generator().manual_seed(0))
    edge_index = torch.tensor([[0, 1, 1, 2, 2, 3, 3, 4, 4, 5], [1, 0, 2, 1, 3, 2, 4, 3, 5, 4]])
    return GAT(5, 3, num_layers=2, hidden=8, heads=2).eval(), Data(x=x, edge_index=edge_index)


# GAT and its GCN control share one family: their routing records carry the same statistics. The bench trains
# GAT as its studies do (CSBM is generated, so no download).
FAMILY = register(Family("graph", axis="node", statistics="graph_features",
                         bench=("router=gat", "data=csbm", "task=node_classification", "regime=none"),
                         example=_example))
