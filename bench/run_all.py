"""Every bench on this device, one markdown table (default bench/results.md).

    python bench/run_all.py            # full: about 15 min on 2 CPU cores
    python bench/run_all.py --quick    # a few steps of each: about 5 min on 2 CPU cores
    python bench/run_all.py --out /tmp/results.md

Each bench runs as its own process (a fresh interpreter, no state shared between benches) and this script
reads its last lines. All numbers are side-by-side ratios or rates measured in one process, so they hold
under load; the table records the load average at the start. Rows the device cannot measure (bf16 and SDPA
flash without a GPU kernel, DDP over several GPUs) say "n/a on <device>".
"""
from __future__ import annotations

import argparse
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.harness import FAMILIES, load_average  # noqa: E402
from common import atomic  # noqa: E402


def bench(script: str, *args: str) -> str:
    result = subprocess.run([sys.executable, str(ROOT / "bench" / script), *args], cwd=ROOT, text=True,
                            capture_output=True)
    if result.returncode:
        return f"FAILED ({result.stderr.strip().splitlines()[-1] if result.stderr.strip() else result.returncode})"
    return result.stdout


def pick(pattern: str, text: str, default: str = "?") -> str:
    match = re.search(pattern, text)
    return match.group(1) if match else default


def throughput_row(label: str, text: str) -> str:
    if text.startswith("FAILED"):
        return f"| throughput: {label} | {text} | |"
    return (f"| throughput: {label} | ours/HF **{pick(r'ratio ours/HF: ([0-9.]+)', text)}**, "
            f"ours {pick(r'ours +tokens/s: +([0-9]+)', text)} tok/s | MFU ours "
            f"{pick(r'ours .*MFU +([0-9.]+) %', text)} %, HF {pick(r'GPTNeoX.*MFU +([0-9.]+) %', text)} % of a "
            f"measured {pick(r'matmul ([0-9.]+) GFLOP/s', text)} GFLOP/s matmul peak; GEMM floor: ours "
            f"{pick(r'ours ([0-9.]+)x it', text)}x, HF {pick(r'HF ([0-9.]+)x;', text)}x |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="few steps per bench (a smoke run of the table)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results.md")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    args = parser.parse_args()
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    gpus = torch.cuda.device_count() if device == "cuda" else 0
    steps = ["--steps", "4", "--warmup", "1"] if args.quick else ["--steps", "20"]
    threads = ["--threads", "1"] if device == "cpu" else []
    started, load = time.time(), load_average()
    rows = []

    def save(done: bool = False) -> None:
        """The table so far, rewritten atomically after every row: a bench that dies keeps the rows before it."""
        state = f"{time.time() - started:.0f} s in all" if done else "in progress"
        header = (f"# Bench results ({'quick' if args.quick else 'full'} run)\n\n"
                  f"Device: {device}{f' x {gpus}' if gpus else ''}, torch {torch.__version__}, "
                  f"{'1 thread' if device == 'cpu' else 'default threads'}; {load} at the start; {state}. "
                  f"Made by `python bench/run_all.py{' --quick' if args.quick else ''}`; every number is a "
                  f"side-by-side ratio or rate from one process (docs/performance.md).\n\n"
                  f"| bench | result | detail |\n|---|---|---|\n")
        atomic.write_text(args.out, header + "\n".join(rows) + "\n")

    def add(row: str) -> None:
        rows.append(row)
        save()

    base = bench("throughput.py", "--device", device, *threads, *steps)
    add(throughput_row("fp32, eager", base))
    if device == "cuda" and torch.cuda.is_bf16_supported():
        add(throughput_row("bf16 autocast on", bench("throughput.py", "--device", device, "--bf16", *steps)))
        add(throughput_row("SDPA flash off (math kernel)",
                                   bench("throughput.py", "--device", device, "--sdpa", "math", *steps)))
    else:
        add(f"| throughput: bf16 autocast on | n/a on {device} (no bf16 matmul units to measure; "
                    f"correctness: tests/test_precision.py) | |")
        add(throughput_row("SDPA flash off (math kernel)",
                                   bench("throughput.py", "--device", device, "--sdpa", "math", *threads, *steps)))
    if not args.quick:
        add(throughput_row("ours torch.compile'd", bench("throughput.py", "--device", device, "--compile",
                                                                 *threads, *steps)))
    add(f"| DDP: 1 vs {max(gpus, 2)}+ GPUs | " + ("n/a on " + device if gpus < 2 else
                "not automated: run `python train.py trainer=ddp` and compare steps/s") + " | |")

    monitor_args = ["--rounds", "1", "--steps", "3"] if args.quick else ["--rounds", "3", "--steps", "10"]
    for family in FAMILIES:
        text = bench("monitor_overhead.py", "--router", family, *monitor_args)
        line = next((l for l in text.splitlines() if l.startswith(family)), text.strip()[-200:])
        at_default, seconds = pick(r"overhead +([0-9.]+) %", line), pick(r"pass +([0-9.]+) s", line)
        in_steps, at_run = pick(r"= +([0-9.]+) steps", line), pick(r"([0-9.]+) % every ([0-9]+) [(]the run", line)
        add(f"| monitor: {family} | **{at_default} %** of training every 250 steps (target <= 2 %) | "
                    f"pass {seconds} s = {in_steps} steps; {at_run} % at the run's own interval |")

    loop = bench("train_loop.py", *(["--rounds", "2", "--steps", "5"] if args.quick else ["--rounds", "4", "--steps", "20"]))
    add(f"| Lightning loop vs bare PyTorch | **{pick(r'overhead +([+-][0-9.]+) %', loop)} %** (target <= 5 %) | "
                f"lightning {pick(r'lightning step +([0-9.]+) ms', loop)} ms, bare {pick(r'bare step +([0-9.]+) ms', loop)} ms "
                f"per step |")
    if not args.quick:
        scan = bench("scan.py", "--quick")
        for line in scan.splitlines()[1:]:
            if line.strip():
                add(f"| scan (bench/scan.py --quick) | {line.strip()} | |")

    save(done=True)
    print(args.out.read_text())


if __name__ == "__main__":
    main()
