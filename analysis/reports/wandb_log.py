"""An analysis's tables and figures logged to W&B as one run (offline unless told otherwise). Local files stay the
source of truth: a W&B outage or an offline run never loses a result."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path


def log_analysis(out: Path, project: str, group: str | None, name: str, tables: dict[str, list[dict]],
                 images: list[Path], offline: bool = True) -> Path | None:
    """One W&B run (job_type "analysis") holding the tables and figures; offline unless told otherwise, as
    the training runs are. Returns the local W&B run folder."""
    import wandb

    mode = os.environ.get("WANDB_MODE") or ("offline" if offline else "online")
    # A fixed id per output folder: re-running (or re-syncing) an analysis updates its W&B run, not a copy.
    run_id = "analysis-" + hashlib.sha1(str(out.resolve()).encode()).hexdigest()[:12]
    run = wandb.init(project=project, group=group, name=name, job_type="analysis", dir=str(out), mode=mode,
                     id=run_id, resume="allow", reinit="finish_previous")
    try:
        for key, rows in tables.items():
            columns = list(dict.fromkeys(k for row in rows for k in row))
            data = [[_loggable(row.get(c)) for c in columns] for row in rows]
            run.log({key: wandb.Table(columns=columns, data=data)})
        run.log({f"figure/{p.stem}": wandb.Image(str(p)) for p in images})
    finally:
        run.finish()
    return Path(run.dir).parent if run.dir else None


def _loggable(value):
    if isinstance(value, (list, dict)):
        return str(value)
    return value
