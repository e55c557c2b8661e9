"""Building a record: a measurement (or a skipped step) as the typed record its JSON line holds."""
from __future__ import annotations

import dataclasses
import math

from records.codecs import signature_parts
from records.record import SCHEMA_VERSION, VERSION_KEY, LayerRow, Record, number, ve_keys  # noqa: F401 (re-exported)


def new_record(step: int, epoch: int, seconds: float, train_loss: float, val_loss: float | None, signature,
               probe_sequences: int | None = None, task=None) -> Record:
    """One measurement: its schema version, when, how long it took, the losses (None when there is none yet),
    how many probe sequences it measured (the monitor's live probe or the whole one) and the signature
    (``ranks``, ``layers``, ``summary``). ``task``: the task's levels where its data defines them (generated
    data; a dataclass or dict): ``solved_loss`` (the validation loss of a model that has solved it) and
    ``idle_fraction`` (the probe's share of queries with nothing to retrieve)."""
    record = Record({VERSION_KEY: SCHEMA_VERSION, "step": step, "epoch": epoch, "seconds": seconds,
                     "train_loss": None if math.isnan(train_loss) else train_loss, "val_loss": val_loss})
    if probe_sequences is not None:
        record["probe_sequences"] = probe_sequences
    levels = dataclasses.asdict(task) if dataclasses.is_dataclass(task) else dict(task or {})
    record.update({key: value for key, value in levels.items() if value is not None})
    record.update(signature_parts(signature))
    return record


def model_record(step: int | None, model: str, probe: str, signature) -> Record:
    """The post-hoc measurement of one model (``analyze.py run=`` / ``model=``): the step it was trained to
    (None for a Hugging Face checkpoint without one), its name, the probe and the signature."""
    return Record({"step": step, "model": model, "probe": probe, **signature_parts(signature)})


def skipped_record(step: int, reason: str) -> Record:
    """A step that was due but not measured; readers see it only when they ask (``read_records(skipped=True)``)."""
    return Record({VERSION_KEY: SCHEMA_VERSION, "step": step, "skipped": reason})


def column(rows: list[LayerRow], key: str) -> list[float]:
    """One column across rows (e.g. a record's layers), null -> nan."""
    return [number(row.get(key)) for row in rows]
