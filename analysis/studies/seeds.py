"""The seed-direction control (paper appendix C.6): is the attractor's geometry reproducible across reseeds
while its direction is not?

Pairs come from a sweep over ``seed`` (weights) and ``data_seed`` (data order): two runs whose configs are
equal except for ``seed`` form a *weight* pair, except for ``data_seed`` a *data* pair, except for both a
*both* pair. Each pair's final checkpoints are run on the identical probe (the first run's; each run is
measured once and its keys reused by every pair it is in, docs/decisions.md), and per layer
we record VE@r of each model, |dVE@r| (paper: max 0.016, always < 0.1), and the mean canonical angle
between their attractor subspaces in key space (the paper's) and in token space (basis-free), each beside
its random-subspace null (``analysis.studies.subspaces``). Pairs are the replicates: |dVE| is a mean over a kind's
pairs with its t-interval; the direction effect is the token-space angle of the kind's pairs minus that of
``len(UNTRAINED_PAIRS)`` pairs of *untrained* models (disjoint pairs of fresh initialisations, the baseline's
own replicates), a difference of two means with its Welch t-interval, permutation p and detectable effect
(analysis.reports.stats.compare_arms). It is read twice: over the whole depth, and over the *concentrating layers*
alone (those whose final max share, averaged over the kind's runs, exceeds the onset threshold), since a
depth mean dilutes the one or two layers where the attractor lives. With fewer than ``MIN_SEEDS`` pairs of a
kind no verdict is given. A kind's pairs share runs (5 seeds make 10 weight pairs), so its interval treats
them as more independent than they are: read it as a lower bound on the uncertainty (docs/statistics.md).
"""
from __future__ import annotations

import hashlib
import itertools
import math
import os
import pickle
from collections import deque
from dataclasses import dataclass

import torch

from analysis.studies.arms import MIN_SEEDS
from analysis.readers.runs import SEED_KEYS, Run, factors, load_router
from analysis.reports.stats import compare_arms, nanmean, t_interval
from analysis.studies.subspaces import KeyAccumulator, compare
from collapse import gaussian_null
from common.constants import LEVEL, ONSET_THRESHOLD, RANK
from records.schema import number
from common.errors import UserError
from datamodules.probe import TokenProbe
from routers.routing import routing_of

KINDS = ("weight", "data", "both")


def pair_kind(a: Run, b: Run, varying: list[str]) -> str | None:
    """weight / data / both when two runs differ only in their seeds; None when anything else differs."""
    differ = {key for key in varying if repr(a.get(key)) != repr(b.get(key))}
    if not differ or differ - set(SEED_KEYS):
        return None
    kinds = {SEED_KEYS[key] for key in differ}
    return kinds.pop() if len(kinds) == 1 else "both"


def find_pairs(runs: list[Run]) -> list[tuple[str, Run, Run]]:
    varying = factors(runs)
    pairs = [(kind, a, b) for a, b in itertools.combinations(runs, 2) if (kind := pair_kind(a, b, varying))]
    if not pairs:
        raise UserError("no pair of runs differs only by seed / data_seed; sweep them, e.g. "
                        "python train.py -m experiment=seed_direction (seed=0,1 data_seed=0,1)")
    return pairs


# Disjoint pairs of initialisation seeds for the untrained baseline: any seeds, only "independently
# initialised" matters; disjoint, so the pairs are independent replicates of the baseline (>= 3 for its interval).
UNTRAINED_PAIRS = ((1_000_003, 2_000_003), (3_000_017, 4_000_037), (5_000_011, 6_000_011))
UNTRAINED_SEEDS = tuple(seed for pair in UNTRAINED_PAIRS for seed in pair)


FORWARD_BATCH = 4  # sequences per forward pass: a CPU runs the explicit-softmax record path ~1.6x faster per
#                    sequence at 4 than at 16 (the T x T weights stay in cache); each sequence's keys are the same
#                    at any batch, and the statistics are still accumulated per ``batch_size`` batch.


@torch.no_grad()
def measure_keys(router, probe: TokenProbe, rank: int, batch_size: int, desc: str, show: bool = True) -> KeyAccumulator:
    """One model's side of every pair it is in: its keys on ``probe``, accumulated per ``batch_size`` batch
    (forward passes of FORWARD_BATCH sequences). ``show``: a progress bar (not in pool workers)."""
    from common.progress import progress

    side = KeyAccumulator(rank)
    batches = probe.batches(batch_size)
    if show:
        batches = progress(batches, desc, total=-(-len(probe.tokens) // batch_size))
    for tokens, _ in batches:
        parts = [KeyAccumulator.of(routing_of(router, part)) for part in tokens.split(FORWARD_BATCH)]
        side.update([torch.cat(layer) for layer in zip(*(keys for keys, _ in parts))], parts[0][1])
    return side


def _probe_digest(probe: TokenProbe) -> str:
    return hashlib.sha1(probe.tokens.numpy().tobytes()).hexdigest()


def _pair_probe(a: Run, b: Run, loaded: dict | None = None) -> TokenProbe:
    """Run ``a``'s saved probe, which both models of the pair are run on; ``b``'s must be the same.
    ``loaded``: probes already read, by path."""
    loaded = {} if loaded is None else loaded
    load = lambda path: loaded[path] if path in loaded else loaded.setdefault(path, TokenProbe.load(path))
    probe = load(a.path / "probe.pt")
    other = b.path / "probe.pt"
    if other.exists() and not torch.equal(load(other).tokens, probe.tokens):
        raise UserError(f"{a.name} and {b.name} saved different probes; the study needs runs on the same data "
                        "(data_seed changes only the batch order, never the probe)")
    return probe


def _keys_key(run: Run, probe: TokenProbe, rank: int, batch_size: int) -> tuple:
    return str(run.path), tuple(probe.tokens.shape), _probe_digest(probe), rank, batch_size


def _run_keys(run: Run, probe: TokenProbe, rank: int, batch_size: int, cache: dict) -> KeyAccumulator:
    """A trained run's keys on ``probe``, measured once per (run, probe) and kept in ``cache``."""
    key = _keys_key(run, probe, rank, batch_size)
    if key not in cache:
        cache[key] = measure_keys(load_router(run.path)[0], probe, rank, batch_size, run.name)
    return cache[key]


@torch.no_grad()
def _untrained_key(run: Run, probe: TokenProbe) -> tuple:
    """What the untrained pair depends on: the architecture (router and data config, seeds and paths aside) and
    the probe. Every pair of a sweep with one architecture shares it, so it is measured once."""
    config = tuple(sorted((k, repr(v)) for k, v in run.config.items()
                          if k.startswith(("router.", "data.")) and k not in SEED_KEYS and k != "data.cache_dir"))
    return config, tuple(probe.tokens.shape), _probe_digest(probe)


def compare_pair(a: Run, b: Run, rank: int = RANK, batch_size: int = 16, untrained_cache: dict | None = None,
                 keys_cache: dict | None = None) -> list[dict]:
    """Per-layer rows of one pair, both routers run on run ``a``'s probe, batch by batch.

    Beside the random-subspace nulls, each row carries the angles of *untrained* pairs of the same
    architecture on the same probe (``*_angle_untrained_<j>`` for each of UNTRAINED_PAIRS, their mean
    ``*_angle_untrained``): keys are functions of the input tokens, so two unrelated models already share
    token-space structure (a repeated token gets the same layer-0 key); only an angle below that baseline is
    direction shared by training. ``max_share_a`` / ``_b``: each run's final max share at the layer (what marks
    a concentrating layer). ``keys_cache``: each run's keys, measured once across the pairs that share it
    (``seed_study`` passes one for the whole sweep).
    """
    probe = _pair_probe(a, b)
    keys = {} if keys_cache is None else keys_cache
    rows = compare(_run_keys(a, probe, rank, batch_size, keys), _run_keys(b, probe, rank, batch_size, keys))
    cache = {} if untrained_cache is None else untrained_cache
    key = (_untrained_key(a, probe), rank, batch_size)
    if key not in cache:
        models = [measure_keys(load_router(a.path, untrained_seed=s)[0], probe, rank, batch_size,
                               f"untrained ({a.name}'s architecture, seed {s})") for s in UNTRAINED_SEEDS]
        cache[key] = untrained_pairs(models)
    dims = [layer.dim for layer in a.final.layers]
    for i, (row, dim) in enumerate(zip(rows, dims)):
        row.update(untrained_columns([pair[i] for pair in cache[key]]))
        row.update({f"ve@{rank}_gauss": gaussian_null(probe.tokens.shape[1], dim, rank),
                    "max_share_a": a.final.layers[i].max_share,
                    "max_share_b": b.final.layers[i].max_share})
    return rows


def untrained_pairs(models: list[KeyAccumulator]) -> list[list[dict]]:
    """The per-layer rows of each untrained pair: ``models`` measured in UNTRAINED_SEEDS order."""
    return [compare(models[2 * j], models[2 * j + 1]) for j in range(len(models) // 2)]


def untrained_columns(layer_rows: list[dict]) -> dict:
    """One layer's untrained angles: per pair (``token_angle_untrained_0`` ...) and their mean."""
    out = {}
    for space in ("token", "key"):
        values = [row[f"{space}_angle"] for row in layer_rows]
        out[f"{space}_angle_untrained"] = nanmean(values)
        out.update({f"{space}_angle_untrained_{j}": v for j, v in enumerate(values)})
    return out




@dataclass(frozen=True)
class _Pass:
    """One model pass of the study: a run's checkpoint (or, with ``untrained_seed``, its architecture freshly
    initialised) over a saved probe. What a pool worker is sent: paths and numbers, no tensors."""
    checkpoint: str
    probe: str
    rank: int
    batch_size: int
    desc: str
    untrained_seed: int | None = None


def _measure_pass(job: _Pass, show: bool = True) -> KeyAccumulator:
    router = load_router(job.checkpoint, untrained_seed=job.untrained_seed)[0]
    return measure_keys(router, TokenProbe.load(job.probe), job.rank, job.batch_size, job.desc, show)


def _worker_start() -> None:
    torch.set_num_threads(1)  # one process per core: each at one torch thread (the BLAS eigenproblems are at one)


def _worker_pass(job: _Pass) -> bytes:
    """A pass in a pool worker, its keys pickled by value (not through torch's shared-memory file descriptors).
    A bad input comes back as its one-line UserError; anything else as one line naming the pass."""
    try:
        return pickle.dumps(_measure_pass(job, show=False), protocol=pickle.HIGHEST_PROTOCOL)
    except UserError:
        raise
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise UserError(f"measuring {job.desc} failed in a worker ({type(e).__name__}: {first}); rerun with "
                        "workers=1 for the traceback") from None


def _plan(pairs: list, rank: int, batch_size: int, keys: dict, untrained: dict) -> tuple[dict, dict]:
    """The model passes the pairs need that ``keys`` / ``untrained`` do not hold yet: {keys_cache key: pass} for
    trained runs, {untrained_cache key: (one pass per UNTRAINED_SEEDS)} for the untrained pairs of each
    architecture and probe."""
    probes, runs, bases = {}, {}, {}
    for _, a, b in pairs:
        probe = _pair_probe(a, b, probes)
        for run in (a, b):
            key = _keys_key(run, probe, rank, batch_size)
            if key not in keys and key not in runs:
                runs[key] = _Pass(str(run.path), str(a.path / "probe.pt"), rank, batch_size, run.name)
        key = (_untrained_key(a, probe), rank, batch_size)
        if key not in untrained and key not in bases:  # every model of the untrained pairs, in UNTRAINED_SEEDS order
            bases[key] = tuple(_Pass(str(a.path), str(a.path / "probe.pt"), rank, batch_size,
                                     f"untrained ({a.name}'s architecture, seed {s})", s) for s in UNTRAINED_SEEDS)
    return runs, bases


def default_workers(passes: int) -> int:
    """One process per core this process may use, at most one per pass."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(cores, passes))


def measure_passes(jobs: list[_Pass], workers: int) -> list[KeyAccumulator]:
    """Every pass's keys, in ``jobs`` order. ``workers`` = 1: one after the other in this process, at its torch
    threads. More: this process and ``workers - 1`` spawned ones (each at one torch thread) share the passes,
    workers from the front of the list, this process from the back, so this process keeps measuring while the
    workers start (each imports torch). A pass's numbers do not depend on which process ran it."""
    if workers <= 1 or len(jobs) <= 1:
        return [_measure_pass(job) for job in jobs]
    import multiprocessing
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
    from concurrent.futures.process import BrokenProcessPool

    results, todo, running = [None] * len(jobs), deque(range(len(jobs))), {}
    threads, spawned = torch.get_num_threads(), min(workers, len(jobs)) - 1
    pool = ProcessPoolExecutor(spawned, mp_context=multiprocessing.get_context("spawn"), initializer=_worker_start)
    try:
        torch.set_num_threads(1)

        def collect(block: bool) -> None:
            done, _ = wait(list(running), timeout=None if block else 0, return_when=FIRST_COMPLETED)
            for future in done:
                results[running.pop(future)] = pickle.loads(future.result())
            while todo and len(running) < spawned:
                index = todo.popleft()
                running[pool.submit(_worker_pass, jobs[index])] = index

        collect(block=False)
        while todo:
            index = todo.pop()
            results[index] = _measure_pass(jobs[index])
            collect(block=False)
        while running:
            collect(block=True)
    except BrokenProcessPool:
        raise UserError("a measurement worker died (out of memory, or a script that calls seed_study outside "
                        "`if __name__ == '__main__':`); rerun with workers=1") from None
    finally:
        torch.set_num_threads(threads)
        pool.shutdown(wait=True, cancel_futures=True)
    return results


def seed_study(runs: list[Run], rank: int = RANK, batch_size: int = 16, workers: int | None = None,
               threshold: float = ONSET_THRESHOLD) -> dict:
    """Rows per (pair, layer), and per reseed kind the per-layer mean over its pairs. ``threshold``: the onset
    threshold that marks a concentrating layer.

    The model passes (each run once, the untrained pairs' models once per architecture) run first, in
    ``workers`` processes (:func:`measure_passes`; default one per core); the rows do not depend on it."""
    rows, untrained, keys = [], {}, {}
    pairs = find_pairs(runs)
    trained, bases = _plan(pairs, rank, batch_size, keys, untrained)
    jobs = list(trained.values()) + [job for pair in bases.values() for job in pair]
    workers = workers or default_workers(len(jobs))
    measured = measure_passes(jobs, workers)
    keys.update(zip(trained, measured))
    per_base = len(UNTRAINED_SEEDS)
    for i, key in enumerate(bases):
        untrained[key] = untrained_pairs(measured[len(trained) + per_base * i:len(trained) + per_base * (i + 1)])
    for kind, a, b in pairs:
        for row in compare_pair(a, b, rank, batch_size, untrained, keys):
            rows.append({"kind": kind, "run_a": a.name, "run_b": b.name, **row})
    return {"rows": rows, "profiles": kind_profiles(rows), "rank": rank, "threshold": threshold}


def kind_profiles(rows: list[dict]) -> dict[str, list[dict]]:
    """Per reseed kind, per layer: the mean over the kind's pairs of every column of the rows."""
    profiles = {}
    for kind in KINDS:
        kind_rows = [r for r in rows if r["kind"] == kind]
        if not kind_rows:
            continue
        layers = sorted({r["layer"] for r in kind_rows})
        profiles[kind] = [{key: nanmean([r[key] for r in kind_rows if r["layer"] == layer])
                           for key in kind_rows[0] if key not in ("kind", "run_a", "run_b")} for layer in layers]
    return profiles


def _per_pair(rows: list[dict], value, layers: set | None = None) -> list[float]:
    """One number per pair: the mean of ``value(row)`` over that pair's layers (``layers``: only those)."""
    pairs: dict = {}
    for r in rows:
        if layers is None or r["layer"] in layers:
            pairs.setdefault((r["run_a"], r["run_b"]), []).append(value(r))
    return [nanmean(v) for v in pairs.values()]


def _per_untrained_pair(rows: list[dict], space: str, layers: set | None = None) -> list[float]:
    """One number per untrained pair: its angle averaged over ``layers`` (None: all). Every trained pair's rows
    carry the same untrained angles per layer, so each layer counts once."""
    by_layer = {r["layer"]: r for r in rows if layers is None or r["layer"] in layers}
    pairs = sorted({int(k.rsplit("_", 1)[1]) for k in rows[0] if k.startswith(f"{space}_angle_untrained_")})
    return [nanmean([r[f"{space}_angle_untrained_{j}"] for r in by_layer.values()]) for j in pairs]


def concentrating_layers(rows: list[dict], threshold: float) -> list[int]:
    """Layers whose final max share, averaged over the runs the rows compare, exceeds ``threshold``: where the
    attractor lives (the onset rule's criterion applied to every layer). Rows without max shares: none."""
    shares: dict = {}
    for r in rows:
        for run, key in ((r["run_a"], "max_share_a"), (r["run_b"], "max_share_b")):
            shares.setdefault(r["layer"], {})[run] = number(r.get(key))
    return sorted(layer for layer, runs in shares.items() if nanmean(list(runs.values())) > threshold)


def _direction_effect(rows: list[dict], layers: set | None, level: float) -> dict:
    """Trained pairs' token-space angle against the untrained pairs' (mean of each, Welch interval of the
    difference, permutation p, detectable effect), over ``layers`` (None: the whole depth)."""
    trained = _per_pair(rows, lambda r: r["token_angle"], layers)
    baseline = _per_untrained_pair(rows, "token", layers)
    _, base_low, base_high = t_interval(baseline, level)
    return {"angle": nanmean(trained), "untrained": nanmean(baseline), "untrained_low": base_low,
            "untrained_high": base_high, "untrained_pairs": len(baseline), **compare_arms(baseline, trained, level)}


def summary_rows(result: dict, level: float = LEVEL) -> list[dict]:
    """One row per reseed kind: pairs, max |dVE@r| and its mean over pairs (t-interval), the angles against their
    baselines, and the direction effect (token-space angle minus the untrained pairs', Welch interval,
    permutation p, detectable effect) over the whole depth and over the concentrating layers."""
    rank, out = result["rank"], []
    threshold = result.get("threshold", ONSET_THRESHOLD)
    for kind, layers in result["profiles"].items():
        rows = [r for r in result["rows"] if r["kind"] == kind]
        pairs = len({(r["run_a"], r["run_b"]) for r in rows})
        delta = [r[f"delta_ve@{rank}"] for r in rows]
        dve, dve_low, dve_high = t_interval(_per_pair(rows, lambda r: r[f"delta_ve@{rank}"]), level)
        depth = _direction_effect(rows, None, level)
        hot = concentrating_layers(rows, threshold)
        conc = _direction_effect(rows, set(hot), level) if hot else {}
        row = {"reseed": kind, "pairs": pairs, f"max |dVE@{rank}|": max(delta), f"mean |dVE@{rank}|": dve,
               f"mean |dVE@{rank}| low": dve_low, f"mean |dVE@{rank}| high": dve_high,
               "untrained pairs": depth["untrained_pairs"],
               "token untrained low": depth["untrained_low"], "token untrained high": depth["untrained_high"],
               "token angle - untrained": depth["difference"], "token angle - untrained low": depth["low"],
               "token angle - untrained high": depth["high"], "p perm": depth["p_perm"],
               "detectable": depth["mde"],
               "concentrating layers": " ".join(f"L{layer}" for layer in hot) or "none",
               "token angle (conc.)": conc.get("angle", math.nan),
               "token untrained (conc.)": conc.get("untrained", math.nan),
               "token angle - untrained (conc.)": conc.get("difference", math.nan),
               "token angle - untrained (conc.) low": conc.get("low", math.nan),
               "token angle - untrained (conc.) high": conc.get("high", math.nan),
               "p perm (conc.)": conc.get("p_perm", math.nan), "detectable (conc.)": conc.get("mde", math.nan)}
        for space in ("key", "token"):
            row.update({f"{space} angle": nanmean([r[f"{space}_angle"] for r in layers]),
                        f"{space} untrained": nanmean([r[f"{space}_angle_untrained"] for r in layers]),
                        f"{space} null": nanmean([r[f"{space}_angle_null"] for r in layers])})
        out.append(row)
    return out


def direction_verdict(low: float, high: float, pairs: int) -> str:
    """What the Welch interval of (trained - untrained) angle says about direction shared by training."""
    if pairs < MIN_SEEDS:
        return f"no verdict, too few pairs ({pairs}; need >= {MIN_SEEDS})"
    if math.isnan(low) or math.isnan(high):
        return "undetermined (no interval)"
    return ("shared beyond what the input imposes" if high < 0 else
            "less shared than in two untrained models" if low > 0 else
            "no more shared than in two untrained models (the interval includes zero)")


def _effect(s: dict, suffix: str = "") -> str:
    gap, low, high = (s[f"token angle - untrained{suffix}{end}"] for end in ("", " low", " high"))
    return (f"trained - untrained {gap:+.1f} deg [t {low:.1f}, {high:.1f}], permutation p {s[f'p perm{suffix}']:.2g}, "
            f"detectable >= {s[f'detectable{suffix}']:.2g} deg")


def statement(result: dict) -> str:
    """What the numbers say, claim by claim (docs/analysis.md: which angle supports which claim)."""
    rank, lines = result["rank"], []
    threshold = result.get("threshold", ONSET_THRESHOLD)
    for s in summary_rows(result):
        trained, untrained, null = s["token angle"], s["token untrained"], s["token null"]
        base = (f"untrained {untrained:.1f} [t {s['token untrained low']:.1f}, {s['token untrained high']:.1f}] over "
                f"{s['untrained pairs']} pairs")
        if s["pairs"] < MIN_SEEDS:
            geometry = f"no verdict, too few pairs ({s['pairs']}; need >= {MIN_SEEDS})"
        else:
            geometry = "reproducible (< 0.1)" if s[f"max |dVE@{rank}|"] < 0.1 else "NOT reproducible (>= 0.1)"
        verdict = direction_verdict(s["token angle - untrained low"], s["token angle - untrained high"], s["pairs"])
        if s["concentrating layers"] == "none":
            hot = f"no layer's final max share exceeds {threshold} (averaged over the runs compared)"
        else:
            hot = (f"{s['token angle (conc.)']:.1f} deg (untrained {s['token untrained (conc.)']:.1f}; "
                   f"{_effect(s, ' (conc.)')}): direction " + direction_verdict(
                       s["token angle - untrained (conc.) low"], s["token angle - untrained (conc.) high"], s["pairs"]))
        key = f"key-space angle {s['key angle']:.1f} deg (untrained {s['key untrained']:.1f}, chance {s['key null']:.1f})"
        key += ("; the pair shares its initial basis, so this angle is how far training rotated the attractor"
                if s["reseed"] == "data" else "; different initial bases: near chance by construction, no evidence")
        lines.append(f"- **{s['reseed']}** ({s['pairs']} pair(s)): geometry {geometry}, max |dVE@{rank}| = "
                     f"{s[f'max |dVE@{rank}|']:.3f}, mean {s[f'mean |dVE@{rank}|']:.3f} "
                     f"[t {s[f'mean |dVE@{rank}| low']:.3f}, {s[f'mean |dVE@{rank}| high']:.3f}]; token-space angle, "
                     f"depth mean: {trained:.1f} deg ({base}, chance {null:.1f}; {_effect(s)}): direction {verdict}; "
                     f"concentrating layers ({s['concentrating layers']}): {hot}; {key}.")
    return "\n".join(lines)
