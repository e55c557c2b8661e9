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

import ctypes
import math
from contextlib import contextmanager
from functools import lru_cache

import numpy as np
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
    """Top-``rank`` left singular vectors ``[batch, T, rank]`` of each sequence's centred ``[batch, T, D]`` keys.

    Read as the top eigenvectors of the T x T Gram matrix x x^T (the same subspace), and only those: LAPACK's
    syevr for an index range (scipy) costs 0.4x a full SVD, which is most of the seed-direction study's time.
    The subspace equals the SVD's to float64 rounding (canonical angles ~1e-6 deg, the resolution of arccos
    near 1; tested against torch.linalg.svd)."""
    x = keys.double()
    return _top_left_vectors(x - x.mean(dim=-2, keepdim=True), rank)


def _top_left_vectors(x: Tensor, rank: int) -> Tensor:
    """:func:`token_subspace` of keys already centred and in float64."""
    from scipy.linalg import eigh

    T, D = x.shape[-2:]
    k = min(rank, T, D)
    gram = (x @ x.transpose(-1, -2)).cpu().numpy()
    with one_blas_thread():
        vectors = [eigh(g, subset_by_index=[T - k, T - 1], driver="evr", check_finite=False)[1] for g in gram]
    return torch.from_numpy(np.ascontiguousarray(np.stack(vectors)[..., ::-1])).to(x.device)  # largest first


# scipy's OpenBLAS starts one thread per core and ignores torch.set_num_threads. A T x T eigenproblem (T ~ 128) is
# too small to split: on 2 shared cores its threads spin against each other and every other process, and the
# seed-direction study's 900 eigenproblems a model pass took 5-10 ms each instead of 0.6-0.8 ms (docs/performance.md
# section 5). The written numbers were the same at 1 thread as at 2 (every output byte-identical on the 12-run grid).
_BLAS_THREADS = ("scipy_openblas_set_num_threads", "scipy_openblas_set_num_threads64_", "openblas_set_num_threads")
_BLAS_GET = ("scipy_openblas_get_num_threads", "scipy_openblas_get_num_threads64_", "openblas_get_num_threads")


@lru_cache(maxsize=1)
def _openblas_controls() -> tuple:
    """(set, get) of every OpenBLAS this process has loaded (numpy's and scipy's are separate copies); empty where
    the loaded libraries cannot be listed (not Linux) or none is OpenBLAS (MKL, Accelerate: nothing to do)."""
    try:
        with open("/proc/self/maps") as maps:
            paths = sorted({line.split()[-1] for line in maps if "openblas" in line.rsplit("/", 1)[-1].lower()})
    except OSError:
        return ()
    controls = []
    for path in paths:
        try:
            lib = ctypes.CDLL(path)  # already loaded: the same handle, nothing is loaded twice
        except OSError:
            continue
        setter = next((getattr(lib, name) for name in _BLAS_THREADS if hasattr(lib, name)), None)
        getter = next((getattr(lib, name) for name in _BLAS_GET if hasattr(lib, name)), None)
        if setter is not None and getter is not None:
            setter.argtypes, setter.restype, getter.restype = [ctypes.c_int], None, ctypes.c_int
            controls.append((setter, getter))
    return tuple(controls)


@contextmanager
def one_blas_thread():
    """Run the block with every loaded OpenBLAS at one thread, then restore each one's own count."""
    controls = _openblas_controls()
    before = [get() for _, get in controls]
    for set_threads, _ in controls:
        set_threads(1)
    try:
        yield
    finally:
        for (set_threads, _), n in zip(controls, before):
            set_threads(n)


def key_basis(scatter: Tensor, rank: int) -> Tensor:
    """Top-``rank`` eigenvectors ``[D, rank]`` of a pooled within-sequence scatter matrix."""
    return torch.linalg.eigh(scatter).eigenvectors.flip(-1)[:, :rank]


class _LayerKeys:
    """One model's side of one layer, accumulated over probe batches: the sum of per-sequence VE@r, the pooled
    within-sequence scatter, and each batch's token subspaces. Everything a pair row needs from this model,
    so a run's keys are measured once however many pairs it is in (analysis.studies.seeds)."""

    def __init__(self):
        self.scatter, self.ve, self.sequences, self.shape = None, 0.0, 0, None
        self.batches: list[int] = []        # sequences per probe batch, in order
        self.subspaces: list[Tensor] = []   # [batch, T, rank] per probe batch, orthonormalised
        self._basis: Tensor | None = None
        self._orthonormal: Tensor | None = None

    def add(self, keys: Tensor, rank: int) -> None:
        x = layer_keys(keys).double()
        x = x - x.mean(dim=-2, keepdim=True)  # centred once, for the scatter and the token subspace
        self.shape = (keys.shape[2], x.shape[-1])
        self.ve += float(ve_at_rank(keys, rank).mean(dim=1).sum())
        scatter = (x.transpose(-1, -2) @ x).sum(0)
        self.scatter = scatter if self.scatter is None else self.scatter + scatter
        # orthonormalised as canonical_angles does it (QR, matrix by matrix) once per model, not once per pair
        self.subspaces.append(torch.linalg.qr(_top_left_vectors(x, rank)).Q)
        self.batches.append(keys.shape[0])
        self.sequences += keys.shape[0]
        self._basis = self._orthonormal = None

    def basis(self, rank: int) -> Tensor:
        if self._basis is None:
            self._basis = key_basis(self.scatter, rank)
        return self._basis

    def orthonormal(self) -> Tensor:
        """Every sequence's token subspace ``[sequences, T, rank]``, orthonormalised as ``canonical_angles`` does
        it (the per-batch QRs of :meth:`add`), in probe order."""
        if self._orthonormal is None:
            # concatenated in the QR's own (column-major) layout: matmul rounds differently in another layout
            self._orthonormal = torch.cat([q.transpose(-1, -2) for q in self.subspaces]).transpose(-1, -2)
            self.subspaces = [self._orthonormal]  # one copy in memory, and a later add() still appends
        return self._orthonormal


def sequence_angles(qa: Tensor, qb: Tensor) -> Tensor:
    """Mean canonical angle (degrees) per sequence between bases ``Q`` of ``torch.linalg.qr(U)``:
    ``collapse.canonical_angles(U_a, U_b).mean(-1)`` without its two QRs, op for op the same numbers
    (tests/test_analyze_subspaces.py holds them equal)."""
    cosines = torch.linalg.svdvals(qa.transpose(-1, -2) @ qb).clamp(0.0, 1.0)
    return torch.rad2deg(torch.arccos(cosines)).mean(-1)


def _pair_row(index: int, a: _LayerKeys, b: _LayerKeys, rank: int) -> dict:
    """One layer of a pair: VE@r of each model, |dVE@r|, and the two angles beside their nulls. Batch by batch
    in probe order, so the numbers do not depend on whether the sides were measured together or apart."""
    if a.batches != b.batches or a.shape[0] != b.shape[0]:
        raise UserError(f"the two models saw different probes ({a.sequences} x {a.shape[0]} vs {b.sequences} x "
                        f"{b.shape[0]} tokens); run both on the identical probe batches")
    (tokens, dim_a), dim_b = a.shape, b.shape[1]
    per_sequence, token_angle_sum, start = sequence_angles(a.orthonormal(), b.orthonormal()), 0.0, 0
    for size in a.batches:  # summed per probe batch, then over batches, as when the pair was streamed together
        token_angle_sum += float(per_sequence[start:start + size].sum())
        start += size
    ve_a, ve_b = a.ve / a.sequences, b.ve / b.sequences
    row = {"layer": index, f"ve@{rank}_a": ve_a, f"ve@{rank}_b": ve_b, f"delta_ve@{rank}": abs(ve_a - ve_b),
           "token_angle": token_angle_sum / a.sequences, "token_angle_null": random_subspace_angle(tokens - 1, rank)}
    if dim_a == dim_b:  # key-space angles need the two layers' keys in spaces of one dimension
        angles = canonical_angles(a.basis(rank), b.basis(rank))
        row.update({"key_angle": float(angles.mean()), "key_angle_null": random_subspace_angle(dim_a, rank)})
    else:
        row.update({"key_angle": math.nan, "key_angle_null": math.nan})
    return row


class KeyAccumulator:
    """One model's scored keys on a probe, streamed batch by batch (``update``: per layer ``[batch, units, T, d]``);
    :func:`compare` pairs two of them measured on the identical probe batches."""

    def __init__(self, rank: int = RANK):
        if not isinstance(rank, int) or rank < 1:
            raise UserError(f"subspace rank must be a positive integer; got {rank!r}")
        self.rank = rank
        self.layers: list[_LayerKeys] = []

    def update(self, keys: list[Tensor], names: list[str] | None = None) -> None:
        if not self.layers:
            self.layers = [_LayerKeys() for _ in keys]
        if len(keys) != len(self.layers):
            raise UserError(f"a probe batch gave {len(keys)} layers of keys after {len(self.layers)}")
        for i, (layer, layer_k) in enumerate(zip(self.layers, keys)):
            if min(layer_k.shape[-2] - 1, layer_keys(layer_k).shape[-1]) < self.rank:
                name = names[i] if names else str(i)
                raise UserError(f"rank {self.rank} exceeds the {layer_k.shape[-2]} tokens x "
                                f"{layer_keys(layer_k).shape[-1]} key dims of layer {name!r}; lower rank=")
            layer.add(layer_k.detach(), self.rank)

    @staticmethod
    def of(routing) -> tuple[list[Tensor], list[str]]:
        """The scored keys and layer names of a routing record, as :meth:`update` takes them."""
        return routing.scored_keys(), [layer.name for layer in routing.layers]


def compare(a: KeyAccumulator, b: KeyAccumulator) -> list[dict]:
    """One row per layer of two models measured on the identical probe batches: VE@r of each, |dVE@r|, and
    the key- and token-space angles with their random-subspace nulls."""
    if not a.layers or not b.layers:
        raise UserError("no probe batches were compared; call update() first")
    if len(a.layers) != len(b.layers):
        raise UserError(f"the two routers have {len(a.layers)} and {len(b.layers)} layers; "
                        "pair runs of the same architecture")
    if a.rank != b.rank:
        raise UserError(f"the two models were measured at ranks {a.rank} and {b.rank}; measure both at one rank")
    return [_pair_row(i, la, lb, a.rank) for i, (la, lb) in enumerate(zip(a.layers, b.layers))]
