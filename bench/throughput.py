"""Training throughput: our Pythia-style router vs transformers' GPTNeoXForCausalLM at the same shape.

Both run eager (no torch.compile) in fp32 with AdamW on the same random batches; steps alternate between the
two models (and which goes first) so that load from other processes hits both alike; rates and the ratio
are medians over steps, robust to bursts of load. Target: ours/HF >= 1.0.

    python bench/throughput.py                    # default small config, 16 x 128, CPU, about a minute
    python bench/throughput.py --steps 50 --device cuda
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


def make_step(model: torch.nn.Module, is_hf: bool):
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)

    def step(tokens: torch.Tensor) -> float:
        logits = model(tokens).logits if is_hf else model(tokens)
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss.item()  # .item() synchronises, so wall-clock timing is honest on GPU too

    return step


def main() -> None:
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
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    ours, hf = build_models(args)
    steps = {"ours": make_step(ours, is_hf=False), "hf": make_step(hf, is_hf=True)}
    seconds = {"ours": [], "hf": []}
    for i in range(args.warmup + args.steps):
        tokens = torch.randint(0, args.vocab, (args.batch, args.context), device=args.device)
        for name in (["ours", "hf"] if i % 2 == 0 else ["hf", "ours"]):
            start = time.perf_counter()
            steps[name](tokens)
            if i >= args.warmup:
                seconds[name].append(time.perf_counter() - start)

    # medians: on a shared machine a burst of load hits a few steps; adjacent (ours, HF) steps see alike load
    rate = {name: args.batch * args.context / statistics.median(s) for name, s in seconds.items()}
    ratio = statistics.median(h / o for o, h in zip(seconds["ours"], seconds["hf"]))
    print(f"config: {args.n_layer} layers, d_model {args.d_model}, {args.n_head} heads, batch {args.batch} x "
          f"{args.context}, vocab {args.vocab}, {args.device}, fp32 eager, HF attention {args.hf_attn}, "
          f"{args.steps} timed steps after {args.warmup} warm-up, {torch.get_num_threads()} threads")
    print(f"ours                tokens/s: {rate['ours']:10.0f}   (median step)")
    print(f"GPTNeoXForCausalLM  tokens/s: {rate['hf']:10.0f}   (median step)")
    print(f"ratio ours/HF: {ratio:.3f}   (median over adjacent step pairs)")


if __name__ == "__main__":
    main()
