"""The collapse signature of one router on one probe: geometry, nulls and concentration, layer by layer.

Reads only the routing record (``routers/routing.py``), duck-typed: a routing has ``.layers`` and ``.axis``;
a layer has ``keys``/``content_keys``/``scored_keys`` ``[batch, units, sources, d]``, dense weights through
``iter_weights()`` (whole or in unit-chunks) with a bool ``mask``, or sparse ``edge_index``/``edge_weight``.
The probe is fed in micro-batches: :class:`SignatureAccumulator` keeps per-(layer, unit) sums over sequences
and reduces each weight chunk to per-unit max shares at once, so no batch or T x T operator is kept.
Aggregation: mean over sequences, then over units; layers weigh equally (docs/metrics.md). Family
statistics (``collapse/family.py``, chosen by the statistics each layer carries) ride along in the same pass.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Sequence

import torch
from torch import Tensor

from collapse.concentration import (completion_layer, concentration_pass, gcn_max_share_sparse, max_share_sparse,
                                    onset_layer, uniform_max_share, uniform_max_share_sparse)
from collapse.family import FamilyStatistics, family_statistics
from collapse.geometry import cv_of_norms, gaussian_null, key_spectrum
from collapse.stats import pearson
from common.constants import COMPLETION_THRESHOLD, ONSET_THRESHOLD, RANKS
from common.errors import UserError

if TYPE_CHECKING:
    from routers.routing import Routing, RoutingLayer

class _Mean:
    """Running per-unit mean over sequences: sums ``[batch, units]`` values over the batch axis."""

    def __init__(self):
        self.total: Tensor | None = None
        self.count = 0

    def add(self, values: Tensor) -> None:
        summed = values.detach().to("cpu", torch.float64).sum(0)
        self.total = summed if self.total is None else self.total + summed
        self.count += values.shape[0]

    def per_unit(self) -> Tensor | None:
        return None if self.total is None else self.total / self.count

    def value(self) -> float:
        return math.nan if self.total is None else float(self.per_unit().mean())


def _restrict_mask(mask: Tensor | None, start: int, stop: int) -> Tensor | None:
    """The part of a broadcastable ``[batch, units, Q, S]`` mask that covers units start..stop."""
    if mask is None:
        return None
    while mask.dim() < 4:
        mask = mask.unsqueeze(0)
    return mask if mask.shape[1] == 1 else mask[:, start:stop]


class _LayerStats:
    def __init__(self, layer: "RoutingLayer", ranks: tuple[int, ...], family: FamilyStatistics | None):
        self.name, self.ranks, self.family = layer.name, ranks, family
        self.sources, self.dim = layer.keys.shape[-2:]
        self.has_post = layer.content_keys is not None and layer.content_keys is not layer.keys
        self.cv, self.share, self.share_exposure, self.share_ex0, self.baseline = (_Mean() for _ in range(5))
        self.baseline_gcn = _Mean()  # graphs only: the fixed GCN operator on the same edges
        self.norm_sum = self.norm_sq_sum = None
        self.norm_count = 0
        # [units, sources]: how many sequences' operators of each unit (head, channel) each source tops; summed
        # over units, the layer's sink counts
        self.unit_sink_counts: Tensor | None = None
        self.ve = {kind: {r: _Mean() for r in ranks} for kind in ("real", "post", "shuffle")}
        self.family_sums: dict[str, list] = {}  # column -> [batch-weighted sum, sequences]

    def add_ve(self, kind: str, keys: Tensor) -> None:
        spectrum = key_spectrum(keys)
        for r in self.ranks:
            self.ve[kind][r].add(spectrum[..., :r].sum(-1) / spectrum.sum(-1))

    def add_geometry(self, keys: Tensor) -> None:
        # widened once for the norms and the spectrum (each would widen again), contiguous as key_spectrum wants
        keys = keys.detach().to(torch.float64, memory_format=torch.contiguous_format)
        norms = keys.norm(dim=-1)
        self.cv.add(cv_of_norms(norms))
        # Pooled CV from float64 moments over all sequences: E[x^2] - E[x]^2 keeps ~1e-8 relative accuracy.
        norms = norms.cpu()
        sums, sq_sums = norms.sum((0, 2)), norms.square().sum((0, 2))
        self.norm_sum = sums if self.norm_sum is None else self.norm_sum + sums
        self.norm_sq_sum = sq_sums if self.norm_sq_sum is None else self.norm_sq_sum + sq_sums
        self.norm_count += norms.shape[0] * norms.shape[2]
        self.add_ve("real", keys)

    def add_dense(self, layer: "RoutingLayer", batch: int) -> None:
        plain, exposure, ex0, unit_counts, start = [], [], [], [], 0
        for chunk in layer.iter_weights():
            if chunk.dim() != 4:
                raise UserError(f"layer {self.name!r}: weights must be [batch, units, queries, sources]; "
                                f"got {tuple(chunk.shape)}")
            mask = _restrict_mask(layer.mask, start, start + chunk.shape[1])
            start += chunk.shape[1]
            *variants, sink = concentration_pass(chunk, mask)
            if self.family is not None:
                self.family.chunk(chunk)
            for parts, value in zip((plain, exposure, ex0), variants):
                parts.append(value)
            # An operator shared by the batch ([1, units]) tops its sink once per sequence.
            sink = sink.reshape(-1, sink.shape[-1]).cpu()  # [operators, units in this chunk]
            tops = torch.zeros(sink.shape[1], self.sources, dtype=torch.int64)
            unit_counts.append(tops.scatter_add_(1, sink.T, torch.ones_like(sink.T)) * (batch // sink.shape[0]))
        if not plain:
            raise UserError(f"layer {self.name!r}: its weight chunks are empty; yield at least one chunk")
        for mean, parts in ((self.share, plain), (self.share_exposure, exposure), (self.share_ex0, ex0)):
            mean.add(torch.cat([p.expand(batch, -1) for p in parts], dim=1))
        self.baseline.add(torch.full((batch, 1), uniform_max_share(layer.mask, chunk.shape[-1]), dtype=torch.float64))
        unit_counts = torch.cat(unit_counts)
        self.unit_sink_counts = unit_counts if self.unit_sink_counts is None else self.unit_sink_counts + unit_counts

    def add_sparse(self, layer: "RoutingLayer") -> None:
        args = (layer.edge_index, layer.edge_weight, layer.num_nodes)
        self.share.add(max_share_sparse(*args).reshape(1, -1))
        self.share_exposure.add(max_share_sparse(*args, exposure=True).reshape(1, -1))
        self.share_ex0.add(torch.full((1, 1), math.nan))  # graphs have no privileged first source
        self.baseline.add(torch.full((1, 1), uniform_max_share_sparse(layer.edge_index, layer.num_nodes),
                                     dtype=torch.float64))
        self.baseline_gcn.add(torch.full((1, 1), gcn_max_share_sparse(layer.edge_index, layer.num_nodes),
                                         dtype=torch.float64))

    def add_family(self, layer: "RoutingLayer", batch: int) -> None:
        # Weighted by sequences so micro-batching the probe does not change a batch-mean statistic.
        if self.family is None:
            return
        for key, value in self.family.batch(layer).items():
            value = torch.as_tensor(value).detach().to("cpu", torch.float64) * batch
            if key in self.family_sums:
                self.family_sums[key][0] = self.family_sums[key][0] + value
                self.family_sums[key][1] += batch
            else:
                self.family_sums[key] = [value, batch]

    def row(self, index: int) -> dict:
        row = {"layer": index, "name": self.name, "sources": self.sources, "dim": self.dim,
               "units": 0 if self.share.total is None else len(self.share.total),
               "norm_cv": self.cv.value(), "norm_cv_gauss": 1 / math.sqrt(2 * self.dim)}
        mean = self.norm_sum / self.norm_count
        std = (self.norm_sq_sum / self.norm_count - mean.square()).clamp(min=0).sqrt()
        row["norm_cv_pooled"] = float((std / mean).mean())
        for r in self.ranks:
            real, shuffle = self.ve["real"][r].value(), self.ve["shuffle"][r].value()
            gauss = gaussian_null(self.sources, self.dim, r)
            row.update({f"ve@{r}": real, f"ve@{r}_post": self.ve["post"][r].value(), f"ve@{r}_gauss": gauss,
                        f"ve@{r}_shuffle": shuffle, f"content@{r}": real - shuffle, f"marginal@{r}": shuffle - gauss})
        baseline = self.baseline.value()
        row.update({"max_share": self.share.value(), "max_share_exposure": self.share_exposure.value(),
                    "max_share_ex0": self.share_ex0.value(), "baseline": baseline,
                    "max_share_ratio": self.share.value() / baseline,
                    "max_share_units": self.share.per_unit().tolist(), "norm_cv_units": self.cv.per_unit().tolist()})
        if self.baseline_gcn.total is not None:
            row.update({"baseline_gcn": self.baseline_gcn.value(),
                        "max_share_ratio_gcn": self.share.value() / self.baseline_gcn.value()})
        counts = None if self.unit_sink_counts is None else self.unit_sink_counts.sum(0)
        if counts is not None and counts.sum() > 0:
            # The sink: the source that most often receives the largest share, and how often it does.
            row.update({"sink_source": int(counts.argmax()), "sink_fraction": float(counts.max() / counts.sum())})
        else:
            row.update({"sink_source": None, "sink_fraction": math.nan})
        if self.unit_sink_counts is not None:
            # Per unit: its sink and how often it tops that unit's operator (parking heads, docs/metrics.md).
            totals = self.unit_sink_counts.sum(1).clamp(min=1)
            row.update({"sink_source_units": self.unit_sink_counts.argmax(1).tolist(),
                        "sink_fraction_units": (self.unit_sink_counts.amax(1) / totals).tolist()})
        for key, (total, count) in self.family_sums.items():
            mean = total / count
            row[key] = float(mean) if mean.dim() == 0 else mean.tolist()
        return row


class SignatureAccumulator:
    """Streams probe micro-batches into per-(layer, unit) sums; :meth:`compute` gives the :class:`Signature`."""

    def __init__(self, ranks: tuple[int, ...] = RANKS):
        if not ranks or any(not isinstance(r, int) or r < 1 for r in ranks):
            raise UserError(f"signature ranks must be positive integers; got {ranks!r}")
        self.ranks = tuple(ranks)
        self.axis: str | None = None
        self.family = ""
        self.layers: list[_LayerStats] = []

    def update(self, routing: "Routing", shuffled: "Routing | Sequence[Tensor] | None" = None) -> None:
        """Add one micro-batch; ``shuffled`` is the same router on the position-shuffled batch: its routing,
        or only its per-layer scored keys (all the shuffle null reads)."""
        if self.axis is None:
            self.axis, self.family = routing.axis, getattr(routing, "family", "")
            self.layers = [_LayerStats(layer, self.ranks, family_statistics(self.family, layer))
                           for layer in routing.layers]
        if routing.axis != self.axis or len(routing.layers) != len(self.layers):
            raise UserError(f"routing changed between updates ({routing.axis}, {len(routing.layers)} layers vs "
                            f"{self.axis}, {len(self.layers)}); use one accumulator per router")
        null_keys = None
        if shuffled is not None:
            null_keys = shuffled.scored_keys() if hasattr(shuffled, "scored_keys") else shuffled
            if len(null_keys) != len(routing.layers):
                raise UserError(f"shuffled routing has {len(null_keys)} layers, real has {len(routing.layers)}; "
                                "re-run the same router on the shuffled probe")
        for i, (stats, layer) in enumerate(zip(self.layers, routing.layers)):
            keys = layer.scored_keys
            if keys.dim() != 4 or tuple(keys.shape[-2:]) != (stats.sources, stats.dim):
                raise UserError(f"layer {i} ({layer.name!r}): keys must be [batch, units, {stats.sources}, "
                                f"{stats.dim}] in every batch; got {tuple(keys.shape)}")
            batch = keys.shape[0]
            stats.add_geometry(keys)
            if stats.has_post:
                stats.add_ve("post", layer.keys)
            if null_keys is not None:
                stats.add_ve("shuffle", null_keys[i])
            if layer.is_sparse:
                stats.add_sparse(layer)
            else:
                stats.add_dense(layer, batch)
            stats.add_family(layer, batch)

    def compute(self, onset_threshold: float = ONSET_THRESHOLD,
                completion_threshold: float = COMPLETION_THRESHOLD) -> "Signature":
        if self.axis is None:
            raise UserError("signature of an empty probe; call update() with at least one batch first")
        rows = [stats.row(i) for i, stats in enumerate(self.layers)]
        summary = _summary(rows, self.axis, self.ranks, onset_threshold, completion_threshold)
        summary["family"] = self.family
        return Signature(rows, summary, self.ranks)


def signature(routing: "Routing", shuffled: "Routing | None" = None, ranks: tuple[int, ...] = RANKS,
              onset_threshold: float = ONSET_THRESHOLD, completion_threshold: float = COMPLETION_THRESHOLD
              ) -> "Signature":
    """The signature of one batch: a single :meth:`SignatureAccumulator.update` then ``compute``."""
    accumulator = SignatureAccumulator(ranks)
    accumulator.update(routing, shuffled)
    return accumulator.compute(onset_threshold, completion_threshold)


def _depth_mean(rows: list[dict], key: str) -> float:
    values = [row[key] for row in rows if not math.isnan(row[key])]
    return sum(values) / len(values) if values else math.nan


def _cv_share_pairs(rows: list[dict]) -> tuple[list[float], list[float]]:
    """(norm-CV, max share) per (layer, unit). Grouped keys (GQA, or one key set for many channels) are
    repeated over the units that share them; layers whose unit counts do not nest are left out."""
    cvs, shares = [], []
    for row in rows:
        cv, share = row["norm_cv_units"], row["max_share_units"]
        if len(share) % len(cv) == 0:
            cvs += [value for value in cv for _ in range(len(share) // len(cv))]
            shares += share
    return cvs, shares


def _summary(rows: list[dict], axis: str, ranks: tuple[int, ...], onset_threshold: float,
             completion_threshold: float) -> dict:
    n_layers, curve = len(rows), [row["max_share"] for row in rows]
    onset, completion = onset_layer(curve, onset_threshold), completion_layer(curve, completion_threshold)
    measured = [i for i, value in enumerate(curve) if not math.isnan(value)]
    peak = max(measured, key=lambda i: curve[i]) if measured else None
    r, p = pearson(*_cv_share_pairs(rows))
    summary = {
        "axis": axis, "n_layers": n_layers,
        "onset_threshold": onset_threshold, "completion_threshold": completion_threshold,
        "onset_layer": onset, "onset_depth": None if onset is None else onset / n_layers,
        "completion_layer": completion, "completion_depth": None if completion is None else completion / n_layers,
        "peak_layer": peak, "peak_max_share": math.nan if peak is None else curve[peak],
        "peak_sink_source": None if peak is None else rows[peak].get("sink_source"),
        "peak_sink_fraction": math.nan if peak is None else rows[peak].get("sink_fraction", math.nan),
        "peak_max_share_ratio": max((rows[i]["max_share_ratio"] for i in measured), default=math.nan),
        "area_above_baseline": _area(rows, measured, "baseline"),
        "r_cv_share": r, "r_cv_share_p": p,
        "norm_cv_min": min((row["norm_cv"] for row in rows if not math.isnan(row["norm_cv"])), default=math.nan),
    }
    means = ["norm_cv", "norm_cv_pooled", "norm_cv_gauss", "max_share", "max_share_exposure", "max_share_ex0"]
    for r in ranks:
        means += [f"ve@{r}", f"ve@{r}_post", f"ve@{r}_gauss", f"ve@{r}_shuffle", f"content@{r}", f"marginal@{r}"]
    summary.update({key: _depth_mean(rows, key) for key in means})
    if rows and "baseline_gcn" in rows[0]:
        summary["area_above_gcn"] = _area(rows, measured, "baseline_gcn")
    return summary


def _area(rows: list[dict], measured: list[int], reference: str) -> float:
    """Depth-mean of the max share above a reference, counting only layers above it."""
    return sum(max(0.0, rows[i]["max_share"] - rows[i][reference]) for i in measured) / len(rows)


@dataclass
class Signature:
    """Per-layer rows (``layers``), the model-level ``summary``, and the VE ranks they were measured at: numbers
    only. As a record (its JSON line, flat metrics, the printed table) it is written by ``records.codecs``."""
    layers: list[dict]
    summary: dict
    ranks: tuple[int, ...] = field(default=RANKS)
