"""What one record holds: a measurement (or a skipped step), and the names of its per-layer VE keys."""
from __future__ import annotations

import math

from common.constants import FEATURE_RANK, RANK


def new_record(step: int, epoch: int, seconds: float, train_loss: float, val_loss: float | None, signature,
               probe_sequences: int | None = None, task: dict | None = None) -> dict:
    """One measurement: when, how long it took, the losses (None when there is none yet), how many probe
    sequences it measured (the monitor's live probe or the whole one; absent in records written before it
    existed) and the signature (``Signature.to_dict()``: ``ranks``, ``layers``, ``summary``)."""
    record = {"step": step, "epoch": epoch, "seconds": seconds,
              "train_loss": None if math.isnan(train_loss) else train_loss, "val_loss": val_loss}
    if probe_sequences is not None:
        record["probe_sequences"] = probe_sequences
    # The task's levels where its data defines them (generated data): ``solved_loss`` (the validation loss of a
    # model that has solved it) and ``idle_fraction`` (the probe's share of queries with nothing to retrieve).
    record.update({key: value for key, value in (task or {}).items() if value is not None})
    return {**record, **signature.to_dict()}


def skipped_record(step: int, reason: str) -> dict:
    """A step that was due but not measured; readers see it only when they ask (``read_records(skipped=True)``)."""
    return {"step": step, "skipped": reason}


def ve_keys(rank: int | str) -> dict[str, str]:
    """The per-layer keys one VE measurement writes, by role: the VE of the scored keys, post-RoPE, the shuffle
    and Gaussian nulls, and the split real - shuffle (content) and shuffle - gauss (marginal).

    ``rank`` is a VE rank (8 -> ``ve@8``) or a whole key for a family that measures VE elsewhere
    (``ve@4_features``), whose nulls follow the same pattern.
    """
    key = f"ve@{rank}" if isinstance(rank, int) else rank
    suffix = key.removeprefix("ve@")
    return {"ve": key, "post": f"{key}_post", "shuffle": f"{key}_shuffle", "gauss": f"{key}_gauss",
            "content": f"content@{suffix}", "marginal": f"marginal@{suffix}"}


def geometry_column(layer: dict) -> tuple[str, str]:
    """(key, label) of the VE column a router family is read by: VE@RANK of the keys (tokens, time, depth), or
    for graphs (whose layers carry it) VE@FEATURE_RANK of the full-width layer features: 8-wide GAT heads make
    per-head VE@8 trivially 1."""
    features = f"ve@{FEATURE_RANK}_features"
    return (features, f"VE@{FEATURE_RANK} feat") if features in layer else (f"ve@{RANK}", f"VE@{RANK}")


def number(value) -> float:
    """A record's value as a float: JSON null (not measured) -> nan."""
    return math.nan if value is None else float(value)


def column(rows: list[dict], key: str) -> list[float]:
    """One key across rows (e.g. a record's layers), null -> nan."""
    return [number(row.get(key)) for row in rows]
