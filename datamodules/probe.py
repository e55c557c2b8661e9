"""The fixed probe set on which the collapse signature is measured, saved with every run."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
from torch import Tensor

from collapse.nulls import shuffle_positions
from common.errors import UserError


@dataclass
class TokenProbe:
    """``tokens`` [N, T] and the same tokens with positions permuted per sequence (the shuffle-null input)."""
    tokens: Tensor
    shuffled: Tensor
    seed: int = 0

    @classmethod
    def from_tokens(cls, tokens: Tensor, seed: int = 0, keep: int = 0) -> "TokenProbe":
        """``keep`` leading positions (a BOS) stay in place in the shuffled copy."""
        return cls(tokens=tokens, shuffled=shuffle_positions(tokens, seed, keep), seed=seed)

    def __len__(self) -> int:
        return self.tokens.shape[0]

    def head(self, n: int) -> "TokenProbe":
        """The first ``n`` sequences and their shuffled copies (the monitor's live probe); the whole probe if
        ``n`` covers it."""
        if n >= len(self):
            return self
        return TokenProbe(tokens=self.tokens[:n], shuffled=self.shuffled[:n], seed=self.seed)

    def batches(self, batch_size: int) -> Iterator[tuple[Tensor, Tensor]]:
        for i in range(0, len(self), batch_size):
            yield self.tokens[i:i + batch_size], self.shuffled[i:i + batch_size]

    def save(self, path: str | Path) -> None:
        torch.save({"kind": "tokens", "tokens": self.tokens, "shuffled": self.shuffled, "seed": self.seed}, path)

    @classmethod
    def load(cls, path: str | Path) -> "TokenProbe":
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
            return cls(tokens=state["tokens"], shuffled=state["shuffled"], seed=state["seed"])
        except FileNotFoundError:
            raise UserError(f"no probe at {path}; pass probe=<file> or re-run training to create it") from None
        except Exception as e:
            raise UserError(f"probe file {path} is unreadable ({type(e).__name__}); delete it and rebuild") from None
