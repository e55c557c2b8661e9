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

The reference arm, the statistics, what each direction means and which ones the prediction covers are the
study's spec (conf/study/metric_study.yaml; ``analysis.studies``).
"""
from __future__ import annotations

import math

from analysis import studies
from analysis.arms import MIN_SEEDS, arm_curves, arm_summary, group, run_row
from analysis.runs import Run
from analysis.stats import bootstrap_difference_ci
from analysis.studies import Study
from analysis.tables import cell
from common.constants import COMPLETION_THRESHOLD, ONSET_THRESHOLD
from common.errors import UserError


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


def metric_study(runs: list[Run], study: Study | None = None, threshold: float = ONSET_THRESHOLD, completion: float = COMPLETION_THRESHOLD,
                 level: float = 0.95) -> dict:
    """Per-run rows, per-arm summaries, and each arm's difference to the reference arm for every comparison
    of ``study`` (default conf/study/metric_study.yaml), at its rank."""
    study = study or studies.load("metric_study")
    factor, rank, reference_arm = study.factor, study.rank, study.reference
    rows = [run_row(run, factor, threshold, completion, rank) for run in runs]
    arm_rows = group(rows, list(study.order))
    if reference_arm not in arm_rows or len(arm_rows) < 2:
        raise UserError(f"study={study.name} compares each arm with {reference_arm!r}; the sweep's {factor} has "
                        f"{', '.join(map(str, arm_rows))}. Sweep {factor}={','.join(map(str, study.order))}")
    reference = arm_rows[reference_arm]
    comparisons = []
    for arm, arm_runs in arm_rows.items():
        if arm == reference_arm:
            continue
        for c in study.comparisons:
            a, b = [r[c.statistic] for r in reference], [r[c.statistic] for r in arm_runs]
            diff, low, high = bootstrap_difference_ci(a, b, level)
            seeds = (sum(not math.isnan(v) for v in a), sum(not math.isnan(v) for v in b))
            comparisons.append({"score": arm, "statistic": c.label, "key": c.statistic, "difference": diff, "low": low,
                                "high": high, "direction": direction(low, high, seeds), "meaning": c.lower})
    return {"study": study.name, "kind": study.kind, "factor": factor, "threshold": threshold,
            "reference": reference_arm, "spec": study.comparisons, "rows": rows, "arms": arm_summary(arm_rows, level, rank),
            "comparisons": comparisons, "level": level, "rank": rank,
            **arm_curves(runs, rows, list(arm_rows), threshold, level, rank, factor)}


def statement(result: dict) -> str:
    """Per score, in words: stratification, concentration, geometry and loss relative to the reference."""
    level, reference = int(100 * result["level"]), result["reference"]
    lines = [f"Each difference is (arm - {reference}) of the arm means, with its {level}% bootstrap interval "
             "over seeds; a direction is claimed only when the interval excludes zero.", ""]
    by_score: dict = {}
    for c in result["comparisons"]:
        by_score.setdefault(c["score"], {})[c["key"]] = c
    predicted = [spec for spec in result["spec"] if spec.expected]
    for score, cs in by_score.items():
        parts = []
        for spec in result["spec"]:
            c = cs[spec.statistic]
            says = {"lower": spec.lower, "higher": spec.higher}.get(c["direction"], c["direction"])
            parts.append(f"{spec.label} {cell(c['difference'])} [{cell(c['low'])}, {cell(c['high'])}] ({says})")
        removes = all(cs[spec.statistic]["direction"] == spec.expected for spec in predicted)
        first = cs[predicted[0].statistic]["direction"] if predicted else ""
        lines.append(f"- **{score}**: " + "; ".join(parts) + ". " +
                     (f"No verdict: {first}." if first.startswith("too few") else
                      "Removes both stratification and concentration." if removes else
                      "Does not remove the compensation (stratification and concentration not both lower)."))
    if "normalized" in by_score:
        lines += ["", "`normalized` keys all have norm sqrt(d_head) by construction: its norm-CV is ~0 by design; "
                  "whether it still concentrates is the test of 'concentration does not need stratification'."]
    return "\n".join(lines)
