"""Spec for routers/ssm.py: Mamba-1 equals transformers' Mamba, its scans agree, and its hidden attention is
the operator the layer really applies (paper App. B.2), with the selectivity freezes of Section 5.2."""
import json
import math

import pytest
import torch
from transformers import MambaConfig, MambaForCausalLM

from collapse import signature
from common.errors import UserError
from routers.ssm import Mamba, hidden_attention, selective_scan_chunked, selective_scan_ref

VOCAB = 61


def tokens(batch=3, length=21, seed=1):
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def scrambled(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Weights far from init, so Δ, B and C vary strongly with the input and no test passes by symmetry."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("A_log", ".D", "dt_proj.bias")):
                p.normal_(0.0, 0.5)
            elif p.dim() > 1:
                p.normal_(0.0, 0.3)
    return model.eval()


def tiny(**knobs) -> Mamba:
    torch.manual_seed(0)  # the conv bias keeps its random init: same seed, same model
    return scrambled(Mamba(VOCAB, n_layer=2, d_model=16, d_state=4, dt_rank=3, routing_chunk_channels=5, **knobs))


def random_scan_inputs(b=2, T=19, d=6, n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, T, d, generator=g)
    delta = torch.nn.functional.softplus(torch.randn(b, T, d, generator=g))
    A = -torch.rand(d, n, generator=g) * 4 - 0.1
    return x, delta, A, torch.randn(b, T, n, generator=g), torch.randn(b, T, n, generator=g)


@pytest.fixture(scope="module")
def hf_mamba(tmp_path_factory):
    config = MambaConfig(vocab_size=VOCAB, hidden_size=32, state_size=8, num_hidden_layers=2, expand=2,
                         conv_kernel=4, time_step_rank=4)
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("mamba")
    scrambled(MambaForCausalLM(config)).save_pretrained(path)
    return MambaForCausalLM.from_pretrained(path).eval()


@pytest.mark.parametrize("scan", ["chunked", "reference"])
def test_from_hf_matches_mamba_logits(hf_mamba, scan):
    ours = Mamba.from_hf(hf_mamba, scan=scan).eval()
    with torch.no_grad():
        expected, got = hf_mamba(tokens()).logits, ours(tokens())
    assert expected.abs().max() > 1.0  # a real comparison, not of near-zero logits
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)


def test_chunked_scan_matches_sequential_reference_in_values_and_gradients():
    inputs = [t.requires_grad_() for t in random_scan_inputs()]
    reference = selective_scan_ref(*inputs)
    grads_ref = torch.autograd.grad(reference.square().sum(), inputs)
    for chunk in (1, 4, 7):  # 7 does not divide T = 19: the last block is short
        chunked = selective_scan_chunked(*inputs, chunk=chunk)
        torch.testing.assert_close(chunked, reference, atol=1e-5, rtol=1e-5)
        for g_chunked, g_ref in zip(torch.autograd.grad(chunked.square().sum(), inputs), grads_ref):
            torch.testing.assert_close(g_chunked, g_ref, atol=1e-4, rtol=1e-4)


def test_hidden_attention_equals_the_unrolled_formula():
    x, delta, A, B, C = random_scan_inputs(b=1, T=11, d=2, n=3)
    alpha = hidden_attention(delta, A, B, C, block=4)
    for d in range(2):
        for t in range(11):
            for s in range(11):
                # alpha_{t,s} = sum_n C_{t,n} exp(A_{d,n} sum_{r=s+1..t} Δ_r) Δ_s B_{s,n} for s <= t, else 0
                decay = [torch.exp(A[d, n] * delta[0, s + 1:t + 1, d].sum()) for n in range(3)]
                expected = 0.0 if s > t else sum(
                    float(C[0, t, n] * decay[n] * delta[0, s, d] * B[0, s, n]) for n in range(3))
                assert float(alpha[0, d, t, s]) == pytest.approx(expected, rel=1e-5, abs=1e-6), (d, t, s)


def test_hidden_attention_reproduces_each_layers_scan_output():
    model = tiny()
    x = model.embeddings(tokens())
    with torch.no_grad():
        for block in model.layers:
            mixer = block.mixer
            u = block.norm(x)
            xs, _, delta, B, C = mixer.select(u)
            scan_output = selective_scan_ref(xs, delta, -torch.exp(mixer.A_log), B, C) + mixer.D * xs
            alpha = hidden_attention(delta, -torch.exp(mixer.A_log), B, C)
            # the scan output before the z gate, D skip included: y_t = sum_s alpha_{t,s} x_s + D x_t
            rebuilt = torch.einsum("bdts,bsd->btd", alpha, xs) + mixer.D * xs
            assert scan_output.abs().max() > 1.0
            torch.testing.assert_close(rebuilt, scan_output, atol=1e-4, rtol=1e-5)
            x, _ = block(x)


def test_routing_record_streams_the_absolute_operator_over_all_channels():
    model = tiny()
    with torch.no_grad():
        logits, routing = model(tokens(), return_routing=True)
        torch.testing.assert_close(logits, model(tokens()))
        layer = routing[0]
        chunks = list(layer.iter_weights())
        assert routing.axis == "time" and len(routing) == 2
        assert [c.shape[1] for c in chunks] == [5, 5, 5, 5, 5, 5, 2]  # 32 channels in chunks of 5
        weights = torch.cat(chunks, dim=1)
        mixer = model.layers[0].mixer
        xs, _, delta, B, C = mixer.select(model.layers[0].norm(model.embeddings(tokens())))
        torch.testing.assert_close(weights, hidden_attention(delta, -torch.exp(mixer.A_log), B, C).abs())
        assert torch.all(weights.masked_select(~layer.mask) == 0)
        assert layer.keys.shape == (3, 1, 21, 4)  # the input matrix B, one key set for all channels
        torch.testing.assert_close(layer.delta, delta)  # the record carries Δ itself; collapse/ derives the rest
        row = signature(routing).layers[0]
        cv = lambda v: (v.std(1, correction=0) / v.mean(1)).mean().item()  # noqa: E731
        assert row["delta_cv"] == pytest.approx(cv(delta.double()), rel=1e-5)
        assert row["b_norm_cv"] == pytest.approx(cv(B.double().norm(dim=-1)), rel=1e-5)
        assert row["effective_key_norm_cv"] == pytest.approx(cv(delta.double() * B.double().norm(dim=-1)[..., None]),
                                                             rel=1e-5)


def test_freeze_delta_makes_delta_position_only_and_leaves_b_and_c_selective():
    model = tiny(freeze_delta=True)
    mixer = model.layers[0].mixer
    with torch.no_grad():
        _, _, delta, B, C = mixer.select(model.layers[0].norm(model.embeddings(tokens())))
    assert torch.equal(delta[0], delta[1]) and torch.equal(delta[1], delta[2])  # same Δ for every sequence
    assert delta[0].std(0).min() > 0  # still varies with position
    assert not torch.allclose(B[0], B[1]) and not torch.allclose(C[0], C[1])


def test_freeze_delta_and_bc_make_the_operator_the_same_for_every_sequence():
    with torch.no_grad():
        real = torch.cat(list(tiny()(tokens(), return_routing=True)[1][1].iter_weights()), 1)
        frozen = torch.cat(list(tiny(freeze_delta=True, freeze_bc=True)(tokens(), return_routing=True)[1][1]
                                .iter_weights()), 1)
    assert not torch.allclose(real[0], real[1])
    torch.testing.assert_close(frozen[0], frozen[1], atol=0, rtol=0)


def test_set_interventions_on_a_built_model_equals_the_config_knob():
    with torch.no_grad():
        knob = tiny(freeze_delta=True)(tokens())
        switched = tiny().set_interventions(freeze_delta=True)(tokens())
        unfrozen = tiny()(tokens())
    torch.testing.assert_close(switched, knob, atol=0, rtol=0)
    assert not torch.allclose(knob, unfrozen)  # the freeze reaches the logits through depth


@pytest.mark.parametrize("kwargs, match", [
    ({"scan": "parallel"}, "unknown scan"),
    ({"freeze_delta": "yes"}, "freeze_delta must be true or false"),
    ({"scan_chunk": 0}, "scan_chunk must be a positive integer"),
    ({"routing_chunk_channels": 1.5}, "routing_chunk_channels must be a positive integer"),
])
def test_bad_knobs_raise_user_errors(kwargs, match):
    with pytest.raises(UserError, match=match):
        Mamba(VOCAB, n_layer=1, d_model=8, **kwargs)


def test_freezing_a_single_sequence_is_refused():
    with pytest.raises(UserError, match=">= 2 sequences"):
        tiny(freeze_delta=True)(tokens(batch=1))


def test_configs_compose_to_the_default_and_130m_shapes(tmp_path):
    from run import compose_run

    cfg = compose_run(tmp_path, ["router=mamba_130m"])
    assert (cfg.router.n_layer, cfg.router.d_model, cfg.router.d_state) == (24, 768, 16)
    cfg = compose_run(tmp_path, ["experiment=mamba_freeze_trained"])
    assert cfg.router._target_ == "routers.ssm.Mamba" and cfg.router.n_layer == 4 and cfg.router.d_model == 128


def test_train_py_trains_mamba_and_the_monitor_logs_its_signature(tmp_path, monkeypatch):
    import train
    from run import compose_run

    monkeypatch.setenv("ROUTECOLLAPSE_DATA", str(tmp_path / "cache"))
    cfg = compose_run(tmp_path / "run", [
        "router=mamba", "router.n_layer=2", "router.d_model=16", "router.d_state=4", "logger=csv",
        "data=synthetic", "data.synthetic.vocab_size=64", "data.synthetic.n_tokens=20000", "data.context_length=32",
        "data.batch_size=4", "data.probe_sequences=4", "data.probe_length=32", "trainer.max_steps=6",
        "trainer.val_check_interval=3", "trainer.limit_val_batches=1", "trainer.enable_progress_bar=false",
        "callbacks.collapse_monitor.every_n_steps=3", "callbacks.collapse_monitor.probe_batch_size=2",
        "callbacks.checkpoint.every_n_train_steps=3", "print_table=false"])
    train.train(cfg)
    records = [json.loads(line) for line in (tmp_path / "run" / "collapse.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [0, 3, 6]
    for layer in records[-1]["layers"]:
        assert 0 < layer["max_share"] <= 1 and math.isfinite(layer["delta_cv"])
