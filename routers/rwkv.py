"""RWKV-4 LM (Peng et al. 2023): the recurrent time router whose routing is a decayed softmax over the past.

Read top to bottom: the WKV operator (the sequential running-max recurrence and a chunked parallel form),
its routing weights, time mixing, channel mixing, the block, the model, and loading a `transformers`
RwkvForCausalLM. Per channel c, with token shift x'_t = mix * x_t + (1 - mix) * x_{t-1}:

    k, v   = key(x'), value(x'),   r = sigmoid(receptance(x'))
    wkv_t  = sum_{s<=t} α_{t,s} v_s,  α_{t,s} ∝ exp((t-1-s) w + k_s)  (s < t),   ∝ exp(u + k_t)  (s = t)
    out    = output(r * wkv)
    w      = -exp(time_decay) < 0,  u = time_first

so α is the softmax over s <= t of the logits above (paper App. B.2): the key k_s is the content score and
(t-1-s) w a linear recency brake. The previous token s = t-1 is not decayed at all.

Interventions on w (paper Section 5.3), applied in every forward so the change propagates through depth; set
them in the config to train under them, or with ``set_interventions`` on a trained model (the paper's sweep):
    decay_scale  s   w -> s * w (s = 1: the learned model; s -> 0: full carry). Equals time_decay += ln s, so
                     in training a learnable time_decay can undo it: ``learn_decay=false`` makes it a fixed brake.
    no_decay         w = 0: full carry (decay_scale = 0)
    kill_carry       w -> -inf: only s = t-1 and s = t keep weight (docs/decisions.md)
"""
from __future__ import annotations

import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from common.errors import UserError
from routers.family import Family, register
from routers.routing import Routing, RoutingLayer, causal_mask, check_tokens

WKVS = ("chunked", "reference")
# kill_carry's decay. Finite on purpose: 0 * w must stay 0 for the undecayed previous token (0 * -inf is
# nan), while exp(g * w + k) underflows to exactly 0 for every gap g >= 1 and any key an fp32 model produces.
KILLED_DECAY = -1e30


def wkv_reference(w: Tensor, u: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """RWKV-4's recurrence (transformers' ``rwkv_linear_attention_cpu``): w, u [C]; k, v [b, T, C] -> [b, T, C].

    The state (num, den) is kept relative to a running maximum exponent m, so exp never overflows.
    """
    num, den = torch.zeros_like(k[:, 0]), torch.zeros_like(k[:, 0])
    m = torch.full_like(k[:, 0], -1e38)
    out = []
    for k_t, v_t in zip(k.unbind(1), v.unbind(1)):
        top = torch.maximum(m, u + k_t)
        e_state, e_now = torch.exp(m - top), torch.exp(u + k_t - top)
        out.append((e_state * num + e_now * v_t) / (e_state * den + e_now))
        top = torch.maximum(m + w, k_t)
        e_state, e_now = torch.exp(m + w - top), torch.exp(k_t - top)
        num, den, m = e_state * num + e_now * v_t, e_state * den + e_now, top
    return torch.stack(out, dim=1)


def wkv_chunked(w: Tensor, u: Tensor, k: Tensor, v: Tensor, chunk: int = 4) -> Tensor:
    """The same WKV, parallel within chunks of ``chunk`` positions and sequential across them.

    It does ``chunk`` times the recurrence's arithmetic in T / chunk steps instead of T: short chunks
    (4) train fastest on CPU (bench/scan.py), where the recurrence's per-step ops are too small to thread;
    accelerators, where each step is a kernel launch, favour longer ones.

    Inside a chunk every query normalises its own [chunk] logits by their maximum (a masked softmax, all
    chunks at once); the sources before the chunk arrive as one carried state (num, den, m) referenced to
    the chunk's first query, which adds the logit m + i w for query i. Every maximum is detached: the output
    is exactly invariant to the reference exponent, so gradients are unchanged and the graph is smaller.
    """
    b, T, C = k.shape
    pad = -T % chunk
    if pad:  # padded positions come after every real one, so causality keeps them out of real outputs
        k, v = F.pad(k, (0, 0, 0, pad)), F.pad(v, (0, 0, 0, pad))
    n_chunks = k.shape[1] // chunk
    k, v = k.view(b, n_chunks, chunk, C), v.view(b, n_chunks, chunk, C)
    i = torch.arange(chunk, device=k.device, dtype=k.dtype)
    gap = (i.view(-1, 1) - 1 - i.view(1, -1)).view(chunk, chunk, 1)                  # t - 1 - s, [query, source]
    logits = torch.where(gap >= 0, gap * w + k.unsqueeze(2), u + k.unsqueeze(3))     # [b, n, query, source, C]
    logits = logits.masked_fill(gap < -1, -math.inf)                                 # sources after the query
    top = logits.amax(3).detach()                                                    # [b, n, query, C]
    weights = torch.exp(logits - top.unsqueeze(3))
    num, den = (weights * v.unsqueeze(2)).sum(3), weights.sum(3)

    # What each chunk hands on, referenced to the next chunk's first query: logit (chunk - 1 - s) w + k_s.
    carry_logits = (chunk - 1 - i).view(-1, 1) * w + k                              # [b, n, source, C]
    carry_top = carry_logits.amax(2).detach()
    carry_w = torch.exp(carry_logits - carry_top.unsqueeze(2))
    carry_num, carry_den = (carry_w * v).sum(2), carry_w.sum(2)

    state_num, state_den = torch.zeros_like(k[:, 0, 0]), torch.zeros_like(k[:, 0, 0])
    state_m = torch.full_like(k[:, 0, 0], -math.inf)
    outputs = []
    for c in range(n_chunks):
        # the carried sources reach query i after i more decays
        m_query = state_m.unsqueeze(1) + i.view(-1, 1) * w                             # [b, query, C]
        top_c = torch.maximum(top[:, c], m_query).detach()
        e_local, e_state = torch.exp(top[:, c] - top_c), torch.exp(m_query - top_c)
        outputs.append((e_local * num[:, c] + e_state * state_num.unsqueeze(1))
                       / (e_local * den[:, c] + e_state * state_den.unsqueeze(1)))
        m_next = torch.maximum(state_m + chunk * w, carry_top[:, c]).detach()
        e_old, e_new = torch.exp(state_m + chunk * w - m_next), torch.exp(carry_top[:, c] - m_next)
        state_num = e_old * state_num + e_new * carry_num[:, c]
        state_den = e_old * state_den + e_new * carry_den[:, c]
        state_m = m_next
    return torch.cat(outputs, dim=1)[:, :T]


def wkv_weights(w: Tensor, u: Tensor, k: Tensor, queries: slice = slice(None)) -> Tensor:
    """The routing operator α [b, C, queries, T] of the channels in w, u, k [b, T, C]: rows sum to 1.

    Built channel-first, so the softmax runs along the contiguous last axis and the operator comes out
    contiguous (the metrics read it in blocks; a permuted view would be copied whole first)."""
    T = k.shape[1]
    t = torch.arange(T, device=k.device, dtype=k.dtype)[queries].view(-1, 1)
    gap = t - 1 - torch.arange(T, device=k.device, dtype=k.dtype).view(1, -1)                 # [q, s]
    keys = k.transpose(1, 2).unsqueeze(2)                                                     # [b, C, 1, s]
    # the position part [C, q, s] once, then one add over the batch: the same sums as (gap w + k_s), (u + k_s)
    bias = torch.where(gap >= 0, gap * w.view(-1, 1, 1), u.view(-1, 1, 1)).masked_fill(gap < -1, -math.inf)
    return (bias + keys).softmax(dim=-1)


class TimeMix(nn.Module):
    def __init__(self, d_model: int, wkv: str, wkv_chunk: int, routing_chunk_channels: int, name: str):
        super().__init__()
        self.name, self.wkv, self.wkv_chunk = name, wkv, wkv_chunk
        self.decay_scale, self.kill_carry, self.no_decay = 1.0, False, False  # set by RWKV.set_interventions
        self.routing_chunk_channels = routing_chunk_channels
        self.time_decay = nn.Parameter(torch.empty(d_model))
        self.time_first = nn.Parameter(torch.empty(d_model))
        # 1-D so weight decay leaves them alone (HF stores them as [1, 1, C]; from_hf flattens)
        self.time_mix_key = nn.Parameter(torch.empty(d_model))
        self.time_mix_value = nn.Parameter(torch.empty(d_model))
        self.time_mix_receptance = nn.Parameter(torch.empty(d_model))
        self.key = nn.Linear(d_model, d_model, bias=False)
        self.value = nn.Linear(d_model, d_model, bias=False)
        self.receptance = nn.Linear(d_model, d_model, bias=False)
        self.output = nn.Linear(d_model, d_model, bias=False)

    def decay(self) -> Tensor:
        """w per channel after the intervention knobs."""
        if self.kill_carry:
            return torch.full_like(self.time_decay, KILLED_DECAY)
        if self.no_decay:
            return torch.zeros_like(self.time_decay)
        return -torch.exp(self.time_decay) * self.decay_scale

    def forward(self, x: Tensor, return_routing: bool = False) -> tuple[Tensor, RoutingLayer | None]:
        shifted = F.pad(x, (0, 0, 1, -1))  # x_{t-1}, zero before the first token
        k = self.key(torch.lerp(shifted, x, self.time_mix_key))
        v = self.value(torch.lerp(shifted, x, self.time_mix_value))
        r = torch.sigmoid(self.receptance(torch.lerp(shifted, x, self.time_mix_receptance)))
        w, u = self.decay(), self.time_first
        if self.wkv == "chunked":
            wkv = wkv_chunked(w, u, k, v, self.wkv_chunk)
        else:
            wkv = wkv_reference(w, u, k, v)
        return self.output(r * wkv), (self.routing(w, u, k) if return_routing else None)

    def routing(self, w: Tensor, u: Tensor, k: Tensor) -> RoutingLayer:
        """α per channel, streamed in channel chunks; keys are the full key vectors k_s (one set for all channels)."""
        w, u, k = w.detach(), u.detach(), k.detach()
        T, C = k.shape[1:]
        step = self.routing_chunk_channels

        def weight_chunks() -> Iterator[Tensor]:
            for start in range(0, C, step):
                channels = slice(start, start + step)
                yield wkv_weights(w[channels], u[channels], k[..., channels])

        return RoutingLayer(keys=k.unsqueeze(1), weight_chunks=weight_chunks, mask=causal_mask(T, k.device),
                            name=self.name)


class ChannelMix(nn.Module):
    def __init__(self, d_model: int, d_ffn: int):
        super().__init__()
        self.time_mix_key = nn.Parameter(torch.empty(d_model))
        self.time_mix_receptance = nn.Parameter(torch.empty(d_model))
        self.key = nn.Linear(d_model, d_ffn, bias=False)
        self.receptance = nn.Linear(d_model, d_model, bias=False)
        self.value = nn.Linear(d_ffn, d_model, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        shifted = F.pad(x, (0, 0, 1, -1))
        k = torch.square(torch.relu(self.key(torch.lerp(shifted, x, self.time_mix_key))))
        return torch.sigmoid(self.receptance(torch.lerp(shifted, x, self.time_mix_receptance))) * self.value(k)


class RwkvBlock(nn.Module):
    def __init__(self, d_model: int, d_ffn: int, layer_norm_eps: float, first: bool, **time_mix):
        super().__init__()
        self.pre_ln = nn.LayerNorm(d_model, eps=layer_norm_eps) if first else None  # RWKV-4 normalises embeddings
        self.ln1 = nn.LayerNorm(d_model, eps=layer_norm_eps)
        self.ln2 = nn.LayerNorm(d_model, eps=layer_norm_eps)
        self.attention = TimeMix(d_model, **time_mix)
        self.feed_forward = ChannelMix(d_model, d_ffn)

    def forward(self, x: Tensor, return_routing: bool = False) -> tuple[Tensor, RoutingLayer | None]:
        if self.pre_ln is not None:
            x = self.pre_ln(x)
        out, routing = self.attention(self.ln1(x), return_routing)
        x = x + out
        return x + self.feed_forward(self.ln2(x)), routing


class RWKV(nn.Module):
    def __init__(self, vocab_size: int, n_layer: int = 4, d_model: int = 128, d_ffn: int | None = None,
                 context_length: int = 1024, layer_norm_eps: float = 1e-5, wkv: str = "chunked",
                 wkv_chunk: int = 4, decay_scale: float = 1.0, kill_carry: bool = False, no_decay: bool = False,
                 learn_decay: bool = True, routing_chunk_channels: int = 64):
        super().__init__()
        _check_shape_knobs(wkv, wkv_chunk, routing_chunk_channels)
        if not isinstance(learn_decay, bool):
            raise UserError(f"learn_decay must be true or false; got {learn_decay!r}")
        self.context_length = context_length
        self.embeddings = nn.Embedding(vocab_size, d_model)
        self.blocks = nn.ModuleList(
            RwkvBlock(d_model, d_ffn or 4 * d_model, layer_norm_eps, first=i == 0, wkv=wkv, wkv_chunk=wkv_chunk,
                      routing_chunk_channels=routing_chunk_channels, name=f"L{i}")
            for i in range(n_layer))
        self.ln_out = nn.LayerNorm(d_model, eps=layer_norm_eps)
        self.head = nn.Linear(d_model, vocab_size, bias=False)
        self._init_weights(n_layer)
        for block in self.blocks:
            block.attention.time_decay.requires_grad_(learn_decay)
        self.set_interventions(decay_scale=decay_scale, kill_carry=kill_carry, no_decay=no_decay)

    def set_interventions(self, decay_scale: float = 1.0, kill_carry: bool = False, no_decay: bool = False) -> "RWKV":
        """Switch the decay intervention on every layer; the next forward (training or analysis) applies it."""
        for knob, value in (("kill_carry", kill_carry), ("no_decay", no_decay)):
            if not isinstance(value, bool):
                raise UserError(f"{knob} must be true or false; got {value!r}")
        if isinstance(decay_scale, bool) or not isinstance(decay_scale, (int, float)) \
                or not math.isfinite(decay_scale) or decay_scale < 0:
            raise UserError(f"decay_scale must be a finite number >= 0 (1 = learned decay, 0 = full carry); "
                            f"got {decay_scale!r}")
        if sum([kill_carry, no_decay, decay_scale != 1]) > 1:
            raise UserError("choose one decay intervention: kill_carry, no_decay or decay_scale != 1")
        for block in self.blocks:
            att = block.attention
            att.decay_scale, att.kill_carry, att.no_decay = float(decay_scale), kill_carry, no_decay
        return self

    @torch.no_grad()
    def _init_weights(self, n_layer: int) -> None:
        """RWKV-4's initialisation (BlinkDL's RWKV-LM, as in transformers): per-channel decays spread from
        fast to slow, u = log(0.3) + zigzag, token-shift mixes ramped over channels and depth."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                rows, cols = module.weight.shape
                gain = math.sqrt(rows / cols) if rows > cols else 1.0
                nn.init.orthogonal_(module.weight, gain=0.5 * gain if module is self.head else gain)
        nn.init.uniform_(self.embeddings.weight, -1e-4, 1e-4)  # pre_ln rescales them
        for layer_id, block in enumerate(self.blocks):
            att, ffn = block.attention, block.feed_forward
            C = att.time_decay.numel()
            ratio_0_to_1 = layer_id / max(n_layer - 1, 1)
            ratio_1_to_0 = 1.0 - layer_id / n_layer
            ramp = torch.arange(C, dtype=torch.float32) / C
            h = torch.arange(C, dtype=torch.float32) / max(C - 1, 1)
            att.time_decay.copy_(-5 + 8 * h ** (0.7 + 1.3 * ratio_0_to_1))
            zigzag = 0.5 * (torch.tensor([(i + 1) % 3 - 1 for i in range(C)], dtype=torch.float32))
            att.time_first.copy_(math.log(0.3) + zigzag)
            att.time_mix_key.copy_(ramp ** ratio_1_to_0)
            att.time_mix_value.copy_(ramp ** ratio_1_to_0 + 0.3 * ratio_0_to_1)
            att.time_mix_receptance.copy_(ramp ** (0.5 * ratio_1_to_0))
            ffn.time_mix_key.copy_(ramp ** ratio_1_to_0)
            ffn.time_mix_receptance.copy_(ramp ** ratio_1_to_0)

    def forward(self, tokens: Tensor, return_routing: bool = False) -> Tensor | tuple[Tensor, Routing]:
        check_tokens(tokens, self.context_length)
        x = self.embeddings(tokens)
        layers = []
        for block in self.blocks:
            x, layer = block(x, return_routing)
            layers.append(layer)
        logits = self.head(self.ln_out(x))
        return (logits, FAMILY.routing(layers)) if return_routing else logits

    def features(self, tokens: Tensor) -> Tensor:
        """What the vocabulary head reads, [B, T, d] after the final norm: ``output_head(features(x))`` is
        ``forward(x)`` exactly (the LM task's fused loss, tasks/fused_loss.py)."""
        check_tokens(tokens, self.context_length)
        x = self.embeddings(tokens)
        for block in self.blocks:
            x = block(x)[0]
        return self.ln_out(x)

    @property
    def output_head(self) -> nn.Linear:
        return self.head

    @classmethod
    def from_hf(cls, hf_model, **knobs) -> "RWKV":
        """Build from a `transformers` RwkvForCausalLM (e.g. RWKV/rwkv-4-169m-pile), weights copied.

        transformers halves the residual stream every ``rescale_every`` blocks in eval mode (an fp16 overflow
        guard); the stored weights are unscaled, so ours reproduce its logits up to LayerNorm's epsilon.
        """
        config = getattr(hf_model, "config", None)
        if getattr(config, "model_type", None) != "rwkv":
            raise UserError("from_hf needs a transformers RwkvForCausalLM; got "
                            f"{type(hf_model).__name__}; load it with RwkvForCausalLM.from_pretrained(...)")
        if config.attention_hidden_size != config.hidden_size:
            raise UserError("from_hf supports RWKV-4 with attention_hidden_size == hidden_size")
        model = cls(vocab_size=config.vocab_size, n_layer=config.num_hidden_layers, d_model=config.hidden_size,
                    d_ffn=config.intermediate_size, context_length=config.context_length,
                    layer_norm_eps=config.layer_norm_epsilon, **knobs)
        state = {k.removeprefix("rwkv."): v.flatten() if "time_mix" in k else v
                 for k, v in hf_model.state_dict().items()}
        model.load_state_dict(state, strict=True)
        return model


def _check_shape_knobs(wkv, wkv_chunk, routing_chunk_channels) -> None:
    if wkv not in WKVS:
        raise UserError(f"unknown wkv {wkv!r}; choose one of {', '.join(WKVS)}")
    for knob, value in (("wkv_chunk", wkv_chunk), ("routing_chunk_channels", routing_chunk_channels)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise UserError(f"{knob} must be a positive integer; got {value!r}")


def _example() -> tuple[RWKV, Tensor]:
    return RWKV(37, n_layer=2, d_model=16, context_length=8).eval(), torch.randint(37, (2, 8))


FAMILY = register(Family("rwkv", axis="time", statistics="late_query_content_recency", hf_model_types=("rwkv",),
                         from_hf=RWKV.from_hf, bench=("router=rwkv",), example=_example))
