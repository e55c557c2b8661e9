"""The record's codecs: its JSON line, the flat metric keys logged to W&B / CSV (and read back from a W&B
group), and the signature as a table of text. Each spelling of a record key outside ``records.record`` is here."""
from __future__ import annotations

import json
import math
import re

from common.constants import RANK
from common.errors import UserError
from records.record import SCHEMA_VERSION, VERSION_KEY, LayerRow, Record, Summary, typed

PREFIX = "collapse"  # the metric namespace: collapse/<column>/L<i> per layer, collapse/<summary column>
_STRUCTURE = ("layer", "name", "sources", "dim", "units")  # row fields that describe, not measure
_LAYER_METRIC = re.compile(rf"^{PREFIX}/(.+)/L(\d+)$")


# --- the JSON line ----------------------------------------------------------------------------------------------

def _jsonable(value):
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, list):
        return [_jsonable(v) for v in value]
    return value


def signature_parts(signature) -> dict:
    """A signature (``collapse.Signature``: ``layers``, ``summary``, ``ranks``) as a record's strict-JSON parts:
    ``ranks``, ``layers``, ``summary``; NaN becomes null, lists stay lists."""
    return {"ranks": list(signature.ranks),
            "layers": [LayerRow({key: _jsonable(value) for key, value in row.items()}) for row in signature.layers],
            "summary": Summary({key: _jsonable(value) for key, value in signature.summary.items()})}


def to_line(record: Record) -> str:
    return json.dumps(record)


def from_line(line: str, where: str = "") -> Record:
    """One JSON line as a typed record. Lines of an older schema read as they are (every version so far only
    added fields); a newer one is refused in one line naming both versions."""
    record = json.loads(line)
    version = record.get(VERSION_KEY, 1)
    if not isinstance(version, int) or version > SCHEMA_VERSION:
        raise UserError(f"{where or 'a record'} has schema_version {version!r}, newer than this code reads "
                        f"(up to {SCHEMA_VERSION}); update routecollapse to read it")
    return typed(record)


# --- CSV tables of one record -------------------------------------------------------------------------------

def layer_table(record: Record) -> list[dict]:
    """One row per layer with its scalar columns (per-unit lists left out): ``signature.csv``."""
    return [{k: v for k, v in row.items() if not isinstance(v, list)} for row in record.layers]


def unit_table(record: Record) -> list[dict]:
    """One row per (layer, unit): its max share and its key set's norm-CV (grouped keys serve several units):
    ``heads.csv``."""
    rows = []
    for row in record.layers:
        cvs, shares = row.norm_cv_units, row.max_share_units
        for unit, share in enumerate(shares):
            cv = cvs[unit * len(cvs) // len(shares)] if cvs else None
            rows.append({"layer": row.layer, "unit": unit, "max_share": share, "norm_cv": cv})
    return rows


# --- flat metrics (W&B, Lightning's CSV logger) ---------------------------------------------------------------

def _is_number(value) -> bool:
    return value is None or (isinstance(value, (int, float)) and not isinstance(value, bool))


def flat_metrics(signature, prefix: str = PREFIX) -> dict[str, float]:
    """Scalar metrics as ``{prefix}/{column}/L{i}`` and ``{prefix}/{summary column}``; None -> nan."""
    out = {}
    for row in signature.layers:
        for key, value in row.items():
            if key not in _STRUCTURE and _is_number(value):
                out[f"{prefix}/{key}/L{row['layer']}"] = math.nan if value is None else float(value)
    for key, value in signature.summary.items():
        if _is_number(value):
            out[f"{prefix}/{key}"] = math.nan if value is None else float(value)
    return out


def measurement_metrics(seconds: float, probe_sequences: int, prefix: str = PREFIX) -> dict[str, float]:
    """What the monitor logs beside the signature: the measurement's wall time and probe size."""
    return {f"{prefix}/seconds": seconds, f"{prefix}/probe_sequences": float(probe_sequences)}


def from_history(history: list[dict]) -> list[Record]:
    """Records (step, layers, summary) from W&B history rows of flat collapse metrics (per-unit lists, which
    are not scalars, are absent)."""
    records = []
    for row in history:
        layers: dict[int, dict] = {}
        summary = {}
        for key, value in row.items():
            if not key.startswith(f"{PREFIX}/") or value is None:
                continue
            value = None if isinstance(value, float) and math.isnan(value) else value
            match = _LAYER_METRIC.match(key)
            if match:
                layers.setdefault(int(match.group(2)), {"layer": int(match.group(2))})[match.group(1)] = value
            else:
                summary[key.removeprefix(f"{PREFIX}/")] = value
        if layers:
            step = row.get("trainer/global_step", row.get("_step"))
            records.append(typed({"step": int(step), "layers": [layers[i] for i in sorted(layers)],
                                  "summary": summary}))
    return sorted(records, key=lambda r: r.step)


# --- the signature as text -----------------------------------------------------------------------------------

def _percent(index: int, n_layers: int) -> str:
    return f"{100 * index / n_layers:.0f}%"  # half-even, as the paper rounds L3/24 to 12%


def signature_table(signature) -> str:
    """One line per layer (``-`` = not measured), then onset, completion and peak ("never" = no crossing)."""
    r = RANK if RANK in signature.ranks else max(signature.ranks)
    headers = ["norm-CV", f"VE@{r}", "gauss", "shuffle", "max share"]
    columns = ["norm_cv", f"ve@{r}", f"ve@{r}_gauss", f"ve@{r}_shuffle", "max_share"]
    cells = [["layer", *headers]]
    for row in signature.layers:
        label = f"L{row['layer']}"
        if row["name"] and row["name"] != label:
            label += f" {row['name']}"
        values = [row[key] for key in columns]
        cells.append([label, *("-" if value is None or (isinstance(value, float) and math.isnan(value))
                               else f"{value:.3f}" if isinstance(value, float) else str(value)
                               for value in values)])
    widths = [max(len(line[i]) for line in cells) for i in range(len(cells[0]))]
    lines = ["  ".join(cell.rjust(w) if i else cell.ljust(w) for i, (cell, w) in enumerate(zip(line, widths)))
             for line in cells]
    s, n_layers = signature.summary, signature.summary["n_layers"]

    def crossing(name: str, index: int | None, threshold: float) -> str:
        where = "never" if index is None else f"L{index} ({_percent(index, n_layers)} depth)"
        return f"{name} (max share > {threshold:.2f}): {where}"

    lines.append(crossing("onset", s["onset_layer"], s["onset_threshold"]))
    lines.append(crossing("completion", s["completion_layer"], s["completion_threshold"]))
    if s["peak_layer"] is not None:
        lines.append(f"peak max share: {s['peak_max_share']:.3f} at L{s['peak_layer']}")
    return "\n".join(lines)
