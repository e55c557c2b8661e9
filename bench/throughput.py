"""Training throughput: our Pythia-style router vs transformers' GPTNeoXForCausalLM at the same shape, and
both against the machine's own matmul peak (model FLOP utilisation, MFU).

Both run eager in fp32 with AdamW on the same random batches; steps alternate between the two models and a
2048 x 2048 fp32 matmul (and which goes first) so that load from other processes hits all alike; rates and
ratios are medians over steps, robust to bursts of load. The step's dense matmuls timed alone (the GEMM
floor) bound what any fp32 eager implementation of the model can reach.

    python bench/throughput.py                    # default small config, 16 x 128, CPU, about a minute
    python bench/throughput.py --steps 50 --device cuda
    python bench/throughput.py --compile          # ours under torch.compile (HF stays eager)
    python bench/throughput.py --bf16             # both under bf16 autocast
    python bench/throughput.py --sdpa math        # SDPA's math kernel instead of flash (both models)
    python bench/throughput.py --no-fused         # ours with the plain logits + F.cross_entropy loss too

Ours trains with the LM task's own loss (tasks/fused_loss.py: the fused linear + cross-entropy head, the
default of conf/task/lm.yaml); HF with its logits and F.cross_entropy, as a user of transformers would.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from routers.transformer import Transformer  # noqa: E402
from tasks.fused_loss import has_features, language_model_loss  # noqa: E402


def build_models(args) -> tuple[torch.nn.Module, torch.nn.Module]:
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    ours = Transformer(vocab_size=args.vocab, n_layer=args.n_layer, d_model=args.d_model, n_head=args.n_head,
                       context_length=args.context)
    config = GPTNeoXConfig(vocab_size=args.vocab, hidden_size=args.d_model, num_hidden_layers=args.n_layer,
                           num_attention_heads=args.n_head, intermediate_size=4 * args.d_model,
                           max_position_embeddings=args.context, rotary_pct=0.25, use_parallel_residual=True,
                           tie_word_embeddings=False)
    config._attn_implementation = args.hf_attn
    hf = GPTNeoXForCausalLM(config)
    return ours.to(args.device).train(), hf.to(args.device).train()


def make_step(model: torch.nn.Module, is_hf: bool, bf16: bool = False, fused: bool = True):
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, foreach=True)  # as tasks/lm.py

    def step(tokens: torch.Tensor) -> float:
        # as tasks/lm.py: the window is context + 1 tokens, inputs and targets are its two shifted views, so the
        # logits are never sliced (a slice of [B, T, V] logits costs a copy forward and a zero-fill backward)
        inputs, targets = tokens[:, :-1], tokens[:, 1:]
        if is_hf:
            with torch.autocast(tokens.device.type, dtype=torch.bfloat16, enabled=bf16):
                logits = model(inputs).logits
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1))
        else:  # the LM task's loss, fused head or plain (float32 loss either way)
            with torch.autocast(tokens.device.type, dtype=torch.bfloat16, enabled=bf16):
                loss = language_model_loss(model, inputs, targets, fused=fused)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss.item()  # .item() synchronises, so wall-clock timing is honest on GPU too

    return step


def train_flops(args) -> float:
    """Model FLOPs of one training step (3 x forward): the matmuls, 12 d^2 per layer and token plus the d x V
    head, and causal attention, 2 T d per layer and token (half of QK^T and AV); embeddings and norms left out."""
    d, L, T = args.d_model, args.n_layer, args.context
    forward_per_token = 2 * (12 * L * d * d + d * args.vocab) + 2 * L * T * d
    return 3 * forward_per_token * args.batch * T


def peak_size(device: str) -> int:
    """The peak matmul's side: 2048 on a CPU; 8192 on a GPU, where 2048^2 is too small to fill the device."""
    return 2048 if torch.device(device).type == "cpu" else 8192


def matmul_peak(device: str, n: int = 2048, dtype: torch.dtype = torch.float32):
    """A timer of one n x n matmul (2 n^3 FLOPs) in ``dtype``: the machine's attainable peak, measured in this
    run (fp32 for fp32 steps; bf16 for the bf16-autocast row, whose matmuls run on the bf16 units)."""
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)

    def run() -> None:
        (a @ b).float().sum().item()  # .item() synchronises on GPU, so the wall clock holds the whole matmul

    return run, 2 * n ** 3


def gemm_floor(args):
    """A timer of the training step's dense matmuls alone, as one fp32 mm each, on random operands of the
    step's own shapes: per layer qkv, attention out, MLP in and out, plus the vocabulary head; forward
    (x W) and both backward products (dX = dY W^T, dW = X^T dY). Attention's T x T products, norms,
    activations, the loss and the optimiser are left out, so no implementation of this model in fp32 eager
    steps faster than this: it bounds the ratio any model can reach against HF's measured step."""
    d, n, device = args.d_model, args.batch * args.context, args.device
    dtype = torch.bfloat16 if args.bf16 else torch.float32  # autocast runs these matmuls in bf16
    shapes = [(d, 3 * d), (d, d), (d, 4 * d), (4 * d, d)] * args.n_layer + [(d, args.vocab)]
    operands = [tuple(torch.randn(*shape, device=device, dtype=dtype) for shape in ((n, k), (k, m), (n, m)))
                for k, m in shapes]

    def run() -> None:
        total = torch.zeros((), device=device, dtype=dtype)
        for x, w, dy in operands:
            total += (x @ w)[0, 0] + (dy @ w.T)[0, 0] + (x.T @ dy)[0, 0]
        total.item()

    return run


def measure(args) -> dict:
    """Interleaved timing; returns tokens/s, the ratio ours/HF, GFLOP/s and MFU against the measured peak."""
    import contextlib

    torch.manual_seed(args.seed)
    ours, hf = build_models(args)
    if args.compile:
        ours.compile()
    steps = {"ours": make_step(ours, is_hf=False, bf16=args.bf16, fused=not args.no_fused),
             "hf": make_step(hf, is_hf=True, bf16=args.bf16)}
    peak_dtype = torch.bfloat16 if args.bf16 else torch.float32
    peak_run, peak_flops = matmul_peak(args.device, peak_size(args.device), peak_dtype)
    floor_run = gemm_floor(args)
    seconds = {"ours": [], "hf": [], "peak": [], "floor": []}
    kernel = contextlib.nullcontext()
    if args.sdpa == "math":
        from torch.nn.attention import SDPBackend, sdpa_kernel
        kernel = sdpa_kernel(SDPBackend.MATH)
    with kernel:
        for i in range(args.warmup + args.steps):
            tokens = torch.randint(0, args.vocab, (args.batch, args.context + 1), device=args.device)
            timers = {"ours": lambda: steps["ours"](tokens), "hf": lambda: steps["hf"](tokens), "peak": peak_run,
                      "floor": floor_run}
            for name in (list(timers) if i % 2 == 0 else list(reversed(timers))):
                start = time.perf_counter()
                timers[name]()
                if i >= args.warmup:
                    seconds[name].append(time.perf_counter() - start)
    # medians: on a shared machine a burst of load hits a few steps; adjacent (ours, HF) steps see alike load
    flops = train_flops(args)
    median = {name: statistics.median(s) for name, s in seconds.items()}
    peak = peak_flops / median["peak"]
    return {"fused": not args.no_fused and has_features(ours),
            "tokens_s": {n: args.batch * args.context / median[n] for n in ("ours", "hf")},
            "ratio": statistics.median(h / o for o, h in zip(seconds["ours"], seconds["hf"])),
            "gflops": {n: flops / median[n] / 1e9 for n in ("ours", "hf")}, "peak_gflops": peak / 1e9,
            "mfu": {n: flops / median[n] / peak for n in ("ours", "hf")}, "step_gflop": flops / 1e9,
            "over_floor": {n: statistics.median(s / f for s, f in zip(seconds[n], seconds["floor"]))
                           for n in ("ours", "hf")}}


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20, help="timed steps per model")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per model first")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--context", type=int, default=128)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--n-layer", type=int, default=6)
    parser.add_argument("--d-model", type=int, default=128)
    parser.add_argument("--n-head", type=int, default=4)
    parser.add_argument("--hf-attn", default="sdpa", choices=["sdpa", "eager"],
                        help="transformers' attention implementation (its default is sdpa)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--compile", action="store_true", help="torch.compile our model (HF stays eager)")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast for both models")
    parser.add_argument("--no-fused", action="store_true",
                        help="ours with logits + F.cross_entropy (task.fused_loss=false) instead of the fused head")
    parser.add_argument("--sdpa", default="default", choices=["default", "math"],
                        help="SDPA kernel: the default choice (flash where it exists) or the math reference")
    return parser


def main() -> None:
    args = parser().parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    r = measure(args)
    print(f"config: {args.n_layer} layers, d_model {args.d_model}, {args.n_head} heads, batch {args.batch} x "
          f"{args.context}, vocab {args.vocab}, {args.device}, {'bf16 autocast' if args.bf16 else 'fp32'}, "
          f"{'ours compiled' if args.compile else 'eager'}, SDPA {args.sdpa}, HF attention {args.hf_attn}, "
          f"ours' loss {'fused head' if r['fused'] else 'plain logits + F.cross_entropy'}, "
          f"{args.steps} timed steps after {args.warmup} warm-up, {torch.get_num_threads()} threads")
    print(f"ours                tokens/s: {r['tokens_s']['ours']:10.0f}   {r['gflops']['ours']:6.1f} GFLOP/s   "
          f"MFU {100 * r['mfu']['ours']:5.1f} %")
    print(f"GPTNeoXForCausalLM  tokens/s: {r['tokens_s']['hf']:10.0f}   {r['gflops']['hf']:6.1f} GFLOP/s   "
          f"MFU {100 * r['mfu']['hf']:5.1f} %")
    print(f"peak: {peak_size(args.device)}^2 {'bf16' if args.bf16 else 'fp32'} matmul {r['peak_gflops']:.1f} GFLOP/s "
          f"(median, interleaved); a step is "
          f"{r['step_gflop']:.2f} GFLOP")
    print(f"ratio ours/HF: {r['ratio']:.3f}   (median over adjacent step pairs)")
    print(f"GEMM floor (the step's dense matmuls alone): ours {r['over_floor']['ours']:.2f}x it, HF "
          f"{r['over_floor']['hf']:.2f}x; the most any eager model at this precision could reach against HF is "
          f"{r['over_floor']['hf']:.2f}x")


if __name__ == "__main__":
    main()
