"""Mamba-style selective state-space LM (Mamba-1, Gu & Dao 2023): the time router with no attention at all.

Read top to bottom: the two scans (a plain sequential reference and the fast chunked one that trains), the
hidden-attention operator they unroll into, the mixer (where Δ, B, C and the interventions live), the block,
the model, and loading a `transformers` MambaForCausalLM. Per channel d and state n (A = -exp(A_log)):

    x, z   = in_proj(u)                       z: the SiLU gate, applied after the scan
    x      = SiLU(causal depthwise conv(x))
    Δ      = softplus(dt_proj(dt)),  (dt, B, C) = x_proj(x)        dt of rank dt_rank, B and C of size d_state
    h_t    = exp(Δ_t A) h_{t-1} + Δ_t B_t x_t,   y_t = C_t h_t + D x_t
    out    = out_proj(y * SiLU(z))

Unrolled (Ali et al. 2024, "hidden attention"; paper App. B.2), y_t = sum_{s<=t} α_{t,s} x_s + D x_t with

    α_{t,s} = sum_n C_{t,n} exp(A_{d,n} sum_{r=s+1..t} Δ_{r,d}) Δ_{s,d} B_{s,n}

so the query is C_t and the effective key of source s is Δ_s B_s: Δ sets the key norm. The operator is
unnormalised and signed; the routing record gives |α| (collapse.max_share normalises column sums by their
total, docs/decisions.md: signed operators). The D skip and the z gate are not routing and stay out of α.

Interventions (paper Section 5.2), applied in every forward so their effect propagates through depth; set
them in the config to train under them, or with ``set_interventions`` on a trained model (the paper's ablation):
    freeze_delta   Δ -> its per-position mean over the batch (docs/decisions.md: Δ-freeze): the gate no longer selects
    freeze_bc      B and C -> their per-position batch means. With freeze_delta (the paper's "+B,C freeze") the
                   operator is the same for every sequence; alone, it is the complementary control.
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

SCANS = ("chunked", "reference")


def selective_scan_ref(x: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor) -> Tensor:
    """The sequential reference (mamba_ssm's ``selective_scan_ref``, fp32, no D skip): discretise the whole
    sequence, then one recurrence step per position. x, delta [b, T, d]; A [d, n]; B, C [b, T, n] -> [b, T, d]."""
    dA = torch.exp(delta.unsqueeze(-1) * A)                      # [b, T, d, n]
    dBx = (delta * x).unsqueeze(-1) * B.unsqueeze(2)             # [b, T, d, n]
    h = x.new_zeros(x.shape[0], *A.shape)
    ys = []
    for dA_t, dBx_t, C_t in zip(dA.unbind(1), dBx.unbind(1), C.unbind(1)):
        h = dA_t * h + dBx_t
        ys.append((h @ C_t.unsqueeze(-1)).squeeze(-1))
    return torch.stack(ys, dim=1)


def selective_scan_chunked(x: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, chunk: int = 4) -> Tensor:
    """The same scan, cache-blocked: discretise ``chunk`` positions at a time and contract them with C at once.

    The scan is bound by its b*T*d*n exponentials and the memory traffic of [b, T, d, n] tensors, not by the
    loop: the reference writes dA and dBx for the whole sequence to main memory and reads them back. Here
    every [b, chunk, d, n] block is created, used and dropped while it is still in cache (chunk 4 at d=256
    is 1 MiB at b=16), and per-step C contractions become one multiply-and-sum per block. A chunk-parallel
    form with log-space cumulative decays was slower on CPU: it materialises [b, T, d, n] decays.
    """
    h = x.new_zeros(x.shape[0], *A.shape)
    ys = []
    for delta_c, x_c, B_c, C_c in zip(delta.split(chunk, 1), x.split(chunk, 1), B.split(chunk, 1), C.split(chunk, 1)):
        dA = (delta_c.unsqueeze(-1) * A).exp_()  # in place: autograd then keeps one block tensor, not two
        dBx = (delta_c * x_c).unsqueeze(-1) * B_c.unsqueeze(2)
        states = []
        for dA_t, dBx_t in zip(dA.unbind(1), dBx.unbind(1)):
            h = torch.addcmul(dBx_t, dA_t, h)
            states.append(h)
        ys.append((torch.stack(states, 1) * C_c.unsqueeze(2)).sum(-1))
    return torch.cat(ys, dim=1)


def hidden_attention(delta: Tensor, A: Tensor, B: Tensor, C: Tensor, block: int = 8) -> Tensor:
    """The signed operator α [b, d, T(query), T(source)] of the channels in ``delta``/``A`` (zero for s > t).

    Computed in query blocks of ``block`` positions. A source s before the block's first query splits the
    decay at p = (block start - 1): exp(A (cum_t - cum_s)) = exp(A (cum_t - cum_p)) exp(A (cum_p - cum_s)),
    both factors <= 1, so α[block, :p+1] is one matmul over the state axis of a query side and a key side;
    the key side is carried from block to block by multiplying with the block's decay. Inside the block the
    decays are exponentiated directly. This takes ~T (block + 2) n exponentials per channel instead of the
    T^2 n / 2 of the plain formula, which dominate its cost. Segment sums cum_t - cum_s are differences of a
    float64 cumulative sum: in float32 their error ~1e-7 sum(Δ) would be multiplied by |A| in the exponent.
    """
    b, T, d = delta.shape
    cum = delta.double().cumsum(1).transpose(1, 2)                       # [b, d, T], cum_t = Δ_0 + ... + Δ_t
    keys = delta.transpose(1, 2).unsqueeze(-1) * B.unsqueeze(1)          # [b, d, T, n]: effective keys Δ_s B_s
    queries = C.unsqueeze(1)                                             # [b, 1, T, n]
    alpha = delta.new_zeros(b, d, T, T)
    carried = keys.new_empty(b, d, T, B.shape[-1])  # [:, :, :t0]: Δ_s B_s exp(A (cum_p - cum_s)), s <= p (in place: no cat)
    for t0 in range(0, T, block):
        t1 = min(t0 + block, T)
        if t0 > 0:
            p = cum[:, :, t0 - 1, None]
            since_p = torch.exp((cum[:, :, t0:t1] - p).float().unsqueeze(-1) * A.unsqueeze(1))   # [b, d, L, n]
            alpha[:, :, t0:t1, :t0] = (queries[:, :, t0:t1] * since_p) @ carried[:, :, :t0].transpose(-1, -2)
        # Inside the block only the causal pairs s <= t (L(L+1)/2 of L^2; s > t stays 0, so α is exactly causal),
        # each as q_t * exp(A (cum_t - cum_s)) * k_s, multiplied in that order.
        # (index_select, not advanced indexing: the same gather, 5x faster on a middle axis)
        L = t1 - t0
        rows, cols = (i + t0 for i in torch.tril_indices(L, L, device=delta.device))
        segment = (cum.index_select(2, rows) - cum.index_select(2, cols)).float()               # [b, d, pairs]
        decay = (segment.unsqueeze(-1) * A.view(1, d, 1, -1)).exp_()                            # [b, d, pairs, n]
        pairs = decay.mul_(queries.index_select(2, rows)).mul_(keys.index_select(2, cols)).sum(-1)
        within = pairs.new_zeros(b, d, L * L).index_copy_(2, (rows - t0) * L + (cols - t0), pairs)
        alpha[:, :, t0:t1, t0:t1] = within.view(b, d, L, L)
        # move the key side's reference from p to t1 - 1: old sources decay over the block, new ones join
        to_end = torch.exp((cum[:, :, t1 - 1, None] - cum[:, :, t0:t1]).float().unsqueeze(-1) * A.unsqueeze(1))
        block_decay = torch.exp((cum[:, :, t1 - 1] - (cum[:, :, t0 - 1] if t0 > 0 else 0)).float().unsqueeze(-1) * A)
        carried[:, :, :t0].mul_(block_decay.unsqueeze(2))
        torch.mul(keys[:, :, t0:t1], to_end, out=carried[:, :, t0:t1])
    return alpha


class MambaMixer(nn.Module):
    def __init__(self, d_model: int, d_state: int, expand: int, d_conv: int, dt_rank: int, scan: str,
                 scan_chunk: int, routing_chunk_channels: int, name: str):
        super().__init__()
        d_inner = expand * d_model
        self.d_state, self.dt_rank, self.name = d_state, dt_rank, name
        self.scan, self.scan_chunk = scan, scan_chunk
        self.freeze_delta = self.freeze_bc = False  # set by Mamba.set_interventions
        self.routing_chunk_channels = routing_chunk_channels
        self.in_proj = nn.Linear(d_model, 2 * d_inner, bias=False)
        self.conv1d = nn.Conv1d(d_inner, d_inner, d_conv, groups=d_inner, padding=d_conv - 1)
        self.x_proj = nn.Linear(d_inner, dt_rank + 2 * d_state, bias=False)
        self.dt_proj = nn.Linear(dt_rank, d_inner)
        self.A_log = nn.Parameter(torch.empty(d_inner, d_state))
        self.A_log._no_weight_decay = True  # mamba_ssm's marker: decay would pull every A = -exp(A_log) to -1
        self.D = nn.Parameter(torch.empty(d_inner))
        self.out_proj = nn.Linear(d_inner, d_model, bias=False)

    def select(self, u: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """The scan's input x [b, T, d], gate z, and the selective Δ [b, T, d], B, C [b, T, n], after interventions."""
        T = u.shape[1]
        x, z = self.in_proj(u).chunk(2, dim=-1)
        x = F.silu(self.conv1d(x.transpose(1, 2))[..., :T].transpose(1, 2))
        dt, B, C = self.x_proj(x).split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        delta = F.softplus(self.dt_proj(dt))
        if self.freeze_delta or self.freeze_bc:
            if u.shape[0] < 2:
                raise UserError("freeze_delta/freeze_bc replace Δ (and B, C) by their mean over the batch, "
                                "which a single sequence leaves unchanged; use batches of >= 2 sequences")
            if self.freeze_delta:
                delta = delta.mean(0, keepdim=True).expand_as(delta)
            if self.freeze_bc:
                B, C = (t.mean(0, keepdim=True).expand_as(t) for t in (B, C))
        return x, z, delta, B, C

    def forward(self, u: Tensor, return_routing: bool = False) -> tuple[Tensor, RoutingLayer | None]:
        x, z, delta, B, C = self.select(u)
        A = -torch.exp(self.A_log)
        if self.scan == "chunked":
            y = selective_scan_chunked(x, delta, A, B, C, self.scan_chunk)
        else:
            y = selective_scan_ref(x, delta, A, B, C)
        y = y + self.D * x
        out = self.out_proj(y * F.silu(z))
        return out, (self.routing(delta, A, B, C) if return_routing else None)

    def routing(self, delta: Tensor, A: Tensor, B: Tensor, C: Tensor) -> RoutingLayer:
        """|α| per channel, streamed in channel chunks; keys are the input matrix B shared by all channels.

        The per-channel effective keys Δ_{s,d} B_s would cost b*d*T*n floats per layer (200 MB at the 130M
        shape, 16 x 128); the statistics they carry need only Δ and |B_s|, so the record carries Δ itself.
        """
        delta, A, B, C = (t.detach() for t in (delta, A, B, C))
        step = self.routing_chunk_channels

        def weight_chunks() -> Iterator[Tensor]:
            for start in range(0, delta.shape[-1], step):
                yield hidden_attention(delta[..., start:start + step], A[start:start + step], B, C).abs_()  # a fresh tensor: in place

        return RoutingLayer(keys=B.unsqueeze(1), weight_chunks=weight_chunks,
                            mask=causal_mask(delta.shape[1], delta.device), name=self.name, delta=delta)


class MambaBlock(nn.Module):
    def __init__(self, d_model: int, layer_norm_eps: float, **mixer):
        super().__init__()
        self.norm = nn.RMSNorm(d_model, eps=layer_norm_eps)
        self.mixer = MambaMixer(d_model, **mixer)

    def forward(self, x: Tensor, return_routing: bool = False) -> tuple[Tensor, RoutingLayer | None]:
        out, routing = self.mixer(self.norm(x), return_routing)
        return x + out, routing


class Mamba(nn.Module):
    def __init__(self, vocab_size: int, n_layer: int = 4, d_model: int = 128, d_state: int = 16, expand: int = 2,
                 d_conv: int = 4, dt_rank: int | str = "auto", context_length: int = 1024,
                 layer_norm_eps: float = 1e-5, scan: str = "chunked", scan_chunk: int = 4,
                 freeze_delta: bool = False, freeze_bc: bool = False, routing_chunk_channels: int = 64,
                 tie_embeddings: bool = True, dt_min: float = 1e-3, dt_max: float = 0.1):
        super().__init__()
        if scan not in SCANS:
            raise UserError(f"unknown scan {scan!r}; choose one of {', '.join(SCANS)}")
        for knob, value in (("scan_chunk", scan_chunk), ("routing_chunk_channels", routing_chunk_channels)):
            if not isinstance(value, int) or value < 1:
                raise UserError(f"{knob} must be a positive integer; got {value!r}")
        dt_rank = math.ceil(d_model / 16) if dt_rank == "auto" else dt_rank
        self.context_length = context_length
        self.embeddings = nn.Embedding(vocab_size, d_model)
        self.layers = nn.ModuleList(
            MambaBlock(d_model, layer_norm_eps, d_state=d_state, expand=expand, d_conv=d_conv, dt_rank=dt_rank,
                       scan=scan, scan_chunk=scan_chunk, routing_chunk_channels=routing_chunk_channels, name=f"L{i}")
            for i in range(n_layer))
        self.norm_f = nn.RMSNorm(d_model, eps=layer_norm_eps)
        self.lm_head = nn.Linear(d_model, vocab_size, bias=False)
        if tie_embeddings:  # as in the released Mamba models
            self.lm_head.weight = self.embeddings.weight
        self._init_weights(n_layer, dt_min, dt_max)
        self.set_interventions(freeze_delta=freeze_delta, freeze_bc=freeze_bc)

    def set_interventions(self, freeze_delta: bool = False, freeze_bc: bool = False) -> "Mamba":
        """Switch the interventions on every layer; the next forward (training or analysis) applies them."""
        for knob, value in (("freeze_delta", freeze_delta), ("freeze_bc", freeze_bc)):
            if not isinstance(value, bool):
                raise UserError(f"{knob} must be true or false; got {value!r}")
        for block in self.layers:
            block.mixer.freeze_delta, block.mixer.freeze_bc = freeze_delta, freeze_bc
        return self

    @torch.no_grad()
    def _init_weights(self, n_layer: int, dt_min: float, dt_max: float) -> None:
        """mamba_ssm's initialisation: S4D-real A, D = 1, Δ log-uniform in [dt_min, dt_max] through the bias."""
        nn.init.normal_(self.embeddings.weight, std=0.02)
        for block in self.layers:
            mixer = block.mixer
            d_inner, d_state = mixer.A_log.shape
            mixer.A_log.copy_(torch.log(torch.arange(1, d_state + 1, dtype=torch.float32)).repeat(d_inner, 1))
            mixer.D.fill_(1.0)
            nn.init.uniform_(mixer.dt_proj.weight, -mixer.dt_rank ** -0.5, mixer.dt_rank ** -0.5)
            dt = torch.exp(torch.rand(d_inner) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
            mixer.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # softplus^-1(dt)
            # GPT-2-style residual scaling, one residual write per layer (mamba_ssm rescale_prenorm_residual)
            mixer.out_proj.weight /= math.sqrt(n_layer)

    def forward(self, tokens: Tensor, return_routing: bool = False) -> Tensor | tuple[Tensor, Routing]:
        check_tokens(tokens, self.context_length)
        x = self.embeddings(tokens)
        layers = []
        for block in self.layers:
            x, layer = block(x, return_routing)
            layers.append(layer)
        logits = self.lm_head(self.norm_f(x))
        return (logits, FAMILY.routing(layers)) if return_routing else logits

    def features(self, tokens: Tensor) -> Tensor:
        """What the vocabulary head reads, [B, T, d] after the final norm: ``output_head(features(x))`` is
        ``forward(x)`` exactly (the LM task's fused loss, tasks/fused_loss.py)."""
        check_tokens(tokens, self.context_length)
        x = self.embeddings(tokens)
        for block in self.layers:
            x = block(x)[0]
        return self.norm_f(x)

    @property
    def output_head(self) -> nn.Linear:
        return self.lm_head

    @classmethod
    def from_hf(cls, hf_model, **knobs) -> "Mamba":
        """Build from a `transformers` MambaForCausalLM (e.g. state-spaces/mamba-130m-hf), weights copied."""
        config = getattr(hf_model, "config", None)
        if getattr(config, "model_type", None) != "mamba":
            raise UserError("from_hf needs a transformers MambaForCausalLM; got "
                            f"{type(hf_model).__name__}; load it with MambaForCausalLM.from_pretrained(...)")
        if config.use_bias or not config.use_conv_bias or config.hidden_act != "silu":
            raise UserError("from_hf supports Mamba with use_bias=False, use_conv_bias=True and hidden_act 'silu'")
        model = cls(vocab_size=config.vocab_size, n_layer=config.num_hidden_layers, d_model=config.hidden_size,
                    d_state=config.state_size, expand=config.expand, d_conv=config.conv_kernel,
                    dt_rank=config.time_step_rank, layer_norm_eps=config.layer_norm_epsilon,
                    tie_embeddings=config.tie_word_embeddings, **knobs)
        state = {k.removeprefix("backbone."): v for k, v in hf_model.state_dict().items()}
        model.load_state_dict(state, strict=True)
        return model


def _example() -> tuple[Mamba, Tensor]:
    return Mamba(37, n_layer=2, d_model=16, d_state=4, dt_rank=3, context_length=8).eval(), torch.randint(37, (2, 8))


FAMILY = register(Family("mamba", axis="time", statistics="selective_scan", hf_model_types=("mamba",),
                         from_hf=Mamba.from_hf, bench=("router=mamba",), example=_example))
