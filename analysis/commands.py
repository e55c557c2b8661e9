"""What ``analyze.py`` does for each kind of target: read, compute (the other ``analysis`` modules), write.

Every command writes its tables (CSV + markdown) and figures (PNG) into one folder and returns the paths;
``wandb=true`` also logs them as one W&B run of job type "analysis".
"""
from __future__ import annotations

import json
import math
import re
from pathlib import Path

from analysis import figures
from analysis.runs import (SEED_KEYS, checkpoint_path, factors, failed_jobs, find_runs, load_router, read_run,
                           val_loss)
from analysis.tables import markdown, number, onset_step, run_statistics, table1_row, write_csv
from common import atomic
from common.errors import UserError

HEATMAP_RUNS = 8  # panels of the sweep's layer x step figure
STUDIES = ("seed_direction", "brake_ordering", "alibi_slope", "metric")
CURVE_KEYS = [("peak_max_share", "peak max share"), ("area_above_baseline", "area above baseline"),
              ("ve@8", "VE@8 (depth mean)"), ("onset_depth", "onset depth")]


def _save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    atomic.save_figure(fig, path, dpi=110)
    plt.close(fig)
    return path


def _wandb(cfg, out: Path, config: dict | None, group: str | None, name: str, tables: dict, images: list[Path]):
    if not cfg.wandb:
        return
    from analysis.wandb_io import log_analysis

    settings = ((config or {}).get("logger") or {}).get("wandb") or {}
    where = log_analysis(out, settings.get("project", "routecollapse"), group, name, tables, images,
                         offline=settings.get("offline", True))
    print(f"  W&B run: {where}")


def _router_tokenizer(config: dict):
    """The tokenizer a run was trained with (None for the synthetic language), for corpus probes."""
    from hydra.utils import instantiate

    return instantiate(config["data"]).tokenizer


# --- one model ---------------------------------------------------------------------------------------------

def analyse_run(cfg) -> Path:
    """``run=<run dir or .ckpt>``: the full signature of that checkpoint on the run's probe (or ``probe=``)."""
    from analysis.model import measure, resolve_probe, write_report

    ckpt = checkpoint_path(cfg.run)
    run_dir = ckpt.parent.parent if ckpt.parent.name == "checkpoints" else ckpt.parent
    router, config, step = load_router(ckpt)
    probe, about = resolve_probe(cfg.probe, run_dir / "probe.pt", _lazy(lambda: _router_tokenizer(config)),
                                 cfg.probe_sequences, cfg.probe_length, cfg.probe_path)
    default = run_dir / "analysis" if ckpt.name == "last.ckpt" else run_dir / "analysis" / ckpt.stem
    out = Path(cfg.out) if cfg.out else default
    sweep = run_dir.parent.name if (run_dir.parent / "multirun.yaml").exists() else None  # training's W&B group
    name = f"{sweep}/{run_dir.name}" if sweep else run_dir.name
    signature = measure(router, probe, tuple(cfg.ranks), cfg.batch_size, cfg.threshold, cfg.completion)
    record = write_report(signature, out, f"{name} step {step}", about, step, cfg.threshold, cfg.completion)
    _wandb(cfg, out, config, sweep, f"{name}-analysis",
           {"signature": [table1_row(name, record, cfg.threshold, cfg.completion)]}, [out / "signature.png"])
    return out


class _lazy:
    """A value computed on first use: a corpus probe needs the tokenizer, a saved probe does not."""

    def __init__(self, make):
        self.make, self.value, self.done = make, None, False

    def __call__(self):
        if not self.done:
            self.value, self.done = self.make(), True
        return self.value


def _revision_step(spec: str) -> int | None:
    match = re.search(r"@step(\d+)$", spec)
    return int(match.group(1)) if match else None


def analyse_hf(cfg) -> Path:
    """``model=hf:<name>[@rev]`` (and ``revisions=[...]``): the signature of each checkpoint, and with several
    revisions the collapse-over-training curve of the real model, beside ``compare=<run dir>`` if given."""
    from analysis.hf import load_hf, load_hf_tokenizer, parse_spec
    from analysis.model import measure, resolve_probe, write_report

    name, revision = parse_spec(cfg.model)
    specs = [f"hf:{name}@{r}" for r in cfg.revisions] if cfg.revisions else [cfg.model]
    if cfg.revisions and revision:
        raise UserError("give the revision either in model=hf:<name>@<rev> or in revisions=[...], not both")
    out = Path(cfg.out) if cfg.out else Path("outputs") / "analysis" / name.strip("/").replace("/", "--")
    probe, about = resolve_probe(cfg.probe or "wikitext103", None, _lazy(lambda: load_hf_tokenizer(cfg.model)),
                                 cfg.probe_sequences, cfg.probe_length, cfg.probe_path)
    records, rows = [], []
    for spec in specs:
        router, where = load_hf(spec)
        signature = measure(router, probe, tuple(cfg.ranks), cfg.batch_size, cfg.threshold, cfg.completion)
        folder = out / (spec.partition("@")[2] or "final")
        record = write_report(signature, folder, where, about, _revision_step(spec), cfg.threshold, cfg.completion)
        records.append(record)
        rows.append(table1_row(where, record, cfg.threshold, cfg.completion))
        print(f"{where}: {folder}/summary.md")
    write_csv(rows, out / "models.csv")
    atomic.write_text(out / "models.md", f"# Collapse signature on {about}\n\n{markdown(rows)}\n")
    images = [out / (spec.partition("@")[2] or "final") / "signature.png" for spec in specs]
    steps = [r["step"] for r in records]
    if len(records) > 1 and all(s is not None for s in steps):
        series = [_series(name, steps, records, cfg.threshold)]
        if cfg.compare:
            ours = read_run(cfg.compare)
            series.append(_series(f"ours: {ours.name}", [r["step"] for r in ours.records], ours.records,
                                  cfg.threshold, style="s--"))
        images.append(_save(figures.curves_figure(series, CURVE_KEYS, f"collapse over training ({about})", log_steps=True),
                            out / "collapse_over_training.png"))
    _wandb(cfg, out, None, None, f"{name}-analysis", {"models": rows}, images)
    return out


def _series(label: str, steps: list, records: list[dict], threshold: float, style: str = "o-") -> dict:
    stats = [run_statistics(r, threshold) for r in records]
    return {"label": label, "steps": steps, "style": style,
            "values": {key: [s[key] for s in stats] for key, _ in CURVE_KEYS}}


# --- sweeps and studies --------------------------------------------------------------------------------------

def analyse_sweep(cfg) -> Path:
    """``sweep=<dir or wandb:...>``: one row per run (its axes, the Table 1 columns, val loss, onset step)
    and every run's collapse over training; or, with ``study=``, that study."""
    if cfg.study and cfg.study not in STUDIES:
        raise UserError(f"unknown study {cfg.study!r}; choose one of {', '.join(STUDIES)}")
    runs = find_runs(cfg.sweep)
    local = not str(cfg.sweep).startswith("wandb:")
    base = Path(cfg.out) if cfg.out else (Path(cfg.sweep) / "analysis" if local else
                                          Path("outputs") / "analysis" / str(cfg.sweep).replace("/", "--").replace(":", "-"))
    out = base / cfg.study if cfg.study and not cfg.out else base
    out.mkdir(parents=True, exist_ok=True)
    if failed := failed_jobs(cfg.sweep):  # never results: listed apart
        write_csv([{"job": job, **failure} for job, failure in failed], out / "failed_jobs.csv")
        print(f"{len(failed)} job(s) left out, not results ({out / 'failed_jobs.csv'}):")
        for job, failure in failed:
            print(f"  {job}: {failure['reason']}")
    group = Path(str(cfg.sweep)).name
    if cfg.study == "seed_direction":
        tables, images = _seed_direction(cfg, runs, out)
    elif cfg.study in ("brake_ordering", "alibi_slope"):
        factor = cfg.factor or ("router.alibi_slope_scale" if cfg.study == "alibi_slope" else "router.position")
        tables, images = _brake(cfg, runs, out, factor)
    elif cfg.study == "metric":
        tables, images = _metric(cfg, runs, out, cfg.factor or "router.score")
    else:
        tables, images = _sweep_table(cfg, runs, out)
    config = _first_config(runs)
    _wandb(cfg, out, config, group, f"{group}-{cfg.study or 'sweep'}", tables, images)
    return out


def _first_config(runs) -> dict:
    nested: dict = {}
    for key, value in runs[0].config.items():  # back to nested for the logger settings
        node = nested
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return nested


def _sweep_table(cfg, runs, out: Path):
    axes = factors(runs)
    rows = []
    for run in runs:
        stats = run_statistics(run.final, cfg.threshold, cfg.completion)
        row = {"run": run.name, **{a: run.get(a) for a in axes}}
        row.update(table1_row(run.name, run.final, cfg.threshold, cfg.completion))
        summary = run.final["summary"]
        row.update({"step": stats["step"], "onset step": onset_step(run.records, cfg.threshold),
                    "sink": summary.get("peak_sink_source"), "sink %": _percent(summary.get("peak_sink_fraction")),
                    "area": stats["area_above_baseline"], "train loss": number(run.final.get("train_loss")),
                    "val loss": val_loss(run)})
        row.pop("model")
        rows.append(row)
    write_csv(rows, out / "sweep.csv")
    atomic.write_text(out / "sweep.md", f"# Sweep {cfg.sweep}: {len(runs)} runs, axes {', '.join(axes) or '-'}\n\n"
                                  f"Onset threshold {cfg.threshold}.\n\n{markdown(rows)}\n")
    arm_keys = [a for a in axes if a not in SEED_KEYS]
    colors = {}
    series = []
    for run in runs:
        arm = ", ".join(f"{a}={run.get(a)}" for a in arm_keys) or "run"
        colors.setdefault(arm, f"C{len(colors) % 10}")
        series.append(_series(arm, [r["step"] for r in run.records], run.records, cfg.threshold) | {"color": colors[arm]})
    image = _save(figures.curves_figure(series, CURVE_KEYS, f"{cfg.sweep}: collapse over training"),
                  out / "collapse_over_training.png")
    panels = [(run.name, run.records) for run in runs[:HEATMAP_RUNS]]
    heatmaps = _save(figures.max_share_heatmaps(panels, cfg.threshold, f"{cfg.sweep}: max share by layer and step"
                                                + (f" (first {HEATMAP_RUNS} runs)" if len(runs) > HEATMAP_RUNS else "")),
                     out / "max_share_heatmaps.png")
    print(f"sweep table: {out / 'sweep.md'}")
    return {"sweep": rows}, [image, heatmaps]


def _percent(fraction) -> float:
    return math.nan if fraction is None else 100 * fraction


def _brake(cfg, runs, out: Path, factor: str):
    from analysis.brake import brake_study, verdict_text

    result = brake_study(runs, factor, cfg.threshold, cfg.completion, cfg.level, cfg.rank)
    write_csv(result["rows"], out / "runs.csv")
    write_csv(result["arms"], out / "arms.csv")
    write_csv(result["checks"], out / "checks.csv")
    verdict = verdict_text(result)
    columns = ["arm", "runs", "never", "onset_depth", "onset_step", "peak_max_share", "peak_max_share_low",
               "peak_max_share_high", "peak_depth", "area_above_baseline", "ve@8", "norm_cv", "val_loss"]
    atomic.write_text(out / "verdict.md", f"# Brake study: {cfg.sweep}\n\n{verdict}\n\n## Arms (mean, {cfg.level:.0%} "
                                    f"bootstrap over seeds)\n\n{markdown(result['arms'], columns)}\n")
    atomic.write_text(out / "result.json", json.dumps({k: result[k] for k in ("factor", "threshold", "verdict", "checks")},
                                                indent=1))
    rank = cfg.rank
    references = {"max_share": [(f"onset threshold {cfg.threshold}", cfg.threshold),
                                ("causal-uniform baseline", _final_column(runs, "baseline"))],
                  f"ve@{rank}": [("Gaussian null", _final_column(runs, f"ve@{rank}_gauss"))]}
    images = [_save(figures.arm_profiles_figure(result["profiles"], [("max_share", "max share"), (f"ve@{rank}", f"VE@{rank}"),
                                                                     ("norm_cv", "norm-CV")], references,
                                                f"{factor}: depth profiles at the last step"), out / "profiles.png"),
              _save(figures.curves_figure(result["curves"], CURVE_KEYS, f"{factor}: collapse over training "
                                          f"(onset at {cfg.threshold})"), out / "trajectories.png")]
    print(verdict)
    print(f"brake study: {out / 'verdict.md'}")
    return {"runs": result["rows"], "arms": result["arms"], "checks": result["checks"]}, images


def _final_column(runs, key: str) -> list[float]:
    """One per-layer column of the first run's last record (baselines and nulls are shared by the arms)."""
    return [layer.get(key) for layer in runs[0].final["layers"]]


def _metric(cfg, runs, out: Path, factor: str):
    from analysis.metric import metric_study, statement

    result = metric_study(runs, factor, cfg.threshold, cfg.completion, cfg.level, cfg.rank)
    write_csv(result["rows"], out / "runs.csv")
    write_csv(result["arms"], out / "arms.csv")
    write_csv(result["comparisons"], out / "comparisons.csv")
    text = statement(result)
    columns = ["arm", "runs", "norm_cv", "norm_cv_low", "norm_cv_high", "ve@8", "ve@8_shuffle", "ve@8_gauss",
               "peak_max_share", "peak_max_share_low", "peak_max_share_high", "area_above_baseline", "val_loss",
               "val_loss_low", "val_loss_high"]
    atomic.write_text(out / "statement.md", f"# Metric study: {cfg.sweep}\n\n{text}\n\n## Arms\n\n"
                                      f"{markdown(result['arms'], columns)}\n")
    rank = cfg.rank
    images = [_save(figures.arm_profiles_figure(result["profiles"], [("max_share", "max share"), (f"ve@{rank}", f"VE@{rank}"),
                                                                     ("norm_cv", "norm-CV")],
                                                {f"ve@{rank}": [("Gaussian null", _final_column(runs, f"ve@{rank}_gauss"))],
                                                 "max_share": [("causal-uniform baseline", _final_column(runs, "baseline"))]},
                                                "score: depth profiles at the last step"), out / "profiles.png"),
              _save(figures.curves_figure(result["curves"], CURVE_KEYS, "score: collapse over training"),
                    out / "trajectories.png")]
    print(text)
    print(f"metric study: {out / 'statement.md'}")
    return {"runs": result["rows"], "arms": result["arms"], "comparisons": result["comparisons"]}, images


def _seed_direction(cfg, runs, out: Path):
    from analysis.seeds import seed_study, statement, summary_rows

    if not all(run.path.is_dir() and (run.path / "checkpoints" / "last.ckpt").is_file() for run in runs):
        raise UserError("the seed-direction study reruns the checkpoints: pass the local multirun folder as sweep=<dir>")
    result = seed_study(runs, cfg.rank, cfg.batch_size)
    summary = summary_rows(result)
    write_csv(result["rows"], out / "layers.csv")
    write_csv(summary, out / "summary.csv")
    text = statement(result)
    atomic.write_text(out / "summary.md", f"# Seed-direction control: {cfg.sweep}\n\n{markdown(summary)}\n\n{text}\n\n"
                                    "Key-space angles compare coordinates, which two weight seeds do not share; "
                                    "token-space angles are basis-free (docs/analysis.md).\n")
    image = _save(figures.seed_direction_figure(result["profiles"], cfg.rank, f"{cfg.sweep}: direction vs geometry"),
                  out / "seed_direction.png")
    print(markdown(summary))
    print(text)
    print(f"seed-direction study: {out / 'summary.md'}")
    return {"layers": result["rows"], "summary": summary}, [image]
