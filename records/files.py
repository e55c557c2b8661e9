"""A run directory's record files: their names, appending one record, reading them back."""
from __future__ import annotations

import json
from pathlib import Path

from common import atomic

JSONL = "collapse.jsonl"
PROFILE_PNG = "collapse_profile.png"
HEATMAP_PNG = "max_share_heatmap.png"


def append_record(run_dir: str | Path, record: dict) -> None:
    """Append one record as a JSON line, fsynced: once it is on disk, a resumed run skips its step."""
    atomic.append_lines(Path(run_dir) / JSONL, [json.dumps(record)])


def read_records(run_dir: str | Path, skipped: bool = False, repair: bool = False) -> list[dict]:
    """The monitor's measurements of a run, in step order (empty if none were written). A line torn by a kill
    is dropped with a warning (``repair``: also cut from the file). ``skipped``: also the steps whose
    measurement was skipped because the weights were not finite (``{"step": s, "skipped": reason}``)."""
    records = [json.loads(line) for line in atomic.read_lines(Path(run_dir) / JSONL, repair=repair) if line.strip()]
    return records if skipped else [r for r in records if "skipped" not in r]
