"""W&B as a view: read a sweep's runs back from a W&B group, and log an analysis's tables and figures.

Local files stay the source of truth (a W&B outage or offline run must never lose a result); a W&B group is read from the flat metrics the monitor
logged (``collapse/<metric>/L<i>`` per layer, ``collapse/<summary key>``), so per-head lists are absent.
"""
from __future__ import annotations

import hashlib
import math
import os
import re
from pathlib import Path

from common.errors import UserError

_LAYER = re.compile(r"^collapse/(.+)/L(\d+)$")


def records_from_history(history: list[dict]) -> list[dict]:
    """Monitor records (``{"step", "layers", "summary"}``) from W&B history rows of flat collapse metrics."""
    records = []
    for row in history:
        layers: dict[int, dict] = {}
        summary = {}
        for key, value in row.items():
            if not key.startswith("collapse/") or value is None:
                continue
            value = None if isinstance(value, float) and math.isnan(value) else value
            match = _LAYER.match(key)
            if match:
                layers.setdefault(int(match.group(2)), {"layer": int(match.group(2))})[match.group(1)] = value
            else:
                summary[key.removeprefix("collapse/")] = value
        if layers:
            step = row.get("trainer/global_step", row.get("_step"))
            records.append({"step": int(step), "layers": [layers[i] for i in sorted(layers)], "summary": summary})
    return sorted(records, key=lambda r: r["step"])


def wandb_runs(path: str):
    """``entity/project/group`` -> our ``Run`` objects (config from the logged hparams, records from history)."""
    from analysis.runs import Run, flatten

    parts = path.strip("/").split("/")
    if len(parts) != 3:
        raise UserError(f"sweep=wandb:{path} must be wandb:<entity>/<project>/<group>")
    import wandb

    try:
        api = wandb.Api(timeout=30)
        found = list(api.runs(f"{parts[0]}/{parts[1]}", filters={"group": parts[2]}))
    except Exception as e:
        raise UserError(f"cannot read W&B group {path} ({type(e).__name__}); run `wandb login` online, or pass the "
                        "local multirun folder as sweep=<dir>") from None
    if not found:
        raise UserError(f"W&B group {path} has no runs; check the group name (the multirun folder's name)")
    from common.progress import progress

    runs = []
    for item in progress(found, f"reading W&B group {path}", unit="run"):  # one history download per run
        history = [dict(row) for row in item.scan_history()]
        records = records_from_history(history)
        if records:
            losses = [row["val/loss"] for row in history if row.get("val/loss") is not None]
            runs.append(Run(path=Path(item.name), config=flatten(dict(item.config).get("config", {})),
                            records=records, logged_val_loss=losses[-1] if losses else math.nan))
    return runs


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
