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

What is predicted is data: the factor, the order of arms, the statistics and which way each should move
are the study's spec (conf/study/brake_ordering.yaml, alibi_slope.yaml; ``analysis.studies``).
"""
from __future__ import annotations

import math

from analysis import studies
from analysis.arms import MIN_SEEDS, add_matched_loss, arm_curves, arm_label, arm_summary, group, run_row
from analysis.runs import Run
from analysis.stats import bootstrap_difference_ci, nanmean, order_probability, spearman, spearman_ci
from analysis.studies import Comparison, Study
from analysis.tables import cell
from common.constants import COMPLETION_THRESHOLD, ONSET_THRESHOLD
from common.errors import UserError

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


def observed_order(arm_rows: dict, key: str, descending: bool = False, labels: dict | None = None) -> str:
    """Arms sorted by the mean of ``key``, as ``NoPE 0.0833 < RoPE 0.25 = ALiBi 1`` (``>`` when descending);
    ``labels``: how to name each arm (default: as it is)."""
    def name(arm) -> str:
        return (labels or {}).get(arm, str(arm))

    means = {arm: nanmean([r[key] for r in rows]) for arm, rows in arm_rows.items()}
    ranked = sorted(means, key=lambda a: (math.isnan(means[a]), -means[a] if descending else means[a]))
    text = f"{name(ranked[0])} {means[ranked[0]]:.3g}"
    for prev, arm in zip(ranked, ranked[1:]):
        text += f" {'=' if means[arm] == means[prev] else '>' if descending else '<'} {name(arm)} {means[arm]:.3g}"
    return text


def ordering_checks(arm_rows: dict, order: list, comparisons: tuple[Comparison, ...], threshold: float,
                    level: float = 0.95, labels: dict | None = None) -> list[dict]:
    """One verdict per statistic: observed order, the differences between neighbouring arms with their
    intervals, P(predicted order), P(reverse), and its classification. ``order``: the arms present, weakest
    to strongest brake; ``labels``: how the verdict names each arm."""
    def _label(arm) -> str:
        return (labels or {}).get(arm, str(arm))

    crossed = any(not math.isnan(r["onset_depth"]) for rows in arm_rows.values() for r in rows)
    checks = []
    for comparison in comparisons:
        key, sign, label = comparison.statistic, comparison.sign, comparison.label
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
                       "observed": observed_order({a: arm_rows[a] for a in order}, key, descending=sign < 0,
                                                  labels=labels),
                       "effects": "; ".join(effects), "p_predicted": p, "p_reverse": p_rev, "verdict": verdict})
    return checks


def _effect(sign: int, difference: tuple[float, float, float]) -> str:
    """A difference of signed values back in the statistic's own units: ``+0.012 [0.0041, 0.02]``."""
    mean, low, high = (sign * v for v in difference)
    low, high = min(low, high), max(low, high)
    return f"{mean:+.3g} [{low:.3g}, {high:.3g}]"  # significant digits: small effects keep their sign


def trend_checks(rows: list[dict], comparisons: tuple[Comparison, ...], level: float = 0.95,
                 factor: str = "") -> list[dict]:
    """Along a numeric brake (ALiBi slope scale): Spearman rho of each statistic against the scale, per run,
    with its bootstrap interval (runs resampled within each scale)."""
    scales = [float(r["arm"]) for r in rows]
    checks = []
    for comparison in comparisons:
        key, sign, label = comparison.statistic, comparison.sign, comparison.label
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


def brake_study(runs: list[Run], study: Study | None = None, threshold: float = ONSET_THRESHOLD, completion: float = COMPLETION_THRESHOLD,
                level: float = 0.95) -> dict:
    """Per-run rows, per-arm summaries with CIs, ordering (or trend) checks, depth profiles and trajectories.
    ``study``: an ordering or a trend spec (default conf/study/brake_ordering.yaml), at its rank."""
    study = study or studies.load("brake_ordering")
    factor, rank = study.factor, study.rank
    rows = [run_row(run, factor, threshold, completion, rank) for run in runs]
    matched = add_matched_loss(rows, runs, threshold, completion, rank)
    numeric = all(isinstance(r["arm"], (int, float)) and not isinstance(r["arm"], bool) for r in rows)
    if study.kind == "trend":
        if not numeric:
            raise UserError(f"study={study.name} reads a trend along a numeric factor; the sweep's {factor} has "
                            f"{', '.join(sorted({str(r['arm']) for r in rows}))}. Pass factor=<a numeric axis>")
        arm_rows = group(rows, sorted({r["arm"] for r in rows}))
        checks = trend_checks(rows, study.comparisons, level, factor)
    else:
        arm_rows = group(rows, list(study.order) + [a for a in study.labels if a not in study.order])
        order = [a for a in study.order if a in arm_rows]
        if len(order) < 2:
            raise UserError(f"the brake ordering needs at least two of {', '.join(study.order)} in {factor}; the sweep "
                            f"has {', '.join(map(str, arm_rows))}. For a numeric brake pass study=alibi_slope")
        checks = ordering_checks(arm_rows, order, study.comparisons, threshold, level, study.labels)
    at_step = {c.statistic for c in study.comparisons if c.at == "step"}
    step_checks = [c for c in checks if c["key"] in at_step]
    loss_checks = [c for c in checks if c["key"] not in at_step]
    return {"study": study.name, "kind": study.kind, "factor": factor, "threshold": threshold,
            "prediction": study.prediction, "labels": study.labels, "rows": rows, "matched_loss": matched,
            "verdict_step": overall(step_checks), "verdict_loss": overall(loss_checks),
            "arms": arm_summary(arm_rows, level, rank), "checks": checks, "verdict": overall(checks),
            **arm_curves(runs, rows, list(arm_rows), threshold, level, rank, factor), "level": level, "rank": rank}


def verdict_text(result: dict) -> str:
    """The plain-language verdict block of docs/results.md and the study's verdict.md."""
    arms, labels, trend = result["arms"], result["labels"], result["kind"] == "trend"
    seeds = ", ".join(f"{labels.get(a['arm'], str(a['arm']))}: {a['runs']} runs ({a['never']} never reach onset)"
                      for a in arms)
    lines = [f"Factor `{result['factor']}`; onset threshold {result['threshold']}; {seeds}.", "",
             result["prediction"], ""]
    for c in result["checks"]:
        if trend:
            lines.append(f"- {c['statistic']}: {c['predicted']}; Spearman rho = {cell(c['spearman_rho'])} "
                         f"[{cell(c['rho_low'])}, {cell(c['rho_high'])}] (p = {cell(c['p'])}) -> **{c['verdict']}**")
        else:
            lines.append(f"- {c['statistic']}: predicted {c['predicted']}; observed {c['observed']}; "
                         f"differences {c['effects']}; P(predicted order) = {cell(c['p_predicted'], 2)}, "
                         f"P(reverse) = {cell(c['p_reverse'], 2)} -> **{c['verdict']}**")
    if not trend:
        lines += ["", f"At matched step (the final records): **{result['verdict_step']}**.",
                  f"At matched training loss ({cell(result['matched_loss'])}, the slowest arm's best; each run read at "
                  f"its first record at or under it): **{result['verdict_loss']}**."]
    level = int(100 * result["level"])
    lines += ["", f"**Verdict: {result['verdict']}.** Intervals are {level}% bootstrap intervals over seeds; a "
              f"statistic supports the prediction when P(predicted order) >= {SUPPORTED} and no interval includes "
              f"zero, with at least {MIN_SEEDS} seeds per arm."]
    return "\n".join(lines)
