"""Record -> table -> verdict logic of the studies, on hand-made sweeps whose answers are known."""
from __future__ import annotations

import csv
import json
import math

import pytest
import yaml

from analysis.studies import spec as studies
from analysis.studies.arms import record_at
from analysis.studies.brake import brake_study, verdict_text
from analysis.studies.metric import metric_study, statement
from analysis.readers.runs import factors, find_runs
from analysis.reports.tables import onset_step, run_statistics
from records import flat_metrics, from_history, typed

BASELINE = 0.05


def record(step, shares, norm_cv=0.2, ve=0.6, train_loss=None, val_loss=None, solved_loss=None):
    """A monitor record with the given per-layer max shares (summary fields as the signature computes them);
    ``solved_loss``: the task's solved level, which generated data writes into every record."""
    layers = [{"layer": i, "dim": 16, "max_share": s, "baseline": BASELINE, "norm_cv": norm_cv, "ve@8": ve,
               "ve@8_gauss": 0.3, "ve@8_shuffle": 0.4} for i, s in enumerate(shares)]
    peak = max(range(len(shares)), key=lambda i: shares[i])
    summary = {"peak_max_share": shares[peak], "peak_layer": peak, "norm_cv": norm_cv, "ve@8": ve,
               "area_above_baseline": sum(max(0, s - BASELINE) for s in shares) / len(shares)}
    out = {"step": step, "layers": layers, "summary": summary, "train_loss": train_loss, "val_loss": val_loss}
    return typed(out if solved_loss is None else {**out, "solved_loss": solved_loss})


def write_run(path, config, records, val_loss=3.0):
    (path / ".hydra").mkdir(parents=True)
    (path / ".hydra" / "config.yaml").write_text(yaml.safe_dump(config))
    (path / "collapse.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (path / "csv").mkdir()
    (path / "csv" / "metrics.csv").write_text(f"step,train/loss,val/loss\n10,4.0,\n20,,{val_loss}\n")


def onset_profile(onset, peak, n=8):
    """Max shares that first exceed 0.2 at layer ``onset`` (None: never) and peak at ``peak``."""
    shares = [0.06 + 0.01 * i for i in range(n)]
    if onset is not None:
        shares[onset:] = [max(0.21, peak - 0.02 * j) for j in range(n - onset)]
        shares[onset] = peak
    else:
        shares[-1] = peak
    return shares


def brake_sweep(tmp_path, arms, seeds=3, with_loss=True, solved_loss=2.5):
    """``arms``: {position: (onset layer at the end, peak, step at which onset first appears)}. Validation loss
    falls 4.0 - step / 200 (3.5 at step 100 ... 2.0 at 400); ``solved_loss`` (a number, or {position: number})
    sets where each arm solves: the default 2.5 at step 300, so solved + 100 reads step 400. ``with_loss``
    False: records older than the loss fields (no losses, no solved level)."""
    job = 0
    for position, (onset, peak, first_step) in arms.items():
        level = solved_loss.get(position) if isinstance(solved_loss, dict) else solved_loss
        for seed in range(seeds):
            jitter = 0.004 * seed
            records = [record(0, [0.06] * 8)]
            for step in (100, 200, 300, 400):
                crossed = first_step is not None and step >= first_step
                losses = {"train_loss": 4.0 - step / 200, "val_loss": 4.0 - step / 200, "solved_loss": level} \
                    if with_loss else {}
                records.append(record(step, onset_profile(onset if crossed else None,
                                                          peak + jitter if crossed else 0.15 + jitter), **losses))
            write_run(tmp_path / f"{job}_position={position},seed={seed}",
                      {"seed": seed, "data_seed": 0, "router": {"position": position, "n_layer": 8}}, records)
            job += 1
    return find_runs(tmp_path)


def test_sweep_axes_are_read_from_each_runs_hydra_config(tmp_path):
    runs = brake_sweep(tmp_path, {"nope": (1, 0.6, 100), "alibi": (5, 0.3, 300)}, seeds=2)
    assert [r.name for r in runs][:2] == ["0_position=nope,seed=0", "1_position=nope,seed=1"]
    assert factors(runs) == ["router.position", "seed"]


def test_runs_that_differ_only_in_execution_settings_are_replicates(tmp_path):
    # The seed-direction control pairs runs trained with different thread counts; threads is not an arm.
    for job, (seed, threads) in enumerate([(0, 2), (1, 1)]):
        write_run(tmp_path / f"{job}", {"seed": seed, "data_seed": 0, "threads": threads, "tags": [f"t{job}"],
                                        "router": {"position": "rope"}}, [record(0, [0.05, 0.06])])
    assert factors(find_runs(tmp_path)) == ["seed"]


def test_threshold_is_a_knob_for_onset_and_onset_step():
    records = [record(0, [0.06, 0.07, 0.08]), record(100, [0.06, 0.12, 0.15]), record(200, [0.1, 0.25, 0.3])]
    assert run_statistics(records[-1])["onset_layer"] == 1 and run_statistics(records[-1])["onset_depth"] == 1 / 3
    assert math.isnan(run_statistics(records[-1], threshold=0.5)["onset_depth"])  # never
    assert onset_step(records, 0.2) == 200 and onset_step(records, 0.1) == 100 and math.isnan(onset_step(records, 0.5))


def test_clean_nope_rope_alibi_ordering_is_supported_by_every_statistic(tmp_path):
    runs = brake_sweep(tmp_path, {"nope": (1, 0.7, 100), "rope": (3, 0.5, 200), "alibi": (6, 0.3, 300)})
    result = brake_study(runs)
    assert [c["verdict"] for c in result["checks"]] == ["supports"] * 12
    assert [c["at"] for c in result["checks"]] == ["solved"] * 3 + ["solved+k"] * 3 + ["step"] * 6
    assert result["verdict_step"] == result["verdict_solved"] == "supported by every determinable statistic"
    assert result["verdict"] == "supported by every determinable statistic"
    onset = next(c for c in result["checks"] if c["key"] == "onset_depth_censored")
    assert onset["observed"] == "NoPE 0.125 < RoPE 0.375 < ALiBi 0.75" and onset["p_predicted"] == 1.0
    assert [a["arm"] for a in result["arms"]] == ["nope", "rope", "alibi"]
    nope = result["arms"][0]
    assert nope["peak_max_share"] == pytest.approx(0.704) and nope["peak_max_share_low"] < 0.704 < nope["peak_max_share_high"]
    assert nope["peak_max_share_low"] < nope["peak_max_share_boot_low"]  # the t-interval, wider at 3 seeds, leads
    assert nope["solved"] == "3/3" and not nope["unsolved"] and nope["peak_max_share@solved"] == pytest.approx(0.704)
    assert "**Verdict: supported" in verdict_text(result)


def test_records_without_a_solved_level_leave_the_gated_checks_undetermined_and_say_so(tmp_path):
    runs = brake_sweep(tmp_path, {"nope": (1, 0.7, 100), "rope": (3, 0.5, 200)}, with_loss=False)
    result = brake_study(runs)
    checks = result["checks"]
    assert all(c["verdict"].startswith("undetermined: the records name no solved loss") for c in checks[:6])
    assert [c["verdict"] for c in checks[6:11]] == ["supports"] * 5
    assert checks[11]["verdict"].startswith("undetermined")  # training loss at onset: no loss logged
    assert result["verdict"] == ("supported by every determinable statistic (at matched step only: no "
                                 "learning-gated comparison was determinable)")
    assert result["arms"][0]["solved"] == "-" and not result["arms"][0]["unsolved"]


def test_solved_gated_comparisons_read_each_run_at_solved_step_and_k_steps_on(tmp_path):
    # NoPE learns slowly (solves at step 300) and concentrates as it learns; RoPE solves at step 100. At matched
    # step NoPE is the weaker brake's opposite (0.3 < 0.5); where each run has just learned, it is the stronger.
    def run(solve_at, shares, seed):
        return [record(step, [0.06, s[0] + 0.003 * seed, *s[1:]], val_loss=3.0 if step >= solve_at else 4.0,
                       solved_loss=3.0) for step, s in zip((0, 100, 200, 300, 400), shares)]

    nope = [[0.06] * 3, [0.1] * 3, [0.15] * 3, [0.3, 0.2, 0.1], [0.3, 0.2, 0.1]]
    rope = [[0.06] * 3, [0.12, 0.1, 0.1], [0.2, 0.2, 0.1], [0.5, 0.4, 0.1], [0.5, 0.4, 0.1]]
    for seed in range(3):
        write_run(tmp_path / f"n{seed}_position=nope", {"seed": seed, "router": {"position": "nope"}},
                  run(300, nope, seed))
        write_run(tmp_path / f"r{seed}_position=rope", {"seed": seed, "router": {"position": "rope"}},
                  run(100, rope, seed))
    result = brake_study(find_runs(tmp_path))
    by_arm = {}
    for row in result["rows"]:
        by_arm.setdefault(row["arm"], []).append(row)
    assert {r["solved_step"] for r in by_arm["nope"]} == {300.0}
    assert {r["solved_step"] for r in by_arm["rope"]} == {100.0}
    assert [r["step@solved+k"] for r in by_arm["rope"]] == [200.0] * 3  # the first record at or after 100 + 100
    assert by_arm["nope"][0]["peak_max_share@solved"] == pytest.approx(0.3)
    assert by_arm["rope"][0]["peak_max_share@solved"] == pytest.approx(0.12)
    assert by_arm["nope"][0]["step@solved+k"] == 400.0
    assert record_at(find_runs(tmp_path)[0].records, 500) is None  # training ended first: the gated values are nan
    checks = {(c["key"]): c for c in result["checks"]}
    assert checks["peak_max_share@solved"]["verdict"] == "supports"   # RoPE - NoPE < 0 where each has learned
    assert checks["peak_max_share"]["verdict"] == "contradicts (RoPE - NoPE on the other side of 0)"
    assert result["verdict"] == result["verdict_solved"] != result["verdict_step"]


def test_an_arm_with_runs_that_never_solve_is_flagged_never_silently_dropped(tmp_path):
    # RoPE's level is below what any of its runs reaches: no RoPE run solves, so gated checks refuse.
    runs = brake_sweep(tmp_path / "none", {"nope": (1, 0.7, 100), "rope": (3, 0.5, 200)},
                       solved_loss={"nope": 2.5, "rope": 1.0})
    result = brake_study(runs)
    gated = [c for c in result["checks"] if c["at"] != "step"]
    assert all(c["verdict"] == "no verdict: too few runs reached " + c["at"] + " (solved: NoPE 3/3, RoPE 0/3; "
               "need >= 3 per arm)" for c in gated)
    assert [a["solved"] for a in result["arms"]] == ["3/3", "0/3"] and result["arms"][1]["unsolved"]
    assert "RoPE: 3 runs (0 never reach onset, 0/3 solved -- FLAGGED)" in verdict_text(result)
    # Four seeds, one of RoPE's never solving: the verdict stands on the solved runs and names the unsolved one.
    runs = brake_sweep(tmp_path / "one", {"nope": (1, 0.7, 100), "rope": (3, 0.5, 200)}, seeds=4)
    last = next(r for r in runs if r.get("router.position") == "rope" and r.get("seed") == 3)
    for r in last.records:
        r["solved_loss"] = 1.0
    result = brake_study(runs)
    peak = next(c for c in result["checks"] if c["key"] == "peak_max_share@solved")
    assert peak["verdict"] == "supports; unsolved runs have no value: RoPE 3/4 solved"
    assert peak["solved"] == "NoPE 4/4, RoPE 3/4"


def test_the_retired_matched_loss_comparison_is_refused_with_its_replacement():
    from common.errors import UserError

    with pytest.raises(UserError, match="matched-loss rule is retired.*solved, solved\\+k or step"):
        studies.Comparison("peak_max_share", "peak", "lower", at="loss")
    assert studies.Comparison("peak_max_share", "peak", at="solved+k").key == "peak_max_share@solved+k"


def test_the_reverse_order_is_reported_as_contradicted(tmp_path):
    runs = brake_sweep(tmp_path, {"nope": (6, 0.3, 300), "rope": (3, 0.5, 200), "alibi": (1, 0.7, 100)})
    result = brake_study(runs)
    assert all(c["verdict"].startswith("contradicts (RoPE - NoPE, ALiBi - RoPE on the other side")
               for c in result["checks"])
    assert result["verdict"].startswith("contradicted by onset depth")


def test_without_any_crossing_onset_is_undetermined_and_peak_still_decides(tmp_path):
    # Small CPU runs (docs/results.md): peaks below 0.20, so only threshold-free statistics can order.
    runs = brake_sweep(tmp_path, {"nope": (None, 0.15, None), "rope": (None, 0.12, None), "alibi": (None, 0.09, None)})
    for run, peak in zip(runs, [0.15] * 3 + [0.12] * 3 + [0.09] * 3):
        for r in run.records[1:]:
            r["layers"][-1]["max_share"] = r["summary"]["peak_max_share"] = peak + 0.004 * int(run.get("seed"))
    result = brake_study(runs)
    verdicts = {c["key"]: c["verdict"] for c in result["checks"]}
    assert verdicts["onset_depth_censored"] == "undetermined: no run's max share exceeded threshold 0.2"
    assert verdicts["peak_max_share"] == "supports"
    lowered = {c["key"]: c["verdict"] for c in brake_study(runs, threshold=0.1)["checks"]}
    assert lowered["onset_depth_censored"] != verdicts["onset_depth_censored"]  # the knob makes onset measurable


def slope_sweep(tmp_path, seeds):
    job = 0
    for scale, (onset, peak) in {0.0: (1, 0.7), 0.5: (3, 0.5), 2.0: (5, 0.35), 8.0: (7, 0.25)}.items():
        for seed in range(seeds):
            records = [record(0, [0.06] * 8), record(100, onset_profile(onset, peak + 0.004 * seed))]
            write_run(tmp_path / f"{job}_s={scale},seed={seed}",
                      {"seed": seed, "router": {"position": "alibi", "alibi_slope_scale": scale}}, records)
            job += 1
    return find_runs(tmp_path)


def test_alibi_slope_scale_is_judged_as_a_monotone_trend_with_an_interval_on_rho(tmp_path):
    result = brake_study(slope_sweep(tmp_path, seeds=3), studies.load("alibi_slope"))
    checks = {c["key"]: c for c in result["checks"]}
    onset, peak = checks["onset_depth_censored"], checks["peak_max_share"]
    assert onset["spearman_rho"] > 0.9 and onset["rho_low"] > 0 and onset["verdict"] == "supports"
    assert peak["spearman_rho"] < -0.9 and peak["rho_high"] < 0 and peak["verdict"] == "supports"
    assert peak["rho_boot_high"] < 0 and 0 < peak["detectable"] < 1 and peak["runs"] == 12
    assert checks["peak_max_share@solved"]["verdict"].startswith("undetermined: the records name no solved loss")


def test_two_seeds_per_arm_give_effect_sizes_but_no_verdict(tmp_path):
    # The case: NoPE 0.0451 vs RoPE 0.0447 from two seeds each must not read "supported, P = 1.00".
    slope = brake_study(slope_sweep(tmp_path / "slope", seeds=2), studies.load("alibi_slope"))
    assert slope["verdict"].startswith("no verdict: too few seeds (runs per arm: 2 x slope0.0")
    runs = brake_sweep(tmp_path / "brake", {"nope": (1, 0.7, 100), "rope": (3, 0.5, 200)}, seeds=2)
    result = brake_study(runs)
    peak = next(c for c in result["checks"] if c["key"] == "peak_max_share")
    assert peak["p_predicted"] == 1.0 and peak["verdict"] == "no verdict: too few seeds (runs per arm: 2 x NoPE, 2 x RoPE; need >= 3)"
    assert peak["effects"].startswith("RoPE - NoPE -0.2 [t ")  # the effect size is still stated, with its interval
    assert " MDE " in peak["effects"] and " p 0.333" in peak["effects"]  # 2 vs 2: the smallest p is 2/6
    assert result["verdict"].startswith("no verdict: too few seeds") and "**Verdict: no verdict" in verdict_text(result)


def metric_sweep(tmp_path, seeds=3, solved=False):
    """``solved``: records carry validation loss and the task's solved level; every run solves at step 100."""
    job = 0
    arms = {"dot": (0.30, 0.6, 3.00), "euclidean": (0.15, 0.4, 3.10), "normalized": (0.01, 0.6, 3.00)}
    for score, (cv, peak, loss) in arms.items():
        for seed in range(seeds):
            j = 0.005 * seed
            levels = {"val_loss": loss + j, "solved_loss": 3.05} if solved else {}
            records = [record(0, [0.06] * 8), record(100, onset_profile(2, peak + j), norm_cv=cv + j, **levels),
                       record(200, onset_profile(2, peak + j), norm_cv=cv + j, **levels)]
            write_run(tmp_path / f"{job}_score={score},seed={seed}", {"seed": seed, "router": {"score": score}},
                      records, val_loss=loss + j)
            job += 1
    return tmp_path


def test_metric_study_states_lower_stratification_and_concentration_and_the_loss_cost(tmp_path):
    result = metric_study(find_runs(metric_sweep(tmp_path)))
    found = {(c["score"], c["key"]): c for c in result["comparisons"]}
    assert found[("euclidean", "norm_cv")]["direction"] == "lower"
    assert found[("euclidean", "norm_cv")]["difference"] == pytest.approx(-0.15)
    assert found[("euclidean", "peak_max_share")]["direction"] == "lower"
    assert found[("euclidean", "val_loss")]["direction"] == "higher"
    assert found[("normalized", "peak_max_share")]["direction"] == "no clear difference"
    text = statement(result)
    assert "**euclidean**: Removes both stratification and concentration (at matched step)." in text
    assert "a loss cost" in text
    assert found[("euclidean", "norm_cv@solved")]["verdict"].startswith("undetermined: the records name no solved loss")


def test_metric_comparisons_state_effect_t_interval_permutation_p_and_detectable_effect_at_solved(tmp_path):
    result = metric_study(find_runs(metric_sweep(tmp_path, seeds=5, solved=True)))
    found = {(c["score"], c["key"]): c for c in result["comparisons"]}
    cv = found[("euclidean", "norm_cv@solved")]
    assert cv["difference"] == pytest.approx(-0.15) and cv["high"] < 0 and cv["verdict"] == "supports"
    assert cv["low"] < cv["boot_low"] and cv["p_perm"] == pytest.approx(2 / 252) and cv["hedges_g"] < -10
    assert cv["n_a"] == cv["n_b"] == 5 and cv["solved"] == "5/5 vs 5/5"
    peak = found[("normalized", "peak_max_share@solved")]
    assert peak["verdict"] == f"inconclusive (interval spans 0; detectable >= {peak['mde']:.3g})"
    sd = math.sqrt(sum((0.005 * i - 0.01) ** 2 for i in range(5)) / 4)  # both arms' seeds spread 0, 0.005, ... 0.02
    assert peak["mde"] == pytest.approx(2.0244 * sd, rel=1e-4)  # at 5 vs 5 the design detects ~2 sd
    assert found[("euclidean", "ve@8")]["verdict"] == "inconclusive (interval spans 0; detectable >= 0)"
    text = statement(result)
    assert "**euclidean**: Removes both stratification and concentration (at solved_step). Solved: dot 5/5, " \
           "euclidean 5/5." in text
    assert "  - norm-CV at solved -0.150 [t " in text and " MDE " in text


def test_the_metric_study_gives_no_direction_with_two_seeds_per_arm(tmp_path):
    runs = [run for run in find_runs(metric_sweep(tmp_path)) if run.get("seed") != 2]
    result = metric_study(runs)
    at_step = [c for c in result["comparisons"] if c["at"] == "step"]
    assert all(c["direction"].startswith("too few seeds (2 and 2 runs") for c in at_step)
    assert "No verdict: too few seeds" in statement(result) and "Removes both" not in statement(result)


def test_wandb_history_rows_rebuild_the_monitor_records():
    from collapse import signature
    from routers.routing import Routing, RoutingLayer, causal_mask
    import torch

    g = torch.Generator().manual_seed(0)
    layers = []
    for _ in range(3):
        weights = torch.rand(2, 2, 16, 16, generator=g).masked_fill(~causal_mask(16), 0)
        layers.append(RoutingLayer(keys=torch.randn(2, 2, 16, 8, generator=g), weights=weights / weights.sum(-1, keepdim=True),
                                   mask=causal_mask(16)))
    sig = signature(Routing(layers))
    history = [{**flat_metrics(sig), "trainer/global_step": 40, "train/loss": 3.0}, {"val/loss": 2.9, "_step": 41}]
    records = from_history(history)
    assert len(records) == 1 and records[0]["step"] == 40
    assert [r["max_share"] for r in records[0]["layers"]] == pytest.approx([r["max_share"] for r in sig.layers])
    assert run_statistics(records[0])["peak_max_share"] == pytest.approx(sig.summary["peak_max_share"])


def test_seed_pairs_are_classified_by_which_seed_differs(tmp_path):
    from analysis.studies.seeds import find_pairs

    for i, (seed, data_seed) in enumerate([(0, 0), (1, 0), (0, 1), (1, 1)]):
        write_run(tmp_path / f"{i}_run", {"seed": seed, "data_seed": data_seed, "router": {"position": "rope"},
                                         "data": {"data_seed": data_seed}}, [record(0, [0.1, 0.1])])
    write_run(tmp_path / "4_other", {"seed": 0, "data_seed": 0, "router": {"position": "alibi"},
                                     "data": {"data_seed": 0}}, [record(0, [0.1, 0.1])])
    kinds = sorted((kind, a.name, b.name) for kind, a, b in find_pairs(find_runs(tmp_path)))
    assert kinds == [("both", "0_run", "3_run"), ("both", "1_run", "2_run"), ("data", "0_run", "2_run"),
                     ("data", "1_run", "3_run"), ("weight", "0_run", "1_run"), ("weight", "2_run", "3_run")]


def test_metric_and_alibi_slope_studies_write_their_files_through_analyze(tmp_path):
    import analyze

    assert analyze.main([f"sweep={metric_sweep(tmp_path / 'metric')}", "study=metric_study"]) == 0
    out = tmp_path / "metric" / "analysis" / "metric_study"
    assert "**euclidean**" in (out / "statement.md").read_text()
    assert {"score", "statistic", "difference", "low", "high", "direction"} <= set((out / "comparisons.csv").read_text().splitlines()[0].split(","))
    assert (out / "profiles.png").stat().st_size and (out / "trajectories.png").stat().st_size
    slope = tmp_path / "slope"
    for job, scale in enumerate([0.0, 1.0, 4.0]):
        write_run(slope / f"{job}", {"seed": 0, "router": {"position": "alibi", "alibi_slope_scale": scale}},
                  [record(0, [0.06] * 8), record(100, onset_profile(2 * job + 1, 0.6 - 0.1 * job))])
    assert analyze.main([f"sweep={slope}", "study=alibi_slope"]) == 0
    assert "Spearman rho" in (slope / "analysis" / "alibi_slope" / "verdict.md").read_text()


def test_every_study_is_named_after_the_experiment_that_trains_it_and_reads_the_axis_it_sweeps():
    from pathlib import Path

    conf = Path(studies.SPECS).parent
    assert studies.names() == ["alibi_slope", "attnres_offset", "brake_ordering", "csbm_homophily", "idle_fraction", "mamba_freeze",
                               "metric_study", "normalization_study", "rwkv_decay_sweep", "seed_direction"]
    for name in studies.names():
        study = studies.load(name)
        experiment = yaml.safe_load((conf / "experiment" / f"{name}.yaml").read_text())
        swept = experiment["hydra"]["sweeper"]["params"]
        assert study.name == name
        if study.kind == "seed_pairs":
            assert study.factor is None and {"seed", "data_seed"} <= set(swept)
        elif study.kind == "intervention":  # read-time: the experiment sweeps seeds of the unmodified router
            assert study.factor is None and set(swept) == {"seed"}, name
        else:
            assert study.factor in swept or study.factor.replace(".", "/") in swept, name
            assert study.strata is None or study.strata in swept, name


def test_the_old_metric_study_name_still_works_and_an_unknown_one_lists_the_specs(tmp_path, capsys):
    import analyze

    assert analyze.main([f"sweep={metric_sweep(tmp_path)}", "study=metric"]) == 0
    assert (tmp_path / "analysis" / "metric_study" / "statement.md").is_file()
    assert analyze.main([f"sweep={tmp_path}", "study=brakes"]) == 2
    assert "unknown study 'brakes'; choose one of alibi_slope, attnres_offset, brake_ordering, csbm_homophily, idle_fraction, mamba_freeze, metric_study, normalization_study, rwkv_decay_sweep, seed_direction" in \
        capsys.readouterr().err


def with_rank_4(records):
    """The monitor's records carry every measured rank; these hand-made ones get VE@4 beside VE@8."""
    for r in records:
        for layer in r["layers"]:
            layer.update({"ve@4": layer["ve@8"] - 0.1, "ve@4_gauss": 0.2, "ve@4_shuffle": 0.25})
        r["summary"].update({"ve@4": r["summary"]["ve@8"] - 0.1, "ve@4_shuffle": 0.25, "ve@4_gauss": 0.2,
                             "content@4": r["summary"]["ve@8"] - 0.35})
    return records


@pytest.mark.parametrize("study", ["brake_ordering", "metric_study"])
def test_a_study_at_rank_4_reads_ve_at_4_end_to_end(study, tmp_path, monkeypatch):
    import analyze

    original = record

    def record_with_4(*args, **kwargs):
        return with_rank_4([original(*args, **kwargs)])[0]

    monkeypatch.setitem(globals(), "record", record_with_4)  # the sweep builders below write these records
    if study == "brake_ordering":
        brake_sweep(tmp_path, {"nope": (1, 0.7, 100), "rope": (3, 0.5, 200), "alibi": (5, 0.3, 300)})
    else:
        metric_sweep(tmp_path)
    assert analyze.main([f"sweep={tmp_path}", f"study={study}", "rank=4"]) == 0
    out = tmp_path / "analysis" / study
    arms = list(csv.DictReader(open(out / "arms.csv")))
    assert all(float(a["ve@4"]) == pytest.approx(0.5) for a in arms) and "ve@8" not in arms[0]
    assert json.loads((out / "result.json").read_text())["rank"] == 4
    text = (out / ("verdict.md" if study == "brake_ordering" else "statement.md")).read_text()
    assert "ve@4" in text and "ve@8" not in text
    assert (out / "profiles.png").stat().st_size and (out / "trajectories.png").stat().st_size
    if study == "metric_study":
        keys = {row["key"] for row in csv.DictReader(open(out / "comparisons.csv"))}
        assert "ve@4" in keys and "ve@8" not in keys


STUDY_EXPERIMENTS = ["brake_ordering", "alibi_slope", "metric_study", "normalization_study", "collapse_regime",
                     "seed_direction", "csbm_homophily", "gat_vs_gcn", "attnres_offset", "mamba_freeze",
                     "rwkv_decay_sweep", "attnres_offset_trained", "mamba_freeze_trained", "rwkv_decay_sweep_trained",
                     "idle_fraction"]


@pytest.mark.parametrize("name", STUDY_EXPERIMENTS)
def test_every_study_experiment_sweeps_at_least_five_replicates_per_arm(name):
    from pathlib import Path

    spec = yaml.safe_load((Path(studies.SPECS).parent / "experiment" / f"{name}.yaml").read_text())
    params = spec["hydra"]["sweeper"]["params"]
    replicates = str(params.get("seed", params.get("data.split", "")))  # gat_vs_gcn: the 10 standard splits
    count = len(range(*map(int, replicates[6:-1].split(",")))) if replicates.startswith("range(") else \
        len(replicates.split(","))
    assert count >= 5, f"{name}: {replicates}"


def idle_sweep(tmp_path, seeds=3, extra=0.0):
    """Runs whose peak layer has 4 heads all parking on BOS: each head's max share is φ (its idle queries on
    BOS), plus ``extra`` beyond parking in seed-varying amounts, so the parking prediction is exactly φ."""
    job = 0
    for phi in (0.25, 0.5, 0.75):
        for seed in range(seeds):
            share = phi + extra * (1 + 0.1 * seed)
            rec = record(100, [0.1, 0.1, share], solved_loss=2.0, train_loss=2.0, val_loss=2.0)
            rec["idle_fraction"] = phi
            rec["layers"][2].update({"sink_source_units": [0] * 4, "sink_fraction_units": [1.0] * 4,
                                     "max_share_units": [share] * 4})
            write_run(tmp_path / f"{job}_phi={phi},seed={seed}",
                      {"seed": seed, "data": {"generator": {"idle_fraction": phi}}}, [record(0, [0.1] * 3), rec])
            job += 1
    return find_runs(tmp_path)


def test_idle_fraction_study_states_the_parking_prediction_and_reports_the_excess_unjudged(tmp_path):
    result = brake_study(idle_sweep(tmp_path, extra=0.05), studies.load("idle_fraction"))
    checks = {(c["key"], c["at"]): c for c in result["checks"]}
    peak, prediction = checks[("peak_max_share", "step")], checks[("parking_prediction", "step")]
    assert peak["verdict"] == "supports" and prediction["predicted"] == "rises with scale"
    excess = checks[("parking_excess", "step")]
    assert excess["predicted"] == "-" and excess["verdict"] in ("higher", "lower") or \
        excess["verdict"].startswith("inconclusive")  # reported, never "supports" / "contradicts"
    assert "peak above the parking prediction" not in result["verdict"]  # reported beside the verdict, not in it
    arms = {a["arm"]: a for a in result["arms"]}
    for phi in (0.25, 0.5, 0.75):  # four parking heads of four: the prediction is phi, the excess what was added
        assert arms[phi]["parking_prediction"] == pytest.approx(phi)
        assert arms[phi]["parking_excess"] == pytest.approx(0.05 * 1.1)  # mean of 0.05 x (1, 1.1, 1.2)
        assert arms[phi]["parking_excess_low"] < 0.055 < arms[phi]["parking_excess_high"]
