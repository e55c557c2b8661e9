"""Family statistics: what a router family's own paper section measures beyond the shared signature.

The routing record carries raw tensors only (``features``, ``delta``, ``recency_bias``, the operator); the
statistics are computed here, chosen by the record's ``statistics`` name (each layer carries its routing's),
so no router imports the metrics and no metric names a router family: the table below is keyed by what is
measured, and a family's descriptor (routers/family.py) says which it uses. Each family
keeps one small accumulator per layer: the signature streams every dense operator chunk through ``chunk``
(so an operator too large to hold is read once) and asks ``batch`` for the batch's values, which it
averages over sequences like every other column.

    graph_features               VE@4 of a graph layer's pre-activation output (the paper's GAT-vs-GCN
                                 number) and of the projected features with all heads side by side, and the
                                 output's Gaussian null (Section 5.1)
    selective_scan               CV over positions of Δ, of the effective key norms Δ_{s,d}|B_s| and of
                                 |B_s| (Section 5.2)
    late_query_content_recency   content and recency r: the routing early sources receive from late
                                 queries, correlated with the key norm and with the position (Section 5.3)
    depth_hubs                   hub shares per depth source (token-averaged weights), the uniform share
                                 1/S and the recency bias (Section 5.4)
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from common.constants import FEATURE_RANK, LATE_FRACTION
from common.errors import UserError
from collapse.geometry import gaussian_null, ve_at_rank
from collapse.recurrent import content_recency, late_query_influence

if TYPE_CHECKING:
    from routers.routing import RoutingLayer


class FamilyStatistics:
    """One layer's family statistics over one batch: ``chunk`` sees each dense operator chunk, ``batch``
    returns ``{column: scalar or 1-D tensor}`` for the batch and resets."""

    def chunk(self, weights: Tensor) -> None:
        pass

    def batch(self, layer: "RoutingLayer") -> dict[str, Tensor]:
        raise NotImplementedError


def _cv(values: Tensor, dim: int) -> Tensor:
    return values.std(dim, correction=0) / values.mean(dim)


class GraphFeatures(FamilyStatistics):
    """Full-width geometry that compares GAT with GCN: per-head GAT keys are only hidden/heads wide, so their
    VE@r sits on a different null than GCN's single hidden-wide unit (docs/decisions.md)."""

    def batch(self, layer):
        if layer.features is None:
            raise ValueError(f"graph layer {layer.name!r} carries no features; set RoutingLayer.features")
        n, r = layer.keys.shape[-2], FEATURE_RANK
        projected = layer.keys[0].detach().permute(1, 0, 2).reshape(n, -1)  # [heads, n, d] -> [n, heads * d]
        return {f"ve@{r}_features": ve_at_rank(layer.features, r), f"ve@{r}_projected": ve_at_rank(projected, r),
                f"ve@{r}_features_gauss": torch.tensor(gaussian_null(n, layer.features.shape[1], r))}


class SelectiveScan(FamilyStatistics):
    """Δ and key-norm spread over positions; the keys are B, shared by all channels."""

    def batch(self, layer):
        if layer.delta is None:
            raise ValueError(f"Mamba layer {layer.name!r} carries no delta; set RoutingLayer.delta")
        b_norm = layer.keys[:, 0].norm(dim=-1)                             # [batch, T]
        return {"delta_cv": _cv(layer.delta, 1).mean(),
                "effective_key_norm_cv": _cv(layer.delta * b_norm.unsqueeze(-1), 1).mean(),
                "b_norm_cv": _cv(b_norm, 1).mean()}


class LateQueryContentRecency(FamilyStatistics):
    """Across the sources s < late_start, the channel-mean routing they receive from the queries
    t >= late_start, correlated with |k_s| (content_r) and with s (recency_r), per sequence. Only late
    queries: every early source precedes all of them, so each is equally exposed (docs/decisions.md)."""

    def __init__(self, sources: int, late_fraction: float = LATE_FRACTION):
        self.late_start = max(1, min(sources - 1, math.floor(late_fraction * sources)))  # >= 1 of each side
        self.influence: Tensor | None = None
        self.channels = 0

    def chunk(self, weights):                                              # [batch, channels, T, T]
        part = late_query_influence(weights[..., self.late_start:, :], self.late_start).sum(1)
        self.influence = part if self.influence is None else self.influence + part
        self.channels += weights.shape[1]

    def batch(self, layer):
        influence = self.influence / self.channels                         # channel mean
        self.influence, self.channels = None, 0
        keys = layer.keys[:, 0]                                            # [batch, T, C]: one key set
        content_r, recency_r = content_recency(influence, keys[:, :self.late_start].norm(dim=-1))
        return {"content_r": content_r.nanmean(), "recency_r": recency_r.nanmean()}


class DepthHubs(FamilyStatistics):
    """Hub shares of one AttnRes sublayer (token-averaged weight per depth source) beside the uniform 1/S."""

    def batch(self, layer):
        shares = layer.weights[:, 0].mean(dim=(0, 1))                     # [sources]
        out = {"uniform_share": shares.new_tensor(1 / len(shares)), "embedding_share": shares[0],
               "current_share": shares[-1]}
        if layer.recency_bias is not None:
            out["recency_bias"] = layer.recency_bias
        out.update({f"block{j}_share": shares[j] for j in range(1, len(shares) - 1)})
        return out


# what is measured -> a layer's accumulator; routing with no family statistics ("") has none
STATISTICS = {
    "graph_features": lambda layer: GraphFeatures(),
    "selective_scan": lambda layer: SelectiveScan(),
    "late_query_content_recency": lambda layer: LateQueryContentRecency(layer.keys.shape[-2]),
    "depth_hubs": lambda layer: DepthHubs(),
}


def family_statistics(family: str, layer: "RoutingLayer") -> FamilyStatistics | None:
    """The accumulator of the family statistics ``layer`` carries (``layer.statistics``, set from its routing
    record's ``statistics``) for one layer; None where it carries none. ``family`` (the record's family name)
    only names the router in the error for statistics this module does not know."""
    name = getattr(layer, "statistics", "")
    if not name:
        return None
    if name not in STATISTICS:
        raise UserError(f"router family {family!r} asks for unknown family statistics {name!r}; "
                        f"choose one of {', '.join(STATISTICS)} (collapse/family.py) or none")
    return STATISTICS[name](layer)

