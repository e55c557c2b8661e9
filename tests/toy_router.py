"""A toy router family, declared here and nowhere else: one causal softmax attention layer over token embeddings
and an LM head. tests/test_toy_router.py shows that registering it is all a new family needs to be trained,
monitored, analysed and benched (with its config, ``router/toy.yaml``, written by the test)."""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from routers.family import Family, register
from routers.routing import RoutingLayer, causal_mask, check_tokens

CONFIG = """\
_target_: tests.toy_router.ToyRouter
d_model: 16
context_length: 128
"""


class ToyRouter(nn.Module):
    """Embeddings -> one head of causal softmax attention (residual) -> vocabulary head."""

    def __init__(self, vocab_size: int, d_model: int = 16, context_length: int = 128):
        super().__init__()
        self.context_length = context_length
        self.embed = nn.Embedding(vocab_size, d_model)
        self.query, self.key, self.value = (nn.Linear(d_model, d_model, bias=False) for _ in range(3))
        self.head = nn.Linear(d_model, vocab_size)

    def forward(self, tokens: Tensor, return_routing: bool = False):
        check_tokens(tokens, self.context_length)
        x = self.embed(tokens)
        q, k = self.query(x), self.key(x)
        mask = causal_mask(tokens.shape[1], tokens.device)
        weights = (q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])).masked_fill(~mask, -math.inf).softmax(-1)
        logits = self.head(x + weights @ self.value(x))
        if not return_routing:
            return logits
        layer = RoutingLayer(keys=k.unsqueeze(1), weights=weights.unsqueeze(1), mask=mask, name="attn")
        return logits, FAMILY.routing([layer])


def _example() -> tuple[ToyRouter, Tensor]:
    return ToyRouter(37, context_length=8).eval(), torch.randint(37, (2, 8))


FAMILY = register(Family("toy", axis="token", bench=("router=toy",), example=_example))
