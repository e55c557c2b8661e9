"""The collapse monitor's cost as a share of training time, per router family (target: <= 2 %).

    python bench/monitor_overhead.py                          # every family, 1 thread
    python bench/monitor_overhead.py --router mamba --rounds 5
    python bench/monitor_overhead.py --router pythia data.probe_sequences=64   # extra Hydra overrides
    python bench/monitor_overhead.py --router pythia --profile                 # where a pass spends its time
    python bench/monitor_overhead.py --router pythia --device cuda --bf16 --vocab 50304 router=pythia_160m \
        data=synthetic data.context_length=2048 data.batch_size=8           # a GPU preset (bench/run_all.py)

Each family at its default config (bench/harness.py: the objects train.py builds). One process, one model:
rounds of ``--steps`` training steps, one full-probe monitor pass (``measure_signature`` with the monitor's own
probe batch size, exactly what the callback calls) and one pass on the live probe, alternating which goes
first. The overhead of a round is pass / (interval x median step); reported is the median over rounds, at the
default interval of conf/callbacks/default.yaml (250) with the full probe, and for the composed run's own
schedule (the laptop regime: a live pass every 50 steps, the full probe at the last step).
"""
from __future__ import annotations

import argparse
import sys
import time
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.harness import FAMILIES, build_family, interleaved, load_average, median  # noqa: E402

DEFAULT_INTERVAL = 250  # conf/callbacks/default.yaml: every_n_steps
TARGET = 0.02


def measure_family(family: str, steps: int, rounds: int, overrides: list[str], out: Path,
                   profile: bool = False, device: str = "cpu", bf16: bool = False, vocab: int | None = None) -> dict:
    import torch

    from callbacks.collapse_monitor import measurement_plan
    from collapse.measure import measure_signature

    built = build_family(family, out, overrides, device=device, bf16=bf16, vocab_size=vocab)
    monitor = built.cfg.callbacks.collapse_monitor
    probe = built.datamodule.probe

    def monitor_pass():
        measure_signature(built.task, probe, tuple(monitor.ranks), monitor.probe_batch_size,
                          monitor.onset_threshold, monitor.completion_threshold)
        if device != "cpu":
            torch.cuda.synchronize()  # the pass's last kernels inside its wall clock

    # The live probe (callbacks/collapse_monitor.py): the steps between full-probe steps measure its head.
    live = monitor.get("live_probe_sequences")
    live_probe = probe.head(live) if live and hasattr(probe, "head") and live < len(probe) else None

    def live_pass():
        measure_signature(built.task, live_probe, tuple(monitor.ranks), monitor.probe_batch_size,
                          monitor.onset_threshold, monitor.completion_threshold)
        if device != "cpu":
            torch.cuda.synchronize()

    step_seconds = []

    def train_steps():
        for _ in range(steps):
            start = time.perf_counter()
            built.step()
            step_seconds.append(time.perf_counter() - start)

    train_steps()  # warm-up: first-call allocations, data generation
    monitor_pass()  # warm-up: the Gaussian nulls, computed once per run and cached
    step_seconds.clear()
    if profile:
        from torch.profiler import profile as profiler

        with profiler() as prof:
            monitor_pass()
        print(f"# {family}: one monitor pass, top operators by self CPU time\n"
              + prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12), flush=True)
    timers = {"train": train_steps, "monitor": monitor_pass, **({"live": live_pass} if live_probe else {})}
    seconds = interleaved(timers, rounds)
    per_round = [step_seconds[i * steps:(i + 1) * steps] for i in range(rounds)]
    shares = [p / median(s) for p, s in zip(seconds["monitor"], per_round)]  # pass in units of steps
    live_shares = [p / median(s) for p, s in zip(seconds.get("live", []), per_round)]
    n_live, n_full = measurement_plan(int(built.cfg.trainer.max_steps), int(monitor.every_n_steps),
                                      monitor.get("full_probe_every_n_steps"), live_probe is not None)
    pass_in_steps, live_in_steps = median(shares), median(live_shares) if live_shares else median(shares)
    return {"family": family, "step_s": median(step_seconds), "pass_s": median(seconds["monitor"]),
            "pass_in_steps": pass_in_steps, "interval": int(monitor.every_n_steps),
            "probe": len(probe), "live_probe": len(live_probe) if live_probe else None,
            "live_in_steps": live_in_steps, "max_steps": int(built.cfg.trainer.max_steps),
            "run_share": (n_live * live_in_steps + n_full * pass_in_steps) / int(built.cfg.trainer.max_steps),
            "schedule": (n_live, n_full), "threads": torch.get_num_threads()}


def overhead(row: dict, interval: int) -> float:
    return row["pass_in_steps"] / interval


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--router", choices=list(FAMILIES), action="append",
                        help="a family (repeatable); default: all")
    parser.add_argument("--steps", type=int, default=10, help="training steps per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--profile", action="store_true", help="also print a torch.profiler table of one pass")
    parser.add_argument("--device", default="cpu", help="cpu or cuda: where the task trains and the monitor runs")
    parser.add_argument("--vocab", type=int, default=None, help="the router's vocabulary instead of the data's "
                        "(at least the data's): a preset's real head over synthetic data")
    parser.add_argument("--bf16", action="store_true", help="training steps under bf16 autocast (trainer=gpu's "
                        "bf16-mixed); the monitor computes in fp32 either way")
    args, overrides = parser.parse_known_args()
    import torch

    torch.set_num_threads(args.threads)
    print(f"# {load_average()}, {args.threads} thread(s), {args.device}{', bf16 steps' if args.bf16 else ''}, "
          f"{args.rounds} rounds of {args.steps} steps + 1 pass")
    for family in args.router or list(FAMILIES):
        with tempfile.TemporaryDirectory() as tmp:
            row = measure_family(family, args.steps, args.rounds, overrides, Path(tmp), args.profile,
                                 args.device, args.bf16, args.vocab)
        at_default = overhead(row, DEFAULT_INTERVAL)
        verdict = "ok" if at_default <= TARGET else "ABOVE TARGET"
        n_live, n_full = row["schedule"]
        live = (f"; live probe {row['live_probe']}: {row['live_in_steps']:.2f} steps a pass"
                if row["live_probe"] else "")
        print(f"{family:8s} probe {row['probe']:4d}  step {1e3 * row['step_s']:7.1f} ms  pass {row['pass_s']:6.2f} s "
              f"= {row['pass_in_steps']:6.1f} steps  overhead {100 * at_default:5.2f} % every {DEFAULT_INTERVAL} "
              f"({verdict}), {100 * row['run_share']:5.2f} % every {row['interval']} (the run's schedule: "
              f"{n_live} live + {n_full} full passes in {row['max_steps']} steps{live})", flush=True)


if __name__ == "__main__":
    main()
