"""The column registry: every field a record holds, with its meaning, unit and which routers write it.

The typed classes (``records.record``) are the declaration: each field's docstring is its meaning. This module
lists them, adds the patterned columns (VE at any rank and its nulls, AttnRes block shares), and says which
routing writes a column that not every router has. ``column(name)`` finds any key a record may hold; a test
holds every key of a real record to it, so a new column cannot appear without being declared here.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from records.record import LayerRow, Record, Summary

PARTS = {"record": Record, "layer": LayerRow, "summary": Summary}

UNITS = {"seconds": "s", "train_loss": "nats", "val_loss": "nats", "solved_loss": "nats", "step": "steps",
         "onset_step": "steps", "solved_step": "steps"}
# Columns only some routings write (everything else: every router). Named by what the routing carries.
ONLY = {
    "baseline_gcn": "sparse (graph) routing", "area_above_gcn": "sparse (graph) routing",
    "max_share_ratio_gcn": "sparse (graph) routing",
    "current_share": "depth routing", "embedding_share": "depth routing", "uniform_share": "depth routing",
    "recency_bias": "depth routing with a recency bias",
    "delta_cv": "routing that carries step sizes (selective SSMs)",
    "effective_key_norm_cv": "routing that carries step sizes (selective SSMs)",
    "b_norm_cv": "routing that carries step sizes (selective SSMs)",
    "content_r": "recurrent time routing", "recency_r": "recurrent time routing",
    "solved_loss": "generated data with a solved level", "idle_fraction": "generated data with idle queries",
}


@dataclass(frozen=True)
class Column:
    name: str      # the key in the record's JSON (a pattern for families of keys: ve@<r>, block<j>_share)
    part: str      # record | layer | summary
    meaning: str
    unit: str = ""
    only: str = ""  # which routing writes it; "" = every router


# Keys that are patterns: VE at any rank r (and features / projected VE of graph layers), and their nulls.
PATTERNS = [
    (re.compile(r"^ve@(\d+|\d+_features|\d+_projected)$"), "VE@r: variance explained by the top r key directions"),
    (re.compile(r"^ve@(\d+|\d+_features)_post$"), "VE@r of the keys after the position transform (post-RoPE)"),
    (re.compile(r"^ve@(\d+|\d+_features)_shuffle$"), "VE@r of the same router on the position-shuffled probe"),
    (re.compile(r"^ve@(\d+|\d+_features)_gauss$"), "VE@r of Gaussian keys of the same shape"),
    (re.compile(r"^content@(\d+|\d+_features)$"), "VE@r real - shuffle: geometry set by content"),
    (re.compile(r"^marginal@(\d+|\d+_features)$"), "VE@r shuffle - Gaussian: geometry set by the marginals"),
    (re.compile(r"^block\d+_share$"), "depth routing: mean weight on block j"),
]
# Written by the signature but read through the classes' methods, not as fields of their own.
OTHER = {
    "layer": {"units": "routing units (heads, channels)", "max_share_ratio": "max share over its baseline",
              "max_share_ratio_gcn": "max share over GCN's routing", "norm_cv_pooled": "norm-CV pooled over units"},
    "summary": {"onset_depth": "onset layer / L", "completion_depth": "completion layer / L",
                "norm_cv_pooled": "depth mean of pooled norm-CV",
                "max_share_exposure": "depth mean of exposure-corrected max share",
                "max_share_ex0": "depth mean of max share without source 0"},
    "record": {"ranks": "VE ranks measured", "layers": "the per-layer rows", "summary": "the model-level numbers",
               "schema_version": "record schema version", "model": "post-hoc: the model measured",
               "probe": "post-hoc: the probe it was measured on"},
}


def _declared(part: str) -> dict[str, str]:
    cls = PARTS[part]
    out = {}
    for name, value in vars(cls).items():
        if isinstance(value, property) and value.__doc__:
            key = name if name != "version" else "schema_version"
            out[key] = value.__doc__
    return out | OTHER[part]


def registry() -> list[Column]:
    """Every declared column (patterns not expanded)."""
    return [Column(name, part, meaning, UNITS.get(name, ""), ONLY.get(name, ""))
            for part in PARTS for name, meaning in _declared(part).items()]


def column(name: str, part: str) -> Column | None:
    """The registered column a record key belongs to (``ve@8_shuffle`` -> its pattern), or None."""
    declared = _declared(part)
    if name in declared:
        return Column(name, part, declared[name], UNITS.get(name, ""), ONLY.get(name, ""))
    if part != "record":
        for pattern, meaning in PATTERNS:
            if pattern.match(name):
                return Column(name, part, meaning, "", ONLY.get(name, ""))
    return None


def undeclared(record: Record) -> list[str]:
    """Keys of ``record`` no column declares (what a test holds empty)."""
    missing = [key for key in record if column(key, "record") is None]
    missing += sorted({f"layer:{k}" for layer in record.layers for k in layer if column(k, "layer") is None})
    missing += [f"summary:{k}" for k in record.summary if column(k, "summary") is None]
    return missing
