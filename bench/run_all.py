"""Every bench on this device, one markdown table (default bench/results.md).

    python bench/run_all.py            # full: about 15 min on 2 CPU cores
    python bench/run_all.py --quick    # a few steps of each: about 5 min on 2 CPU cores
    python bench/run_all.py --out /tmp/results.md

Each bench runs as its own process (a fresh interpreter, no state shared between benches) and this script
reads its last lines. All numbers are side-by-side ratios or rates measured in one process, so they hold
under load; the table records the load average at the start. Rows the device cannot measure (bf16 and SDPA
flash without a GPU kernel, DDP over several GPUs) say "n/a on <device>".

On CUDA it also measures the Pythia-160M preset (shape read from conf/router/pythia_160m.yaml): tokens/s and
MFU in fp32 (against a measured fp32 matmul peak) and under bf16 autocast (against a measured bf16 peak),
bf16 vs fp32, and the monitor's share of training; on a CPU those rows say why they are skipped.
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
from routers.transformer import FAMILY as TRANSFORMER  # noqa: E402  (the presets are Pythia's)
from common import atomic  # noqa: E402


def bench(script: str, *args: str) -> str:
    result = subprocess.run([sys.executable, str(ROOT / "bench" / script), *args], cwd=ROOT, text=True,
                            capture_output=True)
    if result.returncode:
        return f"FAILED ({result.stderr.strip().splitlines()[-1] if result.stderr.strip() else result.returncode})"
    return result.stdout


PRESET = "pythia_160m"
PRESET_VOCAB = 50304  # EleutherAI/pythia-160m's embedding rows; the YAML leaves vocab_size to the tokenizer
PRESET_BATCH = 8      # sequences of the preset's full context per step


def preset_shape(preset: str = PRESET) -> dict:
    """The router preset's shape as composed from its YAML (conf/router/<preset>.yaml over its defaults)."""
    import tempfile

    import run

    with tempfile.TemporaryDirectory() as tmp:
        router = run.compose_run(Path(tmp), [f"router={preset}", "logger=csv"]).router
    return {"n_layer": int(router.n_layer), "d_model": int(router.d_model), "n_head": int(router.n_head),
            "context": int(router.context_length)}


def preset_rows(device: str, quick: bool, run_bench=None) -> list[str]:
    """The Pythia-160M rows: measured on CUDA; on any other device one line each saying why not."""
    labels = ["throughput fp32", "throughput bf16 autocast", "bf16 vs fp32", "monitor share"]
    if device != "cuda":
        return [f"| Pythia-160M: {label} | n/a on {device}: the 160M preset needs a GPU; run "
                f"`python bench/run_all.py` on CUDA | |" for label in labels]
    run_bench = run_bench or bench
    shape = preset_shape()
    steps = ["--steps", "4", "--warmup", "1"] if quick else ["--steps", "20"]
    shape_args = ["--n-layer", str(shape["n_layer"]), "--d-model", str(shape["d_model"]), "--n-head",
                  str(shape["n_head"]), "--vocab", str(PRESET_VOCAB), "--context", str(shape["context"]),
                  "--batch", str(PRESET_BATCH)]
    fp32 = run_bench("throughput.py", "--device", device, *shape_args, *steps)
    bf16 = run_bench("throughput.py", "--device", device, "--bf16", *shape_args, *steps)
    rows = [throughput_row(f"Pythia-160M fp32 ({PRESET_BATCH} x {shape['context']})", fp32),
            throughput_row(f"Pythia-160M bf16 autocast ({PRESET_BATCH} x {shape['context']})", bf16)]
    tokens = [pick(r"ours +tokens/s: +([0-9]+)", text) for text in (fp32, bf16)]
    speedup = f"{float(tokens[1]) / float(tokens[0]):.2f}x" if "?" not in tokens else "?"
    rows.append(f"| Pythia-160M: bf16 vs fp32 | ours **{speedup}** tokens/s | fp32 {tokens[0]}, bf16 {tokens[1]} "
                f"tok/s |")
    monitor_args = ["--rounds", "1", "--steps", "3"] if quick else ["--rounds", "3", "--steps", "10"]
    # synthetic data (no download) at the default 1024-token language; the router keeps the preset's 50304-row
    # head (--vocab): the generator's V x V table cannot reach 50k
    text = run_bench("monitor_overhead.py", "--router", TRANSFORMER.name, "--device", device, "--bf16", "--vocab",
                     str(PRESET_VOCAB), *monitor_args, f"router={PRESET}", "data=synthetic",
                     f"data.context_length={shape['context']}", f"data.batch_size={PRESET_BATCH}")
    rows.append(monitor_row("Pythia-160M (bf16 steps)", TRANSFORMER.name, text))
    return rows


def monitor_row(label: str, family: str, text: str) -> str:
    line = next((l for l in text.splitlines() if l.startswith(family)), text.strip()[-200:])
    at_default, seconds = pick(r"overhead +([0-9.]+) %", line), pick(r"pass +([0-9.]+) s", line)
    in_steps, at_run = pick(r"= +([0-9.]+) steps", line), pick(r"([0-9.]+) % every ([0-9]+) [(]the run", line)
    return (f"| monitor: {label} | **{at_default} %** of training every 250 steps (target <= 2 %) | "
            f"pass {seconds} s = {in_steps} steps; {at_run} % at the run's own interval |")


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
        add(monitor_row(family, family, bench("monitor_overhead.py", "--router", family, *monitor_args)))
    for row in preset_rows(device, args.quick):
        add(row)

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
