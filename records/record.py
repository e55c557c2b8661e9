"""The typed run record: one ``collapse.jsonl`` line read (and written) through declared fields.

A :class:`Record` is a measured step: when (``step``, ``epoch``, ``seconds``), the losses, the task's levels, the
per-layer rows (:class:`LayerRow`) and the model-level :class:`Summary`. Each class is the line's JSON object
itself (a ``dict``), so a record written, read and written again is the same bytes, and every column the
registry (``records.columns``) declares is a typed field: ``record.summary.peak_max_share`` (float, nan when not
measured), ``layer.sink_source`` (int or None), ``layer.ve(8).shuffle``. Code outside ``records/`` reads fields,
never string keys; the string spellings live here and in the metrics that compute the values (``collapse/``).

Re-thresholding is a method: ``record.onset_layer(0.3)``, ``onset_step(records, 0.3)``, ``solved_step(records,
0.15)`` recompute onset, completion and the solved step from the stored curve and losses, so an analysis can
move a threshold without re-measuring.
"""
from __future__ import annotations

import math
from typing import Iterable, NamedTuple

from common.constants import COMPLETION_THRESHOLD, FEATURE_RANK, ONSET_THRESHOLD, RANK, SOLVED_MARGIN

# 1: records written before the field existed (read as version 1); 2: ``schema_version`` in every line.
SCHEMA_VERSION = 2
VERSION_KEY = "schema_version"


def number(value) -> float:
    """A record's value as a float: JSON null (not measured) or absent -> nan."""
    return math.nan if value is None else float(value)


def _num(key: str, doc: str) -> property:
    return property(lambda self: number(self.get(key)), doc=doc)


def _opt(key: str, doc: str) -> property:  # an index or count that may be "never" / not measured: None
    return property(lambda self: self.get(key), doc=doc)


def _list(key: str, doc: str) -> property:
    return property(lambda self: self.get(key) or [], doc=doc)


def ve_key(rank: int | str) -> str:
    """The VE column at ``rank`` (8 -> ``ve@8``), or a whole VE key of a family (``ve@4_features``) as given."""
    return f"ve@{rank}" if isinstance(rank, int) else rank


class VE(NamedTuple):
    """One VE measurement and its nulls: the scored keys, post-RoPE keys, shuffle and Gaussian nulls, and the
    split real - shuffle (content) and shuffle - Gaussian (marginal)."""
    ve: float
    post: float
    shuffle: float
    gauss: float
    content: float
    marginal: float


def ve_keys(rank: int | str) -> dict[str, str]:
    """The keys one VE measurement writes, by role (the field names of :class:`VE`)."""
    key = ve_key(rank)
    suffix = key.removeprefix("ve@")
    return {"ve": key, "post": f"{key}_post", "shuffle": f"{key}_shuffle", "gauss": f"{key}_gauss",
            "content": f"content@{suffix}", "marginal": f"marginal@{suffix}"}


def _ve(part: dict, rank: int | str) -> VE:
    return VE(*(number(part.get(key)) for key in ve_keys(rank).values()))


class LayerRow(dict):
    """One routing layer of one measurement."""
    layer = _opt("layer", "layer index, 0-based")
    name = property(lambda self: self.get("name") or "", doc="the router's name for the layer")
    sources = _opt("sources", "sources per operator row (tokens, nodes, time steps or depth sources)")
    dim = _opt("dim", "key width d")
    norm_cv = _num("norm_cv", "coefficient of variation of the scored keys' norms (mean over units)")
    norm_cv_gauss = _num("norm_cv_gauss", "norm-CV of Gaussian keys of the same width, 1 / sqrt(2d)")
    max_share = _num("max_share", "mean over units and queries of the largest routing weight of a row")
    max_share_exposure = _num("max_share_exposure", "max share corrected for causal exposure")
    max_share_ex0 = _num("max_share_ex0", "max share with source 0 left out")
    baseline = _num("baseline", "max share of causal-uniform routing over the same mask")
    baseline_gcn = _num("baseline_gcn", "max share of GCN's degree-normalised routing (graphs)")
    max_share_units = _list("max_share_units", "max share per unit (head, channel)")
    norm_cv_units = _list("norm_cv_units", "norm-CV per key set")
    sink_source = _opt("sink_source", "the source that most often tops a unit's operator (None: not measured)")
    sink_fraction = _num("sink_fraction", "how often it does, over units x sequences")
    sink_source_units = _list("sink_source_units", "each unit's sink source")
    sink_fraction_units = _list("sink_fraction_units", "how often each unit's sink tops its operator")
    current_share = _num("current_share", "depth routers: mean weight on the current block")
    embedding_share = _num("embedding_share", "depth routers: mean weight on the token embeddings")
    uniform_share = _num("uniform_share", "depth routers: the uniform share 1 / sources")
    recency_bias = _num("recency_bias", "depth routers: the bias on the current source (plus any offset)")
    delta_cv = _num("delta_cv", "selective SSMs: CV of the step size over positions")
    effective_key_norm_cv = _num("effective_key_norm_cv", "selective SSMs: CV of delta x |B| over positions")
    b_norm_cv = _num("b_norm_cv", "selective SSMs: CV of |B| over positions")
    content_r = _num("content_r", "recurrent routers: late-query routing vs key norm, correlation")
    recency_r = _num("recency_r", "recurrent routers: late-query routing vs position, correlation")

    def ve(self, rank: int | str = RANK) -> VE:
        return _ve(self, rank)

    @property
    def has_features(self) -> bool:
        """Whether the layer carries full-width feature geometry (graph routers)."""
        return ve_key(f"ve@{FEATURE_RANK}_features") in self

    def geometry(self) -> tuple[str, str]:
        """(VE key, label) the layer is read by: VE@RANK of the keys (tokens, time, depth), or for graphs VE@
        FEATURE_RANK of the full-width layer features: 8-wide GAT heads make per-head VE@8 trivially 1."""
        features = f"ve@{FEATURE_RANK}_features"
        return (features, f"VE@{FEATURE_RANK} feat") if self.has_features else (ve_key(RANK), f"VE@{RANK}")

    def value(self, column: str) -> float:
        """A column by its registered name (``records.columns``), e.g. a family statistic; nan if absent."""
        return number(self.get(column))


class Summary(dict):
    """The model-level numbers of one measurement (depth means and crossings)."""
    axis = property(lambda self: self.get("axis"), doc="routing axis: token, node, time or depth")
    family = property(lambda self: self.get("family", ""), doc="the routing's family statistics, '' for none")
    n_layers = _opt("n_layers", "routing layers")
    onset_threshold = _num("onset_threshold", "max share above which a layer has crossed onset")
    completion_threshold = _num("completion_threshold", "max share above which a layer has completed (L*)")
    onset_layer = _opt("onset_layer", "first layer above the onset threshold (None: never)")
    completion_layer = _opt("completion_layer", "first layer above the completion threshold (None: never)")
    peak_layer = _opt("peak_layer", "the layer of largest max share")
    peak_max_share = _num("peak_max_share", "its max share")
    peak_sink_source = _opt("peak_sink_source", "the peak layer's sink source")
    peak_sink_fraction = _num("peak_sink_fraction", "how often it tops the peak layer's operators")
    peak_max_share_ratio = _num("peak_max_share_ratio", "largest max share over its causal-uniform baseline")
    area_above_baseline = _num("area_above_baseline", "depth mean of max share above the uniform baseline")
    area_above_gcn = _num("area_above_gcn", "graphs: depth mean of max share above GCN's routing")
    r_cv_share = _num("r_cv_share", "Pearson r between norm-CV and max share over (layer, unit)")
    r_cv_share_p = _num("r_cv_share_p", "its p-value")
    norm_cv = _num("norm_cv", "depth mean of norm-CV")
    norm_cv_min = _num("norm_cv_min", "smallest layer norm-CV")
    norm_cv_gauss = _num("norm_cv_gauss", "depth mean of the Gaussian norm-CV")
    max_share = _num("max_share", "depth mean of max share")
    onset_step = _opt("onset_step", "first measured step past onset (the monitor's running value)")
    solved_step = _opt("solved_step", "first measured step within the solved margin (the monitor's running value)")

    def mark_steps(self, onset_step: int | None, solved_step: int | None) -> None:
        """The monitor's running values: the first measured step past onset and the first solved one so far."""
        self["onset_step"], self["solved_step"] = onset_step, solved_step

    def ve(self, rank: int | str = RANK) -> VE:
        """Depth means of one VE measurement and its nulls."""
        return _ve(self, rank)

    def value(self, column: str) -> float:
        """A depth mean by its registered column name; nan if absent."""
        return number(self.get(column))


class Record(dict):
    """One measured step (or, with ``skipped``, a step that was due and not measured)."""
    step = property(lambda self: self.get("step", math.nan), doc="training step (None: a model measured without one)")
    epoch = _opt("epoch", "training epoch")
    seconds = _num("seconds", "wall time of the measurement")
    train_loss = _num("train_loss", "mean training loss since the previous measurement")
    val_loss = _num("val_loss", "the latest validation loss (nan before the first validation)")
    probe_sequences = _opt("probe_sequences", "sequences measured (the monitor's live probe or the whole one)")
    solved_loss = _num("solved_loss", "validation loss of a model that has solved the task (generated data)")
    idle_fraction = _num("idle_fraction", "the probe's share of queries with nothing to retrieve")
    skipped = _opt("skipped", "why a due step was not measured (None: measured)")
    ranks = property(lambda self: tuple(self.get("ranks", ())), doc="VE ranks measured")
    version = property(lambda self: self.get(VERSION_KEY, 1), doc="schema version (1: before the field)")

    @property
    def layers(self) -> list[LayerRow]:
        return self["layers"]

    @property
    def summary(self) -> Summary:
        return self["summary"]

    def max_share_curve(self) -> list[float]:
        return [layer.max_share for layer in self.layers]

    def onset_layer(self, threshold: float = ONSET_THRESHOLD) -> int | None:
        """First layer whose max share exceeds ``threshold`` (None: never)."""
        return _first_above(self.max_share_curve(), threshold)

    def completion_layer(self, threshold: float = COMPLETION_THRESHOLD) -> int | None:
        return _first_above(self.max_share_curve(), threshold)

    def depth_mean(self, column: str) -> float:
        """Mean of a per-layer column over the layers that have it (nan: none)."""
        values = [v for v in (layer.value(column) for layer in self.layers) if not math.isnan(v)]
        return sum(values) / len(values) if values else math.nan

    def solved(self, margin: float = SOLVED_MARGIN) -> bool:
        """Validation loss within ``margin`` nats of the task's solved loss (False where either is missing)."""
        return self.val_loss <= self.solved_loss + margin


def _first_above(curve: list[float], threshold: float) -> int | None:
    # the same rule as collapse.onset_layer: NaN (unmeasured) layers never cross
    return next((i for i, value in enumerate(curve) if value > threshold), None)


def typed(record: dict) -> Record:
    """A record's JSON object as a :class:`Record` (layers and summary typed too), in place of key order."""
    if isinstance(record, Record):
        return record
    out = Record(record)
    if "layers" in out:
        out["layers"] = [LayerRow(layer) for layer in out["layers"]]
    if "summary" in out:
        out["summary"] = Summary(out["summary"])
    return out


def onset_step(records: Iterable[Record], threshold: float = ONSET_THRESHOLD) -> float:
    """First measured step at which any layer's mean max share exceeds ``threshold`` (nan: never)."""
    return next((float(r.step) for r in map(typed, records) if r.onset_layer(threshold) is not None), math.nan)


def solved_step(records: Iterable[Record], margin: float = SOLVED_MARGIN) -> float:
    """First measured step whose validation loss is within ``margin`` nats of the task's solved loss (nan when
    the task defines none or the run never got there). Its resolution is the validation interval: a record
    carries the latest validation loss."""
    return next((float(r.step) for r in map(typed, records) if r.solved(margin)), math.nan)
