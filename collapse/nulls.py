"""Null baselines that need only tensors.

The shuffle null is *not* a permutation of keys (that only relabels the distance matrix and leaves VE
unchanged); it is the keys a router produces when re-run on its own input with positions permuted within
each sequence. This module makes that input; the caller re-runs the router.
"""
import torch
from torch import Tensor


def shuffle_positions(tokens: Tensor, seed: int, keep: int = 0) -> Tensor:
    """Permute each sequence's tokens along the last axis, one fixed permutation per sequence.

    Deterministic in ``seed`` (independent of the global RNG), so the probe's null input can be rebuilt
    from the probe tokens and the seed alone. The first ``keep`` positions stay put: a BOS token at
    position 0 is where every sequence starts, not content whose order the null should destroy.
    """
    generator = torch.Generator().manual_seed(seed)
    n = tokens.shape[-1]
    flat = tokens.reshape(-1, n)
    head = torch.arange(keep)
    perms = torch.stack([torch.cat([head, keep + torch.randperm(n - keep, generator=generator)])
                         for _ in range(flat.shape[0])])
    return torch.gather(flat, 1, perms.to(flat.device)).reshape(tokens.shape)
