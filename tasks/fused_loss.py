"""Fused linear + cross-entropy for the vocabulary head: the mean next-token loss of ``head(features)``
without ever holding the full [N, V] logits or their gradient (docs/decisions.md, docs/performance.md).

The rows (tokens) go through in chunks of about ``CHUNK_BYTES`` of float32 logits. For each chunk the forward
computes its logits, its log-softmax and loss, and at once the gradients a backward would need:
dlogits = softmax - onehot, then dH = dlogits W and dW += dlogits^T H (and db). So the backward recomputes
nothing and only scales the saved gradients by grad_output (Liger kernel's approach). The numbers are
``F.cross_entropy(F.linear(h, W, b).float(), targets)``'s up to float rounding (dW sums chunk by chunk).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# float32 logits per chunk. CPU: 2 MB (128 rows at V = 4096) stays in cache; 1-4 MB measured alike, 8 MB and
# more slower (docs/performance.md). GPU: few large chunks, so kernel launches stay few (about 1300 rows at
# V = 50k); not measured on a GPU yet.
CHUNK_BYTES = {"cpu": 2 << 20}
GPU_CHUNK_BYTES = 256 << 20
IGNORE_INDEX = -100    # F.cross_entropy's default; the LM task never sets it, but a -100 target means the same here


def chunk_rows(vocab_size: int, device: torch.device | str = "cpu") -> int:
    """Rows per chunk: as many as fit the device's chunk budget of float32 logits."""
    budget = CHUNK_BYTES.get(torch.device(device).type, GPU_CHUNK_BYTES)
    return max(1, budget // (4 * vocab_size))


def _compute_dtype(h: Tensor) -> torch.dtype:
    """The head matmul's dtype: autocast's when it is on (as ``nn.Linear`` would run), else the input's."""
    device = h.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return h.dtype


class _FusedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor, rows: int) -> Tensor:
        valid = targets != IGNORE_INDEX
        count = valid.sum()                      # the mean's N (a tensor: no host sync on GPU)
        safe = targets.masked_fill(~valid, 0)    # an ignored row indexes class 0, then is masked out
        total = h.new_zeros((), dtype=torch.float32)
        grad_h = torch.empty_like(h)
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        grad_b = None if bias is None else torch.zeros(bias.shape, dtype=torch.float32, device=bias.device)
        for start in range(0, h.shape[0], rows):
            stop = min(start + rows, h.shape[0])
            h_c, t_c, keep = h[start:stop], safe[start:stop], valid[start:stop]
            logits = F.linear(h_c, weight, bias).float()          # the only [chunk, V] tensor
            logp = torch.log_softmax(logits, dim=-1)              # float32, as the plain loss
            picked = logp.gather(1, t_c.unsqueeze(1)).squeeze(1)
            total -= (picked * keep).sum()
            grad = logp.exp_()                                    # softmax, in place over logp
            grad[torch.arange(stop - start, device=h.device), t_c] -= 1.0
            # ignored rows: zero their gradient through the [chunk, d] side, not the [chunk, V] one
            keep_col = keep.unsqueeze(1).to(h.dtype)
            grad_low = grad.to(h.dtype)                           # a no-op in fp32; autocast's dtype otherwise
            grad_h[start:stop] = (grad_low @ weight) * keep_col
            if h.dtype == torch.float32:
                grad_w.addmm_(grad_low.t(), h_c * keep_col)
            else:  # the matmul in autocast's dtype, as the plain head's backward; the sum over chunks in float32
                grad_w += (grad_low.t() @ (h_c * keep_col)).float()
            if grad_b is not None:
                grad_b += (grad * keep.unsqueeze(1)).sum(0)
        # the mean's 1/N is applied once to the small tensors, not to every [chunk, V] gradient
        scale = 1.0 / count.float()
        grad_h.mul_(scale.to(grad_h.dtype))
        grad_w.mul_(scale)
        if grad_b is not None:
            grad_b.mul_(scale)
        ctx.save_for_backward(grad_h, grad_w.to(weight.dtype),
                              *(() if grad_b is None else (grad_b.to(bias.dtype),)))
        return total * scale

    @staticmethod
    def backward(ctx, grad_output: Tensor):
        grad_h, grad_w, *grad_b = ctx.saved_tensors
        g = grad_output.float()
        return ((grad_h * g.to(grad_h.dtype)), (grad_w * g.to(grad_w.dtype)),
                (grad_b[0] * g.to(grad_b[0].dtype)) if grad_b else None, None, None)


def _loss_only(h: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor, rows: int) -> Tensor:
    """No autograd (validation, probes): the same chunked loss, without gradients."""
    valid = targets != IGNORE_INDEX
    safe = targets.masked_fill(~valid, 0)
    total = h.new_zeros((), dtype=torch.float32)
    for start in range(0, h.shape[0], rows):
        logp = torch.log_softmax(F.linear(h[start:start + rows], weight, bias).float(), dim=-1)
        picked = logp.gather(1, safe[start:start + rows].unsqueeze(1)).squeeze(1)
        total -= (picked * valid[start:start + rows]).sum()
    return total / valid.sum().float()


def fused_linear_cross_entropy(h: Tensor, weight: Tensor, targets: Tensor, bias: Tensor | None = None,
                               rows: int | None = None) -> Tensor:
    """Mean cross-entropy of ``F.linear(h, weight, bias)`` against ``targets``: h [N, d], weight [V, d],
    targets [N] (``-100`` ignored). The loss is float32; under autocast the matmuls run in autocast's dtype,
    as the plain head would."""
    rows = rows or chunk_rows(weight.shape[0], h.device)
    dtype = _compute_dtype(h)
    with torch.autocast(h.device.type, enabled=False):  # the dtype is chosen here, not per op inside
        h, weight = h.to(dtype), weight.to(dtype)       # differentiable casts: grads flow back to fp32 params
        bias = None if bias is None else bias.to(dtype)
        needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (h, weight, bias))
        if not needs_grad:
            return _loss_only(h, weight, bias, targets, rows)
        return _FusedLinearCrossEntropy.apply(h, weight, bias, targets, rows)


def has_features(model: nn.Module) -> bool:
    """Whether ``model`` can take the fused loss: it has ``features`` and ``output_head`` and its ``forward`` is
    the one that goes with them (a subclass that overrides forward alone, e.g. to perturb the logits as
    tests/nan_router.py does, keeps the plain loss), and its forward is not compiled (``compile=true``
    compiles ``forward`` only; that run keeps the compiled forward and the plain loss)."""
    if not hasattr(model, "features") or not hasattr(model, "output_head"):
        return False
    if getattr(model, "_compiled_call_impl", None) is not None:
        return False
    mro = type(model).__mro__
    owner = lambda name: next((c for c in mro if name in c.__dict__), None)  # noqa: E731
    return owner("forward") is owner("features")


def language_model_loss(model: nn.Module, inputs: Tensor, targets: Tensor, fused: bool = True) -> Tensor:
    """The LM task's loss (tasks/lm.py; bench/throughput.py trains ours with it too): the fused head where the
    router exposes its features, else ``F.cross_entropy`` on the materialised logits."""
    if fused and has_features(model):
        features = model.features(inputs)
        head = model.output_head
        return fused_linear_cross_entropy(features.reshape(-1, features.shape[-1]), head.weight,
                                          targets.reshape(-1), head.bias)
    logits = model(inputs)
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), targets.reshape(-1))
