"""The brake-ordering prediction (paper Section 7, untested there) and the ALiBi slope sweep.

Every position scheme is a brake on the content attractor: NoPE none, RoPE weak, ALiBi (-m|i-j|, RWKV's
decay x gap) strong. Predicted: onset depth NoPE < RoPE < ALiBi, and strength (peak max share, area of the
profile above the causal-uniform baseline) in the reverse order; along training, NoPE crosses onset first.
Small runs may never reach the 0.20 threshold (docs/decisions.md), so the verdict rests on each
statistic separately, with the threshold-free ones beside onset. Within one scheme, the ALiBi slope scale
is a continuous brake: onset should move later and the peak fall as the scale grows (a trend, Spearman).

Confidence = the share of bootstrap resamples (seeds resampled within each arm) in which the arm means fall
in the predicted order; effect sizes = the differences between neighbouring arms (a trend: Spearman's rho),
each with its bootstrap interval. A verdict needs MIN_SEEDS runs per arm and every interval on one side of
zero; otherwise the study says "no verdict" and why. ``learned`` positions are tabulated but the paper makes
no prediction for them.
"""
from __future__ import annotations

import math

from analysis.arms import (MIN_SEEDS, add_matched_loss, arm_label, arm_summary, group, mean_curve, profiles, run_row,
                           trajectory)
from analysis.runs import Run
from analysis.stats import bootstrap_difference_ci, order_probability, spearman, spearman_ci
from analysis.tables import cell
from common.errors import UserError

ORDER = ["nope", "rope", "alibi"]  # weakest to strongest brake
NAMES = {"nope": "NoPE", "rope": "RoPE", "alibi": "ALiBi", "learned": "learned"}
# (statistic, +1 if it should grow with the brake / -1 if it should shrink, label)
CHECKS = [("onset_depth_censored", +1, "onset depth (never = 1)"),
          ("onset_step_censored", +1, "onset step in training (never = end + 1)"),
          ("peak_max_share", -1, "peak max share"),
          ("peak_gain", -1, "peak max share gained in training (final - first record)"),
          ("area_above_baseline", -1, "area above causal-uniform baseline"),
          ("onset_loss_censored", -1, "training loss at onset (never = 0): crossing earlier in learning"),
          ("peak_max_share_matched", -1, "peak max share at matched training loss"),
          ("area_above_baseline_matched", -1, "area above baseline at matched training loss")]
AT_STEP = {"onset_depth_censored", "onset_step_censored", "peak_max_share", "peak_gain", "area_above_baseline"}
SUPPORTED = 0.95
NO_INTERVAL = "no verdict: an interval includes zero"


def too_few_seeds(counts: dict[str, int]) -> str | None:
    """The refusal when an arm (by label) has fewer than MIN_SEEDS runs with a value (None when all have enough)."""
    if min(counts.values()) >= MIN_SEEDS:
        return None
    found = ", ".join(f"{n} x {arm}" for arm, n in counts.items())
    return f"no verdict: too few seeds (runs per arm: {found}; need >= {MIN_SEEDS})"


def classify(p: float, p_reverse: float, differences: list[tuple[float, float, float]]) -> str:
    """``differences``: (mean, low, high) of each neighbouring pair of arms in the predicted order, signed so
    that the prediction says positive. Supported or contradicted only when P says so and no interval
    includes zero."""
    if math.isnan(p):
        return "undetermined"
    if p >= SUPPORTED and all(low > 0 for _, low, _ in differences):
        return "supported"
    if p_reverse >= SUPPORTED and all(high < 0 for _, _, high in differences):
        return "contradicted (reverse order)"
    return NO_INTERVAL


def _label(arm) -> str:
    return NAMES.get(arm, str(arm))


def observed_order(arm_rows: dict, key: str, descending: bool = False) -> str:
    """Arms sorted by the mean of ``key``, as ``NoPE 0.0833 < RoPE 0.25 = ALiBi 1`` (``>`` when descending)."""
    means = {arm: _mean([r[key] for r in rows]) for arm, rows in arm_rows.items()}
    ranked = sorted(means, key=lambda a: (math.isnan(means[a]), -means[a] if descending else means[a]))
    text = f"{_label(ranked[0])} {means[ranked[0]]:.3g}"
    for prev, arm in zip(ranked, ranked[1:]):
        text += f" {'=' if means[arm] == means[prev] else '>' if descending else '<'} {_label(arm)} {means[arm]:.3g}"
    return text


def _mean(values) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return sum(finite) / len(finite) if finite else math.nan


def ordering_checks(arm_rows: dict, order: list, threshold: float, level: float = 0.95) -> list[dict]:
    """One verdict per statistic: observed order, the differences between neighbouring arms with their
    intervals, P(predicted order), P(reverse), and its classification."""
    crossed = any(not math.isnan(r["onset_depth"]) for rows in arm_rows.values() for r in rows)
    checks = []
    for key, sign, label in CHECKS:
        groups = [[sign * r[key] for r in arm_rows[a]] for a in order]
        p, p_rev = order_probability(groups), order_probability(groups[::-1])
        differences = [bootstrap_difference_ci(a, b, level) for a, b in zip(groups, groups[1:])]
        verdict = classify(p, p_rev, differences)
        refusal = too_few_seeds({_label(a): sum(not math.isnan(v) for v in g) for a, g in zip(order, groups)})
        if math.isnan(p) and key.endswith(("_matched", "onset_loss_censored")):
            verdict = "undetermined: the records carry no training loss (runs older than the loss field)"
        elif key.startswith("onset") and not crossed:
            verdict = f"undetermined: no run's max share exceeded threshold {threshold}"
        elif refusal and not verdict.startswith("undetermined"):
            verdict = refusal
        names = [_label(a) for a in order]
        effects = [f"{_label(b)} - {_label(a)} {_effect(sign, d)}" for a, b, d in zip(order, order[1:], differences)]
        checks.append({"statistic": label, "key": key, "predicted": (" < " if sign > 0 else " > ").join(names),
                       "observed": observed_order({a: arm_rows[a] for a in order}, key, descending=sign < 0),
                       "effects": "; ".join(effects), "p_predicted": p, "p_reverse": p_rev, "verdict": verdict})
    return checks


def _effect(sign: int, difference: tuple[float, float, float]) -> str:
    """A difference of signed values back in the statistic's own units: ``+0.012 [0.0041, 0.02]``."""
    mean, low, high = (sign * v for v in difference)
    low, high = min(low, high), max(low, high)
    return f"{mean:+.3g} [{low:.3g}, {high:.3g}]"  # significant digits: small effects keep their sign


def trend_checks(rows: list[dict], level: float = 0.95, factor: str = "") -> list[dict]:
    """Along a numeric brake (ALiBi slope scale): Spearman rho of each statistic against the scale, per run,
    with its bootstrap interval (runs resampled within each scale)."""
    scales = [float(r["arm"]) for r in rows]
    checks = []
    for key, sign, label in CHECKS:
        values = [r[key] for r in rows]
        rho, p = spearman(scales, values)
        low, high = spearman_ci(scales, values, level)
        counts: dict = {}
        for row, value in zip(rows, values):
            arm = arm_label(factor, row["arm"])
            counts[arm] = counts.get(arm, 0) + (not math.isnan(value))
        if math.isnan(rho):
            verdict = "undetermined (constant or too few runs)"
        elif refusal := too_few_seeds(counts):
            verdict = refusal
        elif p < 0.05 and (low > 0 or high < 0):
            verdict = "supported" if rho * sign > 0 else "contradicted (opposite trend)"
        else:
            verdict = NO_INTERVAL if low <= 0 <= high else f"no verdict: p = {p:.2g} >= 0.05"
        checks.append({"statistic": label, "key": key, "predicted": "rises with scale" if sign > 0 else
                       "falls with scale", "spearman_rho": rho, "rho_low": low, "rho_high": high, "p": p,
                       "verdict": verdict})
    return checks


def overall(checks: list[dict]) -> str:
    refused = [c["verdict"] for c in checks if c["verdict"].startswith("no verdict: too few seeds")]
    if refused:
        return refused[0]
    decided = [c for c in checks if not c["verdict"].startswith("undetermined")]
    if not decided:
        return "undetermined"
    if any(c["verdict"].startswith("contradicted") for c in decided):
        return "contradicted by " + ", ".join(c["statistic"] for c in decided if c["verdict"].startswith("contradicted"))
    if all(c["verdict"] == "supported" for c in decided):
        return "supported by every determinable statistic"
    return "not established (" + ", ".join(f"{c['statistic']}: {c['verdict']}" for c in decided) + ")"


def brake_study(runs: list[Run], factor: str = "router.position", threshold: float = 0.2, completion: float = 0.5,
                level: float = 0.95, rank: int = 8) -> dict:
    """Per-run rows, per-arm summaries with CIs, ordering (or trend) checks, depth profiles and trajectories."""
    rows = [run_row(run, factor, threshold, completion, rank) for run in runs]
    matched = add_matched_loss(rows, runs, threshold, completion, rank)
    numeric = all(isinstance(r["arm"], (int, float)) and not isinstance(r["arm"], bool) for r in rows)
    arm_rows = group(rows, sorted({r["arm"] for r in rows}) if numeric else ORDER + ["learned"])
    if numeric:
        checks = trend_checks(rows, level, factor)
    else:
        order = [a for a in ORDER if a in arm_rows]
        if len(order) < 2:
            raise UserError(f"the brake ordering needs at least two of {', '.join(ORDER)} in {factor}; the sweep has "
                            f"{', '.join(map(str, arm_rows))}. For a numeric brake pass factor=router.alibi_slope_scale")
        checks = ordering_checks(arm_rows, order, threshold, level)
    runs_by_arm = {arm: [run for run, row in zip(runs, rows) if row["arm"] == arm] for arm in arm_rows}
    curves = []
    for i, (arm, arm_runs) in enumerate(runs_by_arm.items()):
        per_run = [trajectory(run, threshold, rank) for run in arm_runs]
        curves.append({"label": arm_label(factor, arm), "color": f"C{i}", **mean_curve(per_run)})
        curves += [{"label": None, "color": f"C{i}", **c, "style": "-", "alpha": 0.3} for c in per_run]
    step_checks = [c for c in checks if c["key"] in AT_STEP]
    loss_checks = [c for c in checks if c["key"] not in AT_STEP]
    return {"factor": factor, "threshold": threshold, "numeric": numeric, "rows": rows, "matched_loss": matched,
            "verdict_step": overall(step_checks), "verdict_loss": overall(loss_checks),
            "arms": arm_summary(arm_rows, level), "checks": checks, "verdict": overall(checks),
            "profiles": profiles(runs_by_arm, ["max_share", f"ve@{rank}", f"ve@{rank}_shuffle", "norm_cv"], level,
                                 factor), "curves": curves,
            "level": level, "rank": rank}


def verdict_text(result: dict) -> str:
    """The plain-language verdict block of docs/results.md and the study's verdict.md."""
    arms = result["arms"]
    seeds = ", ".join(f"{_label(a['arm'])}: {a['runs']} runs ({a['never']} never reach onset)" for a in arms)
    lines = [f"Factor `{result['factor']}`; onset threshold {result['threshold']}; {seeds}.", ""]
    if result["numeric"]:
        lines.append("Prediction: a larger ALiBi slope scale is a stronger brake: onset later, concentration lower.")
    else:
        lines.append("Prediction (Section 7): onset NoPE < RoPE < ALiBi; peak and area in the reverse order.")
    lines.append("")
    for c in result["checks"]:
        if result["numeric"]:
            lines.append(f"- {c['statistic']}: {c['predicted']}; Spearman rho = {cell(c['spearman_rho'])} "
                         f"[{cell(c['rho_low'])}, {cell(c['rho_high'])}] (p = {cell(c['p'])}) -> **{c['verdict']}**")
        else:
            lines.append(f"- {c['statistic']}: predicted {c['predicted']}; observed {c['observed']}; "
                         f"differences {c['effects']}; P(predicted order) = {cell(c['p_predicted'], 2)}, "
                         f"P(reverse) = {cell(c['p_reverse'], 2)} -> **{c['verdict']}**")
    if not result["numeric"]:
        lines += ["", f"At matched step (the final records): **{result['verdict_step']}**.",
                  f"At matched training loss ({cell(result['matched_loss'])}, the slowest arm's best; each run read at "
                  f"its first record at or under it): **{result['verdict_loss']}**."]
    level = int(100 * result["level"])
    lines += ["", f"**Verdict: {result['verdict']}.** Intervals are {level}% bootstrap intervals over seeds; a "
              f"statistic supports the prediction when P(predicted order) >= {SUPPORTED} and no interval includes "
              f"zero, with at least {MIN_SEEDS} seeds per arm."]
    return "\n".join(lines)
