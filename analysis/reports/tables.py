"""From monitor records (typed ``records.Record``) to per-run statistics and tables.

Onset and completion are recomputed from each record's per-layer max-share curve at the caller's
thresholds (``threshold=`` knob, the paper's 0.20 / 0.50 by default), so a study can move the threshold
without re-measuring. "never" is NaN in numbers and "never" in text.
"""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path

from analysis.reports.stats import nanmean
from common import atomic
from common.constants import COMPLETION_THRESHOLD, FEATURE_RANK, ONSET_THRESHOLD, PARKING_SINK_FRACTION, RANK
from records import Record, number, onset_step, solved_step, typed, ve_keys  # noqa: F401 (number, onset/solved step: re-exported to the studies)
from records.record import ve_key


def finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def run_statistics(record: Record, threshold: float = ONSET_THRESHOLD, completion: float = COMPLETION_THRESHOLD, rank: int = RANK) -> dict:
    """One record's model-level numbers: onset / L* at the given thresholds (depth = index / L), the
    threshold-free concentration (peak and its depth, area above the causal-uniform baseline), and the
    geometry's depth means (norm-CV, VE@rank against its nulls, r between norm-CV and max share). The keys are
    the statistics a study names (conf/study/*.yaml)."""
    record = typed(record)
    summary, n_layers = record.summary, len(record.layers)
    onset, done = record.onset_layer(threshold), record.completion_layer(completion)
    peak = number(summary.peak_layer)
    stats = {
        "step": record.step, "n_layers": n_layers,
        "onset_layer": number(onset), "onset_depth": math.nan if onset is None else onset / n_layers,
        "completion_layer": number(done), "completion_depth": math.nan if done is None else done / n_layers,
        "peak_max_share": summary.peak_max_share, "peak_layer": peak,
        "peak_depth": peak / n_layers, "peak_max_share_ratio": summary.peak_max_share_ratio,
        "area_above_baseline": summary.area_above_baseline,
        "max_share": summary.max_share,
        "baseline": nanmean([layer.baseline for layer in record.layers]),  # the causal-uniform max share
    }
    stats.update(parking(record, peak))
    # graphs are read by the VE of their full-width layer features (LayerRow.geometry)
    features = ve_key(f"ve@{FEATURE_RANK}_features")
    stats[features] = nanmean([layer.ve(features).ve for layer in record.layers])
    # depth routers (AttnRes): the mass on the current block and on the token embeddings, per sublayer
    stats["current_share"] = nanmean([layer.current_share for layer in record.layers])
    stats["embedding_share"] = nanmean([layer.embedding_share for layer in record.layers])
    stats["norm_cv"], stats["norm_cv_min"], stats["norm_cv_gauss"] = (summary.norm_cv, summary.norm_cv_min,
                                                                      summary.norm_cv_gauss)
    stats.update(zip(ve_keys(rank).values(), summary.ve(rank)))
    first = summary.ve(1)
    stats.update({ve_keys(1)["ve"]: first.ve, ve_keys(1)["post"]: first.post})
    stats["r_cv_share"], stats["r_cv_share_p"] = summary.r_cv_share, summary.r_cv_share_p
    return stats


def parking(record: Record, layer: float, sink_fraction: float = PARKING_SINK_FRACTION) -> dict:
    """What dormant heads explain of a layer's max share (Guo et al. 2024): a head *parks* when BOS (source 0)
    tops its operator in at least ``sink_fraction`` of the probe sequences and its max share is at least half
    the idle fraction (a causal-uniform head also has BOS on top, at H_n / n); if every parking head puts its
    idle queries on BOS and nothing else there, the layer's max share is ``parking / units * idle_fraction``.
    ``parking_excess`` is the measured max share above that prediction: concentration the parking does not
    explain. nan where the record has no idle fraction or no per-head sinks (records before they existed)."""
    record = typed(record)
    out = {"idle_fraction": record.idle_fraction, "parking_heads": math.nan, "units": math.nan,
           "parking_prediction": math.nan, "parking_excess": math.nan}
    if not finite(layer) or not record.layers[int(layer)].sink_source_units:
        return out
    row = record.layers[int(layer)]
    idle = out["idle_fraction"]
    parked = sum(1 for source, often, share in zip(row.sink_source_units, row.sink_fraction_units,
                                                   row.max_share_units)
                 if source == 0 and number(often) >= sink_fraction and number(share) >= idle / 2)
    units = len(row.sink_source_units)
    prediction = parked / units * idle
    out.update({"parking_heads": float(parked), "units": float(units), "parking_prediction": prediction,
                "parking_excess": row.max_share - prediction})
    return out


def depth_label(layer: float, n_layers: int) -> str:
    """``L3 12%`` as the paper writes onset (0-based index, % = index / L, half-even); "never" for nan."""
    if not finite(layer):
        return "never"
    return f"L{int(layer)} {100 * layer / n_layers:.0f}%"


def table1_row(name: str, record: dict, threshold: float = ONSET_THRESHOLD, completion: float = COMPLETION_THRESHOLD, rank: int = RANK) -> dict:
    """The paper's Table 1 / 4 columns for one measured model (depth means; min = smallest layer norm-CV)."""
    s, ve = run_statistics(record, threshold, completion, rank), ve_keys(rank)
    d_h = record.layers[0].dim
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
