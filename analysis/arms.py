"""A sweep as arms x seeds: per-run statistics, per-arm means with bootstrap intervals, depth profiles and
trajectories. The brake-ordering, ALiBi-slope and metric studies are this plus a verdict.

An *arm* is one value of the study's factor (``router.position``, ``router/score``, ...); its seeds
(``seed``, ``data_seed`` and anything else that varies) are the replicates. Statistics come from each
run's final record at the analysis thresholds (``analysis.tables.run_statistics``).
"""
from __future__ import annotations

import math

from analysis.runs import SEED_KEYS, Run, factors, val_loss
from analysis.stats import bootstrap_ci
from analysis.tables import number, onset_step, run_statistics
from common.constants import RANK
from common.errors import UserError
from common.run_names import alias

MIN_SEEDS = 3  # runs per arm below which no study gives a verdict: two seeds cannot show their own spread

def statistics(rank: int = RANK) -> list[tuple[str, str]]:
    """(key, label) of the per-run statistics tabulated per arm; the key geometry at VE@``rank``."""
    return [
        ("onset_depth", "onset depth"), ("onset_depth_censored", "onset depth (never = 1)"),
        ("onset_step", "onset step"), ("onset_step_censored", "onset step (never = end + 1)"),
        ("completion_depth", "L* depth"), ("peak_max_share", "peak max share"), ("peak_gain", "peak gain in training"),
        ("peak_depth", "peak depth"),
        ("area_above_baseline", "area above baseline"), ("norm_cv", "norm-CV"), (f"ve@{rank}", f"VE@{rank}"),
        (f"ve@{rank}_shuffle", f"VE@{rank} shuffle"), (f"ve@{rank}_gauss", f"VE@{rank} Gauss"),
        (f"content@{rank}", f"content@{rank}"),
        ("r_cv_share", "r(norm-CV, max share)"), ("val_loss", "val loss"), ("train_loss", "train loss"),
        ("onset_loss", "train loss at onset"), ("matched_loss", "matched train loss"),
        ("matched_step", "step at matched loss"), ("peak_max_share_matched", "peak max share at matched loss"),
        ("area_above_baseline_matched", "area above baseline at matched loss"),
        ("onset_depth_matched_censored", "onset depth at matched loss (never = 1)"),
    ]


def factor_value(run: Run, factor: str):
    """A run's value of ``factor``; a config group such as ``router/score`` reads its key ``router.score``."""
    key = factor.replace("/", ".")
    if key not in run.config:
        raise UserError(f"runs have no config key {key!r}; pass factor=<one of the sweep's axes>, "
                        f"e.g. {', '.join(factors([run])) or 'router.position'}")
    return run.config[key]


def run_row(run: Run, factor: str, threshold: float, completion: float, rank: int = RANK) -> dict:
    """Everything the studies need about one run, flat."""
    stats = run_statistics(run.final, threshold, completion, rank)
    steps = onset_step(run.records, threshold)
    last = float(run.final.get("step", math.nan))
    row = {"run": run.name, "arm": factor_value(run, factor), **{s: run.get(s) for s in SEED_KEYS if s in run.config}, **stats,
           "onset_depth_censored": 1.0 if math.isnan(stats["onset_depth"]) else stats["onset_depth"],
           "onset_step": steps, "onset_step_censored": last + 1 if math.isnan(steps) else steps,
           # ALiBi's bias already lowers the max share at initialisation; the gain isolates what training added.
           "peak_gain": stats["peak_max_share"] - run_statistics(run.records[0], threshold, completion, rank)["peak_max_share"],
           "val_loss": val_loss(run), "train_loss": number(run.final.get("train_loss")),
           "onset_loss": _onset_loss(run.records, threshold)}
    has_loss = any(r.get("train_loss") is not None for r in run.records)
    row["onset_loss_censored"] = row["onset_loss"] if not math.isnan(row["onset_loss"]) else 0.0 if has_loss else math.nan
    return row


def _onset_loss(records: list[dict], threshold: float) -> float:
    """Mean training loss over the interval that ended at the first record past onset (nan: never, or the
    records predate the loss field). A brake that delays collapse in learning crosses at a lower loss."""
    step = onset_step(records, threshold)
    return next((number(r.get("train_loss")) for r in records if r["step"] == step), math.nan)


def _losses(run: Run) -> list[tuple[dict, float]]:
    return [(r, number(r.get("train_loss"))) for r in run.records if not math.isnan(number(r.get("train_loss")))]


def add_matched_loss(rows: list[dict], runs: list[Run], threshold: float, completion: float, rank: int = RANK) -> float:
    """Statistics at matched training loss, written into ``rows``; returns the matched level.

    Position schemes learn at different speeds, so equal steps can compare a model that has learned the task
    with one that has not. The level is the highest loss that every run got below (the slowest run's best);
    each run is read at its first record at or under it (nan everywhere if a run has no loss records).
    """
    histories = [_losses(run) for run in runs]
    if not histories or any(not h for h in histories):
        level = math.nan
    else:
        level = max(min(loss for _, loss in h) for h in histories)
    for row, history in zip(rows, histories):
        record = next((r for r, loss in history if loss <= level), None)
        stats = run_statistics(record, threshold, completion, rank) if record else {}
        onset = stats.get("onset_depth", math.nan)
        row.update({"matched_loss": level, "matched_step": number(record and record["step"]),
                    "peak_max_share_matched": stats.get("peak_max_share", math.nan),
                    "area_above_baseline_matched": stats.get("area_above_baseline", math.nan),
                    "onset_depth_matched_censored": math.nan if not stats else 1.0 if math.isnan(onset) else onset})
    return level


def group(rows: list[dict], order: list | None = None) -> dict:
    """``{arm: [rows]}`` in ``order`` (values absent from the sweep are skipped), then any others as found."""
    arms: dict = {}
    for row in rows:
        arms.setdefault(row["arm"], []).append(row)
    ordered = [a for a in (order or []) if a in arms]
    return {a: arms[a] for a in ordered + [a for a in arms if a not in ordered]}


def arm_summary(arm_rows: dict, level: float = 0.95, rank: int = RANK) -> list[dict]:
    """One row per arm: seeds, runs that never reached onset, and mean [low, high] of every statistic."""
    out = []
    for arm, rows in arm_rows.items():
        summary = {"arm": arm, "runs": len(rows), "never": sum(math.isnan(r["onset_depth"]) for r in rows)}
        for key, _ in statistics(rank):
            mean, low, high = bootstrap_ci([r.get(key, math.nan) for r in rows], level)
            summary.update({key: mean, f"{key}_low": low, f"{key}_high": high})
        out.append(summary)
    return out


def arm_label(factor: str, arm) -> str:
    """An arm as every figure and W&B run name writes it (``nope``, ``slope0.5``: common.run_names)."""
    return alias(factor, arm)


def profiles(runs_by_arm: dict[str, list[Run]], keys: list[str], level: float = 0.95, factor: str = "") -> list[dict]:
    """Per arm, per layer: mean and bootstrap band across seeds of each per-layer column (final records)."""
    arms = []
    for arm, runs in runs_by_arm.items():
        n_layers = {len(r.final["layers"]) for r in runs}
        if len(n_layers) != 1:
            raise UserError(f"arm {arm!r} mixes depths {sorted(n_layers)}; compare runs of one architecture")
        depth, curves = n_layers.pop(), {}
        for key in keys:
            per_layer = [bootstrap_ci([number(r.final["layers"][i].get(key)) for r in runs], level)
                         for i in range(depth)]
            curves[key] = tuple(list(v) for v in zip(*per_layer))
        arms.append({"label": arm_label(factor, arm), "profiles": curves})
    return arms


def trajectory(run: Run, threshold: float, rank: int = RANK) -> dict:
    """A run's collapse over training: per measured step, peak max share, area above baseline, depth-mean
    VE@rank and onset depth at ``threshold`` (nan = not yet), and the references they are read against
    (the causal-uniform baseline, the shuffle and Gaussian nulls of VE@rank)."""
    keys = ["peak_max_share", "area_above_baseline", f"ve@{rank}", "onset_depth", "baseline", f"ve@{rank}_shuffle",
            f"ve@{rank}_gauss"]
    steps, values = [], {key: [] for key in keys}
    for record in run.records:
        stats = run_statistics(record, threshold, rank=rank)
        steps.append(record["step"])
        for key in values:
            values[key].append(stats[key])
    return {"steps": steps, "values": values}


def arm_curves(runs: list[Run], rows: list[dict], arms: list, threshold: float, level: float, rank: int,
               factor: str) -> dict:
    """What a study's two figures draw, per arm in ``arms`` order: depth profiles at the last step (mean and
    band over seeds) and collapse over training (the arm's mean, and each seed faint in its colour)."""
    runs_by_arm = {arm: [run for run, row in zip(runs, rows) if row["arm"] == arm] for arm in arms}
    curves = []
    for i, (arm, arm_runs) in enumerate(runs_by_arm.items()):
        per_run = [trajectory(run, threshold, rank) for run in arm_runs]
        curves.append({"label": arm_label(factor, arm), "color": f"C{i}", **mean_curve(per_run)})
        curves += [{"label": None, "color": f"C{i}", **c, "style": "-", "alpha": 0.3} for c in per_run]
    return {"profiles": profiles(runs_by_arm, ["max_share", f"ve@{rank}", f"ve@{rank}_shuffle", "norm_cv"], level,
                                 factor), "curves": curves}


def mean_curve(curves: list[dict]) -> dict:
    """Mean of several runs' trajectories over the steps they all measured."""
    common = sorted(set.intersection(*(set(c["steps"]) for c in curves)))
    values = {}
    for key in curves[0]["values"]:
        values[key] = []
        for step in common:
            points = [c["values"][key][c["steps"].index(step)] for c in curves]
            finite = [p for p in points if not math.isnan(p)]
            values[key].append(sum(finite) / len(finite) if finite else math.nan)
    return {"steps": common, "values": values}
