"""The metric study: does a norm-aware score remove the compensation, and at what cost in loss?

Prop. 2 makes the learned metric s_M a new degree of freedom; Theorem 1 says the dot product is the
Euclidean router plus a key-norm bonus, so norm stratification is one way a norm-blind router compensates.
Each norm-aware score (``euclidean``, ``learned_metric``, ``normalized``) is compared with ``dot`` on the
same seeds: the difference of arm means with a bootstrap interval, for norm-CV (stratification), peak max
share and area above baseline (concentration), VE@8 (geometry) and validation loss (cost).
A difference "counts" only when its whole interval lies on one side of zero, and only with at least
``MIN_SEEDS`` runs in each of the two arms (fewer: "too few seeds"). ``normalized`` keys have
constant norm by construction, so its lower norm-CV is design, not evidence; its concentration is the test
of the paper's claim that concentration does not need stratification.
"""
from __future__ import annotations

import math

from analysis.arms import MIN_SEEDS, arm_label, arm_summary, group, mean_curve, profiles, run_row, trajectory
from analysis.runs import Run
from analysis.stats import bootstrap_difference_ci
from analysis.tables import cell
from common.errors import UserError

REFERENCE = "dot"
SCORES = ["dot", "euclidean", "learned_metric", "normalized"]
# (statistic, label, what a decrease means)
COMPARISONS = [("norm_cv", "norm-CV", "less norm stratification"),
               ("peak_max_share", "peak max share", "less concentration"),
               ("area_above_baseline", "area above baseline", "less concentration over depth"),
               ("ve@8", "VE@8", "less low-rank collapse"),
               ("onset_step_censored", "onset step (never = end + 1)", "earlier onset"),
               ("val_loss", "val loss", "better loss")]


def direction(low: float, high: float, seeds: tuple[int, int] = (MIN_SEEDS, MIN_SEEDS)) -> str:
    """lower / higher when the interval excludes zero; ``seeds``: the runs with a value in the two arms."""
    if min(seeds) < MIN_SEEDS:
        return f"too few seeds ({seeds[0]} and {seeds[1]} runs; need >= {MIN_SEEDS} per arm)"
    if math.isnan(low) or math.isnan(high):
        return "undetermined"
    if high < 0:
        return "lower"
    if low > 0:
        return "higher"
    return "no clear difference"


def metric_study(runs: list[Run], factor: str = "router.score", threshold: float = 0.2, completion: float = 0.5,
                 level: float = 0.95, rank: int = 8) -> dict:
    rows = [run_row(run, factor, threshold, completion, rank) for run in runs]
    arm_rows = group(rows, SCORES)
    if REFERENCE not in arm_rows or len(arm_rows) < 2:
        raise UserError(f"the metric study compares scores with {REFERENCE!r}; the sweep's {factor} has "
                        f"{', '.join(map(str, arm_rows))}. Sweep router/score=dot,euclidean,learned_metric,normalized")
    reference = arm_rows[REFERENCE]
    comparisons = []
    for arm, arm_runs in arm_rows.items():
        if arm == REFERENCE:
            continue
        for key, label, meaning in COMPARISONS:
            a, b = [r[key] for r in reference], [r[key] for r in arm_runs]
            diff, low, high = bootstrap_difference_ci(a, b, level)
            seeds = (sum(not math.isnan(v) for v in a), sum(not math.isnan(v) for v in b))
            comparisons.append({"score": arm, "statistic": label, "key": key, "difference": diff, "low": low,
                                "high": high, "direction": direction(low, high, seeds), "meaning": meaning})
    runs_by_arm = {arm: [run for run, row in zip(runs, rows) if row["arm"] == arm] for arm in arm_rows}
    curves = []
    for i, (arm, arm_runs) in enumerate(runs_by_arm.items()):
        per_run = [trajectory(run, threshold, rank) for run in arm_runs]
        curves.append({"label": arm_label(factor, arm), "color": f"C{i}", **mean_curve(per_run)})
        curves += [{"label": None, "color": f"C{i}", **c, "style": "-", "alpha": 0.3} for c in per_run]
    return {"factor": factor, "threshold": threshold, "rows": rows, "arms": arm_summary(arm_rows, level),
            "comparisons": comparisons, "level": level, "rank": rank, "curves": curves,
            "profiles": profiles(runs_by_arm, ["max_share", f"ve@{rank}", f"ve@{rank}_shuffle", "norm_cv"], level,
                                 factor)}


def statement(result: dict) -> str:
    """Per score, in words: stratification, concentration, geometry and loss relative to ``dot``."""
    level = int(100 * result["level"])
    lines = [f"Each difference is (score - {REFERENCE}) of the arm means, with its {level}% bootstrap interval "
             "over seeds; a direction is claimed only when the interval excludes zero.", ""]
    by_score: dict = {}
    for c in result["comparisons"]:
        by_score.setdefault(c["score"], {})[c["key"]] = c
    for score, cs in by_score.items():
        parts = []
        for key, label, meaning in COMPARISONS:
            c = cs[key]
            says = {"lower": meaning if key != "val_loss" else "lower loss",
                    "higher": "the opposite" if key != "val_loss" else "a loss cost"}.get(c["direction"], c["direction"])
            parts.append(f"{label} {cell(c['difference'])} [{cell(c['low'])}, {cell(c['high'])}] ({says})")
        removes = cs["norm_cv"]["direction"] == "lower" and cs["peak_max_share"]["direction"] == "lower"
        few = cs["norm_cv"]["direction"].startswith("too few")
        lines.append(f"- **{score}**: " + "; ".join(parts) + ". " +
                     (f"No verdict: {cs['norm_cv']['direction']}." if few else
                      "Removes both stratification and concentration." if removes else
                      "Does not remove the compensation (stratification and concentration not both lower)."))
    if "normalized" in by_score:
        lines += ["", "`normalized` keys all have norm sqrt(d_head) by construction: its norm-CV is ~0 by design; "
                  "whether it still concentrates is the test of 'concentration does not need stratification'."]
    return "\n".join(lines)
