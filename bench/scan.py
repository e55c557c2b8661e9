"""Recurrent-router scans on CPU: how much faster the paths that train are than their references.

    python bench/scan.py                 # default and 130M Mamba shapes, default and 169M RWKV shapes
    python bench/scan.py --quick         # default shapes only

Mamba: ``selective_scan_chunked`` vs the sequential ``selective_scan_ref``, then our whole MambaMixer vs
transformers' MambaMixer (its CPU path is the sequential loop, what older versions called ``slow_forward``)
with the same weights. RWKV: ``wkv_chunked`` vs the sequential ``wkv_reference``.
Times are this process's CPU time (``time.process_time``), one thread, minimum over repeats: on a shared
machine wall-clock time measures the neighbours. Forward under no_grad; "train" is forward + backward.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from routers.rwkv import wkv_chunked, wkv_reference  # noqa: E402
from routers.ssm import MambaMixer, selective_scan_chunked, selective_scan_ref  # noqa: E402


def cpu_ms(fn, repeats: int) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.process_time()
        fn()
        best = min(best, time.process_time() - start)
    return 1e3 * best


def forward_and_train(fn, inputs: list[torch.Tensor], repeats: int) -> tuple[float, float]:
    with torch.no_grad():
        forward = cpu_ms(lambda: fn(*inputs), repeats)
    leaves = [t.detach().clone().requires_grad_(t.is_floating_point()) for t in inputs]
    train = cpu_ms(lambda: fn(*leaves).sum().backward(), max(2, repeats // 2))
    return forward, train


def row(label: str, base: tuple[float, float], fast: tuple[float, float]) -> str:
    return (f"{label:58s} fwd {base[0]:8.1f} -> {fast[0]:7.1f} ms ({base[0] / fast[0]:4.1f}x)   "
            f"train {base[1]:8.1f} -> {fast[1]:7.1f} ms ({base[1] / fast[1]:4.1f}x)")


def bench_mamba(batch: int, T: int, d_model: int, repeats: int) -> list[str]:
    from transformers import MambaConfig
    from transformers.models.mamba.modeling_mamba import MambaMixer as HFMambaMixer

    d, n = 2 * d_model, 16
    g = torch.Generator().manual_seed(0)
    x, delta = torch.randn(batch, T, d, generator=g), F.softplus(torch.randn(batch, T, d, generator=g) - 2)
    A = -torch.arange(1, n + 1, dtype=torch.float32).repeat(d, 1)  # S4D-real, as at initialisation
    B, C = torch.randn(batch, T, n, generator=g), torch.randn(batch, T, n, generator=g)
    scan_args = [x, delta, A, B, C]
    reference = forward_and_train(selective_scan_ref, scan_args, repeats)
    chunked = forward_and_train(selective_scan_chunked, scan_args, repeats)

    config = MambaConfig(hidden_size=d_model, state_size=n, expand=2, conv_kernel=4, num_hidden_layers=1)
    hf = HFMambaMixer(config, layer_idx=0)
    ours = MambaMixer(d_model, d_state=n, expand=2, d_conv=4, dt_rank=config.time_step_rank, scan="chunked",
                      scan_chunk=4, routing_chunk_channels=64, name="L0")
    ours.load_state_dict(hf.state_dict())
    u = torch.randn(batch, T, d_model, generator=g)
    hf_time = forward_and_train(lambda v: hf(v), [u], repeats)
    ours_time = forward_and_train(lambda v: ours(v)[0], [u], repeats)
    shape = f"b={batch} T={T} d_inner={d} n={n}"
    return [row(f"Mamba scan: reference -> chunked ({shape})", reference, chunked),
            row(f"Mamba mixer: transformers -> ours ({shape})", hf_time, ours_time)]


def bench_rwkv(batch: int, T: int, C: int, repeats: int) -> list[str]:
    g = torch.Generator().manual_seed(0)
    w, u = -torch.exp(torch.randn(C, generator=g)), torch.randn(C, generator=g)
    k, v = torch.randn(batch, T, C, generator=g), torch.randn(batch, T, C, generator=g)
    reference = forward_and_train(wkv_reference, [w, u, k, v], repeats)
    lines = []
    for chunk in (4, 16):
        chunked = forward_and_train(lambda *a: wkv_chunked(*a, chunk=chunk), [w, u, k, v], repeats)
        lines.append(row(f"RWKV WKV: reference -> chunked({chunk}) (b={batch} T={T} C={C})", reference, chunked))
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="default shapes only")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"torch {torch.__version__}, 1 thread, CPU ms (min of {args.repeats}); 'a -> b (r x)': r = a / b")
    for d_model in (128,) if args.quick else (128, 768):
        for line in bench_mamba(16, 128, d_model, args.repeats):
            print(line, flush=True)
    for C in (128,) if args.quick else (128, 768):
        for line in bench_rwkv(16, 128, C, args.repeats):
            print(line, flush=True)


if __name__ == "__main__":
    main()
