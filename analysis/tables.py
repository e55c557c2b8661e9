"""From monitor records (``collapse.jsonl`` lines / ``Signature.to_dict()``) to per-run statistics and tables.

Onset and completion are recomputed from each record's per-layer max-share curve at the caller's
thresholds (``threshold=`` knob, the paper's 0.20 / 0.50 by default), so a study can move the threshold
without re-measuring. "never" is NaN in numbers and "never" in text.
"""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path

from analysis.stats import nanmean
from collapse import completion_layer, onset_layer
from common import atomic
from records.schema import number, ve_keys  # number: re-exported to the studies
from common.constants import (COMPLETION_THRESHOLD, FEATURE_RANK, ONSET_THRESHOLD, PARKING_SINK_FRACTION, RANK,
                              SOLVED_MARGIN)


def finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def max_share_curve(record: dict) -> list[float]:
    return [number(layer.get("max_share")) for layer in record["layers"]]


def run_statistics(record: dict, threshold: float = ONSET_THRESHOLD, completion: float = COMPLETION_THRESHOLD, rank: int = RANK) -> dict:
    """One record's model-level numbers: onset / L* at the given thresholds (depth = index / L), the
    threshold-free concentration (peak and its depth, area above the causal-uniform baseline), and the
    geometry's depth means (norm-CV, VE@rank against its nulls, r between norm-CV and max share)."""
    curve, summary = max_share_curve(record), record["summary"]
    n_layers = len(curve)
    onset, done = onset_layer(curve, threshold), completion_layer(curve, completion)
    peak = number(summary.get("peak_layer"))
    stats = {
        "step": record.get("step", math.nan), "n_layers": n_layers,
        "onset_layer": number(onset), "onset_depth": math.nan if onset is None else onset / n_layers,
        "completion_layer": number(done), "completion_depth": math.nan if done is None else done / n_layers,
        "peak_max_share": number(summary.get("peak_max_share")), "peak_layer": peak,
        "peak_depth": peak / n_layers, "peak_max_share_ratio": number(summary.get("peak_max_share_ratio")),
        "area_above_baseline": number(summary.get("area_above_baseline")),
        "max_share": number(summary.get("max_share")),
        "baseline": _depth_mean(record["layers"], "baseline"),  # the causal-uniform max share
    }
    stats.update(parking(record, peak))
    # graphs are read by the VE of their full-width layer features (records.schema.geometry_column)
    stats[f"ve@{FEATURE_RANK}_features"] = _depth_mean(record["layers"], f"ve@{FEATURE_RANK}_features")
    # depth routers (AttnRes): the mass on the current block and on the token embeddings, per sublayer
    stats["current_share"] = _depth_mean(record["layers"], "current_share")
    stats["embedding_share"] = _depth_mean(record["layers"], "embedding_share")
    for key in ("norm_cv", "norm_cv_min", "norm_cv_gauss", *ve_keys(rank).values(), "ve@1", "ve@1_post",
                "r_cv_share", "r_cv_share_p"):
        stats[key] = number(summary.get(key))
    return stats


def _depth_mean(layers: list[dict], key: str) -> float:
    return nanmean([number(layer.get(key)) for layer in layers])


def onset_step(records: list[dict], threshold: float = ONSET_THRESHOLD) -> float:
    """First measured step at which any layer's mean max share exceeds ``threshold`` (nan: never)."""
    for record in records:
        if onset_layer(max_share_curve(record), threshold) is not None:
            return float(record["step"])
    return math.nan


def solved_step(records: list[dict], margin: float = SOLVED_MARGIN) -> float:
    """First measured step whose validation loss is within ``margin`` nats of the task's solved loss (the
    record's ``solved_loss``; nan when the task defines none or the run never got there). Its resolution is
    the validation interval: a record carries the latest validation loss."""
    for record in records:
        solved, loss = number(record.get("solved_loss")), number(record.get("val_loss"))
        if loss <= solved + margin:  # False for nan on either side
            return float(record["step"])
    return math.nan


def parking(record: dict, layer: float, sink_fraction: float = PARKING_SINK_FRACTION) -> dict:
    """What dormant heads explain of a layer's max share (Guo et al. 2024): a head *parks* when BOS (source 0)
    tops its operator in at least ``sink_fraction`` of the probe sequences and its max share is at least half
    the idle fraction (a causal-uniform head also has BOS on top, at H_n / n); if every parking head puts its
    idle queries on BOS and nothing else there, the layer's max share is ``parking / units * idle_fraction``.
    ``parking_excess`` is the measured max share above that prediction: concentration the parking does not
    explain. nan where the record has no idle fraction or no per-head sinks (records before they existed)."""
    out = {"idle_fraction": number(record.get("idle_fraction")), "parking_heads": math.nan, "units": math.nan,
           "parking_prediction": math.nan, "parking_excess": math.nan}
    if not finite(layer) or "sink_source_units" not in record["layers"][int(layer)]:
        return out
    row = record["layers"][int(layer)]
    idle = out["idle_fraction"]
    parked = sum(1 for source, often, share in zip(row["sink_source_units"], row["sink_fraction_units"],
                                                   row["max_share_units"])
                 if source == 0 and number(often) >= sink_fraction and number(share) >= idle / 2)
    units = len(row["sink_source_units"])
    prediction = parked / units * idle
    out.update({"parking_heads": float(parked), "units": float(units), "parking_prediction": prediction,
                "parking_excess": number(row.get("max_share")) - prediction})
    return out


def depth_label(layer: float, n_layers: int) -> str:
    """``L3 12%`` as the paper writes onset (0-based index, % = index / L, half-even); "never" for nan."""
    if not finite(layer):
        return "never"
    return f"L{int(layer)} {100 * layer / n_layers:.0f}%"


def table1_row(name: str, record: dict, threshold: float = ONSET_THRESHOLD, completion: float = COMPLETION_THRESHOLD, rank: int = RANK) -> dict:
    """The paper's Table 1 / 4 columns for one measured model (depth means; min = smallest layer norm-CV)."""
    s, ve = run_statistics(record, threshold, completion, rank), ve_keys(rank)
    d_h = record["layers"][0].get("dim")
    return {"model": name, "L": s["n_layers"], "d_h": d_h, "norm-CV": s["norm_cv"], "min": s["norm_cv_min"],
            f"VE@{rank}": s[ve["ve"]], f"VE@{rank} post": s[ve["post"]], "shuf": s[ve["shuffle"]],
            "Gauss": s[ve["gauss"]], "cont": s[ve["content"]], "marg": s[ve["marginal"]],
            "onset": depth_label(s["onset_layer"], s["n_layers"]),
            "L*": depth_label(s["completion_layer"], s["n_layers"]),
            "peak": s["peak_max_share"], "peak at": depth_label(s["peak_layer"], s["n_layers"]),
            "r": s["r_cv_share"], "r p": s["r_cv_share_p"]}


def cell(value, digits: int = 3) -> str:
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, float):
        return "-" if math.isnan(value) else f"{value:.{digits}f}"
    return str(value)


def markdown(rows: list[dict], columns: list[str] | None = None, digits: int = 3) -> str:
    """A GitHub markdown table of ``rows`` (all keys of the first row unless ``columns`` are given)."""
    if not rows:
        return "(no rows)"
    columns = columns or list(rows[0])
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(row.get(c), digits) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def write_csv(rows: list[dict], path: Path) -> Path:
    """Rows to CSV; the header is the union of keys in first-seen order, lists are written as JSON."""
    columns = list(dict.fromkeys(key for row in rows for key in row))
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic.atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: json.dumps(v) if isinstance(v, (list, dict)) else v for k, v in row.items()})
    return path
