"""Attention residuals (AttnRes): a Qwen3-style decoder whose residual stream routes over depth.

The additive residual h_l = h_{l-1} + f(h_{l-1}) gives every sublayer the same input: the running sum. Block
attention residuals (Kimi Team 2026, arXiv:2603.15031; paper Section 5.4 and Appendix B) let each sublayer
*choose* its input instead, by softmax over earlier depth representations, per token:

    sources V = [e, s_1, ..., s_n, h]     e: token embeddings (source 0), s_j: the residual stream at the end
                                          of block j (blocks of ``layers_per_block`` layers), h: the running
                                          stream, i.e. the current, partial block (always the last source)
    keys    K = RMSNorm(V)                one learned RMSNorm per sublayer (its gain makes ||K|| vary)
    logits    = K q  (+ b + offset on h)  q: one pseudo-query per sublayer, zero-initialised, so routing starts
                                          exactly uniform; b: learned recency bias, zero-initialised
    input     = sum_s softmax(logits)_s V_s

Every sublayer output is added to the running stream h whatever the routing, so a recency bias of +inf gives
back the plain additive residual exactly (the paper's "additive-residual limit") and ``residual="additive"``
is the matched control: the same decoder, the same weights, no depth routing.

Source counting (docs/decisions.md: AttnRes sources): the embeddings count as source 0 and the running stream is always
a source, so a sublayer in block k (0-based) routes over S = k + 2 sources; at a block's first sublayer the
stream equals the snapshot just taken (the open implementation's convention). For the 0.6B layout (28 layers,
4 layers per block: the open checkpoint's ``attnres_num_blocks=8`` is ceil(28/8) = 4 layers per block) the mean
uniform share over the 56 sublayers is (H_8 - 1)/7 = 0.2454, the paper's 0.245.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from common.errors import UserError
from routers.family import Family, register
from routers.routing import Routing, RoutingLayer, causal_mask, check_tokens

RESIDUALS = ("attnres", "additive")
ROUTING_AXES = ("depth", "token")


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        # fp32 statistics and the gain applied last, as Qwen3 does, so HF weights reproduce its logits.
        x32 = x.float()
        return self.weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)


def rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class Attention(nn.Module):
    """Qwen3 attention: grouped-query heads, per-head RMSNorm on q and k (QK-norm), full-width RoPE."""

    def __init__(self, d_model: int, n_head: int, n_kv_head: int, head_dim: int, eps: float):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = n_head, n_kv_head, head_dim
        self.q_proj = nn.Linear(d_model, n_head * head_dim, bias=False)
        self.k_proj = nn.Linear(d_model, n_kv_head * head_dim, bias=False)
        self.v_proj = nn.Linear(d_model, n_kv_head * head_dim, bias=False)
        self.o_proj = nn.Linear(n_head * head_dim, d_model, bias=False)
        self.q_norm = RMSNorm(head_dim, eps)
        self.k_norm = RMSNorm(head_dim, eps)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, return_routing: bool = False):
        B, T, _ = x.shape
        q = self.q_norm(self.q_proj(x).view(B, T, self.n_head, self.head_dim)).transpose(1, 2)
        k = self.k_norm(self.k_proj(x).view(B, T, self.n_kv_head, self.head_dim)).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        content_keys = k
        q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        if not return_routing:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=self.n_kv_head != self.n_head)
            return self.o_proj(y.transpose(1, 2).reshape(B, T, -1)), None
        # Reference path for the routing record: explicit softmax, kv heads repeated so units = query heads.
        group = self.n_head // self.n_kv_head
        k, v, content_keys = (t.repeat_interleave(group, dim=1) for t in (k, v, content_keys))
        mask = causal_mask(T, x.device)
        scores = (q @ k.transpose(-2, -1)) * self.head_dim ** -0.5
        weights = scores.masked_fill(~mask, float("-inf")).softmax(dim=-1)
        y = weights @ v
        layer = RoutingLayer(weights=weights, keys=k, content_keys=content_keys, mask=mask)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1)), layer


class MLP(nn.Module):
    """SwiGLU: down(silu(gate x) * up x)."""

    def __init__(self, d_model: int, d_ff: int):
        super().__init__()
        self.gate_proj = nn.Linear(d_model, d_ff, bias=False)
        self.up_proj = nn.Linear(d_model, d_ff, bias=False)
        self.down_proj = nn.Linear(d_ff, d_model, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DepthRouter(nn.Module):
    """One sublayer's attention residual: a pseudo-query scoring RMS-normalised sources, plus a recency bias."""

    def __init__(self, d_model: int, eps: float, learn_recency_bias: bool = True):
        super().__init__()
        self.query = nn.Parameter(torch.zeros(d_model))  # zero: uniform routing at init (paper Section 5.4)
        self.key_norm = RMSNorm(d_model, eps)
        # Frozen, the bias stays 0 and ``recency_offset`` is a fixed brake (the paper's checkpoint has b = 0).
        self.recency_bias = nn.Parameter(torch.zeros(()), requires_grad=learn_recency_bias)

    def forward(self, sources: list[Tensor], recency_offset: float = 0.0) -> tuple[Tensor, Tensor]:
        """S sources [B, T, d] in depth order, the running stream last -> (sublayer input, weights [B, T, S])."""
        # q . RMSNorm(v) = (v . (g * q)) / rms(v): the logits without materialising the keys (built only for the
        # routing record, by ``key_norm``) nor a stacked copy of the sources: ~3x cheaper on CPU.
        gq = self.key_norm.weight * self.query
        logits = torch.stack([(v.float() @ gq) * torch.rsqrt(v.float().pow(2).mean(dim=-1) + self.key_norm.eps)
                              for v in sources], dim=-1)
        logits = torch.cat((logits[..., :-1], logits[..., -1:] + self.recency_bias + recency_offset), dim=-1)
        weights = logits.softmax(dim=-1).to(sources[0].dtype)
        return sum(weights[..., s, None] * v for s, v in enumerate(sources)), weights


class DecoderLayer(nn.Module):
    def __init__(self, d_model, n_head, n_kv_head, head_dim, d_ff, eps, attnres: bool, learn_recency_bias: bool):
        super().__init__()
        self.input_layernorm = RMSNorm(d_model, eps)
        self.self_attn = Attention(d_model, n_head, n_kv_head, head_dim, eps)
        self.post_attention_layernorm = RMSNorm(d_model, eps)
        self.mlp = MLP(d_model, d_ff)
        self.attn_router = DepthRouter(d_model, eps, learn_recency_bias) if attnres else None
        self.mlp_router = DepthRouter(d_model, eps, learn_recency_bias) if attnres else None


class Qwen3Decoder(nn.Module):
    """Qwen3-style decoder LM (RMSNorm, SwiGLU, RoPE, GQA, QK-norm) with an AttnRes or additive residual.

    ``routing_axis`` chooses the record ``forward(..., return_routing=True)`` returns: "depth" (AttnRes only:
    one layer per sublayer, weights [B, 1, T, S], keys [B, T, S, d]) or "token" (one layer per attention
    layer, weights [B, H, T, T]). ``recency_offset`` is added to every recency bias at forward time: set it
    on a trained model to re-extract the routing under the paper's offset intervention, or train with it and
    ``learn_recency_bias=False`` to hold a fixed recency brake.
    """

    def __init__(self, vocab_size: int, n_layer: int = 4, d_model: int = 128, n_head: int = 4,
                 n_kv_head: int | None = None, head_dim: int | None = None, d_ff: int | None = None,
                 context_length: int = 128, rope_theta: float = 1e6, rms_norm_eps: float = 1e-6,
                 tie_embeddings: bool = True, residual: str = "attnres", layers_per_block: int = 2,
                 recency_offset: float = 0.0, learn_recency_bias: bool = True, routing_axis: str = "depth",
                 init_std: float = 0.02):
        super().__init__()
        n_kv_head = n_kv_head or n_head
        if residual not in RESIDUALS:
            raise UserError(f"unknown residual {residual!r}; choose one of {', '.join(RESIDUALS)}")
        if routing_axis not in ROUTING_AXES:
            raise UserError(f"unknown routing_axis {routing_axis!r}; choose one of {', '.join(ROUTING_AXES)}")
        if residual == "additive" and routing_axis == "depth":
            raise UserError("the additive residual does not route over depth; set routing_axis=token "
                            "or residual=attnres")
        if head_dim is None and d_model % n_head:
            raise UserError(f"n_head={n_head} must divide d_model={d_model}, or set head_dim")
        if n_head % n_kv_head:
            raise UserError(f"n_kv_head={n_kv_head} must divide n_head={n_head}")
        if residual == "attnres" and not 1 <= layers_per_block <= n_layer:  # blocks exist only for AttnRes
            raise UserError(f"layers_per_block={layers_per_block} must be in 1..n_layer={n_layer}")
        head_dim = head_dim or d_model // n_head
        if head_dim % 2:
            raise UserError(f"head_dim={head_dim} must be even for RoPE")
        self.context_length, self.layers_per_block = context_length, layers_per_block
        self.residual, self.routing_axis, self.recency_offset = residual, routing_axis, float(recency_offset)

        self.embed_tokens = nn.Embedding(vocab_size, d_model)
        self.layers = nn.ModuleList(
            DecoderLayer(d_model, n_head, n_kv_head, head_dim, d_ff or 3 * d_model, rms_norm_eps,
                         residual == "attnres", learn_recency_bias) for _ in range(n_layer))
        self.norm = RMSNorm(d_model, rms_norm_eps)
        self.lm_head = nn.Linear(d_model, vocab_size, bias=False)
        if tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

        # RoPE tables in fp32 exactly as Qwen3 builds them (positions x inverse frequencies, duplicated halves).
        inv_freq = 1.0 / rope_theta ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim)
        freqs = torch.arange(context_length, dtype=torch.float)[:, None] * inv_freq
        angles = torch.cat((freqs, freqs), dim=-1)
        self.register_buffer("rope_cos", angles.cos(), persistent=False)
        self.register_buffer("rope_sin", angles.sin(), persistent=False)

        # GPT-2/nanoGPT init; projections into the residual stream scaled by 1/sqrt(2 n_layer). The depth
        # routers keep their zero query and zero bias (DepthRouter), so routing starts uniform.
        for name, p in self.named_parameters():
            if p.dim() == 2:
                scale = 1 / math.sqrt(2 * n_layer) if name.endswith(("o_proj.weight", "down_proj.weight")) else 1
                nn.init.normal_(p, std=init_std * scale)

    def set_interventions(self, recency_offset: float = 0.0) -> "Qwen3Decoder":
        """The paper's offset intervention: add ``recency_offset`` to every recency bias from the next forward on
        (the same knob as Mamba's and RWKV's ``set_interventions``, so one analysis re-reads all three)."""
        if isinstance(recency_offset, bool) or not isinstance(recency_offset, (int, float)) \
                or not math.isfinite(recency_offset):
            raise UserError(f"recency_offset must be a finite number; got {recency_offset!r}")
        self.recency_offset = float(recency_offset)
        return self

    def _read(self, router: DepthRouter | None, blocks: list[Tensor], stream: Tensor, record: list | None,
              name: str) -> Tensor:
        """The sublayer's input: the running stream (additive) or AttnRes over [embeddings, blocks, stream]."""
        if router is None:
            return stream
        h, weights = router(blocks + [stream], self.recency_offset)
        if record is not None:
            keys = router.key_norm(torch.stack(blocks + [stream], dim=2))
            record.append(RoutingLayer(weights=weights.unsqueeze(1), keys=keys, name=name,
                                       recency_bias=router.recency_bias.detach() + self.recency_offset))
        return h

    def forward(self, tokens: Tensor, return_routing: bool = False):
        normed, depth, token = self._trunk(tokens, return_routing)
        logits = self.lm_head(normed)
        if not return_routing:
            return logits
        if depth is not None:
            return logits, FAMILY.routing(depth, axis=self.routing_axis)
        return logits, Routing(layers=token, axis=self.routing_axis)  # the additive control: no depth statistics

    def features(self, tokens: Tensor) -> Tensor:
        """What the vocabulary head reads, [B, T, d] after the final norm: ``output_head(features(x))`` is
        ``forward(x)`` exactly (the LM task's fused loss, tasks/fused_loss.py)."""
        return self._trunk(tokens, False)[0]

    @property
    def output_head(self) -> nn.Linear:
        return self.lm_head

    def _trunk(self, tokens: Tensor, return_routing: bool):
        """Everything before the head: (the final-norm output, depth records, token records)."""
        check_tokens(tokens, self.context_length)
        T = tokens.shape[1]
        cos, sin = self.rope_cos[:T], self.rope_sin[:T]
        depth = [] if return_routing and self.routing_axis == "depth" else None
        token = [] if return_routing and self.routing_axis == "token" else None

        stream = self.embed_tokens(tokens)
        blocks = [stream]  # source 0: the token embeddings; then the stream at the end of each block
        for i, layer in enumerate(self.layers):
            h = self._read(layer.attn_router, blocks, stream, depth, f"L{i}.attn")
            out, attention = layer.self_attn(layer.input_layernorm(h), cos, sin, return_routing=token is not None)
            stream = stream + out
            if token is not None:
                attention.name = f"L{i}"
                token.append(attention)
            h = self._read(layer.mlp_router, blocks, stream, depth, f"L{i}.mlp")
            stream = stream + layer.mlp(layer.post_attention_layernorm(h))
            if (i + 1) % self.layers_per_block == 0:
                blocks.append(stream)
        return self.norm(stream), depth, token

    @classmethod
    def from_hf(cls, hf, **overrides) -> "Qwen3Decoder":
        """Build from a ``transformers`` Qwen3ForCausalLM (or a local directory holding one), copying its
        weights. ``overrides`` set our own options, e.g. ``residual="attnres"`` (new depth routers start
        uniform) or ``context_length``."""
        if isinstance(hf, (str, Path)):
            from transformers import Qwen3ForCausalLM

            hf = Qwen3ForCausalLM.from_pretrained(hf)
        c = hf.config
        if c.model_type != "qwen3":
            raise UserError(f"from_hf needs a Qwen3 checkpoint, got model_type={c.model_type!r}")
        if c.attention_bias or c.sliding_window is not None or c.rope_parameters.get("rope_type") != "default":
            raise UserError("from_hf supports Qwen3 without attention bias, sliding window or RoPE scaling")
        kwargs = dict(vocab_size=c.vocab_size, n_layer=c.num_hidden_layers, d_model=c.hidden_size,
                      n_head=c.num_attention_heads, n_kv_head=c.num_key_value_heads, head_dim=c.head_dim,
                      d_ff=c.intermediate_size, context_length=c.max_position_embeddings,
                      rope_theta=c.rope_parameters["rope_theta"], rms_norm_eps=c.rms_norm_eps,
                      tie_embeddings=c.tie_word_embeddings, residual="additive", routing_axis="token")
        kwargs.update(overrides)
        model = cls(**kwargs)
        state = {k.removeprefix("model."): v for k, v in hf.state_dict().items()}
        missing, unexpected = model.load_state_dict(state, strict=False)
        missing = [k for k in missing if "_router." not in k]
        if missing or unexpected:
            raise UserError(f"Qwen3 weights do not fit: missing {missing[:3]}, unexpected {unexpected[:3]}")
        return model


def _example() -> tuple[Qwen3Decoder, Tensor]:
    return (Qwen3Decoder(37, n_layer=2, d_model=16, n_head=2, d_ff=32, context_length=8).eval(),
            torch.randint(37, (2, 8)))


# Depth routing; its Qwen3 checkpoints load through from_hf with overrides (docs/attnres.md), while
# analysis reads plain Qwen3 checkpoints as token attention (analysis/readers/hf.py), so it adapts no model type.
FAMILY = register(Family("attnres", axis="depth", statistics="depth_hubs", bench=("router=attnres",),
                         example=_example))
