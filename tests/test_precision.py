"""bf16 autocast trains the default router on CPU like fp32 does (trainer=gpu trains in bf16-mixed)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from routers.transformer import Transformer


def train_losses(autocast: bool, steps: int = 5) -> list[float]:
    torch.manual_seed(0)
    model = Transformer(vocab_size=64, n_layer=2, d_model=32, n_head=2, context_length=32)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, foreach=True)
    batch = torch.randint(0, 64, (8, 33), generator=torch.Generator().manual_seed(1))  # one batch, memorised
    losses = []
    for _ in range(steps):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            logits = model(batch[:, :-1])
        loss = F.cross_entropy(logits.float().reshape(-1, 64), batch[:, 1:].reshape(-1))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def test_bf16_autocast_training_follows_fp32():
    fp32, bf16 = train_losses(autocast=False), train_losses(autocast=True)
    assert all(torch.isfinite(torch.tensor(bf16)))
    # bf16 keeps 8 mantissa bits: ~0.4 % per rounding; five steps of a tiny model stay within 2 %
    assert bf16 == pytest.approx(fp32, rel=0.02)
    assert bf16[-1] < bf16[0]  # and it learns
