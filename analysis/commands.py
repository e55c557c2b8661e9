"""What ``analyze.py`` does for each kind of target: read, compute (the other ``analysis`` modules), write.

Every command writes its tables (CSV + markdown) and figures (PNG) into one folder and returns the paths;
``wandb=true`` also logs them as one W&B run of job type "analysis".
"""
from __future__ import annotations

import json
import re
from pathlib import Path

from analysis.reports import figures
from analysis.readers.runs import (SEED_KEYS, factors, failed_jobs, find_runs, load_router, read_run,
                           val_loss)
from analysis.reports.tables import finite, markdown, onset_step, run_statistics, solved_step, table1_row, write_csv
from common import atomic, run_names
from common.checkpoints import newest_checkpoint
from common.configs import unflatten
from common.constants import RANK
from common.errors import UserError
from records import Record, max_share_heatmaps

HEATMAP_RUNS = 8  # panels of the sweep's layer x step figure
DEFAULT_RANK = RANK  # VE rank of the tables and figures without a study (rank= sets it)


def curve_keys(rank: int = RANK) -> list[tuple[str, str]]:
    """The panels of every collapse-over-training figure: (statistic, axis label)."""
    return [("peak_max_share", "peak max share"), ("area_above_baseline", "area above baseline"),
            (f"ve@{rank}", f"VE@{rank} (depth mean)"), ("onset_depth", "onset depth")]


def curves_figure(series: list[dict], title: str, threshold: float, rank: int = RANK, log_steps: bool = False):
    """Collapse over training with what each panel is read against: the causal-uniform baseline and the onset
    threshold under peak max share, the shuffle and Gaussian nulls under VE, "no onset" when none."""
    references = {"peak_max_share": [("causal-uniform baseline", "baseline", ":")],
                  f"ve@{rank}": [("Gaussian null", f"ve@{rank}_gauss", "--")]}
    nulls = {f"ve@{rank}": [("shuffle null (arm colour)", f"ve@{rank}_shuffle", "-.")]}
    empty = {"onset_depth": f"no onset: no layer's mean max share\nexceeded {threshold} at any measured step"}
    return figures.curves_figure(series, curve_keys(rank), title, log_steps, nulls, threshold, empty, references)


def profiles_figure(arms: list[dict], runs, rank: int, threshold: float, title: str):
    """Depth profiles per arm at the last step, each panel with its baseline or nulls."""
    panels = [("max_share", "max share"), (f"ve@{rank}", f"VE@{rank}"), ("norm_cv", "norm-CV")]
    references = {"max_share": [("causal-uniform baseline", _final_column(runs, "baseline"), ":")],
                  f"ve@{rank}": [("Gaussian null", _final_column(runs, f"ve@{rank}_gauss"), "--")],
                  "norm_cv": [("Gaussian norm-CV 1/sqrt(2d)", _final_column(runs, "norm_cv_gauss"), "--")]}
    nulls = {f"ve@{rank}": [("shuffle null (arm colour)", f"ve@{rank}_shuffle", "-.")]}
    return figures.arm_profiles_figure(arms, panels, references, title, threshold, nulls)


def _save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    atomic.save_figure(fig, path, dpi=110)
    plt.close(fig)
    return path


def _wandb(cfg, out: Path, config: dict | None, group: str | None, name: str, tables: dict, images: list[Path]):
    if not cfg.wandb:
        return
    from analysis.reports.wandb_log import log_analysis

    settings = ((config or {}).get("logger") or {}).get("wandb") or {}
    where = log_analysis(out, settings.get("project", "routecollapse"), group, name, tables, images,
                         offline=settings.get("offline", True))
    print(f"  W&B run: {where}")


def _router_tokenizer(config: dict):
    """The tokenizer a run was trained with (None for the synthetic language), for corpus probes."""
    from hydra.utils import instantiate

    try:
        return instantiate(config["data"]).tokenizer
    except UserError:  # its fix names train.py's keys (tokenizer.name, data.path), which analyze.py does not take
        spec = (config["data"].get("tokenizer") or {})
        raise UserError(f"cannot rebuild the tokenizer this run was trained with ({spec.get('kind')} "
                        f"{spec.get('name') or spec.get('vocab_size')}); pass tokenizer=<Hub name or folder with "
                        "tokenizer files>, or probe=<probe.pt>") from None


# --- one model ---------------------------------------------------------------------------------------------

def analyse_run(cfg) -> Path:
    """``run=<run dir or .ckpt>``: the full signature of that checkpoint on the run's probe (or ``probe=``)."""
    from analysis.readers.hf import load_hf_tokenizer
    from analysis.readers.model import measure, resolve_probe, write_report

    ckpt = newest_checkpoint(cfg.run)
    run_dir = ckpt.parent.parent if ckpt.parent.name == "checkpoints" else ckpt.parent
    router, config, step = load_router(ckpt)
    default = run_dir / "analysis" if ckpt.name == "last.ckpt" else run_dir / "analysis" / ckpt.stem
    out = Path(cfg.out) if cfg.out else default
    sweep_dir = run_names.sweep_dir_of(run_dir)
    group = run_names.sweep_group(sweep_dir) if sweep_dir else None  # the W&B group training gave it
    name = run_names.run_label(run_dir)
    if graph_task := _graph_task(router, config):
        from collapse.measure import measure_signature

        probe, about = _graph_probe(cfg.probe, run_dir, config)
        signature = measure_signature(graph_task, probe, tuple(cfg.ranks), cfg.batch_size, cfg.threshold,
                                      cfg.completion)
    else:
        tokenizer = _lazy(lambda: load_hf_tokenizer(cfg.tokenizer) if cfg.tokenizer else _router_tokenizer(config))
        probe, about = resolve_probe(cfg.probe, run_dir / "probe.pt", tokenizer, cfg.probe_sequences,
                                     cfg.probe_length, cfg.probe_path)
        signature = measure(router, probe, tuple(cfg.ranks), cfg.batch_size, cfg.threshold, cfg.completion, name)
    record = write_report(signature, out, f"{name} step {step}", about, step, cfg.threshold, cfg.completion)
    _wandb(cfg, out, config, group, f"{name}-analysis",
           {"signature": [table1_row(name, record, cfg.threshold, cfg.completion)]}, [out / "signature.png"])
    return out


def _graph_task(router, config: dict):
    """The run's node-classification task around its router (None for a token run): its ``probe_routing``
    is what the monitor measured in training, so a graph is measured exactly as then."""
    if not str((config.get("task") or {}).get("_target_", "")).endswith("NodeClassificationTask"):
        return None
    from tasks.node_classification import NodeClassificationTask

    return NodeClassificationTask(router)


def _graph_probe(spec: str | None, run_dir: Path, config: dict):
    """(probe, description) of a graph run: the graph the monitor saved (``probe.pt``, or ``probe=<file.pt>``),
    else the graph rebuilt from the data config stored in the checkpoint."""
    from hydra.utils import instantiate

    from datamodules.graph import GraphProbe

    if spec is not None and not str(spec).endswith(".pt"):
        raise UserError(f"probe={spec} is a text probe; a graph run is measured on its graph: drop probe= or pass "
                        "probe=<a graph probe.pt>")
    saved = Path(spec) if spec else run_dir / "probe.pt"
    if saved.is_file():
        return GraphProbe.load(saved), f"the run's graph ({saved})"
    datamodule = instantiate(config["data"])
    datamodule.setup("fit")
    return datamodule.probe, f"the run's graph ({config['data']['_target_'].rsplit('.', 1)[-1]} from its stored config)"


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
    from analysis.readers.hf import load_hf, load_hf_tokenizer, parse_spec
    from analysis.readers.model import measure, resolve_probe, write_report

    name, revision = parse_spec(cfg.model)
    specs = [f"hf:{name}@{r}" for r in cfg.revisions] if cfg.revisions else [cfg.model]
    if cfg.revisions and revision:
        raise UserError("give the revision either in model=hf:<name>@<rev> or in revisions=[...], not both")
    out = Path(cfg.out) if cfg.out else Path("outputs") / "analysis" / name.strip("/").replace("/", "--")
    first = load_hf(specs[0])  # before the probe: a model that cannot load is the error to report
    tokenizer = _lazy(lambda: load_hf_tokenizer(cfg.tokenizer or cfg.model))
    probe, about = resolve_probe(cfg.probe or "wikitext103", None, tokenizer, cfg.probe_sequences, cfg.probe_length,
                                 cfg.probe_path)
    records, rows = [], []
    for i, spec in enumerate(specs):
        router, where = first if i == 0 else load_hf(spec)
        signature = measure(router, probe, tuple(cfg.ranks), cfg.batch_size, cfg.threshold, cfg.completion, where)
        folder = out / (spec.partition("@")[2] or "final")
        record = write_report(signature, folder, where, about, _revision_step(spec), cfg.threshold, cfg.completion)
        records.append(record)
        rows.append(table1_row(where, record, cfg.threshold, cfg.completion))
        print(f"{where}: {folder}/summary.md")
    write_csv(rows, out / "models.csv")
    atomic.write_text(out / "models.md", f"# Collapse signature on {about}\n\n{markdown(rows)}\n")
    images = [out / (spec.partition("@")[2] or "final") / "signature.png" for spec in specs]
    steps = [r.step for r in records]
    if len(records) > 1 and all(s is not None for s in steps):
        rank = cfg.rank or DEFAULT_RANK
        series = [_series(name, steps, records, cfg.threshold, rank) | {"color": "C0"}]
        if cfg.compare:
            ours = read_run(cfg.compare)
            series.append(_series(f"ours: {run_names.run_label(ours.path)}", [r.step for r in ours.records],
                                  ours.records, cfg.threshold, rank, style="s--") | {"color": "C1"})
        images.append(_save(curves_figure(series, f"collapse over training ({about})", cfg.threshold, rank,
                                          log_steps=True), out / "collapse_over_training.png"))
    _wandb(cfg, out, None, None, f"{name}-analysis", {"models": rows}, images)
    return out


def _series(label: str, steps: list, records: list[Record], threshold: float, rank: int = DEFAULT_RANK,
            style: str = "o-") -> dict:
    stats = [run_statistics(r, threshold, rank=rank) for r in records]
    keys = [key for key, _ in curve_keys(rank)] + ["baseline", f"ve@{rank}_shuffle", f"ve@{rank}_gauss"]
    return {"label": label, "steps": steps, "style": style, "values": {key: [s[key] for s in stats] for key in keys}}


# --- sweeps and studies --------------------------------------------------------------------------------------

def analyse_sweep(cfg) -> Path:
    """``sweep=<dir or wandb:...>``: one row per run (its axes, the Table 1 columns, val loss, onset step)
    and every run's collapse over training; or, with ``study=``, that study (its spec: conf/study/)."""
    study = _study(cfg)
    runs = find_runs(cfg.sweep)
    local = not str(cfg.sweep).startswith("wandb:")
    base = Path(cfg.out) if cfg.out else (Path(cfg.sweep) / "analysis" if local else
                                          Path("outputs") / "analysis" / str(cfg.sweep).replace("/", "--").replace(":", "-"))
    out = base / study.name if study and not cfg.out else base
    out.mkdir(parents=True, exist_ok=True)
    if failed := failed_jobs(cfg.sweep):  # never results: listed apart
        write_csv([{"job": job, **failure} for job, failure in failed], out / "failed_jobs.csv")
        print(f"{len(failed)} job(s) left out, not results ({out / 'failed_jobs.csv'}):")
        for job, failure in failed:
            print(f"  {job}: {failure['reason']}\n      {failure['command']}")
    group = run_names.sweep_group(Path(cfg.sweep)) if local else Path(str(cfg.sweep)).name
    if study is None:
        tables, images = _sweep_table(cfg, runs, out)
    elif study.kind == "seed_pairs":
        tables, images = _seed_direction(cfg, runs, out, study)
    elif study.kind == "intervention":
        tables, images = _intervention_study(cfg, runs, out, study)
    else:
        tables, images = _arm_study(cfg, runs, out, study)
    config = unflatten(runs[0].config)
    _wandb(cfg, out, config, group, f"{group}-{study.name if study else 'sweep'}", tables, images)
    return out


def _study(cfg):
    """The composed ``study`` spec with the ``rank=`` and ``factor=`` knobs applied (None without a study)."""
    from omegaconf import OmegaConf

    from analysis.studies.spec import from_config

    if not cfg.study:
        return None
    return from_config(OmegaConf.to_container(cfg.study, resolve=True)).at(cfg.rank, cfg.factor)


def _sweep_table(cfg, runs, out: Path):
    axes, rank = factors(runs), cfg.rank or DEFAULT_RANK
    rows = []
    for run in runs:
        stats = run_statistics(run.final, cfg.threshold, cfg.completion, rank)
        row = {"run": run.name, **{a: run.get(a) for a in axes}}
        row.update(table1_row(run.name, run.final, cfg.threshold, cfg.completion, rank))
        summary = run.final.summary
        row.update({"step": stats["step"], "onset step": onset_step(run.records, cfg.threshold),
                    "solved step": solved_step(run.records),
                    "parking": _parking_cell(stats), "parking pred": stats["parking_prediction"],
                    "excess": stats["parking_excess"],
                    "sink": summary.peak_sink_source, "sink %": 100 * summary.peak_sink_fraction,
                    "area": stats["area_above_baseline"], "train loss": run.final.train_loss,
                    "val loss": val_loss(run)})
        row.pop("model")
        rows.append(row)
    write_csv(rows, out / "sweep.csv")
    atomic.write_text(out / "sweep.md", f"# Sweep {cfg.sweep}: {len(runs)} runs, axes {', '.join(axes) or '-'}\n\n"
                                  f"Onset threshold {cfg.threshold}.\n\n{markdown(rows)}\n")
    arm_keys = [a for a in axes if a not in SEED_KEYS]
    colors = {}
    series = []
    for run in runs:  # one colour and one legend entry per arm, labelled as W&B names the runs
        arm = run_names.label([(a, run.get(a)) for a in arm_keys]) or "all runs"
        colors.setdefault(arm, f"C{len(colors) % 10}")
        series.append(_series(arm, [r.step for r in run.records], run.records, cfg.threshold, rank)
                      | {"color": colors[arm]})
    name = run_names.sweep_group(Path(cfg.sweep)) if Path(cfg.sweep).is_dir() else str(cfg.sweep)
    image = _save(curves_figure(series, f"{name}: collapse over training", cfg.threshold, rank),
                  out / "collapse_over_training.png")
    panels = [(_panel_label(run, axes), run.records) for run in runs[:HEATMAP_RUNS]]
    heatmaps = _save(max_share_heatmaps(panels, cfg.threshold, f"{name}: max share by layer and step"
                                        + (f" (first {HEATMAP_RUNS} runs)" if len(runs) > HEATMAP_RUNS else "")),
                     out / "max_share_heatmaps.png")
    print(f"sweep table: {out / 'sweep.md'}")
    return {"sweep": rows}, [image, heatmaps]


def _parking_cell(stats: dict) -> str:
    """``3/4``: heads of the peak layer that park on BOS, of its heads (``-`` where the record cannot say)."""
    return "-" if not finite(stats["parking_heads"]) else f"{stats['parking_heads']:.0f}/{stats['units']:.0f}"


def _panel_label(run, axes: list[str]) -> str:
    """The run's swept values (``nope·s0``); its folder name when the runs differ in too many keys for that
    to read (a hand-made folder of unrelated runs)."""
    label = run_names.label([(a, run.get(a)) for a in axes])
    return label if label and len(label) <= 40 else run.name


# What each kind of arm study writes: its table of tests, the file of its verdict in words, and the arm
# columns that file shows (the per-arm means, at the study's rank).
_WRITES = {"ordering": ("checks", "verdict.md"), "trend": ("checks", "verdict.md"),
           "reference": ("comparisons", "statement.md")}


def _arm_columns(kind: str, rank: int) -> list[str]:
    if kind == "reference":
        return ["arm", "runs", "solved", "norm_cv", "norm_cv_low", "norm_cv_high", f"ve@{rank}", f"ve@{rank}_shuffle",
                f"ve@{rank}_gauss", "peak_max_share", "peak_max_share_low", "peak_max_share_high",
                "area_above_baseline", "val_loss", "val_loss_low", "val_loss_high"]
    return ["arm", "runs", "solved", "never", "onset_depth", "onset_step", "peak_max_share", "peak_max_share_low",
            "peak_max_share_high", "peak_depth", "area_above_baseline", "area_above_baseline_low",
            "area_above_baseline_high", f"ve@{rank}", "norm_cv", "val_loss"]


def _stratified(cfg, runs, out: Path, study):
    """A study judged within each value of ``study.strata`` apart (GAT vs GCN at each homophily): one folder
    per value with the whole study, and ``strata.csv`` / ``strata.md`` / ``strata.png`` side by side."""
    import dataclasses

    from analysis.studies.arms import factor_value

    values = sorted({factor_value(run, study.strata) for run in runs})
    inner = dataclasses.replace(study, strata=None)
    rows, images = [], []
    for value in values:
        subset = [run for run in runs if factor_value(run, study.strata) == value]
        tables, pictures = _arm_study(cfg, subset, out / f"{study.strata}={value}", inner)
        tests = tables.get("comparisons") or tables.get("checks") or []
        rows += [{study.strata: value, **test} for test in tests]
        images += pictures
    write_csv(rows, out / "strata.csv")
    columns = [study.strata, "score", "statistic", "n_a", "n_b", "difference", "low", "high", "p_perm", "mde", "verdict"]
    atomic.write_text(out / "strata.md", f"# {study.title}: {cfg.sweep}\n\n{_about(runs, sorted({str(r.get('seed')) for r in runs}))}."
                      f"\n\nEach arm against {study.reference} within each {study.strata} "
                      f"({cfg.level:.0%} Welch t-interval over seeds, permutation p, detectable effect):\n\n"
                      f"{markdown(rows, [c for c in columns if not rows or c in rows[0]])}\n")
    images.append(_save(_strata_figure(rows, study, cfg.level), out / "strata.png"))
    print(f"{study.name} study by {study.strata}: {out / 'strata.md'}")
    return {"strata": rows}, images


def _strata_figure(rows: list[dict], study, level: float):
    """Each comparison's difference (arm - reference) against the strata axis, with its t-interval."""
    import matplotlib.pyplot as plt

    statistics = list(dict.fromkeys(row["statistic"] for row in rows))
    fig, axes = plt.subplots(1, len(statistics), figsize=(4.2 * len(statistics), 3.4), squeeze=False)
    for ax, statistic in zip(axes[0], statistics):
        chosen = [row for row in rows if row["statistic"] == statistic]
        for arm in dict.fromkeys(row["score"] for row in chosen):
            mine = [row for row in chosen if row["score"] == arm]
            x = [float(row[study.strata]) for row in mine]
            y = [row["difference"] for row in mine]
            err = [[d - row["low"] for d, row in zip(y, mine)], [row["high"] - d for d, row in zip(y, mine)]]
            ax.errorbar(x, y, yerr=err, fmt="o-", capsize=3, label=f"{study.label(arm)} - {study.label(study.reference)}")
        ax.axhline(0, color="grey", lw=0.8)
        ax.set(xlabel=study.strata, ylabel="difference of arm means", title=statistic)
        ax.legend(fontsize=7)
    fig.suptitle(f"{study.title}: difference with its {level:.0%} t-interval over seeds", fontsize=9)
    fig.tight_layout()
    return fig


def _arm_study(cfg, runs, out: Path, study):
    """A study of arms x seeds (brake ordering, ALiBi slope, metric): per-run rows, per-arm means with
    intervals, the study's tests (checks or comparisons), its verdict in words, profiles and trajectories."""
    if study.strata:
        return _stratified(cfg, runs, out, study)
    out.mkdir(parents=True, exist_ok=True)
    from analysis.studies.brake import brake_study, verdict_text
    from analysis.studies.metric import metric_study, statement

    judge, explain = (metric_study, statement) if study.kind == "reference" else (brake_study, verdict_text)
    result = judge(runs, study, cfg.threshold, cfg.completion, cfg.level)
    tests, text_file = _WRITES[study.kind]
    write_csv(result["rows"], out / "runs.csv")
    write_csv(result["arms"], out / "arms.csv")
    write_csv(result[tests], out / f"{tests}.csv")
    text = explain(result)
    atomic.write_text(out / text_file, f"# {study.title}: {cfg.sweep}\n\n{text}\n\n## Arms (mean, {cfg.level:.0%} "
                                       f"t-interval over seeds; solved: runs that reached the solved loss)\n\n"
                                       f"{markdown(result['arms'], _arm_columns(study.kind, study.rank))}\n")
    saved = {k: result[k] for k in ("study", "factor", "threshold", "rank", "verdict", tests) if k in result}
    atomic.write_text(out / "result.json", json.dumps(saved, indent=1))
    about = f"{study.factor}: depth profiles at the last step (mean and band over seeds)"
    images = [_save(profiles_figure(result["profiles"], runs, study.rank, cfg.threshold, about), out / "profiles.png"),
              _save(curves_figure(result["curves"], f"{study.factor}: collapse over training (mean per arm, faint: "
                                  "seeds)", cfg.threshold, study.rank), out / "trajectories.png")]
    print(text)
    print(f"{study.name} study: {out / text_file}")
    return {"runs": result["rows"], "arms": result["arms"], tests: result[tests]}, images


def _final_column(runs, key: str) -> list[float]:
    """One per-layer column of the first run's last record (baselines and nulls are shared by the arms)."""
    return [layer.value(key) for layer in runs[0].final.layers]


def _intervention_study(cfg, runs, out: Path, study):
    """Each run's checkpoint re-read under the study's interventions (Mamba freeze, RWKV decay, AttnRes offset)."""
    from analysis.studies import interventions

    if not all(run.path.is_dir() and (run.path / "checkpoints" / "last.ckpt").is_file() for run in runs):
        raise UserError(f"study={study.name} re-reads the checkpoints: pass the local multirun folder as sweep=<dir>")
    result = interventions.intervention_study(runs, study, cfg.batch_size, cfg.threshold, cfg.completion, cfg.level)
    images = interventions.write(result, out, study.title, str(cfg.sweep), cfg.level, _final_column(runs, "baseline"),
                                 _about(runs, result["seeds"]))
    print(f"{study.name} study: {out / 'verdict.md'}")
    return {"runs": [{k: v for k, v in row.items() if k != "max_share_by_layer"} for row in result["rows"]],
            "comparisons": result["comparisons"]}, images


def _about(runs, seeds: list[str]) -> str:
    """What a study's runs are, for its figure and summary: router, size, data, seeds."""
    config = runs[0].config
    router = str(config.get("router._target_", "?")).rsplit(".", 1)[-1]
    size = " x ".join(str(config[k]) for k in ("router.n_layer", "router.d_model") if k in config)
    data = str(config.get("data.generator._target_") or config.get("data._target_") or "?").rsplit(".", 1)[-1]
    length = config.get("data.context_length")
    return (f"{router} {size}, data {data}" + (f" ({length} tokens)" if length else "")
            + f", {len(runs)} runs, seeds {', '.join(seeds)}")


def _seed_direction(cfg, runs, out: Path, study):
    from analysis.studies.seeds import seed_study, statement, summary_rows

    if not all(run.path.is_dir() and (run.path / "checkpoints" / "last.ckpt").is_file() for run in runs):
        raise UserError("the seed-direction study reruns the checkpoints: pass the local multirun folder as sweep=<dir>")
    result = seed_study(runs, study.rank, cfg.batch_size, cfg.get("workers"), threshold=cfg.threshold)
    summary = summary_rows(result)
    write_csv(result["rows"], out / "layers.csv")
    write_csv(summary, out / "summary.csv")
    text = statement(result)
    atomic.write_text(out / "summary.md", f"# {study.title}: {cfg.sweep}\n\n{markdown(summary)}\n\n{text}\n\n"
                                    "Key-space angles compare coordinates, which two weight seeds do not share; "
                                    "token-space angles are basis-free (docs/analysis.md).\n")
    image = _save(figures.seed_direction_figure(result["profiles"], study.rank,
                                                f"{run_names.sweep_group(Path(cfg.sweep))}: direction vs geometry"),
                  out / "seed_direction.png")
    print(markdown(summary))
    print(text)
    print(f"seed-direction study: {out / 'summary.md'}")
    return {"layers": result["rows"], "summary": summary}, [image]
