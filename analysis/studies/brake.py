"""The brake-ordering prediction (paper Section 7, untested there) and the ALiBi slope sweep.

Every position scheme is a brake on the content attractor: NoPE none, RoPE weak, ALiBi (-m|i-j|, RWKV's
decay x gap) strong. Predicted: onset depth NoPE < RoPE < ALiBi, and strength (peak max share, area of the
profile above the causal-uniform baseline) in the reverse order; along training, NoPE crosses onset first.
Small runs may never reach the 0.20 threshold (docs/decisions.md), so the verdict rests on each
statistic separately, with the threshold-free ones beside onset. Within one scheme, the ALiBi slope scale
is a continuous brake: onset should move later and the peak fall as the scale grows (a trend, Spearman).

Each statistic is judged between neighbouring arms (weakest to strongest brake): the difference of arm means
with its Welch t-interval (the bootstrap interval beside it), Hedges' g, the exact permutation p and the
design's detectable effect (analysis.reports.stats.compare_arms); a trend by Spearman's rho with its Fisher-z
interval. The statistic *supports* the prediction when every neighbouring interval lies on the predicted
side of zero, *contradicts* it when one lies on the other side, and is *inconclusive* otherwise, with the
effect the design could have detected (docs/statistics.md). P(predicted order) over bootstrap resamples is
reported beside it. Fewer than MIN_SEEDS runs with a value in an arm: "no verdict".

The primary comparisons read each run where it has learned the task (at solved_step and solved_step + k);
the final records (matched step) are the secondary ones. ``learned`` positions are tabulated, not ordered.

What is predicted is data: the factor, the order of arms, the statistics, where each is read and which way
each should move are the study's spec (conf/study/brake_ordering.yaml, alibi_slope.yaml; ``analysis.studies.spec``).
"""
from __future__ import annotations

import math

from analysis.studies import spec as studies
from analysis.studies.arms import (MIN_SEEDS, arm_curves, arm_label, arm_summary, flag_unsolved, gate_refusal, group,
                           run_row, solved_count)
from analysis.readers.runs import Run
from analysis.reports.stats import (compare_arms, min_detectable_rho, nanmean, order_probability, spearman, spearman_ci,
                            spearman_interval, verdict_word)
from analysis.studies.spec import Comparison, Study
from analysis.reports.tables import cell
from common.constants import COMPLETION_THRESHOLD, LEVEL, ONSET_THRESHOLD
from common.errors import UserError

SUPPORTED = 0.95  # P(predicted order) reported as "confident" beside the verdict


def too_few_seeds(counts: dict[str, int]) -> str | None:
    """The refusal when an arm (by label) has fewer than MIN_SEEDS runs with a value (None when all have enough)."""
    if min(counts.values()) >= MIN_SEEDS:
        return None
    found = ", ".join(f"{n} x {arm}" for arm, n in counts.items())
    return f"no verdict: too few seeds (runs per arm: {found}; need >= {MIN_SEEDS})"


def combine(words: list[str], mdes: list[float], names: list[str]) -> str:
    """One verdict from the neighbouring pairs' words (analysis.reports.stats.verdict_word): contradicts when any pair's
    interval lies on the wrong side (naming it), supports when every pair's lies on the predicted side, else
    inconclusive with the largest detectable effect among the pairs whose interval spans zero."""
    if any(w.startswith("undetermined") for w in words):
        return next(w for w in words if w.startswith("undetermined"))
    wrong = [name for w, name in zip(words, names) if w == "contradicts"]
    if wrong:
        return f"contradicts ({', '.join(wrong)} on the other side of 0)"
    if all(w == "supports" for w in words):
        return "supports"
    spanning = [m for w, m in zip(words, mdes) if w.startswith("inconclusive")]
    detectable = max(spanning) if spanning and not any(math.isnan(m) for m in spanning) else math.nan
    return f"inconclusive (interval spans 0; detectable >= {_g(detectable)})"


def _g(value: float) -> str:
    return "-" if math.isnan(value) else f"{value:.3g}"


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
                    level: float = LEVEL, labels: dict | None = None) -> list[dict]:
    """One verdict per statistic: observed order, each neighbouring pair's effect (difference, t-interval,
    bootstrap interval, Hedges' g, permutation p, detectable effect), P(predicted order), P(reverse), and the
    verdict. ``order``: the arms present, weakest to strongest brake; ``labels``: how the verdict names each arm."""
    def _label(arm) -> str:
        return (labels or {}).get(arm, str(arm))

    crossed = any(not math.isnan(r["onset_depth"]) for rows in arm_rows.values() for r in rows)
    checks = []
    for comparison in comparisons:
        key, sign, label = comparison.key, comparison.sign, comparison.label
        groups = [[r[key] for r in arm_rows[a]] for a in order]
        signed = [[sign * v for v in g] for g in groups]
        p, p_rev = order_probability(signed), order_probability(signed[::-1])
        pairs = [compare_arms(a, b, level) for a, b in zip(groups, groups[1:])]
        names = [f"{_label(b)} - {_label(a)}" for a, b in zip(order, order[1:])]
        verdict = combine([verdict_word(c["low"], c["high"], c["mde"], sign) for c in pairs],
                          [c["mde"] for c in pairs], names)
        refusal = too_few_seeds({_label(a): sum(not math.isnan(v) for v in g) for a, g in zip(order, groups)})
        if comparison.statistic.startswith("onset") and not crossed:
            verdict = f"undetermined: no run's max share exceeded threshold {threshold}"
        elif gate := gate_refusal(comparison, arm_rows, order, _label):
            verdict = gate
        elif refusal and not verdict.startswith("undetermined"):
            verdict = refusal
        elif comparison.gated:
            verdict += flag_unsolved(arm_rows, order, _label)
        checks.append({"statistic": label, "key": key, "at": comparison.at,
                       "predicted": (" < " if sign > 0 else " > ").join(_label(a) for a in order),
                       "observed": observed_order({a: arm_rows[a] for a in order}, key, descending=sign < 0,
                                                  labels=labels),
                       "effects": " | ".join(f"{n} {effect_text(c)}" for n, c in zip(names, pairs)),
                       "p_perm": _largest([c["p_perm"] for c in pairs]),
                       "detectable": _largest([c["mde"] for c in pairs]),
                       "solved": ", ".join(f"{_label(a)} {solved_count(arm_rows[a])}" for a in order),
                       "p_predicted": p, "p_reverse": p_rev, "verdict": verdict})
    return checks


def _largest(values: list[float]) -> float:
    """The weakest link of an ordering (largest p, largest detectable effect); nan when any is unknown."""
    return math.nan if not values or any(math.isnan(v) for v in values) else max(values)


def effect_text(c: dict) -> str:
    """One difference as a verdict states it: ``+0.012 [t 0.0041, 0.02; boot 0.006, 0.018] g +1.9 p 0.008 MDE 0.01``
    (significant digits: small effects keep their sign)."""
    return (f"{c['difference']:+.3g} [t {_g(c['low'])}, {_g(c['high'])}; boot {_g(c['boot_low'])}, "
            f"{_g(c['boot_high'])}] g {_signed(c['hedges_g'])} p {_g(c['p_perm'])} MDE {_g(c['mde'])}")


def _signed(value: float) -> str:
    return "-" if math.isnan(value) else f"{value:+.2g}"


def trend_checks(rows: list[dict], comparisons: tuple[Comparison, ...], level: float = LEVEL,
                 factor: str = "") -> list[dict]:
    """Along a numeric brake (ALiBi slope scale): Spearman rho of each statistic against the scale, per run,
    with its Fisher-z interval (primary) and bootstrap interval (runs resampled within each scale), and the
    smallest |rho| the runs could detect."""
    scales = [float(r["arm"]) for r in rows]
    arm_rows = group(rows, sorted(set(scales)))
    order = list(arm_rows)
    name = lambda arm: arm_label(factor, arm)  # noqa: E731
    checks = []
    for comparison in comparisons:
        key, sign, label = comparison.key, comparison.sign, comparison.label
        values = [r[key] for r in rows]
        rho, p = spearman(scales, values)
        low, high = spearman_interval(scales, values, level)
        boot_low, boot_high = spearman_ci(scales, values, level)
        n = sum(not math.isnan(v) for v in values)
        mde = min_detectable_rho(n)
        counts: dict = {}
        for row, value in zip(rows, values):
            counts[name(row["arm"])] = counts.get(name(row["arm"]), 0) + (not math.isnan(value))
        if gate := gate_refusal(comparison, arm_rows, order, name):
            verdict = gate
        elif math.isnan(rho):
            verdict = "undetermined (constant or too few runs)"
        elif refusal := too_few_seeds(counts):
            verdict = refusal
        else:
            verdict = verdict_word(low, high, mde, None if comparison.expected is None else sign)
            verdict += flag_unsolved(arm_rows, order, name) if comparison.gated else ""
        predicted = "-" if comparison.expected is None else "rises with scale" if sign > 0 else "falls with scale"
        checks.append({"statistic": label, "key": key, "at": comparison.at, "predicted": predicted, "spearman_rho": rho,
                       "rho_low": low, "rho_high": high, "rho_boot_low": boot_low, "rho_boot_high": boot_high,
                       "p": p, "detectable": mde, "runs": n, "verdict": verdict})
    return checks


def overall(checks: list[dict]) -> str:
    """The study's verdict from its statistics': a refusal for too few seeds first; contradicted when any
    statistic contradicts; supported when every determinable predicted one supports; otherwise not established."""
    refused = [c["verdict"] for c in checks if c["verdict"].startswith("no verdict: too few seeds")]
    if refused:
        return refused[0]
    # statistics the spec predicts nothing about (predicted "-") are reported beside the verdict, not part of it
    decided = [c for c in checks if c["verdict"].startswith(("supports", "contradicts", "inconclusive"))
               and c.get("predicted") != "-"]
    if not decided:  # e.g. too few runs solved the task to read them there
        return next((c["verdict"] for c in checks if c["verdict"].startswith("no verdict")), "undetermined")
    if any(c["verdict"].startswith("contradicts") for c in decided):
        return "contradicted by " + ", ".join(c["statistic"] for c in decided if c["verdict"].startswith("contradicts"))
    if all(c["verdict"].startswith("supports") for c in decided):
        return "supported by every determinable statistic"
    return "not established (" + ", ".join(f"{c['statistic']}: {c['verdict']}" for c in decided) + ")"


def brake_study(runs: list[Run], study: Study | None = None, threshold: float = ONSET_THRESHOLD, completion: float = COMPLETION_THRESHOLD,
                level: float = LEVEL) -> dict:
    """Per-run rows, per-arm summaries with CIs, ordering (or trend) checks, depth profiles and trajectories.
    ``study``: an ordering or a trend spec (default conf/study/brake_ordering.yaml), at its rank."""
    study = study or studies.load("brake_ordering")
    factor, rank = study.factor, study.rank
    rows = [run_row(run, factor, threshold, completion, rank, study.solved_k, study.solved_margin) for run in runs]
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
    primary = overall([c for c in checks if c["at"] != "step"])
    secondary = overall([c for c in checks if c["at"] == "step"])
    return {"study": study.name, "kind": study.kind, "factor": factor, "threshold": threshold,
            "prediction": study.prediction, "labels": study.labels, "rows": rows, "solved_k": study.solved_k,
            "verdict_solved": primary, "verdict_step": secondary, "verdict": headline(primary, secondary),
            "arms": arm_summary(arm_rows, level, rank), "checks": checks,
            **arm_curves(runs, rows, list(arm_rows), threshold, level, rank, factor), "level": level, "rank": rank}


def headline(primary: str, secondary: str) -> str:
    """The study's verdict: the learning-gated one; where that cannot be given, why, and the matched-step one."""
    if primary == "undetermined":
        return f"{secondary} (at matched step only: no learning-gated comparison was determinable)"
    if primary.startswith("no verdict"):
        return f"{primary}; at matched step: {secondary}"
    return primary


def verdict_text(result: dict) -> str:
    """The plain-language verdict block of docs/results.md and the study's verdict.md."""
    arms, labels, trend = result["arms"], result["labels"], result["kind"] == "trend"
    seeds = ", ".join(f"{labels.get(a['arm'], str(a['arm']))}: {a['runs']} runs ({a['never']} never reach onset, "
                      f"{a['solved']} solved{' -- FLAGGED' if a['unsolved'] else ''})" for a in arms)
    k = result["solved_k"]
    lines = [f"Factor `{result['factor']}`; onset threshold {result['threshold']}; {seeds}.", "",
             result["prediction"], ""]
    for c in result["checks"]:
        where = {"solved": "at solved_step", "solved+k": f"at solved_step + {k}", "step": "at matched step"}[c["at"]]
        if trend:
            lines.append(f"- {c['statistic']} ({where}): {c['predicted']}; Spearman rho = {cell(c['spearman_rho'])} "
                         f"[Fisher {cell(c['rho_low'])}, {cell(c['rho_high'])}; boot {cell(c['rho_boot_low'])}, "
                         f"{cell(c['rho_boot_high'])}] (p = {cell(c['p'])}, {c['runs']} runs, detectable |rho| >= "
                         f"{cell(c['detectable'], 2)}) -> **{c['verdict']}**")
        else:
            lines.append(f"- {c['statistic']} ({where}): predicted {c['predicted']}; observed {c['observed']}; "
                         f"P(predicted order) = {cell(c['p_predicted'], 2)}, P(reverse) = {cell(c['p_reverse'], 2)} "
                         f"-> **{c['verdict']}**")
            lines += [f"  - {effect}" for effect in c["effects"].split(" | ")]
    lines += ["", f"Primary, where each run has learned the task (at solved_step and solved_step + {k}): "
              f"**{result['verdict_solved']}**.",
              f"Secondary, at matched step (the final records): **{result['verdict_step']}**."]
    level = int(100 * result["level"])
    interval = ("Fisher-z intervals of Spearman's rho (variance 1.06 / (n - 3)), bootstrap beside" if trend else
                "Welch t-intervals of each difference of arm means (percentile bootstrap beside it); g: Hedges' g; "
                "p: exact permutation test; MDE: the smallest difference this design detects (two-sided t-test, "
                "alpha 0.05, power 0.8, the arms' n and pooled sd)")
    lines += ["", f"**Verdict: {result['verdict']}.** {level}% {interval}. A statistic supports the prediction when "
              f"every interval lies on the predicted side of zero, contradicts it when one lies on the other side, "
              f"and is inconclusive otherwise; at least {MIN_SEEDS} runs with a value per arm (docs/statistics.md)."]
    return "\n".join(lines)
