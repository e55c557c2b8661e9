"""Hugging Face checkpoints as routers: ``model=hf:<local dir or hub name>[@revision]`` -> the routing record.

Families (paper Table 1 and Section 5), each giving the same record as our own routers:

* GPT-2 (``gpt2``): post-softmax attention read from the forward pass (eager attention: SDPA silently
  returns no weights, PITFALLS.md), keys = the K slice of ``c_attn`` with its bias, recomputed from each
  block's input hidden state (``output_hidden_states``) rather than captured with hooks.
* GPT-NeoX / Pythia (``gpt_neox``): the weights copied into our ``routers.transformer.Transformer``
  (``from_hf``), whose explicit-softmax path gives attention and keys pre- and post-rotary.
* Mamba (``mamba``) and RWKV-4 (``rwkv``): through the reconstructed operators of ``routers.ssm`` and
  ``routers.rwkv`` (their ``from_hf`` copies the weights; we do not write the operators again).

Pythia's per-step revisions (``@step4000``) give a real pretraining trajectory. Offline, a name that is not
in the local cache fails with one line.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from common.errors import UserError
from routers.routing import Routing, RoutingLayer, causal_mask

FAMILIES = ("gpt2", "gpt_neox", "mamba", "rwkv")


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


class GPT2Router(nn.Module):
    """A ``GPT2LMHeadModel`` that returns our routing record; weights are not copied, the model is wrapped."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.context_length = model.config.n_positions

    def forward(self, tokens: Tensor, return_routing: bool = False):
        if tokens.shape[-1] > self.context_length:
            raise UserError(f"sequence length {tokens.shape[-1]} exceeds GPT-2's {self.context_length} positions; "
                            "use a shorter probe_length")
        out = self.model(tokens, output_attentions=return_routing, output_hidden_states=return_routing)
        if not return_routing:
            return out.logits
        blocks = self.model.transformer.h
        if len(out.attentions or ()) != len(blocks):
            raise UserError("GPT-2 returned no attention weights; load it with attn_implementation='eager'")
        B, T = tokens.shape
        n_head, d_model = self.model.config.n_head, self.model.config.n_embd
        layers = []
        for i, block in enumerate(blocks):
            # hidden_states[i] is block i's input; c_attn = [q | k | v] over d_model each, heads contiguous.
            keys = block.attn.c_attn(block.ln_1(out.hidden_states[i]))[..., d_model:2 * d_model]
            keys = keys.view(B, T, n_head, d_model // n_head).transpose(1, 2)
            layers.append(RoutingLayer(keys=keys, weights=out.attentions[i], mask=causal_mask(T, tokens.device),
                                       name=f"L{i}"))
        return out.logits, Routing(layers=layers, axis="token")


def _wrap(model: nn.Module) -> nn.Module:
    family = model.config.model_type
    if family == "gpt2":
        return GPT2Router(model)
    if family == "gpt_neox":
        from routers.transformer import Transformer

        return Transformer.from_hf(model)
    if family == "mamba":
        from routers.ssm import Mamba

        return Mamba.from_hf(model)
    if family == "rwkv":
        from routers.rwkv import RWKV

        return RWKV.from_hf(model)
    raise UserError(f"unsupported Hugging Face model_type {family!r}; choose a checkpoint of {', '.join(FAMILIES)}")


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
        kwargs = {"attn_implementation": "eager"} if config.model_type in ("gpt2", "gpt_neox") else {}
        model = AutoModelForCausalLM.from_pretrained(name, revision=revision, local_files_only=local_only,
                                                     dtype=torch.float32, **kwargs)
    except (OSError, ValueError) as e:
        hint = "the Hub is unreachable and it is not in the local cache; " if local_only else ""
        raise UserError(f"cannot load {where} ({type(e).__name__}); {hint}download it online once, or pass "
                        f"model=hf:<local folder>") from None
    return _wrap(model.eval()).eval(), where


def load_hf_tokenizer(spec: str):
    """The checkpoint's tokenizer (revisions of one model share it), for building a probe from a corpus."""
    from datamodules.tokenizer import TextTokenizer, pretrained

    name, _ = parse_spec(spec)
    try:
        tokenizer = pretrained(name)
    except UserError:  # its message is about training's tokenizer.name; here the model itself is missing
        raise UserError(f"cannot load model=hf:{name} (no tokenizer found for it); download the model online "
                        "once, or pass model=hf:<a local folder with its tokenizer files>") from None
    return TextTokenizer(tokenizer, "hf-" + name.strip("/").replace("/", "--"))
