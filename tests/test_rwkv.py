"""Spec for routers/rwkv.py and collapse/recurrent.py: RWKV-4 equals transformers' RWKV, its WKV forms agree,
its routing operator is the softmax the layer really applies (paper App. B.2), and the decay interventions
of Section 5.3 do what they claim."""
import json
import math

import numpy as np
import pytest
import torch
from transformers import RwkvConfig, RwkvForCausalLM

from collapse.recurrent import content_recency, late_query_influence, pearson_rows
from collapse import signature
from common.errors import UserError
from routers.rwkv import RWKV, wkv_chunked, wkv_reference, wkv_weights

VOCAB = 61


def tokens(batch=3, length=21, seed=1):
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def scrambled(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Weights far from init (keys of a few units, decays from fast to slow), so routing is far from uniform."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "time_decay" in name or "time_first" in name:
                p.normal_(0.0, 1.0)
            elif "time_mix" in name:
                p.uniform_(0.0, 1.0)
            elif p.dim() > 1:
                p.normal_(0.0, 0.3)
    return model.eval()


def tiny(**knobs) -> RWKV:
    torch.manual_seed(0)
    return scrambled(RWKV(VOCAB, n_layer=2, d_model=16, routing_chunk_channels=5, **knobs))


def random_wkv_inputs(b=2, T=19, C=6, key_scale=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    w, u = -torch.exp(torch.randn(C, generator=g)), torch.randn(C, generator=g)
    return w, u, key_scale * torch.randn(b, T, C, generator=g), torch.randn(b, T, C, generator=g)


@pytest.fixture(scope="module")
def hf_rwkv(tmp_path_factory):
    # rescale_every=0: transformers otherwise halves the residual stream in eval mode (an fp16 guard) and
    # matches the unscaled model only up to LayerNorm's epsilon
    config = RwkvConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, intermediate_size=64,
                        context_length=64, rescale_every=0)
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("rwkv")
    scrambled(RwkvForCausalLM(config)).save_pretrained(path)
    return RwkvForCausalLM.from_pretrained(path).eval()


@pytest.mark.parametrize("wkv", ["chunked", "reference"])
def test_from_hf_matches_rwkv_logits(hf_rwkv, wkv):
    ours = RWKV.from_hf(hf_rwkv, wkv=wkv).eval()
    with torch.no_grad():
        expected, got = hf_rwkv(tokens()).logits, ours(tokens())
    assert expected.abs().max() > 1.0
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)


def test_chunked_wkv_matches_the_running_max_recurrence_in_values_and_gradients():
    # keys of +-40 overflow a naive exp(k) sum; both forms must stay exact
    inputs = random_wkv_inputs(key_scale=40.0)
    reference = wkv_reference(*inputs)
    # gradients in float64: the detached running maxima must not change them (fp32 chains differ by rounding)
    inputs64 = [t.double().requires_grad_() for t in inputs]
    grads_ref = torch.autograd.grad(wkv_reference(*inputs64).square().sum(), inputs64)
    for chunk in (1, 4, 7):  # 7 does not divide T = 19
        torch.testing.assert_close(wkv_chunked(*inputs, chunk=chunk), reference, atol=1e-5, rtol=1e-5)
        chunked = wkv_chunked(*inputs64, chunk=chunk)
        for g_chunked, g_ref in zip(torch.autograd.grad(chunked.square().sum(), inputs64), grads_ref):
            torch.testing.assert_close(g_chunked, g_ref, atol=1e-9, rtol=1e-9)


def test_wkv_weights_are_the_papers_decayed_softmax():
    w, u, k, _ = random_wkv_inputs(b=1, T=9, C=2)
    alpha = wkv_weights(w, u, k)
    for c in range(2):
        for t in range(9):
            # logits (t-1-s) w_c + k_{s,c} for s < t, u_c + k_{t,c} for s = t, normalised over s <= t
            logits = [float((t - 1 - s) * w[c] + k[0, s, c]) for s in range(t)] + [float(u[c] + k[0, t, c])]
            expected = np.exp(np.array(logits) - max(logits))
            expected = np.concatenate([expected / expected.sum(), np.zeros(8 - t)])
            np.testing.assert_allclose(alpha[0, c, t].numpy(), expected, rtol=1e-5, atol=1e-7)


def test_wkv_operator_reproduces_each_layers_wkv_output():
    model = tiny()
    with torch.no_grad():
        x = model.blocks[0].pre_ln(model.embeddings(tokens()))
        for block in model.blocks:
            att, h = block.attention, block.ln1(x)
            shifted = torch.nn.functional.pad(h, (0, 0, 1, -1))
            k = att.key(torch.lerp(shifted, h, att.time_mix_key))
            v = att.value(torch.lerp(shifted, h, att.time_mix_value))
            wkv = wkv_reference(att.decay(), att.time_first, k, v)
            rebuilt = torch.einsum("bcts,bsc->btc", wkv_weights(att.decay(), att.time_first, k), v)
            assert wkv.abs().max() > 0.5
            torch.testing.assert_close(rebuilt, wkv, atol=1e-4, rtol=1e-5)
            x = x + att(h)[0]
            x = x + block.feed_forward(block.ln2(x))


def test_routing_record_streams_the_operator_with_rows_summing_to_one():
    model = tiny()
    with torch.no_grad():
        logits, routing = model(tokens(), return_routing=True)
        torch.testing.assert_close(logits, model(tokens()))
    layer = routing[1]
    chunks = list(layer.iter_weights())
    assert routing.axis == "time" and [c.shape[1] for c in chunks] == [5, 5, 5, 1]  # 16 channels in chunks of 5
    weights = torch.cat(chunks, dim=1)
    torch.testing.assert_close(weights.sum(-1), torch.ones(3, 16, 21))
    assert torch.all(weights.masked_select(~layer.mask) == 0)
    assert layer.keys.shape == (3, 1, 21, 16)  # the full key vectors k_s, one key set for all channels
    # Content/recency from the operator itself: late queries t >= floor(0.75 * 21) = 15, early sources s < 15.
    influence = weights[..., 15:, :15].sum(-2).mean(1)
    content, recency = content_recency(influence, layer.keys[:, 0, :15].norm(dim=-1))
    row = signature(routing).layers[1]
    assert row["content_r"] == pytest.approx(content.nanmean().item(), abs=1e-6)
    assert row["recency_r"] == pytest.approx(recency.nanmean().item(), abs=1e-6)
    assert math.isfinite(row["content_r"]) and math.isfinite(row["recency_r"])


def test_decay_scale_one_is_a_no_op():
    with torch.no_grad():
        torch.testing.assert_close(tiny(decay_scale=1.0)(tokens()), tiny()(tokens()), atol=0, rtol=0)
        torch.testing.assert_close(tiny().set_interventions(decay_scale=1)(tokens()), tiny()(tokens()), atol=0, rtol=0)


def test_decay_scale_equals_an_offset_of_time_decay_by_its_log():
    scaled = tiny(decay_scale=4.0)
    shifted = tiny()
    with torch.no_grad():
        for block in shifted.blocks:
            block.attention.time_decay += math.log(4.0)  # -exp(td + ln s) = s * -exp(td)
        torch.testing.assert_close(scaled(tokens()), shifted(tokens()), atol=1e-5, rtol=1e-5)
        assert not torch.allclose(scaled(tokens()), tiny()(tokens()))  # and the scale reaches the logits


def test_no_decay_is_decay_scale_zero_full_carry():
    with torch.no_grad():
        torch.testing.assert_close(tiny(no_decay=True)(tokens()), tiny(decay_scale=0.0)(tokens()), atol=0, rtol=0)
        alpha = torch.cat(list(tiny(no_decay=True)(tokens(), return_routing=True)[1][0].iter_weights()), 1)
    # w = 0: the past is weighted by exp(k_s) alone, so two past sources keep their ratio for every query
    ratio = alpha[..., 5:, 0] / alpha[..., 5:, 1]
    torch.testing.assert_close(ratio, ratio[..., :1].expand_as(ratio))


def test_kill_carry_leaves_weight_only_on_the_previous_and_current_source():
    T = 128
    with torch.no_grad():
        routing = tiny(kill_carry=True)(tokens(length=T), return_routing=True)[1]
    for layer in routing:
        alpha = torch.cat(list(layer.iter_weights()), 1)
        assert torch.all(alpha.tril(-2) == 0)  # s < t - 1 gets exactly nothing
        torch.testing.assert_close(alpha.diagonal(0, -2, -1).sum(-1) + alpha.diagonal(-1, -2, -1).sum(-1),
                                   torch.full(alpha.shape[:2], float(T)))
        # each source receives at most its own query and the next one: max share <= 2/T (paper: 0.015 = 2/128)
        shares = alpha.sum(-2) / alpha.sum((-2, -1)).unsqueeze(-1)
        assert 1 / T <= shares.amax(-1).min() and shares.amax(-1).max() <= 2 / T + 1e-6


def test_learn_decay_false_keeps_time_decay_out_of_training():
    model = RWKV(VOCAB, n_layer=2, d_model=8, learn_decay=False)
    assert all(not b.attention.time_decay.requires_grad and b.attention.time_first.requires_grad for b in model.blocks)


@pytest.mark.parametrize("kwargs, match", [
    ({"decay_scale": -1.0}, "decay_scale must be a finite number >= 0"),
    ({"decay_scale": math.nan}, "decay_scale must be a finite number >= 0"),
    ({"decay_scale": "slow"}, "decay_scale must be a finite number >= 0"),
    ({"kill_carry": True, "no_decay": True}, "choose one decay intervention"),
    ({"kill_carry": True, "decay_scale": 2.0}, "choose one decay intervention"),
    ({"no_decay": 1}, "no_decay must be true or false"),
    ({"wkv": "cuda"}, "unknown wkv"),
])
def test_bad_knobs_raise_user_errors(kwargs, match):
    with pytest.raises(UserError, match=match):
        RWKV(VOCAB, n_layer=1, d_model=8, **kwargs)


def test_pearson_rows_matches_numpy():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(4, 30, generator=g), torch.randn(4, 30, generator=g)
    expected = [np.corrcoef(x[i].numpy(), y[i].numpy())[0, 1] for i in range(4)]
    np.testing.assert_allclose(pearson_rows(x, y).numpy(), expected, rtol=1e-10)
    assert math.isnan(float(pearson_rows(torch.ones(5), torch.arange(5.0))))


def test_content_recency_reads_late_queries_only():
    T, late = 8, 6
    rows = torch.zeros(1, T, T)
    rows[0, :late, 0] = 1.0  # early queries pile onto source 0: must not count
    rows[0, late:, :late] = torch.arange(1.0, late + 1)  # late queries favour later sources
    influence = late_query_influence(rows[:, late:], late)
    torch.testing.assert_close(influence, 2 * torch.arange(1.0, late + 1).unsqueeze(0))
    content, recency = content_recency(influence, key_norm=influence.flip(-1))
    assert float(recency) == pytest.approx(1.0) and float(content) == pytest.approx(-1.0)


def test_configs_compose_to_the_default_169m_shape_and_the_nine_point_sweep(tmp_path):
    from omegaconf import OmegaConf

    from run import compose_run

    cfg = compose_run(tmp_path, ["router=rwkv_169m"])
    assert (cfg.router.n_layer, cfg.router.d_model, cfg.router.d_ffn) == (12, 768, 3072)
    sweep = OmegaConf.load("conf/experiment/rwkv_decay_sweep_trained.yaml").hydra.sweeper.params["router.decay_scale"]
    assert [float(s) for s in str(sweep).split(",")] == [0, 0.125, 0.25, 0.5, 1, 2, 4, 8, 16]
    cfg = compose_run(tmp_path, ["experiment=rwkv_decay_sweep_trained"])
    assert cfg.router._target_ == "routers.rwkv.RWKV" and cfg.router.learn_decay is False


def test_train_py_trains_rwkv_and_the_monitor_logs_its_signature(tmp_path, monkeypatch):
    import train
    from run import compose_run

    monkeypatch.setenv("ROUTECOLLAPSE_DATA", str(tmp_path / "cache"))
    cfg = compose_run(tmp_path / "run", [
        "router=rwkv", "router.n_layer=2", "router.d_model=16", "logger=csv",
        "data=synthetic", "data.synthetic.vocab_size=64", "data.synthetic.n_tokens=20000", "data.context_length=32",
        "data.batch_size=4", "data.probe_sequences=4", "data.probe_length=32", "trainer.max_steps=6",
        "trainer.val_check_interval=3", "trainer.limit_val_batches=1", "trainer.enable_progress_bar=false",
        "callbacks.collapse_monitor.every_n_steps=3", "callbacks.collapse_monitor.probe_batch_size=2",
        "callbacks.checkpoint.every_n_train_steps=3", "print_table=false"])
    train.train(cfg)
    records = [json.loads(line) for line in (tmp_path / "run" / "collapse.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [0, 3, 6]
    for layer in records[-1]["layers"]:
        assert 0 < layer["max_share"] <= 1 and math.isfinite(layer["recency_r"])
