"""Hugging Face checkpoints as routers: ``model=hf:<local dir or hub name>[@revision]`` -> the routing record.

Families (paper Table 1 and Section 5), each giving the same record as our own routers:

* GPT-2 (``gpt2``): post-softmax attention read from the forward pass (eager attention: SDPA silently
  returns no weights, docs/decisions.md), keys = the K slice of ``c_attn`` with its bias, recomputed from each
  block's input hidden state (``output_hidden_states``) rather than captured with hooks.
* GPT-NeoX / Pythia (``gpt_neox``): the weights copied into our ``routers.transformer.Transformer``
  (``from_hf``), whose explicit-softmax path gives attention and keys pre- and post-rotary.
* Mamba (``mamba``) and RWKV-4 (``rwkv``): through the reconstructed operators of ``routers.ssm`` and
  ``routers.rwkv`` (their ``from_hf`` copies the weights; we do not write the operators again).
* Llama-family decoders (``llama``, ``mistral``, ``qwen2``, ``qwen3``, ``gemma``, ``gemma2``, ``gemma3_text``,
  ``olmo``, ``olmo2``): one attention design (RMSNorm, rotary on the whole head, grouped-query attention; Gemma-2's
  logit soft-capping and Gemma-2/3's local/global layers are in the weights HF returns, their windows in each
  layer's mask, Gemma-3's per-type rotary base in its keys), wrapped like GPT-2: eager
  attention weights per query head; keys recomputed from each layer's input through its own ``k_proj`` (and
  ``k_norm`` / ``clip_qkv`` where the family has them), pre-RoPE (what VE reads) and post-RoPE (as scored),
  one per key head: the signature shares each key head's norm-CV across the query heads that read it.

Pythia's per-step revisions (``@step4000``) give a real pretraining trajectory. Offline, a name that is not
in the local cache fails with one line.
"""
from __future__ import annotations

import inspect
import sys
from pathlib import Path

import torch
from torch import Tensor, nn

from common.errors import UserError
from routers.routing import Routing, RoutingLayer, causal_mask

LLAMA_LIKE = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "olmo", "olmo2")
WRAPPED = ("gpt2",) + LLAMA_LIKE  # model types wrapped here; the others are adapted by our router families
EAGER = ("gpt2", "gpt_neox") + LLAMA_LIKE  # families whose attention weights come from HF's forward pass


def parse_spec(spec: str) -> tuple[str, str | None]:
    """``hf:EleutherAI/pythia-160m@step4000`` -> (``EleutherAI/pythia-160m``, ``step4000``); a name written as a
    path (``/``, ``./``, ``~``) must be an existing folder."""
    if not spec.startswith("hf:") or len(spec) == 3:
        raise UserError(f"model={spec!r} is not a Hugging Face spec; write model=hf:<local dir or hub name>[@revision]")
    name, _, revision = spec[3:].partition("@")
    if name.startswith(("/", "./", "../", "~")) and not Path(name).expanduser().is_dir():
        raise UserError(f"model=hf:{name}: no such folder; pass model=hf:<a folder with the model's config.json> "
                        "or a Hub name such as EleutherAI/pythia-160m")
    return name, revision or None


class _WrappedDecoder(nn.Module):
    """A Hugging Face causal LM that returns our routing record; the model is wrapped, not copied.

    One forward pass with eager attention weights and every block's input hidden state; subclasses turn
    those into routing layers (:meth:`routing_layers`)."""

    def __init__(self, model: nn.Module, context_length: int, blocks: nn.ModuleList):
        super().__init__()
        self.model, self.context_length, self.blocks = model, context_length, blocks

    def forward(self, tokens: Tensor, return_routing: bool = False):
        if tokens.shape[-1] > self.context_length:
            raise UserError(f"sequence length {tokens.shape[-1]} exceeds the model's {self.context_length} "
                            "positions; use a shorter probe_length")
        out = self.model(tokens, output_attentions=return_routing, output_hidden_states=return_routing)
        if not return_routing:
            return out.logits
        if len(out.attentions or ()) != len(self.blocks):
            raise UserError(f"{self.model.config.model_type} returned no attention weights; load it with "
                            "attn_implementation='eager'")
        return out.logits, Routing(layers=self.routing_layers(out, tokens), axis="token")

    def routing_layers(self, out, tokens: Tensor) -> list[RoutingLayer]:
        raise NotImplementedError


class GPT2Router(_WrappedDecoder):
    """GPT-2: keys are the K slice of ``c_attn`` (with its bias) applied to each block's normalised input."""

    def __init__(self, model: nn.Module):
        super().__init__(model, model.config.n_positions, model.transformer.h)

    def routing_layers(self, out, tokens: Tensor) -> list[RoutingLayer]:
        B, T = tokens.shape
        n_head, d_model = self.model.config.n_head, self.model.config.n_embd
        layers = []
        for i, block in enumerate(self.blocks):
            # hidden_states[i] is block i's input; c_attn = [q | k | v] over d_model each, heads contiguous.
            keys = block.attn.c_attn(block.ln_1(out.hidden_states[i]))[..., d_model:2 * d_model]
            keys = keys.view(B, T, n_head, d_model // n_head).transpose(1, 2)
            layers.append(RoutingLayer(keys=keys, weights=out.attentions[i], mask=causal_mask(T, tokens.device),
                                       name=f"L{i}"))
        return layers


class DecoderRouter(_WrappedDecoder):
    """Llama-family decoders: pre-rotary keys from each family's own projection (and norms), rotated with
    the family's own rotary function; one key per key head under grouped-query attention."""

    def __init__(self, model: nn.Module):
        super().__init__(model, model.config.max_position_embeddings, model.model.layers)

    def routing_layers(self, out, tokens: Tensor) -> list[RoutingLayer]:
        T = tokens.shape[-1]
        positions = torch.arange(T, device=tokens.device)[None]
        rotary, types = self.model.model.rotary_emb, getattr(self.model.config, "layer_types", None)
        # Gemma-3 rotates local and global layers with different bases: its rotary module takes the layer type.
        per_type = "layer_type" in inspect.signature(rotary.forward).parameters
        tables = {}
        layers, windows = [], layer_windows(self.model.config, len(self.blocks))
        for i, layer in enumerate(self.blocks):
            kind = types[i] if per_type and types else None
            if kind not in tables:
                args = (out.hidden_states[0], positions) + ((kind,) if kind else ())
                tables[kind] = rotary(*args)
            cos, sin = tables[kind]
            attention = layer.self_attn
            # hidden_states[i] is layer i's input; OLMo-2 normalises after its sublayers, so its attention reads
            # the residual stream as it is. Each family's module carries its own rotary function.
            norm = getattr(layer, "input_layernorm", None)
            content = _content_keys(attention, norm(out.hidden_states[i]) if norm else out.hidden_states[i])
            _, rotated = sys.modules[type(attention).__module__].apply_rotary_pos_emb(content, content, cos, sin)
            layers.append(RoutingLayer(keys=rotated, content_keys=content, weights=out.attentions[i],
                                       mask=causal_mask(T, tokens.device, windows[i]), name=f"L{i}"))
        return layers


def layer_windows(config, n_layers: int) -> list[int | None]:
    """Each layer's sliding window (None: full causal attention), as the model's own forward masks it: per
    layer from ``layer_types`` where the config has them (Qwen2's ``max_window_layers`` and
    ``use_sliding_window`` become ``layer_types``), else Mistral's one ``sliding_window`` for every layer.
    The record's mask must be the layer's own: the uniform baseline and the exposure-corrected share read it."""
    window = getattr(config, "sliding_window", None)
    types = getattr(config, "layer_types", None)
    if types:
        return [window if kind == "sliding_attention" and window else None for kind in types[:n_layers]]
    if window and config.model_type == "mistral":
        return [window] * n_layers
    return [None] * n_layers


def _content_keys(attention: nn.Module, x: Tensor) -> Tensor:
    """[batch, key heads, T, d_head] keys before rotary, as the family's attention computes them: OLMo clips
    the projection, OLMo-2 normalises it across all key heads, Qwen3 per head."""
    B, T, _ = x.shape
    d_head = attention.head_dim
    keys = attention.k_proj(x)
    clip = getattr(attention.config, "clip_qkv", None)
    if clip is not None:
        keys = keys.clamp(-clip, clip)
    norm = getattr(attention, "k_norm", None)
    if norm is not None and norm.weight.shape[-1] != d_head:
        keys = norm(keys)
    keys = keys.view(B, T, -1, d_head)
    if norm is not None and norm.weight.shape[-1] == d_head:
        keys = norm(keys)
    return keys.transpose(1, 2)


def supported_model_types() -> tuple[str, ...]:
    """Every Hugging Face model_type we read: those wrapped here, then those a router family adapts
    (``Family.hf_model_types``, routers/family.py)."""
    from routers.family import hf_adapters

    return WRAPPED + tuple(hf_adapters())


def _wrap(model: nn.Module) -> nn.Module:
    model_type = model.config.model_type
    if model_type == "gpt2":
        return GPT2Router(model)
    if model_type in LLAMA_LIKE:
        return DecoderRouter(model)
    from routers.family import hf_adapters

    adapter = hf_adapters().get(model_type)
    if adapter is not None:
        return adapter.from_hf(model)
    raise UserError(f"unsupported Hugging Face model_type {model_type!r}; choose a checkpoint of "
                    f"{', '.join(supported_model_types())}")


def _local_only(name: str) -> bool:
    from datamodules.corpora import hub_reachable

    return Path(name).expanduser().is_dir() or not hub_reachable()


def load_hf(spec: str) -> tuple[nn.Module, str]:
    """(router in eval mode, fp32, returning the routing record; a display name) for ``hf:<name>[@rev]``."""
    from transformers import AutoConfig, AutoModelForCausalLM

    name, revision = parse_spec(spec)
    local_only = _local_only(name)
    where = f"{name}@{revision}" if revision else name
    try:
        config = AutoConfig.from_pretrained(name, revision=revision, local_files_only=local_only)
        kwargs = {"attn_implementation": "eager"} if config.model_type in EAGER else {}
        model = AutoModelForCausalLM.from_pretrained(name, revision=revision, local_files_only=local_only,
                                                     dtype=torch.float32, **kwargs)
    except (OSError, ValueError) as e:
        hint = "the Hub is unreachable and it is not in the local cache; " if local_only else ""
        raise UserError(f"cannot load {where} ({type(e).__name__}); {hint}download it online once, or pass "
                        f"model=hf:<local folder>") from None
    return _wrap(model.eval()).eval(), where


def load_hf_tokenizer(source: str):
    """The tokenizer of ``source``: ``hf:<model>[@rev]`` (the model's own; revisions share it) or, from
    ``tokenizer=``, a Hub name or a folder. A folder without tokenizer files is an error, not the
    two-token tokenizer transformers 5 builds from its config."""
    from datamodules.tokenizer import TextTokenizer, pretrained

    name = parse_spec(source)[0] if source.startswith("hf:") else source
    fix = ("pass tokenizer=<the Hub name of the base model, or a folder with its tokenizer files>, or probe=<probe.pt>")
    try:
        tokenizer = pretrained(name)
    except UserError:  # its message is about training's tokenizer.name; here it is analyze.py's tokenizer=
        why = ("the folder has no tokenizer files it can build one from" if Path(name).expanduser().is_dir() else
               "not in the local cache, and the Hub is unreachable")
        raise UserError(f"cannot load a tokenizer from {name} ({why}); {fix}") from None
    probe = tokenizer("The quick brown fox jumps over the lazy dog.", add_special_tokens=False)["input_ids"]
    if len(tokenizer) < 256 or not probe:
        raise UserError(f"the tokenizer in {name} is empty or degenerate ({len(tokenizer)} tokens; a sentence "
                        f"encodes to {len(probe)}): that folder has no tokenizer files; {fix}")
    return TextTokenizer(tokenizer, "hf-" + name.strip("/").replace("/", "--"))
