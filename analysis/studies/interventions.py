"""Read-time interventions: each trained checkpoint re-read with one knob changed (the paper's protocol).

The Mamba Δ-freeze, the RWKV decay sweep and the AttnRes recency offset are, in the paper, changes made to an
already-trained model whose routing is then measured again: no retraining. A study of this kind takes a sweep
of seeds of one router family, loads every run's last checkpoint, switches each intervention on with the
router's ``set_interventions(**knobs)`` and measures the signature on the run's own probe. Every intervention
is compared with the unmodified model *within* each run (paired by seed): the mean change with its t-interval,
the exact sign-flip p and the smallest change the design detects.
"""
from __future__ import annotations

import math
from pathlib import Path

from analysis.readers.runs import Run, load_router
from analysis.reports.stats import compare_paired, nanmean, t_interval, verdict_word
from analysis.reports.tables import run_statistics
from common.constants import COMPLETION_THRESHOLD, LEVEL, ONSET_THRESHOLD, RANK
from common.errors import UserError
from records import model_record


def _intervene(router, knobs: dict, study_name: str):
    if not hasattr(router, "set_interventions"):
        raise UserError(f"study={study_name} re-reads routers under interventions; {type(router).__name__} has "
                        "no set_interventions (Mamba, RWKV and the AttnRes decoder do)")
    try:
        return router.set_interventions(**knobs)
    except TypeError as e:  # a knob this router does not have
        raise UserError(f"study={study_name}: {type(router).__name__}.set_interventions does not take "
                        f"{sorted(knobs)} ({e}); is the sweep of the study's router family?") from None


def measure_interventions(run: Run, interventions: list[dict], study_name: str, batch_size: int = 16,
                          threshold: float = ONSET_THRESHOLD, completion: float = COMPLETION_THRESHOLD, rank: int = RANK) -> list[dict]:
    """One row per intervention for ``run``: its label, the run's seed and the model-level statistics of the
    checkpoint re-read under it (``run_statistics``), and the per-layer max shares."""
    from analysis.readers.model import measure
    from datamodules.probe import TokenProbe

    probe_file = run.path / "probe.pt"
    if not probe_file.is_file():
        raise UserError(f"{run.path} has no probe.pt; study={study_name} re-reads each run on its own probe")
    router, _, step = load_router(run.path)
    probe = TokenProbe.load(probe_file)
    rows = []
    for spec in interventions:
        _intervene(router, dict(spec.get("set") or {}), study_name)
        signature = measure(router, probe, (1, rank), batch_size, threshold, completion,
                            f"{run.name} [{spec['label']}]")
        record = model_record(step, run.name, str(probe_file), signature)
        stats = run_statistics(record, threshold, completion, rank)
        rows.append({"run": run.name, "seed": run.get("seed"), "intervention": spec["label"], **stats,
                     "max_share_by_layer": record.max_share_curve()})
    return rows


def predicted_direction(spec: dict, comparison) -> str | None:
    """Which way ``comparison`` is predicted to move under intervention ``spec``. An intervention may say it
    itself: ``expected: higher`` (or ``lower``, or null: nothing) for every comparison that predicts a
    direction -- a grid whose settings push both ways, as less and more decay do -- or
    ``expected: {statistic: direction}`` per statistic, the others keeping the comparison's own."""
    own = spec.get("expected", ...)
    if isinstance(own, dict):
        return own.get(comparison.statistic, comparison.expected)
    if comparison.expected is None:
        return None
    return comparison.expected if own is ... else own


def intervention_study(runs: list[Run], study, batch_size: int = 16, threshold: float = ONSET_THRESHOLD,
                       completion: float = COMPLETION_THRESHOLD, level: float = LEVEL) -> dict:
    """Every run re-read under every intervention of ``study`` (conf/study/<name>.yaml, kind: intervention),
    then each intervention against ``study.reference`` paired by run, for each of the study's comparisons."""
    if len(runs) < 2:
        raise UserError(f"study={study.name} pairs each intervention with the unmodified model over seeds; the "
                        f"sweep has {len(runs)} run(s): train >= 3 seeds (docs/results.md)")
    labels = [spec["label"] for spec in study.interventions]
    if study.reference not in labels:
        raise UserError(f"study {study.name}: reference {study.reference!r} is not one of its interventions {labels}")
    rows = [row for run in runs for row in measure_interventions(run, list(study.interventions), study.name,
                                                                 batch_size, threshold, completion, study.rank)]
    by = {label: [row for row in rows if row["intervention"] == label] for label in labels}
    arms = []
    for label in labels:
        arm = {"intervention": label, "runs": len(by[label])}
        for c in study.comparisons:
            mean, low, high = t_interval([row[c.statistic] for row in by[label]], level)
            arm.update({c.statistic: mean, f"{c.statistic} low": low, f"{c.statistic} high": high})
        arms.append(arm)
    tests = []
    for spec in study.interventions:
        if spec["label"] == study.reference:
            continue
        for c in study.comparisons:
            result = compare_paired([row[c.statistic] for row in by[study.reference]],
                                    [row[c.statistic] for row in by[spec["label"]]], level)
            predicted = predicted_direction(spec, c)
            expected = None if predicted is None else (-1 if predicted == "lower" else +1)
            tests.append({"intervention": spec["label"], "statistic": c.label, **result,
                          "verdict": verdict_word(result["low"], result["high"], result["mde"], expected),
                          "predicted": predicted or "-"})
    profiles = [{"label": label, "max_share": [nanmean(values) for values in
                                               zip(*[row["max_share_by_layer"] for row in by[label]])]}
                for label in labels]
    return {"study": study.name, "rows": rows, "arms": arms, "comparisons": tests, "profiles": profiles,
            "reference": study.reference, "seeds": sorted({str(row["seed"]) for row in rows})}


def statement(result: dict) -> str:
    """The study in sentences: each predicted comparison, its mean change, interval, p and detectable effect."""
    lines = [f"Each of {len(result['seeds'])} runs (seeds {', '.join(result['seeds'])}) re-read under every "
             f"intervention and compared with itself unmodified ({result['reference']}): mean change, "
             "t-interval over runs, exact sign-flip p, detectable change at power 0.8."]
    for t in result["comparisons"]:
        if not math.isfinite(t["difference"]):
            lines.append(f"- {t['intervention']}, {t['statistic']}: no value")
            continue
        lines.append(f"- {t['intervention']}, {t['statistic']}: {t['difference']:+.3f} "
                     f"[{t['low']:+.3f}, {t['high']:+.3f}], p = {t['p_sign_flip']:.3g}, detectable >= "
                     f"{t['mde']:.3g} (predicted: {t['predicted']}) -> {t['verdict']}")
    return "\n".join(lines)


def profiles_figure(result: dict, baseline: list[float], title: str):
    """Max share by depth (layer ℓ drawn at ℓ/L) per intervention, the mean over runs, in the study's order
    (one colour ramp, so an ordered grid reads as one), with the causal-uniform baseline."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8.2, 4.2))
    colours = plt.get_cmap("viridis")
    n = max(len(result["profiles"]) - 1, 1)
    for i, profile in enumerate(result["profiles"]):
        shares = profile["max_share"]
        reference = profile["label"] == result["reference"]
        ax.plot([j / len(shares) for j in range(len(shares))], shares, marker="o", ms=4,
                color="black" if reference else colours(i / n), lw=2.2 if reference else 1.2,
                label=profile["label"] + (" (unmodified)" if reference else ""), zorder=3 if reference else 2)
    if baseline:
        ax.plot([j / len(baseline) for j in range(len(baseline))], baseline, ":", color="gray",
                label="uniform-routing baseline")
    ax.set_xlabel("depth ℓ/L (layer or sublayer ℓ of L, 0-based)")
    ax.set_ylabel("max share (mean over runs)")
    top = max([max(p["max_share"]) for p in result["profiles"] if p["max_share"]] + [max(baseline or [0])])
    ax.set_ylim(0, min(1.02, max(0.3, 1.15 * top)))  # shares are small at these sizes: room to read them
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    return fig


def write(result: dict, out: Path, title: str, sweep: str, level: float, baseline: list[float], about: str) -> list[Path]:
    """runs.csv (run x intervention), arms.csv (means with intervals), comparisons.csv, verdict.md, profiles.png."""
    import json

    import matplotlib.pyplot as plt

    from analysis.reports.tables import markdown, write_csv
    from common import atomic

    write_csv([{k: v for k, v in row.items() if k != "max_share_by_layer"} for row in result["rows"]],
              out / "runs.csv")
    write_csv(result["arms"], out / "arms.csv")
    write_csv(result["comparisons"], out / "comparisons.csv")
    text = statement(result)
    columns = ["intervention", "n", "statistic", "difference", "low", "high", "p_sign_flip", "mde", "predicted",
               "verdict"]
    atomic.write_text(out / "verdict.md", f"# {title}: {sweep}\n\n{about}.\n\n{text}\n\n## Changes against "
                      f"{result['reference']} ({level:.0%} t-interval over runs)\n\n"
                      f"{markdown(result['comparisons'], columns)}\n\n## Interventions (mean over runs)\n\n"
                      f"{markdown(result['arms'])}\n")
    atomic.write_text(out / "result.json", json.dumps({k: result[k] for k in ("study", "reference", "seeds",
                                                                             "comparisons")}, indent=1))
    figure = profiles_figure(result, baseline, f"{title}\n{about}")
    image = out / "profiles.png"
    atomic.save_figure(figure, image, dpi=110)
    plt.close(figure)
    print(text)
    return [image]
