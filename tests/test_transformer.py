"""Spec for routers/transformer.py: the GPT-NeoX block, its position schemes and scores, and its configs."""
import itertools
import math

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

from common.errors import UserError
from routers.transformer import POSITIONS, SCORES, Transformer

CONF = "/work/main/conf"
VOCAB = 97
TINY = dict(vocab_size=VOCAB, n_layer=2, d_model=32, n_head=4, context_length=16)


def tiny(position="nope", score="dot", seed=0, **kw):
    """A tiny model whose scores are far from uniform: random (not init-sized) weights, random metric and gain."""
    torch.manual_seed(seed)
    model = Transformer(**{**TINY, "position": position, "score": score, **kw}).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("metric_factor"):
                p.add_(0.3 * torch.randn_like(p))
            elif name.endswith("query_gain"):
                p.uniform_(0.5, 2.0)
            elif p.dim() > 1:
                p.normal_(0.0, 0.3)
    return model


def tokens(batch=2, length=12, seed=1):
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A tiny random GPTNeoXForCausalLM saved locally, with weights large enough that attention is not uniform."""
    config = GPTNeoXConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                           intermediate_size=256, max_position_embeddings=32, rotary_pct=0.25,
                           use_parallel_residual=True)
    torch.manual_seed(0)
    hf = GPTNeoXForCausalLM(config)
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(0.0, 0.3)
    path = tmp_path_factory.mktemp("neox")
    hf.save_pretrained(path)
    return path


def load_hf(path):
    return GPTNeoXForCausalLM.from_pretrained(path, attn_implementation="eager").eval()


@pytest.mark.parametrize("source", ["model", "state_dict"])
def test_from_hf_matches_gpt_neox_logits(hf_dir, source):
    hf = load_hf(hf_dir)
    ours = (Transformer.from_hf(hf) if source == "model"
            else Transformer.from_hf(hf.state_dict(), n_head=4, context_length=32)).eval()
    x = tokens(length=20)
    with torch.no_grad():
        expected = hf(x).logits
        assert expected.std() > 0.5  # logits far from zero, so atol 1e-5 is a real constraint
        torch.testing.assert_close(ours(x), expected, atol=1e-5, rtol=0)


def test_serial_residual_matches_gpt_neox_without_parallel_residual(hf_dir):
    hf = load_hf(hf_dir)
    hf.config.use_parallel_residual = False
    for layer in hf.gpt_neox.layers:
        layer.use_parallel_residual = False
    ours = Transformer.from_hf(hf).eval()
    assert not ours.blocks[0].parallel_residual
    x = tokens(length=20)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), hf(x).logits, atol=1e-5, rtol=0)


def test_routing_weights_match_gpt_neox_attentions(hf_dir):
    hf = load_hf(hf_dir)
    ours = Transformer.from_hf(hf).eval()
    x = tokens(length=20)
    with torch.no_grad():
        attentions = hf(x, output_attentions=True).attentions
        _, routing = ours(x, return_routing=True)
    assert len(attentions) == len(routing) == 2
    for theirs, layer in zip(attentions, routing):
        torch.testing.assert_close(layer.weights, theirs, atol=1e-6, rtol=0)


def test_from_hf_rejects_an_unsupported_activation(hf_dir):
    hf = load_hf(hf_dir)
    hf.config.hidden_act = "relu"
    with pytest.raises(UserError, match="hidden_act"):
        Transformer.from_hf(hf)


@pytest.mark.parametrize("position,score", list(itertools.product(POSITIONS, SCORES)))
def test_sdpa_path_matches_explicit_softmax_path(position, score):
    model = tiny(position, score, alibi_slope_scale=0.7)
    x = tokens()
    with torch.no_grad():
        fast = model(x)
        reference, _ = model(x, return_routing=True)
    assert fast.std() > 0.5
    torch.testing.assert_close(fast, reference, atol=1e-5, rtol=0)


def j_after_i(n):
    return torch.ones(n, n, dtype=torch.bool).triu(1)


def layer0_queries_keys(model, x):
    """Independent q, k of layer 0 of a TINY model: fused qkv viewed as [B, T, H=4, (q | k | v), d_head=8]."""
    block = model.blocks[0]
    h = torch.nn.functional.layer_norm(model.wte(x), (32,), block.ln_1.weight, block.ln_1.bias, 1e-5)
    qkv = (h @ block.attn.qkv.weight.T + block.attn.qkv.bias).view(*x.shape, 4, 3, 8)
    return qkv[..., 0, :].transpose(1, 2), qkv[..., 1, :].transpose(1, 2)


def direct_scores(model, score, q, k):
    """Each score written as its formula over pairs (q_i, k_j), query-only terms included."""
    tau = 1 / math.sqrt(8)
    if score == "normalized":
        rms = lambda v: v / v.square().mean(-1, keepdim=True).add(1e-5).sqrt()  # noqa: E731
        q, k = model.blocks[0].attn.query_gain * rms(q), rms(k)
    diff = q.unsqueeze(-2) - k.unsqueeze(-3)  # [B, H, i, j, d] = q_i - k_j
    if score == "euclidean":
        return -tau / 2 * diff.square().sum(-1)
    if score == "learned_metric":
        L = model.blocks[0].attn.metric_factor
        return -tau / 2 * torch.einsum("bhijd,hed,hef,bhijf->bhij", diff, L, L, diff)  # M = L^T L
    return tau * torch.einsum("bhid,bhjd->bhij", q, k)


@pytest.mark.parametrize("position,score", list(itertools.product(["nope", "alibi"], SCORES)))
def test_routing_weights_equal_softmax_of_direct_score(position, score):
    model = tiny(position, score, alibi_slope_scale=0.5)
    x = tokens(length=10)
    with torch.no_grad():
        _, routing = model(x, return_routing=True)
        logits = direct_scores(model, score, *layer0_queries_keys(model, x))
    if position == "alibi":
        slopes = 0.5 * 2.0 ** (-8 * torch.arange(1, 5) / 4)  # m_h = scale * 2^(-8h/H), h = 1..H
        i, j = torch.arange(10).view(10, 1), torch.arange(10).view(1, 10)
        logits = logits - slopes.view(4, 1, 1) * (i - j)
    expected = logits.masked_fill(j_after_i(10), float("-inf")).softmax(-1)
    assert expected[..., -1, :].max() > 0.5  # last query: far from uniform 1/10, so a wrong score shows
    torch.testing.assert_close(routing[0].weights, expected, atol=1e-5, rtol=0)


def test_learned_metric_at_identity_equals_euclidean():
    euclidean = tiny("rope", "euclidean")
    learned = Transformer(**TINY, position="rope", score="learned_metric").eval()
    missing, unexpected = learned.load_state_dict(euclidean.state_dict(), strict=False)
    assert all(name.endswith("metric_factor") for name in missing) and len(missing) == 2 and not unexpected
    x = tokens()
    with torch.no_grad():
        (_, expected), (_, routing) = euclidean(x, return_routing=True), learned(x, return_routing=True)
        torch.testing.assert_close(learned(x), euclidean(x), atol=1e-5, rtol=0)
    for theirs, ours in zip(expected, routing):
        torch.testing.assert_close(ours.weights, theirs.weights, atol=1e-6, rtol=0)


def test_routing_record_is_causal_row_stochastic_per_head():
    model = tiny("alibi", "dot")
    _, routing = model(tokens(batch=3, length=12), return_routing=True)
    assert routing.axis == "token" and [layer.name for layer in routing] == ["L0", "L1"]
    for layer in routing:
        assert layer.weights.shape == (3, 4, 12, 12) and layer.keys.shape == (3, 4, 12, 8)
        assert torch.equal(layer.mask, torch.ones(12, 12, dtype=torch.bool).tril())
        assert layer.weights.masked_select(j_after_i(12)).abs().max() == 0
        torch.testing.assert_close(layer.weights.sum(-1), torch.ones(3, 4, 12))
        assert layer.content_keys is None  # only RoPE separates keys as scored from content keys


def test_rope_rotates_only_the_rotary_fraction_and_keeps_key_norms():
    model = tiny("rope", "dot", rotary_pct=0.5)  # d_head 8 -> 4 rotary dims
    _, routing = model(tokens(), return_routing=True)
    layer = routing[0]
    assert layer.content_keys.shape == layer.keys.shape
    torch.testing.assert_close(layer.keys[..., 4:], layer.content_keys[..., 4:], atol=0, rtol=0)
    assert not torch.allclose(layer.keys[..., 1:, :4], layer.content_keys[..., 1:, :4])
    torch.testing.assert_close(layer.keys.norm(dim=-1), layer.content_keys.norm(dim=-1))
    torch.testing.assert_close(layer.keys[..., 0, :], layer.content_keys[..., 0, :])  # angle 0 at position 0


def test_normalized_score_gives_every_key_norm_sqrt_d_head():
    _, routing = tiny("rope", "normalized")(tokens(), return_routing=True)
    for layer in routing:
        torch.testing.assert_close(layer.keys.norm(dim=-1), torch.full(layer.keys.shape[:-1], math.sqrt(8)),
                                   atol=1e-4, rtol=0)


def test_nope_cannot_tell_positions_of_a_repeated_token_but_learned_can():
    x = torch.full((1, 8), 5)
    with torch.no_grad():
        nope, learned = tiny("nope")(x), tiny("learned")(x)
    torch.testing.assert_close(nope, nope[:, :1].expand_as(nope), atol=1e-5, rtol=0)
    assert (learned - learned[:, :1]).abs().max() > 0.1


def test_init_is_deterministic_and_scales_residual_projections():
    torch.manual_seed(3)
    a = Transformer(vocab_size=VOCAB, n_layer=8, d_model=128, n_head=4)
    torch.manual_seed(3)
    b = Transformer(vocab_size=VOCAB, n_layer=8, d_model=128, n_head=4)
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))
    # nanoGPT: std 0.02 everywhere, 0.02 / sqrt(2 n_layer) = 0.005 on the two residual projections
    assert abs(a.blocks[0].attn.qkv.weight.std().item() - 0.02) < 0.0005
    assert abs(a.blocks[0].mlp.proj.weight.std().item() - 0.005) < 0.0002
    assert abs(a.blocks[0].attn.proj.weight.std().item() - 0.005) < 0.0003
    assert a.blocks[0].attn.qkv.bias.abs().max() == 0


@pytest.mark.parametrize("kwargs,message", [
    (dict(position="sinusoid"), "unknown position 'sinusoid'; choose one of nope, rope, alibi, learned"),
    (dict(score="cosine"), "unknown score 'cosine'; choose one of dot, euclidean, learned_metric, normalized"),
    (dict(d_model=30, n_head=4), r"n_head \(4\) must divide d_model \(30\)"),
    (dict(position="rope", rotary_pct=0.1), "rotary_pct"),
])
def test_bad_arguments_raise_user_error(kwargs, message):
    with pytest.raises(UserError, match=message):
        Transformer(**{**TINY, **kwargs})


def test_sequence_longer_than_context_raises_user_error_naming_context_length():
    with pytest.raises(UserError, match="exceeds context_length 16"):
        tiny()(tokens(length=17))


def compose_router(*overrides):
    with initialize_config_dir(version_base=None, config_dir=CONF):
        return compose(config_name=None, overrides=list(overrides)).router


@pytest.mark.parametrize("position,score", list(itertools.product(POSITIONS, SCORES)))
def test_hydra_composes_each_position_and_score(position, score):
    cfg = compose_router("+router=pythia", f"router/position={position}", f"router/score={score}")
    assert (cfg.position, cfg.score, cfg.n_layer, cfg.d_model, cfg.n_head, cfg.context_length) == (
        position, score, 6, 128, 4, 128)
    model = instantiate(cfg, vocab_size=VOCAB)
    assert isinstance(model, Transformer) and model.context_length == 128
    assert model(tokens(batch=1, length=8)).shape == (1, 8, VOCAB)


@pytest.mark.parametrize("name,shape", [
    ("pythia_14m", (6, 128, 4)), ("pythia_70m", (6, 512, 8)), ("pythia_160m", (12, 768, 12))])
def test_named_pythia_shapes_extend_the_default(name, shape):
    cfg = compose_router(f"+router={name}", "router/position=alibi")
    assert (cfg.n_layer, cfg.d_model, cfg.n_head, cfg.context_length) == (*shape, 2048)
    assert (cfg.position, cfg.alibi_slope_scale, cfg.score) == ("alibi", 1.0, "dot")
    assert cfg._target_ == "routers.transformer.Transformer"


# every position scheme and score once: the shortcuts must hold for each way the keys and scores are formed
SHORTCUT_CASES = [("rope", "dot"), ("alibi", "euclidean"), ("nope", "learned_metric"), ("learned", "normalized")]


def _three_layers(position: str, score: str, seed: int) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(vocab_size=50, n_layer=3, d_model=32, n_head=2, context_length=16, position=position,
                       score=score).eval()


@pytest.mark.parametrize("position,score", SHORTCUT_CASES)
def test_routing_only_path_equals_the_full_forward_record(position, score):
    model = _three_layers(position, score, seed=0)
    tokens = torch.randint(0, 50, (2, 16))
    with torch.no_grad():
        _, full = model(tokens, return_routing=True)
        only = model.routing(tokens)
    assert only.axis == full.axis and len(only) == len(full)
    for a, b in zip(only, full):  # the same operations on the same inputs: bit-identical
        assert torch.equal(a.weights, b.weights) and torch.equal(a.keys, b.keys)
        assert torch.equal(a.scored_keys, b.scored_keys)


@pytest.mark.parametrize("position,score", SHORTCUT_CASES)
def test_keys_only_path_gives_the_records_scored_keys(position, score):
    model = _three_layers(position, score, seed=1)
    tokens = torch.randint(0, 50, (3, 16))
    with torch.no_grad():
        record, keys = model.routing(tokens), model.scored_keys(tokens)
    assert len(keys) == len(record) == 3
    assert torch.equal(keys[0], record[0].scored_keys)  # before any attention: the same ops
    for got, layer in zip(keys, record):  # later layers read SDPA's output: equal up to float rounding
        assert got.shape == layer.scored_keys.shape
        torch.testing.assert_close(got, layer.scored_keys, rtol=1e-5, atol=1e-6)


def test_readers_take_the_shortcuts_where_offered_and_the_full_forward_otherwise():
    from routers.routing import routing_of, scored_keys_of

    class Plain(torch.nn.Module):  # the same router without shortcuts
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, tokens, return_routing=False):
            return self.inner(tokens, return_routing)

    model = _three_layers("rope", "dot", seed=3)
    tokens = torch.randint(0, 50, (2, 16))
    with torch.no_grad():
        assert torch.equal(routing_of(Plain(model), tokens)[2].weights, model(tokens, return_routing=True)[1][2].weights)
        fallback, shortcut = scored_keys_of(Plain(model), tokens), scored_keys_of(model, tokens)
    assert [torch.equal(k, layer.scored_keys) for k, layer in zip(fallback, model.routing(tokens))] == [True] * 3
    assert all(torch.equal(a, b) for a, b in zip(shortcut, model.scored_keys(tokens)))


def test_monitor_shuffle_null_from_keys_only_matches_the_full_record():
    """The monitor's pass (collapse.measure) takes the shuffle null from the keys-only path: every other value is
    bit-identical to measuring with full records, the shuffle-null VE equal up to SDPA's float rounding."""
    from collapse import SignatureAccumulator
    from datamodules.probe import TokenProbe
    from collapse.measure import measure_signature
    from tasks.lm import LanguageModelTask

    torch.manual_seed(2)
    task = LanguageModelTask(Transformer(vocab_size=50, n_layer=3, d_model=32, n_head=2, context_length=16))
    probe = TokenProbe.from_tokens(torch.randint(0, 50, (6, 16)), seed=3)
    fast = measure_signature(task, probe, ranks=(1, 4), batch_size=4)
    reference = SignatureAccumulator((1, 4))
    with torch.no_grad():
        for inputs, shuffled in probe.batches(4):
            reference.update(task.model(inputs, return_routing=True)[1], task.model(shuffled, return_routing=True)[1])
    reference = reference.compute()
    for got, want in zip(fast.layers, reference.layers):
        for key, value in want.items():
            if "shuffle" in key or key.startswith(("content@", "marginal@")):
                assert got[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key
            else:
                assert got[key] == value, key
    assert fast.layers[0]["ve@4_shuffle"] == reference.layers[0]["ve@4_shuffle"]  # layer 0 sees no attention


# --- the sink controls: softmax1 and sigmoid normalisation --------------------------------------------------

@pytest.mark.parametrize("normalization", ["softmax", "softmax1", "sigmoid"])
@pytest.mark.parametrize("position", ["rope", "alibi"])
def test_normalizations_match_their_formulas_written_out_and_the_fast_path(normalization, position):
    import math as m

    from collapse import signature

    torch.manual_seed(0)
    model = Transformer(vocab_size=50, n_layer=2, d_model=32, n_head=2, context_length=16, position=position,
                        normalization=normalization).eval()
    tokens = torch.randint(0, 50, (3, 16))
    with torch.no_grad():
        logits, routing = model(tokens, return_routing=True)
        fast = model(tokens)
    assert torch.allclose(fast, logits, atol=1e-5)  # the training path routes as the record says
    attention = model.blocks[0].attn
    with torch.no_grad():
        q, k, _, _, bias = attention.project(model.blocks[0].ln_1(model.embed(tokens)))
    scores = (q.double() @ k.double().transpose(-1, -2)) / m.sqrt(attention.d_head)
    if bias is not None:
        scores = scores + bias.double()
    visible = torch.ones(16, 16, dtype=torch.bool).tril()
    e = scores.exp() * visible
    expected = {"softmax": e / e.sum(-1, keepdim=True), "softmax1": e / (1 + e.sum(-1, keepdim=True)),
                "sigmoid": torch.sigmoid(scores - m.log(16)) * visible}[normalization]
    weights = routing[0].weights.double()
    assert torch.allclose(weights, expected, atol=1e-6)
    rows = weights.sum(-1)
    if normalization == "softmax":
        assert torch.allclose(rows, torch.ones_like(rows), atol=1e-6)
    else:  # a query may route (almost) nowhere: rows do not sum to 1, and the record keeps them as they are
        assert bool((rows < 1).all()) if normalization == "softmax1" else not torch.allclose(rows, torch.ones_like(rows))
    row = signature(routing).layers[0]
    assert 0 < row["max_share"] <= 1 and row["baseline"] == pytest.approx(sum(1 / i for i in range(1, 17)) / 16)


def test_an_unknown_normalization_is_one_line():
    from common.errors import UserError

    with pytest.raises(UserError, match="unknown normalization 'tanh'; choose one of softmax, softmax1, sigmoid"):
        Transformer(vocab_size=50, n_layer=1, d_model=32, n_head=2, context_length=16, normalization="tanh")


@pytest.mark.parametrize("position", ["nope", "rope", "alibi"])
def test_smeared_keys_mix_each_key_with_its_predecessor_and_the_record_reproduces_the_output(position):
    import torch.nn.functional as F

    model = tiny(position, "dot", smear_keys=True)
    attention = model.blocks[0].attn
    with torch.no_grad():
        for gate in (block.attn.smear_gate for block in model.blocks):
            gate.copy_(torch.randn_like(gate))
        x = tokens(length=10)
        h = model.blocks[0].ln_1(model.embed(x))
        # Written out: raw keys from the qkv projection, then s k_j + (1 - s) k_{j-1}, k_{-1} = 0.
        B, T, _ = h.shape
        raw = attention.qkv(h).view(B, T, attention.n_head, 3 * attention.d_head).transpose(1, 2)[..., attention.d_head:2 * attention.d_head]
        s = torch.sigmoid(attention.smear_gate)
        previous = torch.cat([torch.zeros_like(raw[..., :1, :]), raw[..., :-1, :]], dim=-2)
        expected = s * raw + (1 - s) * previous
        scored = attention.project(h)[3]
        torch.testing.assert_close(scored, expected)
        # The record's weights and values reproduce the layer's real output (the routing operator is exact).
        out_fast = model(x)
        logits, routing = model(x, return_routing=True)
        torch.testing.assert_close(out_fast, logits, atol=1e-5, rtol=0)
        q, k, v, _, bias = attention.project(h)
        manual = attention._merge_heads(routing[0].weights @ v)
        torch.testing.assert_close(manual, attention(h)[0], atol=1e-5, rtol=0)
    assert all(getattr(p, "_no_weight_decay", False) for n, p in model.named_parameters() if n.endswith("smear_gate"))
    assert not hasattr(tiny(position, "dot").blocks[0].attn.smear_gate, "shape")  # off by default: no parameter
