"""Routing concentration: how much of an operator's routing mass one source receives (docs/metrics.md).

An operator is ``[..., queries, sources]`` (row = query, column = source). Its column sums c_j are the
routing each source receives; shares c_j / sum_k c_k make the max share comparable across normalised
(softmax) and unnormalised (Mamba) operators. Magnitudes |A| are used throughout: Mamba's hidden operator is
signed, and a source that is routed to with a negative weight still carries routing mass (docs/decisions.md: signed operators).
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from common.constants import COMPLETION_THRESHOLD, ONSET_THRESHOLD
from common.errors import UserError


def _check_mask(mask: Tensor | None) -> None:
    if mask is not None and mask.dtype != torch.bool:
        raise UserError(f"routing mask must be bool (True = visible); got {mask.dtype}, pass mask.bool()")


def _max_of_shares(received: Tensor) -> Tensor:
    return (received / received.sum(-1, keepdim=True)).amax(-1)


def max_share(weights: Tensor, mask: Tensor | None = None, exposure: bool = False) -> Tensor:
    """Largest share of the column sums, ``[..., Q, S] -> [...]``; 1/S for uniform routing, 1 for a sink.

    ``mask`` (bool, broadcastable, True = the query may see the source) zeroes invisible entries.
    ``exposure=True`` divides each column sum by what the source would receive if every query spread its
    own mass uniformly over the sources it can see, e_j = sum_i mask_ij m_i / |visible(i)|, before
    normalising: causal-uniform routing then scores exactly 1/S. (Dividing by the number of queries that
    see j does not: under causal-uniform routing it still favours source 0 by H_n.) Without a mask every
    source is equally exposed and the exposure variant equals the plain one.
    """
    plain, exposed, _ = max_share_variants(weights, mask)
    return exposed if exposure else plain


def max_share_variants(weights: Tensor, mask: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Plain, exposure-corrected and ex-position-0 max share (see :func:`max_share`) from ONE pass over the
    operator: all three derive from its column sums and row masses, so the [.., Q, S] tensor is read once
    in its own dtype (the monitor's cost on channels x T x T operators is this pass)."""
    return concentration_pass(weights, mask)[:3]


def concentration_pass(weights: Tensor, mask: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """:func:`max_share_variants` plus the sink: the index of the source with the largest share, ``[...]``
    int64 (position 0 for a BOS sink)."""
    _check_mask(mask)
    if weights.dim() < 2:
        raise UserError(f"max_share needs weights shaped [..., queries, sources]; got {tuple(weights.shape)}")
    received, mass = _received_and_mass(weights, mask)
    plain = _max_of_shares(received)
    ex0 = _max_of_shares(received[..., 1:]) if received.shape[-1] > 1 else torch.full_like(plain, float("nan"))
    sink = received.argmax(-1)
    if mask is None:
        return plain, plain, ex0, sink
    visible = mask.to(torch.float64)
    mass_per_visible = mass / visible.sum(-1).clamp(min=1)
    expected = (mass_per_visible.unsqueeze(-2) @ visible).squeeze(-2)  # e_j = sum_i mask_ij m_i / |visible(i)|
    exposed = torch.where(expected > 0, received / expected.clamp(min=1e-300), torch.zeros_like(received))
    return plain, _max_of_shares(exposed), ex0, sink


# |weights| is widened to float64 in blocks of about 1 MiB: a whole channels x T x T operator widened at once
# leaves the cache between the conversion and the two sums (4x slower on CPU); the sums are the same numbers
# (the monitor's pass on Mamba and RWKV operators is mostly this).
_BLOCK_FLOATS = 2 ** 17


def _received_and_mass(weights: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor]:
    """Column sums (what each source receives) and row sums (each query's mass) of |weights| under ``mask``,
    in float64."""
    Q, S = weights.shape[-2:]
    shared = mask is None or (mask.dim() <= weights.dim() and all(n == 1 for n in mask.shape[:-2]))
    if not shared or weights.dim() < 3 or weights.numel() <= _BLOCK_FLOATS:
        return _sums(weights, mask)  # a mask per operator (or a small operator): one block
    flat = weights.reshape(-1, Q, S)
    visible = None if mask is None else mask.reshape(mask.shape[-2:]).to(torch.float64)
    step = max(1, _BLOCK_FLOATS // (Q * S))
    parts = [_block_sums(flat[i:i + step], mask, visible) for i in range(0, len(flat), step)]
    lead = weights.shape[:-2]
    return (torch.cat([p[0] for p in parts]).view(*lead, S),
            torch.cat([p[1] for p in parts]).view(*lead, Q))


def _block_sums(weights: Tensor, mask: Tensor | None, visible: Tensor | None) -> tuple[Tensor, Tensor]:
    """:func:`_sums` of one block, masking by multiplying with the 0/1 mask (2x faster than masked_fill, and
    the same numbers for finite weights); a block with a non-finite sum is redone with masked_fill."""
    magnitude = weights.double().abs_()
    if visible is not None:
        magnitude.mul_(visible)
    received, mass = magnitude.sum(-2), magnitude.sum(-1)
    if visible is not None and not (received.isfinite().all() and mass.isfinite().all()):
        return _sums(weights, mask)  # inf or nan in the operator: x * 0 would not hide a masked one
    return received, mass


def _sums(weights: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor]:
    magnitude = weights.abs()
    if mask is not None:  # in place when the mask fits inside the operator (it may also widen it)
        fits = torch.broadcast_shapes(mask.shape, magnitude.shape) == magnitude.shape
        magnitude = magnitude.masked_fill_(~mask, 0) if fits else magnitude.masked_fill(~mask, 0)
    # widened once: sum(dtype=float64) would convert again on each call (and slowly along queries)
    magnitude = magnitude.double()
    return magnitude.sum(-2), magnitude.sum(-1)


def causal_uniform_share(n: int) -> float:
    """Max share of causal-uniform routing over n sources: source 0 receives sum_i 1/(i+1) = H_n of n units."""
    if not isinstance(n, int) or n < 1:
        raise UserError(f"causal_uniform_share needs a positive integer number of sources; got {n!r}")
    return sum(1.0 / k for k in range(1, n + 1)) / n


def uniform_max_share(mask: Tensor | None, sources: int) -> float:
    """Max share of uniform routing under ``mask`` (each query spreads evenly over what it sees).

    The concentration a router shows with no content preference at all: 1/S unmasked, H_n/n causal
    (docs/decisions.md: baseline under the layer's own mask). Averaged over any leading (batch, unit) axes of the mask.
    """
    _check_mask(mask)
    if mask is None:
        return 1.0 / sources
    visible = mask.to(torch.float64)
    uniform = visible / visible.sum(-1, keepdim=True).clamp(min=1)
    return float(max_share(uniform).mean())


def _check_edges(edge_index: Tensor, edge_weight: Tensor, num_nodes: int) -> None:
    if edge_index.dim() != 2 or edge_index.shape[0] != 2 or edge_weight.shape[0] != edge_index.shape[1]:
        raise UserError(f"sparse routing needs edge_index [2, E] and edge_weight [E, units]; got "
                        f"{tuple(edge_index.shape)} and {tuple(edge_weight.shape)}")
    if edge_index.numel() and int(edge_index.max()) >= num_nodes:
        raise UserError(f"edge_index refers to node {int(edge_index.max())} but num_nodes={num_nodes}; pass the graph's node count")


def max_share_sparse(edge_index: Tensor, edge_weight: Tensor, num_nodes: int, exposure: bool = False) -> Tensor:
    """Max share of a graph operator given as edges, ``edge_weight [E, units] -> [units]`` (``[E] -> []``).

    Row 0 of ``edge_index`` is the source, row 1 the target (PyG). Column sums are a scatter-add over
    sources, so the N x N operator is never built. ``exposure`` as in :func:`max_share`, with a target's
    visible sources being its in-neighbours.
    """
    _check_edges(edge_index, edge_weight, num_nodes)
    vector = edge_weight.dim() == 1
    magnitude = (edge_weight.unsqueeze(-1) if vector else edge_weight).abs().double()
    source, target = edge_index[0], edge_index[1]
    received = magnitude.new_zeros(num_nodes, magnitude.shape[1]).index_add_(0, source, magnitude)
    if exposure:
        mass = magnitude.new_zeros(received.shape).index_add_(0, target, magnitude)
        in_degree = torch.bincount(target, minlength=num_nodes).clamp(min=1).unsqueeze(-1)
        expected = magnitude.new_zeros(received.shape).index_add_(0, source, (mass / in_degree)[target])
        received = torch.where(expected > 0, received / expected.clamp(min=1e-300), torch.zeros_like(received))
    shares = _max_of_shares(received.T)
    return shares[0] if vector else shares


def uniform_max_share_sparse(edge_index: Tensor, num_nodes: int) -> float:
    """Max share of uniform routing over each target's in-edges, D^-1 (A+I): the graph's structural
    concentration, and the reference of every graph router (docs/decisions.md)."""
    target = edge_index[1]
    in_degree = torch.bincount(target, minlength=num_nodes).double()
    return float(max_share_sparse(edge_index, 1.0 / in_degree[target], num_nodes))


def gcn_max_share_sparse(edge_index: Tensor, num_nodes: int) -> float:
    """Max share of the fixed GCN operator D^-1/2 (A+I) D^-1/2 on the same edges (degrees at the target, as
    PyG's gcn_norm): the reference of the GAT - GCN differential, in float64."""
    source, target = edge_index
    in_degree = torch.bincount(target, minlength=num_nodes).double()
    inv_sqrt = in_degree.clamp(min=1).rsqrt()
    return float(max_share_sparse(edge_index, inv_sqrt[source] * inv_sqrt[target], num_nodes))


def _first_above(per_layer: Sequence[float] | Tensor, threshold: float) -> int | None:
    values = torch.as_tensor(per_layer, dtype=torch.float64)
    if values.dim() != 1:
        raise UserError(f"onset needs one value per layer (a 1-D sequence); got shape {tuple(values.shape)}")
    crossed = torch.nonzero(values > threshold)  # NaN compares False: an unmeasured layer never crosses
    return int(crossed[0]) if len(crossed) else None


def onset_layer(per_layer_max_share: Sequence[float] | Tensor, threshold: float = ONSET_THRESHOLD) -> int | None:
    """0-based index of the first layer whose mean max share is strictly above ``threshold``; None = never."""
    return _first_above(per_layer_max_share, threshold)


def completion_layer(per_layer_max_share: Sequence[float] | Tensor, threshold: float = COMPLETION_THRESHOLD) -> int | None:
    """0-based index L* of the first layer strictly above ``threshold`` (0.50 in the paper); None = never."""
    return _first_above(per_layer_max_share, threshold)
