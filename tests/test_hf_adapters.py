"""Hugging Face adapters: tiny random HF models saved to a temp dir, loaded back through ``model=hf:<dir>``;
the routing record must hold exactly the attention and keys the HF model computes."""
from __future__ import annotations

import math

import pytest
import torch

from analysis.hf import load_hf, parse_spec
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
                                                     max_position_embeddings=32, partial_rotary_factor=0.5,
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
    rotary = 4  # partial_rotary_factor 0.5 of d_head 8
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
