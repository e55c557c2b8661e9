"""The fused linear + cross-entropy head (tasks/fused_loss.py) against F.cross_entropy on materialised logits,
the routers' ``features`` / ``output_head``, and a training run with each loss."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tasks import fused_loss
from tasks.fused_loss import fused_linear_cross_entropy, has_features, language_model_loss


def reference(h, weight, targets, bias=None):
    """Today's plain path: the full logits, float32 cross-entropy, autograd's gradients."""
    return F.cross_entropy(F.linear(h, weight, bias).float(), targets)


def leaves(n, d, v, bias, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, d, generator=g).requires_grad_()
    weight = (0.3 * torch.randn(v, d, generator=g)).requires_grad_()
    b = (0.1 * torch.randn(v, generator=g)).requires_grad_() if bias else None
    targets = torch.randint(0, v, (n,), generator=g)
    return h, weight, b, targets


def close(got, want):
    # rtol 1e-5, with an absolute floor at 1e-5 of the tensor's largest entry for entries near zero
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())


@pytest.mark.parametrize("n, d, v, rows, bias", [
    (64, 16, 50, 64, False),      # one chunk
    (100, 16, 300, 7, True),      # 7 does not divide 100: a short last chunk
    (257, 32, 4096, 128, False),  # the default vocabulary, 3 chunks
    (5, 8, 11, 1, True),          # a row per chunk
])
def test_loss_and_gradients_equal_cross_entropy_on_materialised_logits(n, d, v, rows, bias):
    h, weight, b, targets = leaves(n, d, v, bias)
    params = [h, weight] + ([b] if bias else [])
    want = reference(h, weight, targets, b)
    want_grads = torch.autograd.grad(want, params)
    got = fused_linear_cross_entropy(h, weight, targets, b, rows=rows)
    got_grads = torch.autograd.grad(got, params)
    assert got.dtype == torch.float32
    close(got, want)
    for g, w in zip(got_grads, want_grads):
        close(g, w)


def test_ignored_targets_drop_out_of_the_mean_and_the_gradients_as_in_cross_entropy():
    h, weight, b, targets = leaves(40, 8, 30, bias=True)
    targets[::3] = -100
    want = reference(h, weight, targets, b)
    want_grads = torch.autograd.grad(want, [h, weight, b])
    got = fused_linear_cross_entropy(h, weight, targets, b, rows=6)
    got_grads = torch.autograd.grad(got, [h, weight, b])
    close(got, want)
    for g, w in zip(got_grads, want_grads):
        close(g, w)
    assert got_grads[0][::3].abs().max() == 0  # ignored rows get no gradient


def test_backward_scales_the_saved_gradients_by_grad_output():
    h, weight, _, targets = leaves(30, 8, 20, bias=False)
    base = torch.autograd.grad(fused_linear_cross_entropy(h, weight, targets, rows=8), [h, weight])
    scaled = torch.autograd.grad(2.5 * fused_linear_cross_entropy(h, weight, targets, rows=8), [h, weight])
    for s, g in zip(scaled, base):
        close(s, 2.5 * g)


def test_no_grad_path_gives_the_same_loss_and_builds_no_graph():
    h, weight, _, targets = leaves(50, 8, 40, bias=False)
    want = reference(h, weight, targets)
    with torch.no_grad():
        got = fused_linear_cross_entropy(h, weight, targets, rows=9)
    assert got.grad_fn is None
    close(got, want.detach())


def test_a_non_finite_feature_gives_a_non_finite_loss():
    h, weight, _, targets = leaves(20, 8, 10, bias=False)
    with torch.no_grad():
        h[7, 3] = float("inf")
    assert not torch.isfinite(fused_linear_cross_entropy(h, weight, targets, rows=4))  # the task skips the step


def test_bf16_autocast_matches_the_plain_head_under_autocast_and_returns_a_float32_loss():
    h, weight, _, targets = leaves(64, 16, 100, bias=False)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = reference(h, weight, targets)
        want_grads = torch.autograd.grad(want, [h, weight])
        got = fused_linear_cross_entropy(h, weight, targets, rows=16)
        got_grads = torch.autograd.grad(got, [h, weight])
    assert got.dtype == torch.float32 and [g.dtype for g in got_grads] == [torch.float32] * 2
    # the same bf16 matmuls; the float32 sum of dW over chunks rounds differently from one bf16 product
    assert got.item() == pytest.approx(want.item(), rel=1e-6)
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w, rtol=2e-2, atol=2e-2 * w.abs().max().item())


def routers():
    from routers.attnres import Qwen3Decoder
    from routers.rwkv import RWKV
    from routers.ssm import Mamba
    from routers.transformer import Transformer

    torch.manual_seed(0)
    return {
        "transformer": Transformer(vocab_size=37, n_layer=2, d_model=16, n_head=2, context_length=16),
        "mamba": Mamba(37, n_layer=2, d_model=16, d_state=4, dt_rank=3),
        "rwkv": RWKV(37, n_layer=2, d_model=16, context_length=16),
        "attnres": Qwen3Decoder(37, n_layer=2, d_model=16, n_head=2, d_ff=32, context_length=16),
        "qwen3": Qwen3Decoder(37, n_layer=2, d_model=16, n_head=2, d_ff=32, context_length=16, residual="additive",
                              routing_axis="token"),
    }


@pytest.mark.parametrize("name", list(routers()))
def test_head_of_features_is_the_forward_exactly(name):
    model = routers()[name].train()
    tokens = torch.randint(0, 37, (3, 16), generator=torch.Generator().manual_seed(2))
    features = model.features(tokens)
    assert features.shape == (3, 16, model.output_head.in_features)
    assert torch.equal(model.output_head(features), model(tokens))
    assert has_features(model)
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    fused, plain = (language_model_loss(model, inputs, targets, fused=f) for f in (True, False))
    assert fused.item() == pytest.approx(plain.item(), rel=1e-6)


def test_routers_that_override_forward_or_are_compiled_keep_the_plain_loss():
    from routers.transformer import Transformer
    from tests.nan_router import NaNAfter

    shape = dict(vocab_size=37, n_layer=1, d_model=16, n_head=2, context_length=16)
    assert has_features(Transformer(**shape))
    assert not has_features(NaNAfter(**shape, nan_after_steps=0))  # its forward poisons the logits
    compiled = Transformer(**shape)
    compiled.compile(backend="eager")  # compile=true compiles forward only: features would run eager
    assert not has_features(compiled)
    assert not has_features(torch.nn.Linear(4, 4))


def train_curve(fused: bool, tmp_path, steps: int = 200) -> list[float]:
    from bench.harness import build_family
    from tests.conftest import TINY

    overrides = [o for o in TINY if not o.startswith(("data.synthetic.vocab_size", "router.d_model"))]
    built = build_family("pythia", tmp_path / ("fused" if fused else "plain"), [
        *overrides, "data.synthetic.vocab_size=512", "router.d_model=32", f"task.fused_loss={str(fused).lower()}",
        f"trainer.max_steps={steps}"])
    assert built.task.hparams.fused_loss is fused
    return [built.step() for _ in range(steps)]


def test_200_training_steps_follow_the_plain_loss_within_1e_4(tmp_path, monkeypatch):
    """The task's own loss, optimiser and data (bench/harness.py builds them as train.py does); 200 steps of a
    2-layer model with a 512-token vocabulary, chunks of 48 rows (batch 4 x 32 = 128 rows: a short last chunk)."""
    monkeypatch.setenv("ROUTECOLLAPSE_DATA", str(tmp_path / "cache"))
    monkeypatch.setitem(fused_loss.CHUNK_BYTES, "cpu", 48 * 4 * 512)
    calls = []
    real = fused_loss.fused_linear_cross_entropy
    monkeypatch.setattr(fused_loss, "fused_linear_cross_entropy", lambda *a, **k: calls.append(1) or real(*a, **k))
    fused = train_curve(True, tmp_path)
    assert len(calls) == 200  # the task took the fused path every step
    plain = train_curve(False, tmp_path)
    assert len(calls) == 200  # and task.fused_loss=false none
    assert len(fused) == len(plain) == 200
    assert plain[-1] < plain[0] - 0.1  # it learns (6.25 -> 6.09), so the curves are not trivially flat
    worst = max(abs(f - p) for f, p in zip(fused, plain))
    print(f"largest |fused - plain| over 200 steps: {worst:.2e}")
    assert worst <= 1e-4, worst


def test_gpu_bench_reads_the_160m_shape_from_its_yaml_and_skips_its_rows_on_cpu_with_a_reason():
    """bench/run_all.py's Pythia-160M rows (the GPU bench): on a CPU each says why, without running a bench."""
    from bench import run_all

    assert run_all.preset_shape() == {"n_layer": 12, "d_model": 768, "n_head": 12, "context": 2048}

    def no_bench(*args):
        raise AssertionError(f"ran {args} on a CPU")

    rows = run_all.preset_rows("cpu", quick=True, run_bench=no_bench)
    assert len(rows) == 4
    assert all(row.startswith("| Pythia-160M: ") and "n/a on cpu: the 160M preset needs a GPU" in row
               for row in rows)
