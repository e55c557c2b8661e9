"""Training time with and without the CollapseMonitor at its default interval (target: <= 5 % overhead).

    python bench/monitor_overhead.py                    # default model and data, 400 steps each
    python bench/monitor_overhead.py --steps 1200 data=synthetic

Both runs use the same composed config (logger=csv, no checkpoints) and differ only in the monitor; they
run one after the other in this process and the ratio is what counts, not the absolute seconds.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from run import compose_run  # noqa: E402  (in-process Hydra composition)


def timed_run(out: Path, steps: int, monitor: bool, overrides: list[str]) -> float:
    import train

    args = [f"trainer.max_steps={steps}", "logger=csv", "~callbacks.checkpoint", "~callbacks.lr_monitor",
            "trainer.enable_progress_bar=false", "trainer.limit_val_batches=0", "print_table=false", *overrides]
    if not monitor:
        args.append("~callbacks.collapse_monitor")
    cfg = compose_run(out, args)
    start = time.perf_counter()
    train.train(cfg)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=400)
    args, overrides = parser.parse_known_args()
    with tempfile.TemporaryDirectory() as tmp:
        timed_run(Path(tmp) / "warmup", 20, False, overrides)  # data cache, tokenizer, first-call costs
        without = timed_run(Path(tmp) / "without", args.steps, False, overrides)
        with_monitor = timed_run(Path(tmp) / "with", args.steps, True, overrides)
    overhead = with_monitor / without - 1
    print(f"steps={args.steps}  without monitor {without:.1f} s   with monitor {with_monitor:.1f} s   "
          f"overhead {100 * overhead:+.1f} %  (target <= 5 %)")


if __name__ == "__main__":
    main()
