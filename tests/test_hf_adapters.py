"""Hugging Face adapters: tiny random HF models saved to a temp dir, loaded back through ``model=hf:<dir>``;
the routing record must hold exactly the attention and keys the HF model computes."""
from __future__ import annotations

import math

import pytest
import torch

from analysis.readers.hf import load_hf, parse_spec
from common.errors import UserError

T = 16


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """``{family: folder}`` of tiny random checkpoints written with save_pretrained."""
    from transformers import (GPT2Config, GPT2LMHeadModel, GPTNeoXConfig, GPTNeoXForCausalLM, MambaConfig,
                              MambaForCausalLM, RwkvConfig, RwkvForCausalLM)

    root = tmp_path_factory.mktemp("hf")
    torch.manual_seed(0)
    models = {
        "gpt2": GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=2, n_head=4,
                                           bos_token_id=0, eos_token_id=0)),
        "gpt_neox": GPTNeoXForCausalLM(GPTNeoXConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2,
                                                     num_attention_heads=4, intermediate_size=64,
                                                     max_position_embeddings=32, rotary_pct=0.5,
                                                     bos_token_id=0, eos_token_id=0)),
        "mamba": MambaForCausalLM(MambaConfig(vocab_size=64, hidden_size=32, state_size=8, num_hidden_layers=2,
                                              expand=2, conv_kernel=4, time_step_rank=4, bos_token_id=0,
                                              eos_token_id=0, pad_token_id=0)),
        "rwkv": RwkvForCausalLM(RwkvConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, attention_hidden_size=32,
                                           intermediate_size=64, context_length=32, bos_token_id=0, eos_token_id=0)),
    }
    for family, model in models.items():
        model.save_pretrained(root / family)
    return {family: root / family for family in models}


def capture_outputs(modules):
    """Outputs of the given submodules during one forward (test-side hooks: the adapter itself uses none)."""
    seen, handles = [], []
    for m in modules:
        handles.append(m.register_forward_hook(lambda _m, _i, out: seen.append(out.detach())))
    return seen, handles


def causal_softmax(q, k):
    logits = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    mask = torch.ones(q.shape[-2], q.shape[-2], dtype=torch.bool).tril()
    return logits.masked_fill(~mask, float("-inf")).softmax(-1)


def test_spec_parses_name_and_revision():
    assert parse_spec("hf:EleutherAI/pythia-160m@step4000") == ("EleutherAI/pythia-160m", "step4000")
    assert parse_spec("hf:gpt2") == ("gpt2", None)
    with pytest.raises(UserError, match="hf:"):
        parse_spec("gpt2")


def test_gpt2_routing_holds_the_c_attn_keys_and_the_attention_they_produce(saved):
    router, _ = load_hf(f"hf:{saved['gpt2']}")
    tokens = torch.randint(0, 64, (2, T), generator=torch.Generator().manual_seed(1))
    seen, handles = capture_outputs([block.attn.c_attn for block in router.model.transformer.h])
    with torch.no_grad():
        logits, routing = router(tokens, return_routing=True)
        reference = router.model(tokens).logits
    for h in handles:
        h.remove()
    assert torch.allclose(logits, reference, atol=1e-6) and len(routing) == 2
    for layer, qkv in zip(routing, seen[:2]):  # the first forward's two c_attn outputs
        q, k, _ = (x.view(2, T, 4, 8).transpose(1, 2) for x in qkv.split(32, dim=-1))
        assert torch.allclose(layer.keys, k, atol=1e-6)
        assert torch.allclose(layer.weights, causal_softmax(q, k), atol=1e-5)


def test_pythia_routing_matches_hf_attention_with_keys_pre_and_post_rotary(saved):
    from transformers import AutoModelForCausalLM

    router, _ = load_hf(f"hf:{saved['gpt_neox']}")
    hf = AutoModelForCausalLM.from_pretrained(saved["gpt_neox"], attn_implementation="eager").eval()
    tokens = torch.randint(0, 64, (2, T), generator=torch.Generator().manual_seed(2))
    seen, handles = capture_outputs([layer.attention.query_key_value for layer in hf.gpt_neox.layers])
    with torch.no_grad():
        out = hf(tokens, output_attentions=True)
        logits, routing = router(tokens, return_routing=True)
    for h in handles:
        h.remove()
    assert torch.allclose(logits, out.logits, atol=1e-5)
    rotary = 4  # rotary_pct 0.5 of d_head 8 (transformers 5 reads rotary_pct, ignores partial_rotary_factor=)
    assert hf.config.rope_parameters["partial_rotary_factor"] == 0.5  # the half-rotary case, not the default quarter
    for layer, attention, qkv in zip(routing, out.attentions, seen):
        assert torch.allclose(layer.weights, attention, atol=1e-6)
        k = qkv.view(2, T, 4, 24)[..., 8:16].transpose(1, 2)  # fused per head as [q | k | v]
        assert torch.allclose(layer.content_keys, k, atol=1e-6)  # pre-RoPE keys: what VE measures
        post = layer.keys
        assert torch.allclose(post.norm(dim=-1), k.norm(dim=-1), atol=1e-5)  # a rotation keeps norms
        assert torch.allclose(post[..., rotary:], k[..., rotary:], atol=1e-6) and torch.allclose(post[:, :, 0], k[:, :, 0], atol=1e-6)
        assert not torch.allclose(post[:, :, 1:, :rotary], k[:, :, 1:, :rotary])


def test_mamba_routing_runs_through_the_reconstructed_operator_on_the_hf_weights(saved):
    from transformers import AutoModelForCausalLM

    router, _ = load_hf(f"hf:{saved['mamba']}")
    hf = AutoModelForCausalLM.from_pretrained(saved["mamba"]).eval()
    tokens = torch.randint(0, 64, (2, T), generator=torch.Generator().manual_seed(3))
    seen, handles = capture_outputs([layer.mixer.x_proj for layer in hf.backbone.layers])
    with torch.no_grad():
        reference = hf(tokens).logits
        logits, routing = router(tokens, return_routing=True)
    for h in handles:
        h.remove()
    assert routing.axis == "time" and len(routing) == 2
    assert torch.allclose(logits, reference, atol=1e-4)
    for layer, x_proj in zip(routing, seen):
        B = x_proj.split([4, 8, 8], dim=-1)[1]  # (dt, B, C): the input matrix B is the key the metrics read
        assert torch.allclose(layer.keys[:, 0], B, atol=1e-5)
        weights = torch.cat(list(layer.iter_weights()), dim=1)
        assert weights.shape == (2, 64, T, T) and torch.all(weights.triu(1) == 0)  # 64 channels, causal


def test_rwkv_routing_holds_the_token_shifted_keys_and_a_causal_softmax_over_the_past(saved):
    from transformers import AutoModelForCausalLM

    router, _ = load_hf(f"hf:{saved['rwkv']}")
    hf = AutoModelForCausalLM.from_pretrained(saved["rwkv"]).eval()
    tokens = torch.randint(0, 64, (2, T), generator=torch.Generator().manual_seed(4))
    seen, handles = capture_outputs([block.attention.key for block in hf.rwkv.blocks])
    with torch.no_grad():
        reference = hf(tokens).logits
        logits, routing = router(tokens, return_routing=True)
    for h in handles:
        h.remove()
    assert routing.axis == "time" and len(routing) == 2
    assert torch.allclose(logits, reference, atol=1e-4)
    for layer, k in zip(routing, seen):
        assert torch.allclose(layer.keys[:, 0], k, atol=1e-5)  # key projection after HF's own token shift
        weights = torch.cat(list(layer.iter_weights()), dim=1)  # [2, 32 channels, T, T]
        assert torch.allclose(weights.sum(-1), torch.ones(2, 32, T), atol=1e-5) and torch.all(weights.triu(1) == 0)


def test_a_missing_checkpoint_offline_fails_with_one_line(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError, match="cannot load nobody/no-such-model@step1") as info:
        load_hf("hf:nobody/no-such-model@step1")
    assert "\n" not in str(info.value)


# --- Llama-family decoders: grouped-query attention, rotary on the whole head ------------------------------

DECODERS = {  # family: (config class, extra config) -- each exercises its own way to its keys
    "llama": ("LlamaConfig", {}),
    "mistral": ("MistralConfig", {}),
    "qwen2": ("Qwen2Config", {}),                     # k_proj with a bias
    "qwen3": ("Qwen3Config", {}),                     # k_norm per head, before rotary
    "gemma": ("GemmaConfig", {}),                     # scaled embeddings, (1 + w) RMSNorm
    "olmo": ("OlmoConfig", {"clip_qkv": 0.05}),       # the key projection clipped
    "olmo2": ("Olmo2Config", {}),                     # k_norm across all key heads
}
HEADS, KV_HEADS, D_HEAD = 4, 2, 8


@pytest.fixture(scope="module")
def decoders(tmp_path_factory):
    import transformers

    root = tmp_path_factory.mktemp("decoders")
    for family, (config_class, extra) in DECODERS.items():
        torch.manual_seed(0)
        config = getattr(transformers, config_class)(
            vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=HEADS,
            num_key_value_heads=KV_HEADS, head_dim=D_HEAD, max_position_embeddings=64, bos_token_id=0,
            eos_token_id=0, pad_token_id=0, **extra)
        transformers.AutoModelForCausalLM.from_config(config).save_pretrained(root / family)
    return root


def rotary(x, theta=10000.0):
    """Rotary embedding on the whole head, rotate-half convention, positions 0..T-1 (written out here)."""
    d, T = x.shape[-1], x.shape[-2]
    inv_freq = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float32) / d)
    angles = torch.arange(T, dtype=torch.float32)[:, None] * inv_freq[None]
    cos, sin = torch.cat([angles, angles], -1).cos(), torch.cat([angles, angles], -1).sin()
    half = torch.cat([-x[..., d // 2:], x[..., :d // 2]], -1)
    return x * cos + half * sin


def heads(x, n):
    return x.view(2, T, n, D_HEAD).transpose(1, 2)


@pytest.mark.parametrize("family", DECODERS)
def test_llama_family_routing_holds_pre_rope_grouped_keys_and_the_attention_they_produce(decoders, family):
    from transformers import AutoModelForCausalLM

    router, _ = load_hf(f"hf:{decoders / family}")
    hf = AutoModelForCausalLM.from_pretrained(decoders / family).eval()  # default attention: logits only
    attentions = [layer.self_attn for layer in router.model.model.layers]
    # The keys and queries HF's own forward scores: after k_norm / q_norm where the family has them.
    key_modules = [getattr(a, "k_norm", None) or a.k_proj for a in attentions]
    query_modules = [getattr(a, "q_norm", None) or a.q_proj for a in attentions]
    keys, key_hooks = capture_outputs(key_modules)
    queries, query_hooks = capture_outputs(query_modules)
    tokens = torch.randint(0, 64, (2, T), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        logits, routing = router(tokens, return_routing=True)
        reference = hf(tokens).logits
    for h in key_hooks + query_hooks:
        h.remove()
    assert routing.axis == "token" and len(routing) == 2
    assert torch.allclose(logits, reference, atol=1e-5)
    clip = DECODERS[family][1].get("clip_qkv")
    for layer, k, q in zip(routing, keys, queries):
        k, q = (x.clamp(-clip, clip) if clip else x for x in (k, q))  # OLMo clamps after the projection
        k, q = heads(k.reshape(2, T, -1), KV_HEADS), heads(q.reshape(2, T, -1), HEADS)
        assert layer.content_keys.shape == (2, KV_HEADS, T, D_HEAD) and layer.weights.shape == (2, HEADS, T, T)
        assert torch.allclose(layer.content_keys, k, atol=1e-5)  # pre-RoPE: what VE measures
        assert torch.allclose(layer.keys, rotary(k), atol=1e-5)  # as scored
        shared = rotary(k).repeat_interleave(HEADS // KV_HEADS, dim=1)  # each key head serves 2 query heads
        assert torch.allclose(layer.weights, causal_softmax(rotary(q), shared), atol=1e-5)


def test_a_grouped_query_model_gets_a_full_signature_through_analyze(decoders, tmp_path):
    import csv

    import analyze
    from datamodules.probe import TokenProbe

    TokenProbe.from_tokens(torch.randint(0, 64, (6, 32))).save(tmp_path / "probe.pt")
    assert analyze.main([f"model=hf:{decoders / 'qwen3'}", f"probe={tmp_path / 'probe.pt'}", f"out={tmp_path / 'out'}",
                         "batch_size=3"]) == 0
    heads_rows = list(csv.DictReader(open(tmp_path / "out" / "final" / "heads.csv")))
    assert len(heads_rows) == 2 * HEADS  # max share per query head, norm-CV of the key head each one reads
    assert [r["norm_cv"] for r in heads_rows[:HEADS]] == [heads_rows[0]["norm_cv"]] * 2 + [heads_rows[2]["norm_cv"]] * 2
    layers = list(csv.DictReader(open(tmp_path / "out" / "final" / "signature.csv")))
    assert all(float(r["ve@4_post"]) != float(r["ve@4"]) for r in layers)  # d_head 8: VE@8 would be 1 either way


def test_a_checkpoint_folder_without_tokenizer_files_is_an_error_naming_it(saved, decoders, capsys):
    import analyze

    # transformers 5 builds a 2-token tokenizer from a GPT-NeoX config alone, and raises for Llama's
    for folder, says in ((saved["gpt_neox"], "is empty or degenerate"), (decoders / "llama", "has no tokenizer files")):
        assert analyze.main([f"model=hf:{folder}", "probe=wikitext103"]) == 2
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert err.startswith("error: ") and str(folder) in err and says in err and "tokenizer=<" in err


def test_tokenizer_key_tokenises_a_corpus_probe_for_a_folder_saved_without_one(tmp_path, capsys):
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM, PreTrainedTokenizerFast

    import analyze
    from datamodules.tokenizer import train_bpe

    texts = tmp_path / "texts"
    texts.mkdir()
    for i in range(4):  # the text_files corpus holds out every other work as validation
        (texts / f"work{i}.txt").write_text(" ".join(f"the quick brown fox {i} jumps over the lazy dog" for _ in range(60)))
    PreTrainedTokenizerFast(tokenizer_object=train_bpe([(texts / "work0.txt").read_text()], 300)).save_pretrained(
        tmp_path / "tokenizer")
    GPTNeoXForCausalLM(GPTNeoXConfig(vocab_size=320, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=64, max_position_embeddings=32)).save_pretrained(tmp_path / "model")
    assert analyze.main([f"model=hf:{tmp_path / 'model'}", f"probe={texts}", f"tokenizer={tmp_path / 'tokenizer'}",
                         "probe_sequences=2", "probe_length=16", f"out={tmp_path / 'out'}"]) == 0
    assert "text files in" in (tmp_path / "out" / "final" / "summary.md").read_text()
    (tmp_path / "empty").mkdir()
    assert analyze.main([f"model=hf:{tmp_path / 'model'}", f"probe={tmp_path / 'empty'}",
                         f"tokenizer={tmp_path / 'tokenizer'}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert f"probe={tmp_path / 'empty'} has no .txt files" in err and "data." not in err  # analyze.py's keys only


def test_the_model_is_loaded_before_the_probe_so_its_error_comes_first(capsys, monkeypatch):
    import analyze

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert analyze.main(["model=hf:nobody/no-such-model", "probe=wikitext103"]) == 2
    err = capsys.readouterr().err
    assert "cannot load nobody/no-such-model" in err and "model=hf:<local folder>" in err



# --- sliding-window layers: the record's mask is the layer's own ---------------------------------------------

@pytest.mark.parametrize("family, extra, windowed", [
    ("MistralConfig", {"sliding_window": 5}, [True, True]),
    ("Qwen2Config", {"sliding_window": 5, "use_sliding_window": True, "max_window_layers": 1}, [False, True]),
])
def test_sliding_window_layers_are_recorded_with_their_own_mask_baseline_and_weights(tmp_path, family, extra,
                                                                                      windowed):
    import transformers

    from collapse import signature

    torch.manual_seed(0)
    config = getattr(transformers, family)(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS, head_dim=D_HEAD, max_position_embeddings=64, bos_token_id=0,
        eos_token_id=0, pad_token_id=0, **extra)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "model")
    router, _ = load_hf(f"hf:{tmp_path / 'model'}")
    tokens = torch.randint(0, 64, (2, T), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        _, routing = router(tokens, return_routing=True)
    window = extra["sliding_window"]
    q, s = torch.arange(T)[:, None], torch.arange(T)[None]
    sliding = (s <= q) & (q - s < window)  # written out here: each query sees itself and window - 1 before it
    sig = signature(routing)
    for layer, row, is_windowed in zip(routing, sig.layers, windowed):
        expected = sliding if is_windowed else s <= q
        assert torch.equal(layer.mask, expected)
        assert float(layer.weights.masked_select(~expected).abs().max()) == 0.0  # HF's weights agree with it
        assert torch.allclose(layer.weights.sum(-1), torch.ones(2, HEADS, T), atol=1e-5)
        received = (expected.double() / expected.sum(-1, keepdim=True)).sum(0)  # uniform routing's column sums
        assert row["baseline"] == pytest.approx(float(received.max() / received.sum()), rel=1e-12)  # its own mask
    assert sig.layers[0]["baseline"] != sig.layers[1]["baseline"] or windowed[0] == windowed[1]


@pytest.mark.parametrize("family", ["Gemma2Config", "Gemma3TextConfig"])
def test_gemma_local_and_global_layers_match_softcapped_windowed_softmax_written_out(tmp_path, family):
    """Gemma-2: scores scaled by query_pre_attn_scalar^-1/2 and soft-capped (cap * tanh(x / cap)); Gemma-3:
    q/k norms per head, no cap, rotary base 10^4 on local layers and 10^6 on global ones; both alternate a
    sliding-window layer and a full one."""
    import transformers

    torch.manual_seed(0)
    config = getattr(transformers, family)(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS, head_dim=D_HEAD, max_position_embeddings=64, sliding_window=5,
        query_pre_attn_scalar=D_HEAD, layer_types=["sliding_attention", "full_attention"])
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "model")
    router, _ = load_hf(f"hf:{tmp_path / 'model'}")
    attentions = [layer.self_attn for layer in router.model.model.layers]
    keys, key_hooks = capture_outputs([getattr(a, "k_norm", None) or a.k_proj for a in attentions])
    queries, query_hooks = capture_outputs([getattr(a, "q_norm", None) or a.q_proj for a in attentions])
    tokens = torch.randint(0, 64, (2, T), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        _, routing = router(tokens, return_routing=True)
    for h in key_hooks + query_hooks:
        h.remove()
    cap = config.attn_logit_softcapping if family == "Gemma2Config" else None
    thetas = [10000.0, 10000.0] if family == "Gemma2Config" else [10000.0, 1_000_000.0]
    q_idx, s_idx = torch.arange(T)[:, None], torch.arange(T)[None]
    for layer, k, q, theta, window in zip(routing, keys, queries, thetas, (5, None)):
        # Gemma-3 normalises q and k after moving heads forward ([B, heads, T, d]); Gemma-2's projections are flat
        k, q = (x if x.dim() == 4 and x.shape[2] == T else heads(x.reshape(2, T, -1), n) for x, n in ((k, KV_HEADS), (q, HEADS)))
        assert torch.allclose(layer.content_keys, k, atol=1e-5)
        assert torch.allclose(layer.keys, rotary(k, theta), atol=1e-5)
        scores = rotary(q, theta) @ rotary(k, theta).repeat_interleave(HEADS // KV_HEADS, 1).transpose(-1, -2)
        scores = scores / math.sqrt(D_HEAD)  # query_pre_attn_scalar = d_head here
        if cap:
            scores = cap * torch.tanh(scores / cap)
        mask = (s_idx <= q_idx) & ((q_idx - s_idx < window) if window else True)
        assert torch.equal(layer.mask, mask)
        assert torch.allclose(layer.weights, scores.masked_fill(~mask, float("-inf")).softmax(-1), atol=1e-5)
