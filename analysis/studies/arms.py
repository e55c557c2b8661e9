"""A sweep as arms x seeds: per-run statistics, per-arm means with t- and bootstrap intervals, depth profiles
and trajectories. The brake-ordering, ALiBi-slope and metric studies are this plus a verdict.

An *arm* is one value of the study's factor (``router.position``, ``router/score``, ...); its seeds
(``seed``, ``data_seed`` and anything else that varies) are the replicates. Statistics come from each
run's final record at the analysis thresholds (``analysis.reports.tables.run_statistics``: matched step), and from
its records at ``solved_step`` and ``solved_step + k`` (learning-gated: ``<statistic>@solved``,
``<statistic>@solved+k``; nan for a run that never solved its task, counted per arm, never dropped silently).
"""
from __future__ import annotations

import math

from analysis.readers.runs import SEED_KEYS, Run, factors, val_loss
from analysis.reports.stats import bootstrap_ci, t_interval
from analysis.studies.spec import SOLVED_K
from analysis.reports.tables import number, onset_step, run_statistics, solved_step
from common.constants import LEVEL, RANK, SOLVED_MARGIN
from common.errors import UserError
from common.run_names import alias
from records import Record

MIN_SEEDS = 3  # runs per arm below which no study gives a verdict: two seeds cannot show their own spread

# What is read at solved_step and at solved_step + k: the statistics of one record (run-level ones such as
# onset step have no value "at" a step).
GATED = ("onset_depth_censored", "peak_max_share", "peak_gain", "area_above_baseline", "norm_cv", "ve@{rank}",
         "val_loss", "step")


def gated_keys(rank: int = RANK) -> list[str]:
    return [key.format(rank=rank) for key in GATED]


def statistics(rank: int = RANK) -> list[tuple[str, str]]:
    """(key, label) of the per-run statistics tabulated per arm; the key geometry at VE@``rank``."""
    final = [
        ("onset_depth", "onset depth"), ("onset_depth_censored", "onset depth (never = 1)"),
        ("onset_step", "onset step"), ("onset_step_censored", "onset step (never = end + 1)"),
        ("completion_depth", "L* depth"), ("peak_max_share", "peak max share"), ("peak_gain", "peak gain in training"),
        ("peak_depth", "peak depth"),
        ("area_above_baseline", "area above baseline"), ("norm_cv", "norm-CV"), (f"ve@{rank}", f"VE@{rank}"),
        (f"ve@{rank}_shuffle", f"VE@{rank} shuffle"), (f"ve@{rank}_gauss", f"VE@{rank} Gauss"),
        (f"content@{rank}", f"content@{rank}"),
        ("r_cv_share", "r(norm-CV, max share)"), ("val_loss", "val loss"), ("train_loss", "train loss"),
        ("onset_loss", "train loss at onset"), ("solved_step", "solved step"),
        ("parking_heads", "parking heads at the peak"), ("parking_prediction", "parking prediction"),
        ("parking_excess", "peak above the parking prediction"), ("ve@4_features", "VE@4 of the layer features"),
    ]
    gated = [(f"{key}@{at}", f"{key} at {at}") for at in ("solved", "solved+k") for key in gated_keys(rank)]
    return final + gated


def factor_value(run: Run, factor: str):
    """A run's value of ``factor``; a config group such as ``router/score`` reads its key ``router.score``."""
    key = factor.replace("/", ".")
    if key not in run.config and f"{key}._target_" in run.config:  # a config group (router=gat,gcn): its class
        key = f"{key}._target_"
    if key not in run.config:
        raise UserError(f"runs have no config key {key!r}; pass factor=<one of the sweep's axes>, "
                        f"e.g. {', '.join(factors([run])) or 'router.position'}")
    return run.config[key]


def run_row(run: Run, factor: str, threshold: float, completion: float, rank: int = RANK,
            solved_k: int = SOLVED_K, solved_margin: float = SOLVED_MARGIN) -> dict:
    """Everything the studies need about one run, flat: at its final record, and at solved_step and
    solved_step + ``solved_k`` (:func:`gated`)."""
    stats = run_statistics(run.final, threshold, completion, rank)
    steps = onset_step(run.records, threshold)
    last = float(run.final.step)
    row = {"run": run.name, "arm": factor_value(run, factor), **{s: run.get(s) for s in SEED_KEYS if s in run.config}, **stats,
           "onset_depth_censored": 1.0 if math.isnan(stats["onset_depth"]) else stats["onset_depth"],
           "onset_step": steps, "onset_step_censored": last + 1 if math.isnan(steps) else steps,
           # ALiBi's bias already lowers the max share at initialisation; the gain isolates what training added.
           "peak_gain": stats["peak_max_share"] - run_statistics(run.records[0], threshold, completion, rank)["peak_max_share"],
           "val_loss": val_loss(run), "train_loss": run.final.train_loss,
           "onset_loss": _onset_loss(run.records, threshold)}
    has_loss = any(not math.isnan(r.train_loss) for r in run.records)
    row["onset_loss_censored"] = row["onset_loss"] if not math.isnan(row["onset_loss"]) else 0.0 if has_loss else math.nan
    row.update(gated(run.records, threshold, completion, rank, solved_k, solved_margin))
    return row


def record_at(records: list[Record], step: float) -> Record | None:
    """The first measured record at or after ``step`` (None: nan, or training ended before it)."""
    if math.isnan(step):
        return None
    return next((r for r in records if r.step >= step), None)


def record_row(record: Record | None, first: Record, threshold: float, completion: float, rank: int = RANK) -> dict:
    """The :data:`GATED` statistics of one record (all nan without one); ``first``: the run's first record,
    which the peak's gain is counted from."""
    if record is None:
        return {key: math.nan for key in gated_keys(rank)}
    stats = run_statistics(record, threshold, completion, rank)
    base = run_statistics(first, threshold, completion, rank)["peak_max_share"]
    stats.update({"onset_depth_censored": 1.0 if math.isnan(stats["onset_depth"]) else stats["onset_depth"],
                  "peak_gain": stats["peak_max_share"] - base, "val_loss": record.val_loss,
                  "step": number(record.step)})
    return {key: stats[key] for key in gated_keys(rank)}


def gated(records: list[Record], threshold: float, completion: float, rank: int = RANK,
          solved_k: int = SOLVED_K, solved_margin: float = SOLVED_MARGIN) -> dict:
    """A run's learning-gated statistics: ``solved_step`` (analysis.reports.tables.solved_step; nan = never, or the task
    defines no solved level), ``has_solved_level``, and the :data:`GATED` statistics of the records at
    solved_step (``<key>@solved``) and at the first measured step >= solved_step + ``solved_k``
    (``<key>@solved+k``; nan when training ended first)."""
    step = solved_step(records, solved_margin)
    out = {"solved_step": step,
           "has_solved_level": any(not math.isnan(r.solved_loss) for r in records)}
    for at, target in (("solved", step), ("solved+k", step + solved_k)):
        row = record_row(record_at(records, target), records[0], threshold, completion, rank)
        out.update({f"{key}@{at}": value for key, value in row.items()})
    return out


def _onset_loss(records: list[Record], threshold: float) -> float:
    """Mean training loss over the interval that ended at the first record past onset (nan: never, or the
    records predate the loss field). A brake that delays collapse in learning crosses at a lower loss."""
    step = onset_step(records, threshold)
    return next((r.train_loss for r in records if r.step == step), math.nan)


def group(rows: list[dict], order: list | None = None) -> dict:
    """``{arm: [rows]}`` in ``order`` (values absent from the sweep are skipped), then any others as found."""
    arms: dict = {}
    for row in rows:
        arms.setdefault(row["arm"], []).append(row)
    ordered = [a for a in (order or []) if a in arms]
    return {a: arms[a] for a in ordered + [a for a in arms if a not in ordered]}


def solved_count(rows: list[dict]) -> str:
    """``4/5``: the arm's runs that solved the task, of its runs (``-`` when no record names a solved level)."""
    if not any(r.get("has_solved_level") for r in rows):
        return "-"
    return f"{sum(not math.isnan(r['solved_step']) for r in rows)}/{len(rows)}"


def gate_refusal(comparison, arm_rows: dict, order: list, label) -> str | None:
    """Why a learning-gated comparison cannot be judged: no record names the task's solved level, or an arm has
    fewer than MIN_SEEDS runs that solved it. None when it can (or the comparison is read at step)."""
    if not comparison.gated:
        return None
    rows = [r for a in order for r in arm_rows[a]]
    if not any(r.get("has_solved_level") for r in rows):
        return ("undetermined: the records name no solved loss (data without a solved level, or runs older "
                "than it): only the matched-step comparisons apply")
    counts = {a: sum(not math.isnan(r[comparison.key]) for r in arm_rows[a]) for a in order}
    if min(len(arm_rows[a]) for a in order) < MIN_SEEDS:
        return None  # too few seeds at all: the refusal that says so applies
    if min(counts.values()) < MIN_SEEDS:
        found = ", ".join(f"{label(a)} {solved_count(arm_rows[a])}" for a in order)
        return f"no verdict: too few runs reached {comparison.at} (solved: {found}; need >= {MIN_SEEDS} per arm)"
    return None


def flag_unsolved(arm_rows: dict, order: list, label) -> str:
    """``; unsolved runs left out: RoPE 4/5 solved`` when an arm has runs that never solved ("" when none)."""
    partial = [f"{label(a)} {solved_count(arm_rows[a])}" for a in order
               if solved_count(arm_rows[a]) not in ("-", f"{len(arm_rows[a])}/{len(arm_rows[a])}")]
    return f"; unsolved runs have no value: {', '.join(partial)} solved" if partial else ""


def arm_summary(arm_rows: dict, level: float = LEVEL, rank: int = RANK) -> list[dict]:
    """One row per arm: runs, runs that never reached onset, runs that solved the task (``solved``, flagged by
    ``unsolved``), and per statistic its mean with the t-interval ``_low`` / ``_high`` (primary) and the
    percentile bootstrap ``_boot_low`` / ``_boot_high`` beside it."""
    out = []
    for arm, rows in arm_rows.items():
        solved = solved_count(rows)
        summary = {"arm": arm, "runs": len(rows), "never": sum(math.isnan(r["onset_depth"]) for r in rows),
                   "solved": solved, "unsolved": solved != "-" and not solved.startswith(f"{len(rows)}/")}
        for key, _ in statistics(rank):
            values = [r.get(key, math.nan) for r in rows]
            mean, low, high = t_interval(values, level)
            _, boot_low, boot_high = bootstrap_ci(values, level)
            summary.update({key: mean, f"{key}_low": low, f"{key}_high": high, f"{key}_boot_low": boot_low,
                            f"{key}_boot_high": boot_high})
        out.append(summary)
    return out


def arm_label(factor: str, arm) -> str:
    """An arm as every figure and W&B run name writes it (``nope``, ``slope0.5``: common.run_names)."""
    return alias(factor, arm)


def profiles(runs_by_arm: dict[str, list[Run]], keys: list[str], level: float = LEVEL, factor: str = "") -> list[dict]:
    """Per arm, per layer: mean and t-interval band across seeds of each per-layer column (final records)."""
    arms = []
    for arm, runs in runs_by_arm.items():
        n_layers = {len(r.final.layers) for r in runs}
        if len(n_layers) != 1:
            raise UserError(f"arm {arm!r} mixes depths {sorted(n_layers)}; compare runs of one architecture")
        depth, curves = n_layers.pop(), {}
        for key in keys:
            per_layer = [t_interval([r.final.layers[i].value(key) for r in runs], level)
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
        steps.append(record.step)
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
