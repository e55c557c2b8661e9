"""A run directory's record files: their names, appending one record, reading them back."""
from __future__ import annotations

from pathlib import Path

from common import atomic
from records.codecs import from_line, to_line
from records.record import Record

JSONL = "collapse.jsonl"
PROFILE_PNG = "collapse_profile.png"
HEATMAP_PNG = "max_share_heatmap.png"


def append_record(run_dir: str | Path, record: Record) -> None:
    """Append one record as a JSON line, fsynced: once it is on disk, a resumed run skips its step."""
    atomic.append_lines(Path(run_dir) / JSONL, [to_line(record)])


def read_records(run_dir: str | Path, skipped: bool = False, repair: bool = False) -> list[Record]:
    """The monitor's measurements of a run, in step order (empty if none were written). A line torn by a kill
    is dropped with a warning (``repair``: also cut from the file). ``skipped``: also the steps whose
    measurement was skipped (``record.skipped`` says why). Records of an older schema version read as
    they are; a newer version is a one-line error naming it."""
    path = Path(run_dir) / JSONL
    records = [from_line(line, f"{path}, line {i + 1},")
               for i, line in enumerate(atomic.read_lines(path, repair=repair)) if line.strip()]
    return records if skipped else [r for r in records if r.skipped is None]
