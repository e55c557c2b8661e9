"""Pythia-style decoder: a GPT-NeoX block with a switchable position scheme and score. The token router.

Read top to bottom: rotary and ALiBi helpers, attention (where the score lives), MLP, block, model, and
loading a `transformers` GPTNeoXForCausalLM. The block is GPT-NeoX's: parallel residual
x + attn(ln_1(x)) + mlp(ln_2(x)), fused qkv laid out per head as [q | k | v], partial rotary on the first
rotary_pct of each head (rotate_half convention), exact GELU, untied input/output embeddings.

Scores, with tau = 1/sqrt(d_head) (paper Sec. 2: Theorem 1 and Prop. 2). Terms that depend only on the
query cancel in the softmax, so each score is a dot product that SDPA runs plus a per-key additive bias:
    dot             tau q.k
    euclidean       -tau/2 |q-k|^2           = tau q.k - tau/2 |k|^2              (+ query-only term)
    learned_metric  -tau/2 (q-k)^T M (q-k)   = tau (Mq).k - tau/2 k^T M k,  M = L^T L per head, L = I at init
    normalized      tau q^.k^,  q^ = g * q/rms(q),  k^ = k/rms(k)   (|k^| = sqrt(d_head) for every key)
With M = I the learned metric is exactly the euclidean score.

Normalisations of the scores l_j over the visible sources (the sink controls):
    softmax         exp(l_j) / sum_k exp(l_k)                  rows sum to 1 (every query must route somewhere)
    softmax1        exp(l_j) / (1 + sum_k exp(l_k))            an extra zero logit: a query may route nowhere (Miller 2023)
    sigmoid         sigmoid(l_j - log T)                       each source on its own (Ramapuram et al. 2024)
"""
from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from common.errors import UserError
from routers.family import Family, register
from routers.routing import Routing, RoutingLayer, causal_mask, check_tokens

POSITIONS = ("nope", "rope", "alibi", "learned")
SCORES = ("dot", "euclidean", "learned_metric", "normalized")
NORMALIZATIONS = ("softmax", "softmax1", "sigmoid")


def normalize(logits: Tensor, normalization: str) -> Tensor:
    """Routing weights from masked scores (-inf where a query may not look), ``[..., Q, S]``; float32 math for
    half inputs. softmax1's zero logit enters the max, so exp never overflows and a row of -inf gives zeros."""
    x = logits if logits.dtype == torch.float32 else logits.float()
    if normalization == "softmax":
        weights = x.softmax(-1)
    elif normalization == "softmax1":
        top = x.amax(-1, keepdim=True).clamp(min=0.0)
        e = (x - top).exp()
        weights = e / ((-top).exp() + e.sum(-1, keepdim=True))
    else:  # sigmoid, with Ramapuram et al.'s bias -log(sequence length) so T sources start near a total of 1
        weights = torch.sigmoid(x - math.log(x.shape[-1]))
    return weights if weights.dtype == logits.dtype else weights.to(logits.dtype)


def _check_choice(kind: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise UserError(f"unknown {kind} {value!r}; choose one of {', '.join(choices)}")


def rotate_half(x: Tensor) -> Tensor:
    """GPT-NeoX's rotation: pairs dimension i with i + d/2 (not interleaved pairs as in the RoFormer paper)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class Rotary(nn.Module):
    """Partial RoPE: rotate the first `rotary_ndims` dimensions of each head, pass the rest through."""

    def __init__(self, rotary_ndims: int, context_length: int, base: float):
        super().__init__()
        self.rotary_ndims = rotary_ndims
        inv_freq = 1.0 / (base ** (torch.arange(0, rotary_ndims, 2, dtype=torch.float) / rotary_ndims))
        angles = torch.outer(torch.arange(context_length, dtype=torch.float), inv_freq)
        angles = torch.cat((angles, angles), dim=-1)
        # computed once for the whole context (HF recomputes them every forward); fp32 like HF
        self.register_buffer("cos", angles.cos(), persistent=False)
        self.register_buffer("sin", angles.sin(), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        n = x.shape[-2]
        cos, sin = self.cos[:n].to(x.dtype), self.sin[:n].to(x.dtype)
        x_rot, x_pass = x[..., :self.rotary_ndims], x[..., self.rotary_ndims:]
        return torch.cat((x_rot * cos + rotate_half(x_rot) * sin, x_pass), dim=-1)


def alibi_slopes(n_head: int, scale: float = 1.0) -> Tensor:
    """Geometric head slopes m_h = scale * 2^(-8h/H), h = 1..H (Press et al. 2022; the paper's brake sweep
    multiplies every slope by `scale`). For H not a power of two ALiBi's reference code interleaves a second
    sequence; we keep the plain geometric one."""
    return scale * 2.0 ** (-8.0 * torch.arange(1, n_head + 1, dtype=torch.float) / n_head)


# Built once per (length, device, dtype) and shared by every layer, not rebuilt each step (nor held per layer:
# at context 2048 a table is 16 MB).
@functools.lru_cache(maxsize=16)
def _distance(T: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    """Source minus query position, [T, T]."""
    with torch.inference_mode(False):  # a first call under validation's inference mode must not cache an inference tensor
        positions = torch.arange(T, device=device)
        return (positions.view(1, T) - positions.view(T, 1)).to(dtype)


@functools.lru_cache(maxsize=16)
def _future(T: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    """The additive causal mask, [T, T]: -inf above the diagonal."""
    with torch.inference_mode(False):
        return torch.full((T, T), float("-inf"), dtype=dtype, device=device).triu(1)


class Attention(nn.Module):
    def __init__(self, d_model: int, n_head: int, context_length: int, position: str, score: str,
                 rotary_pct: float, rotary_base: float, alibi_slope_scale: float, layer_norm_eps: float,
                 dropout: float, name: str, normalization: str = "softmax", smear_keys: bool = False):
        super().__init__()
        self.n_head, self.d_head = n_head, d_model // n_head
        self.score, self.name, self.dropout = score, name, dropout
        self.normalization = normalization
        self.tau = 1.0 / math.sqrt(self.d_head)
        self.eps = layer_norm_eps
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)
        self.rotary = None
        if position == "rope":
            self.rotary = Rotary(int(self.d_head * rotary_pct), context_length, rotary_base)
        slopes = alibi_slopes(n_head, alibi_slope_scale).view(n_head, 1, 1) if position == "alibi" else None
        self.register_buffer("alibi_slopes", slopes, persistent=False)
        if smear_keys:
            # Olsson et al. (2022)'s smeared key: k'_j = s k_j + (1 - s) k_{j-1}, s = sigmoid(gate) per head, so
            # one layer can match a query against the token *before* a source -- induction by content, open to
            # every position scheme alike. gate = 0 at init: an even mix.
            self.smear_gate = nn.Parameter(torch.zeros(n_head, 1, 1))
            self.smear_gate._no_weight_decay = True
        else:
            self.smear_gate = None
        if score == "learned_metric":
            self.metric_factor = nn.Parameter(torch.eye(self.d_head).repeat(n_head, 1, 1))  # L, M = L^T L
            # Not decayed: decay toward zero would shrink the metric itself, not regularise it (docs/decisions.md)
            self.metric_factor._no_weight_decay = True
        if score == "normalized":
            # a query-side gain lets the router learn its temperature while every key keeps norm sqrt(d_head)
            self.query_gain = nn.Parameter(torch.ones(n_head, 1, self.d_head))
            self.query_gain._no_weight_decay = True  # a gain, like a norm's: decay would lower the temperature

    def metric(self, q: Tensor, k: Tensor) -> tuple[Tensor, Tensor | None]:
        """The query as it enters the dot product, and the score's per-key bias [B, H, 1, T] (or None)."""
        if self.score == "euclidean":
            return q, -0.5 * self.tau * k.square().sum(-1).unsqueeze(-2)
        if self.score == "learned_metric":
            L = self.metric_factor
            metric_keys = k @ L.transpose(-1, -2)  # Lk, so that k^T M k = |Lk|^2
            return q @ (L.transpose(-1, -2) @ L), -0.5 * self.tau * metric_keys.square().sum(-1).unsqueeze(-2)
        return q, None

    def project(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor | None]:
        """Everything before the scores: (query as scored, key as scored, value, scored_keys, per-key bias).
        ``scored_keys`` are the keys whose geometry the metrics read: pre-position (pre-RoPE) keys."""
        B, T, C = x.shape
        q, k, v = self.qkv(x).view(B, T, self.n_head, 3 * self.d_head).transpose(1, 2).chunk(3, dim=-1)
        if self.score == "normalized":
            q = self.query_gain * F.rms_norm(q, (self.d_head,), eps=self.eps)
            k = F.rms_norm(k, (self.d_head,), eps=self.eps)
        if self.smear_gate is not None:
            keep = torch.sigmoid(self.smear_gate)
            k = keep * k + (1 - keep) * F.pad(k, (0, 0, 1, -1))  # the first source has no predecessor: zeros
        scored_keys = k
        if self.rotary is not None:
            q, k = self.rotary(q), self.rotary(k)
        q, bias = self.metric(q, k)
        if self.alibi_slopes is not None:
            alibi = self.alibi_slopes * _distance(T, x.device, q.dtype)  # -m (i - j) for query i, source j
            bias = alibi if bias is None else bias + alibi
        return q, k, v, scored_keys, bias

    def forward(self, x: Tensor, return_routing: bool = False) -> tuple[Tensor, RoutingLayer | None]:
        q, k, v, scored_keys, bias = self.project(x)
        if not return_routing:
            return self.attend(q, k, v, bias), None
        # the reference path: explicit softmax, its weights go into the record
        T = x.shape[1]
        # in place on the fresh logits: the same numbers as the out-of-place form, with fewer T x T copies
        logits = (q @ k.transpose(-1, -2)).mul_(self.tau)
        if bias is not None:
            fits = torch.broadcast_shapes(bias.shape, logits.shape) == logits.shape
            logits = logits.add_(bias) if fits else logits + bias
        mask = causal_mask(T, device=x.device)
        logits = logits.masked_fill_(~mask, float("-inf"))
        weights = normalize(logits, self.normalization)
        out = F.dropout(weights, self.dropout, self.training) @ v
        routing = RoutingLayer(keys=k, weights=weights, mask=mask, name=self.name,
                               content_keys=scored_keys if self.rotary is not None else None)
        return self._merge_heads(out), routing

    def attend(self, q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None) -> Tensor:
        """The fast path (SDPA, no weights kept): training, and the keys-only pass of the shuffle null."""
        dropout = self.dropout if self.training else 0.0
        if self.normalization != "softmax":  # no fused kernel for these: the explicit weights, not kept
            logits = (q @ k.transpose(-1, -2)).mul_(self.tau) + _future(q.shape[-2], q.device, q.dtype)
            weights = normalize(logits if bias is None else logits + bias, self.normalization)
            return self._merge_heads(F.dropout(weights, dropout, self.training) @ v)
        if bias is None:
            out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True, scale=self.tau)
        else:
            future = _future(q.shape[-2], q.device, q.dtype)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias + future, dropout_p=dropout,
                                                 scale=self.tau)
        return self._merge_heads(out)

    def _merge_heads(self, out: Tensor) -> Tensor:
        B, _, T, _ = out.shape
        return self.proj(out.transpose(1, 2).reshape(B, T, self.n_head * self.d_head))


class MLP(nn.Module):
    def __init__(self, d_model: int, mlp_ratio: float):
        super().__init__()
        self.fc = nn.Linear(d_model, round(mlp_ratio * d_model))
        self.proj = nn.Linear(round(mlp_ratio * d_model), d_model)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(F.gelu(self.fc(x)))  # exact (erf) GELU, as GPT-NeoX's "gelu"


class Block(nn.Module):
    def __init__(self, d_model: int, layer_norm_eps: float, mlp_ratio: float, dropout: float,
                 parallel_residual: bool, **attention):
        super().__init__()
        self.parallel_residual = parallel_residual
        self.ln_1 = nn.LayerNorm(d_model, eps=layer_norm_eps)
        self.attn = Attention(d_model, layer_norm_eps=layer_norm_eps, dropout=dropout, **attention)
        self.ln_2 = nn.LayerNorm(d_model, eps=layer_norm_eps)
        self.mlp = MLP(d_model, mlp_ratio)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor, return_routing: bool = False) -> tuple[Tensor, RoutingLayer | None]:
        attn_out, routing = self.attn(self.ln_1(x), return_routing)
        return self.add_branches(x, attn_out), routing

    def add_branches(self, x: Tensor, attn_out: Tensor) -> Tensor:
        if self.parallel_residual:  # GPT-NeoX: both branches read the same x
            return x + self.drop(attn_out) + self.drop(self.mlp(self.ln_2(x)))
        x = x + self.drop(attn_out)
        return x + self.drop(self.mlp(self.ln_2(x)))


class Transformer(nn.Module):
    def __init__(self, vocab_size: int, n_layer: int = 6, d_model: int = 128, n_head: int = 4,
                 context_length: int = 128, position: str = "rope", score: str = "dot", rotary_pct: float = 0.25,
                 rotary_base: float = 10000, mlp_ratio: float = 4, layer_norm_eps: float = 1e-5,
                 dropout: float = 0.0, alibi_slope_scale: float = 1.0, parallel_residual: bool = True,
                 normalization: str = "softmax", smear_keys: bool = False):
        super().__init__()
        _check_choice("position", position, POSITIONS)
        _check_choice("score", score, SCORES)
        _check_choice("normalization", normalization, NORMALIZATIONS)
        if n_head < 1 or d_model % n_head:
            raise UserError(f"n_head ({n_head}) must divide d_model ({d_model}); pick n_head among its divisors")
        rotary_ndims = int(d_model // n_head * rotary_pct)
        if position == "rope" and (rotary_ndims < 2 or rotary_ndims % 2):
            raise UserError(f"rotary_pct {rotary_pct} of d_head {d_model // n_head} gives {rotary_ndims} rotary "
                            f"dims; RoPE needs a positive even number: change rotary_pct")
        self.context_length = context_length
        self.position, self.score, self.normalization = position, score, normalization
        self.wte = nn.Embedding(vocab_size, d_model)
        self.wpe = nn.Embedding(context_length, d_model) if position == "learned" else None
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(
            Block(d_model, layer_norm_eps, mlp_ratio, dropout, parallel_residual, n_head=n_head,
                  context_length=context_length, position=position, score=score, rotary_pct=rotary_pct,
                  rotary_base=rotary_base, alibi_slope_scale=alibi_slope_scale, normalization=normalization,
                  smear_keys=smear_keys, name=f"L{i}")
            for i in range(n_layer))
        self.ln_f = nn.LayerNorm(d_model, eps=layer_norm_eps)
        self.lm_head = nn.Linear(d_model, vocab_size, bias=False)  # untied, as in GPT-NeoX
        self.apply(self._init_weights)
        # GPT-2 / nanoGPT: residual projections scaled by 1/sqrt(2 n_layer), two residual writes per layer
        for name, p in self.named_parameters():
            if name.endswith(("attn.proj.weight", "mlp.proj.weight")):
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(self, tokens: Tensor, return_routing: bool = False) -> Tensor | tuple[Tensor, Routing]:
        x, layers = self.embed(tokens), []
        for block in self.blocks:
            x, layer = block(x, return_routing)
            layers.append(layer)
        logits = self.lm_head(self.ln_f(x))
        return (logits, FAMILY.routing(layers)) if return_routing else logits

    def features(self, tokens: Tensor) -> Tensor:
        """What the vocabulary head reads, [B, T, d] after the final norm: ``output_head(features(x))`` is
        ``forward(x)`` exactly. The LM task's fused loss (tasks/fused_loss.py) takes these and the head."""
        x = self.embed(tokens)
        for block in self.blocks:
            x = block(x)[0]
        return self.ln_f(x)

    @property
    def output_head(self) -> nn.Linear:
        return self.lm_head

    def routing(self, tokens: Tensor) -> Routing:
        """The routing record alone, the same tensors as ``forward(tokens, return_routing=True)[1]``: skips
        what the record never reads, the last block's MLP and the vocabulary head (the probe's costliest matmul)."""
        x, layers = self.embed(tokens), []
        *inner, last = self.blocks
        for block in inner:
            x, layer = block(x, return_routing=True)
            layers.append(layer)
        layers.append(last.attn(last.ln_1(x), return_routing=True)[1])
        return FAMILY.routing(layers)

    def scored_keys(self, tokens: Tensor) -> list[Tensor]:
        """Each layer's scored keys and nothing else (the shuffle null reads only these): SDPA instead of the
        explicit softmax, and the last block stops at its keys. Equal to the record's ``scored_keys`` up to
        float rounding (SDPA sums in another order, ~1e-7 relative from the second layer on)."""
        x, keys = self.embed(tokens), []
        *inner, last = self.blocks
        for block in inner:
            q, k, v, scored, bias = block.attn.project(block.ln_1(x))
            keys.append(scored)
            x = block.add_branches(x, block.attn.attend(q, k, v, bias))
        keys.append(last.attn.project(last.ln_1(x))[3])
        return keys

    def embed(self, tokens: Tensor) -> Tensor:
        check_tokens(tokens, self.context_length)
        x = self.wte(tokens)
        if self.wpe is not None:
            x = x + self.wpe(torch.arange(tokens.shape[1], device=tokens.device))
        return self.drop(x)

    @classmethod
    def from_hf(cls, source, **shape) -> "Transformer":
        """Build from a `transformers` GPTNeoXForCausalLM (shape read from its config) or from its state dict
        (pass n_head=..., and rotary_pct / rotary_base / context_length where they differ from Pythia's)."""
        if isinstance(source, dict):
            state = source
            if "n_head" not in shape:
                raise UserError("from_hf(state_dict) cannot infer the head count; pass n_head=...")
        else:
            state, shape = source.state_dict(), _shape_from_hf_config(source.config)
        state = {k.removeprefix("gpt_neox."): v for k, v in state.items()}
        head = state.get("lm_head.weight", state.get("embed_out.weight"))
        if head is None or "embed_in.weight" not in state:
            raise UserError("from_hf: not a GPTNeoXForCausalLM state (no embed_in / lm_head weights); "
                            "pass the causal-LM model, not the bare GPTNeoXModel")
        vocab_size, d_model = head.shape
        n_layer = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("layers."))
        shape.setdefault("mlp_ratio", state["layers.0.mlp.dense_h_to_4h.weight"].shape[0] / d_model)
        shape.setdefault("context_length", 2048)
        model = cls(vocab_size=vocab_size, n_layer=n_layer, d_model=d_model, position="rope", score="dot", **shape)
        renames = {"embed_in.": "wte.", "final_layer_norm.": "ln_f.", "embed_out.": "lm_head.", "layers.": "blocks.",
                   ".input_layernorm.": ".ln_1.", ".post_attention_layernorm.": ".ln_2.",
                   ".attention.query_key_value.": ".attn.qkv.", ".attention.dense.": ".attn.proj.",
                   ".mlp.dense_h_to_4h.": ".mlp.fc.", ".mlp.dense_4h_to_h.": ".mlp.proj."}
        ours = {}
        for key, value in state.items():
            if key.endswith(("attention.bias", "attention.masked_bias", "inv_freq")):
                continue  # old checkpoints' cached causal masks and rotary tables: we rebuild both
            for old, new in renames.items():
                key = key.replace(old, new)
            ours[key] = value
        model.load_state_dict(ours, strict=True)
        return model


def _shape_from_hf_config(config) -> dict:
    """Our keyword arguments from a GPTNeoXConfig; UserError for the variants this block does not implement."""
    rope = dict(config.rope_parameters or {})
    if config.hidden_act != "gelu" or not config.attention_bias or rope.get("rope_type", "default") != "default":
        raise UserError(f"from_hf supports GPT-NeoX with hidden_act 'gelu', attention_bias and default RoPE; got "
                        f"{config.hidden_act!r}, {config.attention_bias}, {rope.get('rope_type')!r}")
    return dict(n_head=config.num_attention_heads, context_length=config.max_position_embeddings,
                rotary_pct=rope.get("partial_rotary_factor", 1.0), rotary_base=rope["rope_theta"],
                mlp_ratio=config.intermediate_size / config.hidden_size, layer_norm_eps=config.layer_norm_eps,
                parallel_residual=config.use_parallel_residual)


def _example() -> tuple[Transformer, Tensor]:
    return Transformer(37, n_layer=2, d_model=16, n_head=2, context_length=8).eval(), torch.randint(37, (2, 8))


# Attention over tokens: the signature alone (no family statistics); GPT-NeoX (Pythia) checkpoints load into it.
FAMILY = register(Family("pythia", axis="token", hf_model_types=("gpt_neox",), from_hf=Transformer.from_hf,
                         bench=("router=pythia",), example=_example))
