"""The metric study: does a norm-aware score remove the compensation, and at what cost in loss?

Prop. 2 makes the learned metric s_M a new degree of freedom; Theorem 1 says the dot product is the
Euclidean router plus a key-norm bonus, so norm stratification is one way a norm-blind router compensates.
Each norm-aware score (``euclidean``, ``learned_metric``, ``normalized``) is compared with ``dot`` on the
same seeds: the difference of arm means with its Welch t-interval (the bootstrap interval beside it),
Hedges' g, the exact permutation p and the design's detectable effect (analysis.reports.stats.compare_arms), for
norm-CV (stratification), peak max share and area above baseline (concentration), VE@8 (geometry) and
validation loss (cost), each where the spec reads it: at solved_step, k steps after it, or the final record.
A difference "counts" only when its whole t-interval lies on one side of zero, and only with at least
``MIN_SEEDS`` runs with a value in each of the two arms (fewer: "too few seeds"; at solved_step a run that
never solved has no value, and the arms' solved counts are stated). The normalization study is this module
with conf/study/normalization_study.yaml. ``normalized`` keys have
constant norm by construction, so its lower norm-CV is design, not evidence; its concentration is the test
of the paper's claim that concentration does not need stratification.

The reference arm, the statistics, what each direction means and which ones the prediction covers are the
study's spec (conf/study/metric_study.yaml; ``analysis.studies.spec``).
"""
from __future__ import annotations

import math

from analysis.studies import spec as studies
from analysis.studies.arms import MIN_SEEDS, arm_curves, arm_summary, flag_unsolved, gate_refusal, group, run_row, solved_count
from analysis.readers.runs import Run
from analysis.reports.stats import compare_arms, verdict_word
from analysis.studies.spec import Study
from analysis.reports.tables import cell
from common.constants import COMPLETION_THRESHOLD, LEVEL, ONSET_THRESHOLD
from common.errors import UserError


def direction(low: float, high: float, seeds: tuple[int, int] = (MIN_SEEDS, MIN_SEEDS)) -> str:
    """lower / higher when the (t-)interval excludes zero; ``seeds``: the runs with a value in the two arms."""
    if min(seeds) < MIN_SEEDS:
        return f"too few seeds ({seeds[0]} and {seeds[1]} runs; need >= {MIN_SEEDS} per arm)"
    if math.isnan(low) or math.isnan(high):
        return "undetermined"
    if high < 0:
        return "lower"
    if low > 0:
        return "higher"
    return "no clear difference"


def _reading(says: str, c: dict, spec) -> str:
    """What one difference means: its meaning in words, then the verdict on the prediction where there is one
    and the words do not already say it (an inconclusive or undetermined verdict stands alone)."""
    if not spec.expected or c["verdict"] == says:
        return says
    return f"{says}; {c['verdict']}" if c["direction"] in ("lower", "higher") else c["verdict"]


def _open(direction: str) -> bool:
    """A direction that could not be judged (no values, too few runs with one)."""
    return direction.startswith(("undetermined", "too few"))


def metric_study(runs: list[Run], study: Study | None = None, threshold: float = ONSET_THRESHOLD, completion: float = COMPLETION_THRESHOLD,
                 level: float = LEVEL) -> dict:
    """Per-run rows, per-arm summaries, and each arm's difference to the reference arm for every comparison
    of ``study`` (default conf/study/metric_study.yaml), at its rank."""
    study = study or studies.load("metric_study")
    factor, rank, reference_arm = study.factor, study.rank, study.reference
    rows = [run_row(run, factor, threshold, completion, rank, study.solved_k, study.solved_margin) for run in runs]
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
            a, b = [r[c.key] for r in reference], [r[c.key] for r in arm_runs]
            test = compare_arms(a, b, level)
            seeds = (test["n_a"], test["n_b"])
            pair = {reference_arm: reference, arm: arm_runs}
            gate = gate_refusal(c, pair, list(pair), str)
            verdict = verdict_word(test["low"], test["high"], test["mde"], c.sign if c.expected else None)
            verdict = (gate if gate else direction(math.nan, math.nan, seeds) if min(seeds) < MIN_SEEDS else
                       verdict + (flag_unsolved(pair, list(pair), str) if c.gated else ""))
            comparisons.append({"score": arm, "statistic": c.label, "key": c.key, "at": c.at, **test,
                                "direction": gate or direction(test["low"], test["high"], seeds), "verdict": verdict,
                                "solved": f"{solved_count(reference)} vs {solved_count(arm_runs)}" if c.gated else "",
                                "meaning": c.lower})
    return {"study": study.name, "kind": study.kind, "factor": factor, "threshold": threshold,
            "reference": reference_arm, "spec": study.comparisons, "solved_k": study.solved_k, "rows": rows,
            "arms": arm_summary(arm_rows, level, rank),
            "comparisons": comparisons, "level": level, "rank": rank,
            **arm_curves(runs, rows, list(arm_rows), threshold, level, rank, factor)}


def statement(result: dict) -> str:
    """Per score, in words: stratification, concentration, geometry and loss relative to the reference, each
    with its effect, t-interval, permutation p and detectable effect."""
    level, reference, k = int(100 * result["level"]), result["reference"], result["solved_k"]
    lines = [f"Each difference is (arm - {reference}) of the arm means, with its {level}% Welch t-interval over "
             "seeds (bootstrap beside it), Hedges' g, the exact permutation p and the smallest difference the "
             "design detects (MDE: two-sided t-test, alpha 0.05, power 0.8); a direction is claimed only when the "
             "t-interval excludes zero. Read at solved_step (primary), "
             f"solved_step + {k}, or the final record (matched step), as each line says.", ""]
    by_score: dict = {}
    for c in result["comparisons"]:
        by_score.setdefault(c["score"], {})[c["key"]] = c
    predicted = [spec for spec in result["spec"] if spec.expected]
    arms = {a["arm"]: a for a in result["arms"]}
    for score, cs in by_score.items():
        parts = []
        for spec in result["spec"]:
            c = cs[spec.key]
            says = {"lower": spec.lower, "higher": spec.higher}.get(c["direction"], c["direction"])
            where = "" if spec.at == "step" else f" at {spec.at.replace('+k', f' + {k}')}"
            parts.append(f"{spec.label}{where} {cell(c['difference'])} [t {cell(c['low'])}, {cell(c['high'])}; boot "
                         f"{cell(c['boot_low'])}, {cell(c['boot_high'])}] g {cell(c['hedges_g'], 2)} p "
                         f"{cell(c['p_perm'])} MDE {cell(c['mde'])} ({_reading(says, c, spec)})")
        # The verdict rests on the learning-gated reads where they are determinable, else on the final records.
        gated = [spec for spec in predicted if spec.gated and not _open(cs[spec.key]["direction"])]
        basis = gated or [spec for spec in predicted if not spec.gated]
        removes = bool(basis) and all(cs[spec.key]["direction"] == spec.expected for spec in basis)
        first = cs[basis[0].key]["direction"] if basis else ""
        where = ", at solved_step" if gated else ", at matched step" if basis else ""
        solved = f" Solved: {reference} {arms[reference]['solved']}, {score} {arms[score]['solved']}." \
            if any(spec.gated for spec in result["spec"]) else ""
        lines.append(f"- **{score}**: " +
                     (f"No verdict: {first}." if first.startswith("too few") else
                      f"Removes both stratification and concentration ({where[2:]})." if removes else
                      f"Does not remove the compensation (stratification and concentration not both lower{where}).")
                     + solved)
        lines += [f"  - {part}" for part in parts]
    if "normalized" in by_score:
        lines += ["", "`normalized` keys all have norm sqrt(d_head) by construction: its norm-CV is ~0 by design; "
                  "whether it still concentrates is the test of 'concentration does not need stratification'."]
    return "\n".join(lines)
