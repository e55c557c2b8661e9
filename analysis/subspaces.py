"""Direction versus geometry of two routers on the same probe (paper appendix C.6; docs/decisions.md).

Two angles between the attractor subspaces of a layer, each with its chance level:

* **key space** (the paper's): the top-r principal subspace of the layer's keys, heads concatenated
  (D = units x d dims), from the within-sequence scatter sum_s X_c^T X_c pooled over the probe. Two models
  trained from different weight seeds have unrelated coordinate bases, so this angle sits near the
  random-subspace null in R^D by construction; it can only speak to pairs that share their initialisation
  (data-order reseeds).
* **token space** (basis-free): per probe sequence, the top-r left singular subspace of the centred keys
  X_c (T x D), i.e. which *tokens* the dominant key directions separate, compared between the two models on
  the identical input and averaged over sequences. It is unchanged by any orthogonal map (and scaling) of
  the key coordinates, so a rotated copy of a model scores 0 here. Centring puts every such subspace in the
  (T-1)-dim complement of the all-ones vector, which is where its null lives.

Both keys are the scored (pre-position, i.e. pre-RoPE) keys of the routing record, like VE@r.
"""
from __future__ import annotations

import math
from functools import lru_cache

import torch
from torch import Tensor

from collapse import canonical_angles, ve_at_rank
from common.constants import RANK
from common.errors import UserError

NULL_TRIALS = 200  # random-subspace draws: the mean angle's standard error is then below 0.2 degrees


@lru_cache(maxsize=None)
def random_subspace_angle(dim: int, rank: int, trials: int = NULL_TRIALS, seed: int = 0) -> float:
    """Expected mean canonical angle (degrees) between two independent uniformly random rank-``rank``
    subspaces of R^dim: the chance level of an angle between attractor subspaces."""
    if not 1 <= rank <= dim:
        raise UserError(f"random_subspace_angle needs 1 <= rank <= dim; got rank={rank}, dim={dim}")
    generator = torch.Generator().manual_seed(seed)
    # A Gaussian matrix's column space is uniformly (Haar) distributed; canonical_angles orthonormalises it.
    a = torch.randn(trials, dim, rank, generator=generator, dtype=torch.float64)
    b = torch.randn(trials, dim, rank, generator=generator, dtype=torch.float64)
    return float(canonical_angles(a, b).mean())


def layer_keys(keys: Tensor) -> Tensor:
    """``[batch, units, T, d] -> [batch, T, units * d]``: one key vector per token for the whole layer."""
    if keys.dim() != 4:
        raise UserError(f"layer keys must be [batch, units, sources, d]; got {tuple(keys.shape)}")
    b, u, t, d = keys.shape
    return keys.transpose(1, 2).reshape(b, t, u * d)


def token_subspace(keys: Tensor, rank: int) -> Tensor:
    """Top-``rank`` left singular vectors ``[batch, T, rank]`` of each sequence's centred ``[batch, T, D]`` keys."""
    x = keys.double()
    x = x - x.mean(dim=-2, keepdim=True)
    return torch.linalg.svd(x, full_matrices=False).U[..., :rank]


def key_basis(scatter: Tensor, rank: int) -> Tensor:
    """Top-``rank`` eigenvectors ``[D, rank]`` of a pooled within-sequence scatter matrix."""
    return torch.linalg.eigh(scatter).eigenvectors.flip(-1)[:, :rank]


class _LayerPair:
    def __init__(self):
        self.scatter = [None, None]
        self.ve = [0.0, 0.0]
        self.token_angle_sum, self.sequences, self.shape = 0.0, 0, None

    def add(self, keys_a: Tensor, keys_b: Tensor, rank: int) -> None:
        if keys_a.shape[0] != keys_b.shape[0] or keys_a.shape[2] != keys_b.shape[2]:
            raise UserError(f"the two models saw different probes ({tuple(keys_a.shape)} vs {tuple(keys_b.shape)}); "
                            "run both on the identical probe batch")
        self.shape = (keys_a.shape[2], layer_keys(keys_a).shape[-1], layer_keys(keys_b).shape[-1])
        for i, keys in enumerate((keys_a, keys_b)):
            self.ve[i] += float(ve_at_rank(keys, rank).mean(dim=1).sum())
            x = layer_keys(keys).double()
            x = x - x.mean(dim=-2, keepdim=True)
            scatter = (x.transpose(-1, -2) @ x).sum(0)
            self.scatter[i] = scatter if self.scatter[i] is None else self.scatter[i] + scatter
        angles = canonical_angles(token_subspace(layer_keys(keys_a), rank), token_subspace(layer_keys(keys_b), rank))
        self.token_angle_sum += float(angles.mean(-1).sum())
        self.sequences += keys_a.shape[0]

    def row(self, index: int, rank: int) -> dict:
        tokens, dim_a, dim_b = self.shape
        ve_a, ve_b = self.ve[0] / self.sequences, self.ve[1] / self.sequences
        row = {"layer": index, f"ve@{rank}_a": ve_a, f"ve@{rank}_b": ve_b, f"delta_ve@{rank}": abs(ve_a - ve_b),
               "token_angle": self.token_angle_sum / self.sequences,
               "token_angle_null": random_subspace_angle(tokens - 1, rank)}
        if dim_a == dim_b:  # key-space angles need the two layers' keys in spaces of one dimension
            angles = canonical_angles(key_basis(self.scatter[0], rank), key_basis(self.scatter[1], rank))
            row.update({"key_angle": float(angles.mean()), "key_angle_null": random_subspace_angle(dim_a, rank)})
        else:
            row.update({"key_angle": math.nan, "key_angle_null": math.nan})
        return row


class PairAccumulator:
    """Streams two routers' routing records on the same probe batches; :meth:`compute` gives one row per
    layer: VE@r of each, |dVE@r|, and the key- and token-space angles with their random-subspace nulls."""

    def __init__(self, rank: int = RANK):
        if not isinstance(rank, int) or rank < 1:
            raise UserError(f"subspace rank must be a positive integer; got {rank!r}")
        self.rank = rank
        self.layers: list[_LayerPair] = []

    def update(self, routing_a, routing_b) -> None:
        if len(routing_a.layers) != len(routing_b.layers):
            raise UserError(f"the two routers have {len(routing_a.layers)} and {len(routing_b.layers)} layers; "
                            "pair runs of the same architecture")
        if not self.layers:
            self.layers = [_LayerPair() for _ in routing_a.layers]
        for pair, layer_a, layer_b in zip(self.layers, routing_a.layers, routing_b.layers):
            keys_a, keys_b = layer_a.scored_keys, layer_b.scored_keys
            if min(keys_a.shape[-2] - 1, layer_keys(keys_a).shape[-1]) < self.rank:
                raise UserError(f"rank {self.rank} exceeds the {keys_a.shape[-2]} tokens x "
                                f"{layer_keys(keys_a).shape[-1]} key dims of layer {layer_a.name!r}; lower rank=")
            pair.add(keys_a.detach(), keys_b.detach(), self.rank)

    def compute(self) -> list[dict]:
        if not self.layers:
            raise UserError("no probe batches were compared; call update() first")
        return [pair.row(i, self.rank) for i, pair in enumerate(self.layers)]
