"""The ``FAILED`` marker: a failed run writes why and at which step into its own folder, so a sweep's other
jobs go on and ``analyze.py sweep=`` can tell a failed job from a result. A run that starts (or resumes)
removes it."""
from __future__ import annotations

import json
from pathlib import Path

from common import atomic

FAILED = "FAILED"


def mark_failed(run_dir: str | Path, reason: str, step: int | None) -> None:
    # JSON strings are YAML scalars: the file reads as YAML and as "key: value" lines.
    atomic.write_text(Path(run_dir) / FAILED, f"reason: {json.dumps(reason)}\nstep: {json.dumps(step)}\n")


def read_failure(run_dir: str | Path) -> dict | None:
    """``{"reason": str, "step": int | None}`` for a failed run, else None."""
    path = Path(run_dir) / FAILED
    if not path.is_file():
        return None
    fields = dict(line.partition(": ")[::2] for line in path.read_text().splitlines() if ": " in line)
    try:
        return {"reason": json.loads(fields.get("reason", '""')), "step": json.loads(fields.get("step", "null"))}
    except json.JSONDecodeError:
        return {"reason": path.read_text().strip(), "step": None}


def clear_failure(run_dir: str | Path) -> None:
    (Path(run_dir) / FAILED).unlink(missing_ok=True)
