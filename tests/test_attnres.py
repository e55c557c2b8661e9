"""Spec for routers/attnres.py: block attention residuals (AttnRes) and the matched Qwen3 baseline."""
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import OmegaConf

from collapse import signature
from collapse.family import DepthHubs
from common.errors import UserError
from routers.attnres import Qwen3Decoder

CONF = Path(__file__).resolve().parents[1] / "conf"
VOCAB = 64


def tiny(**kwargs) -> Qwen3Decoder:
    torch.manual_seed(0)
    shape = dict(n_layer=4, d_model=32, n_head=4, n_kv_head=2, d_ff=48, context_length=16, layers_per_block=2)
    return Qwen3Decoder(VOCAB, **{**shape, **kwargs}).eval()


def tokens(batch=2, length=12, seed=1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def randomise_routers(model: Qwen3Decoder, scale: float = 2.0) -> None:
    """Move the depth routers off their uniform init (trained-looking, non-uniform routing)."""
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for layer in model.layers:
            for router in (layer.attn_router, layer.mlp_router):
                router.query.copy_(scale * torch.randn(router.query.shape, generator=g))
                router.key_norm.weight.copy_(1 + 0.5 * torch.rand(router.key_norm.weight.shape, generator=g))
                router.recency_bias.fill_(torch.randn((), generator=g).item())


def source_counts(n_layer: int, layers_per_block: int) -> list[int]:
    """Depth sources S of each of the 2 * n_layer sublayers: embeddings, each finished block, the stream."""
    return [layer // layers_per_block + 2 for layer in range(n_layer) for _ in range(2)]


def hubs(layer) -> dict:
    return DepthHubs().batch(layer)


def max_share(weights: torch.Tensor) -> torch.Tensor:
    """Column sums over queries, normalised, max over sources; mean over batch and units (docs/metrics.md)."""
    columns = weights.sum(dim=-2)
    return (columns / columns.sum(dim=-1, keepdim=True)).amax(dim=-1).mean()


def test_zero_init_query_gives_exactly_uniform_routing():
    _, routing = tiny()(tokens(), return_routing=True)
    assert routing.axis == "depth" and len(routing) == 8  # one record layer per sublayer
    for layer, s in zip(routing, source_counts(4, 2)):  # depth sources S: embeddings, finished blocks, stream
        assert layer.weights.shape == (2, 1, 12, s)
        torch.testing.assert_close(layer.weights, torch.full_like(layer.weights, 1 / s), rtol=0, atol=1e-7)


def test_step0_max_share_equals_the_uniform_baseline():
    _, routing = tiny()(tokens(), return_routing=True)
    for layer in routing:
        torch.testing.assert_close(max_share(layer.weights), hubs(layer)["uniform_share"])
    measured = sum(max_share(layer.weights) for layer in routing) / len(routing)
    assert measured.item() == pytest.approx((1 / 2 + 1 / 3) / 2, abs=1e-6)  # 4 sublayers at S=2, 4 at S=3


def test_uniform_baseline_of_the_0p6b_layout_is_the_papers_0_245():
    # 28 layers in blocks of 4: sublayers of block k see k + 2 sources, so the mean of 1/S is (H_8 - 1) / 7.
    closed_form = (sum(1 / s for s in range(1, 9)) - 1) / 7
    assert sum(1 / s for s in source_counts(28, 4)) / 56 == pytest.approx(closed_form, abs=1e-12)
    assert round(closed_form, 3) == 0.245
    # The routing a zero-initialised 28-layer model (tiny width) actually produces gives the same number.
    model = Qwen3Decoder(VOCAB, n_layer=28, d_model=8, n_head=1, d_ff=8, context_length=4, layers_per_block=4)
    _, routing = model(tokens(1, 4), return_routing=True)
    assert len(routing) == 56
    measured = sum(max_share(layer.weights) for layer in routing) / len(routing)
    assert measured.item() == pytest.approx(closed_form, abs=1e-6)


def test_record_sources_times_weights_reproduce_each_sublayer_input():
    """Rebuild the sources from the additive stream (embeddings + every sublayer output, snapshot at each
    block end) and check keys = RMSNorm(sources) and sum_s w_s V_s = the input each sublayer normalised."""
    model = tiny()
    randomise_routers(model)
    inputs, outputs = [], []
    hooks = []
    for layer in model.layers:
        for norm, block in ((layer.input_layernorm, layer.self_attn), (layer.post_attention_layernorm, layer.mlp)):
            hooks.append(norm.register_forward_pre_hook(lambda m, args: inputs.append(args[0])))
            hooks.append(block.register_forward_hook(
                lambda m, args, out: outputs.append(out[0] if isinstance(out, tuple) else out)))
    x = tokens()
    _, routing = model(x, return_routing=True)
    for h in hooks:
        h.remove()

    routers = [r for layer in model.layers for r in (layer.attn_router, layer.mlp_router)]
    stream = model.embed_tokens(x)
    blocks = [stream]
    for j, (layer, router) in enumerate(zip(routing, routers)):
        sources = torch.stack(blocks + [stream], dim=2)
        torch.testing.assert_close(layer.keys, router.key_norm(sources))
        rebuilt = torch.einsum("bts,btsd->btd", layer.weights[:, 0], sources)
        torch.testing.assert_close(rebuilt, inputs[j], rtol=0, atol=1e-6)
        stream = stream + outputs[j]
        if j % 4 == 3:  # end of a 2-layer block
            blocks.append(stream)
    assert not torch.allclose(routing[-1].weights, torch.full_like(routing[-1].weights, 1 / 3))


def test_large_positive_offset_routes_everything_to_the_current_block():
    model = tiny(recency_offset=30.0)
    randomise_routers(model, scale=0.5)
    _, routing = model(tokens(), return_routing=True)
    for layer in routing:
        assert hubs(layer)["current_share"].item() > 0.999


def test_large_negative_offset_starves_the_current_block():
    model = tiny()
    randomise_routers(model, scale=0.5)
    model.recency_offset = -30.0  # applied at forward time: the intervention on an already-built model
    _, routing = model(tokens(), return_routing=True)
    for layer in routing:
        assert hubs(layer)["current_share"].item() < 1e-6
        shares = [v for k, v in hubs(layer).items() if k.endswith("share") and k != "uniform_share"]
        assert sum(shares).item() == pytest.approx(1.0, abs=1e-5)  # the weight went to the other hubs


def test_offset_limit_of_attnres_is_the_additive_baseline_with_the_same_weights():
    baseline = tiny(residual="additive", routing_axis="token")
    attnres = tiny(recency_offset=1e4)
    missing, unexpected = attnres.load_state_dict(baseline.state_dict(), strict=False)
    assert unexpected == [] and all("_router." in k for k in missing)
    randomise_routers(attnres)
    x = tokens()
    torch.testing.assert_close(attnres(x), baseline(x), rtol=0, atol=1e-6)
    attnres.recency_offset = 0.0
    assert not torch.allclose(attnres(x), baseline(x), atol=1e-3)


@pytest.mark.parametrize("tie", [True, False])
def test_qwen3_baseline_matches_transformers_qwen3_logits(tmp_path, tie):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(0)
    config = Qwen3Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=32,
                         tie_word_embeddings=tie, attn_implementation="eager")
    hf = Qwen3ForCausalLM(config)
    with torch.no_grad():  # HF inits norm gains to 1: perturb them so a misplaced gain cannot pass
        for name, p in hf.named_parameters():
            if "norm" in name:
                p.add_(0.3 * torch.randn_like(p))
    hf.save_pretrained(tmp_path)
    hf = Qwen3ForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    ours = Qwen3Decoder.from_hf(tmp_path).eval()
    assert ours.residual == "additive"
    x = tokens(2, 20)
    expected = hf(x).logits
    torch.testing.assert_close(ours(x), expected, rtol=0, atol=1e-5)
    logits, routing = ours(x, return_routing=True)  # explicit-softmax path: same logits, causal heads
    torch.testing.assert_close(logits, expected, rtol=0, atol=1e-5)
    assert routing.axis == "token" and routing[0].weights.shape == (2, 4, 20, 20)
    torch.testing.assert_close(routing[0].weights.sum(-1), torch.ones(2, 4, 20))
    assert routing[0].weights.triu(1).abs().max() == 0
    hf_weights = hf(x, output_attentions=True).attentions
    torch.testing.assert_close(routing[2].weights, hf_weights[2], rtol=0, atol=1e-6)


def test_qwen3_from_hf_loads_a_one_layer_model(tmp_path):
    # The block size only matters to AttnRes: an additive 1-layer model must load with the default blocks of 2.
    from transformers import Qwen3Config, Qwen3ForCausalLM

    config = Qwen3Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=32,
                         attn_implementation="eager")
    Qwen3ForCausalLM(config).save_pretrained(tmp_path)
    hf = Qwen3ForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    ours = Qwen3Decoder.from_hf(tmp_path).eval()
    torch.testing.assert_close(ours(tokens(1, 9)), hf(tokens(1, 9)).logits, rtol=0, atol=1e-5)
    with pytest.raises(UserError, match="layers_per_block=2 must be in 1..n_layer=1"):
        Qwen3Decoder.from_hf(tmp_path, residual="attnres", routing_axis="depth")


def test_attnres_routing_path_matches_training_path():
    model = tiny()
    randomise_routers(model)
    x = tokens()
    for axis in ("depth", "token"):
        model.routing_axis = axis
        logits, routing = model(x, return_routing=True)
        torch.testing.assert_close(logits, model(x), rtol=0, atol=1e-5)
        assert routing.axis == axis


def test_key_norm_cv_is_measured_not_assumed_zero():
    """Keys are RMSNorm(sources), ||k|| = ||g * v|| / sqrt(ms(v) + eps): only unit gain *and* eps << ms(v) give
    every key the norm sqrt(d) (the paper's CV = 0 'by construction'). The record keeps the real norms."""
    def norm_cv(keys):
        norms = keys.norm(dim=-1)
        return (norms.std(dim=-1, unbiased=False) / norms.mean(dim=-1)).mean().item()

    model, x = tiny(), tokens()
    _, routing = model(x, return_routing=True)
    embeddings = model.embed_tokens(x)  # source 0 of every sublayer
    ms = embeddings.pow(2).mean(dim=-1)
    torch.testing.assert_close(routing[-1].keys[..., 0, :].norm(dim=-1), (32 * ms / (ms + 1e-6)).sqrt())
    unit_gain_cv = norm_cv(routing[-1].keys)
    randomise_routers(model)  # gains spread over [1, 1.5], as training moves them
    _, routing = model(x, return_routing=True)
    assert 0 < unit_gain_cv < 1e-3 < norm_cv(routing[-1].keys)


def test_hub_shares_are_token_averaged_weights():
    model = tiny()
    randomise_routers(model)
    _, routing = model(tokens(), return_routing=True)
    layer = routing[-1]  # block 1: sources = embeddings, block 1 snapshot, running stream
    shares = layer.weights.mean(dim=(0, 1, 2))
    got = hubs(layer)
    assert set(got) == {"uniform_share", "embedding_share", "block1_share", "current_share", "recency_bias"}
    torch.testing.assert_close(torch.stack([got[k] for k in ("embedding_share", "block1_share", "current_share")]),
                               shares)
    assert got["uniform_share"].item() == pytest.approx(1 / 3)
    assert got["recency_bias"].item() == pytest.approx(model.layers[-1].mlp_router.recency_bias.item())
    row = signature(routing).layers[-1]  # the signature carries them as sequence means
    assert row["embedding_share"] == pytest.approx(got["embedding_share"].item(), abs=1e-7)


@pytest.mark.parametrize("bad, fix", [
    (dict(residual="dense"), "choose one of attnres, additive"),
    (dict(routing_axis="time"), "choose one of depth, token"),
    (dict(residual="additive"), "set routing_axis=token"),
    (dict(layers_per_block=5), "layers_per_block=5 must be in 1..n_layer=4"),
    (dict(n_head=3, n_kv_head=3), "must divide d_model"),
    (dict(n_kv_head=3), "n_kv_head=3 must divide n_head=4"),
])
def test_bad_config_raises_user_error_naming_the_fix(bad, fix):
    with pytest.raises(UserError, match=fix):
        tiny(**bad)


def test_sequence_longer_than_context_raises_user_error():
    with pytest.raises(UserError, match="context_length 16"):
        tiny()(tokens(1, 17))


@pytest.mark.parametrize("name, residual, axis", [("attnres", "attnres", "depth"), ("qwen3", "additive", "token")])
def test_router_configs_compose_and_train_one_step(name, residual, axis):
    with initialize_config_dir(str(CONF), version_base="1.3"):  # as train.py composes it: under the root
        cfg = compose("train", overrides=[f"router={name}", "router.n_layer=2", "router.layers_per_block=1"])
    assert cfg.probe_sequences == 16  # the family's probe, set by the router config at the root
    model = instantiate(cfg.router, vocab_size=VOCAB)
    assert (model.residual, model.routing_axis, model.context_length) == (residual, axis, 128)
    loss = torch.nn.functional.cross_entropy(model(tokens()).flatten(0, 1), tokens(seed=3).flatten())
    loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("name", ["attnres_0.6b", "qwen3_0.6b"])
def test_0p6b_configs_have_the_qwen3_0p6b_shape(name):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    with initialize_config_dir(str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=[f"router={name}"]).router
    counts = source_counts(cfg.n_layer, cfg.layers_per_block)
    assert sum(1 / s for s in counts) / len(counts) == pytest.approx(0.2454, abs=1e-4)
    with torch.device("meta"):  # shapes only: no 2.4 GB of weights on a CPU test machine
        ours = instantiate(cfg, vocab_size=151936)
        hf = Qwen3ForCausalLM(Qwen3Config(vocab_size=151936, hidden_size=1024, intermediate_size=3072,
                                          num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8,
                                          head_dim=128, tie_word_embeddings=True))
    routers = sum(p.numel() for n, p in ours.named_parameters() if "_router." in n)
    assert routers == (56 * (2 * 1024 + 1) if cfg.residual == "attnres" else 0)
    assert sum(p.numel() for p in ours.parameters()) - routers == sum(p.numel() for p in hf.parameters())


def test_offset_experiment_sweeps_a_fixed_recency_brake(tmp_path):
    # A minimal root with train.yaml's router/experiment groups, so this checks our files alone.
    root = {"defaults": ["_self_", {"router": "qwen3"}, {"experiment": None}],
            "hydra": {"searchpath": [f"file://{CONF}"]}}
    (tmp_path / "root.yaml").write_text(OmegaConf.to_yaml(root))
    with initialize_config_dir(str(tmp_path), version_base="1.3"):
        cfg = compose(config_name="root", overrides=["experiment=attnres_offset_trained"], return_hydra_config=True)
    assert cfg.router.residual == "attnres" and cfg.router.learn_recency_bias is False
    offsets = [float(v) for v in str(cfg.hydra.sweeper.params["router.recency_offset"]).split(",")]
    assert offsets == [-8, -4, -2, -1, 0, 1, 2, 4, 8]
