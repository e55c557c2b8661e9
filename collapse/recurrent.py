"""Content vs recency in a recurrent router's routing (paper Section 5.3 and Fig. 6; docs/decisions.md: RWKV content vs recency).

Only late queries are used: every early source precedes all of them, so each source is equally exposed and
the routing it receives measures preference, not how many queries could see it. Across the early sources,
the routing received is correlated with the source's key norm (content) and with its position (recency).
"""
from __future__ import annotations

import torch
from torch import Tensor

from common.errors import UserError


def late_query_influence(late_rows: Tensor, late_start: int) -> Tensor:
    """Routing each early source s < late_start receives from the late queries, summed over them.

    ``late_rows`` are an operator's rows for the queries t >= late_start, ``[..., queries, sources]``;
    returns ``[..., late_start]``.
    """
    if late_rows.dim() < 2 or not 0 < late_start <= late_rows.shape[-1]:
        raise UserError(f"late_query_influence needs rows [..., queries, sources] and 0 < late_start <= sources; "
                        f"got shape {tuple(late_rows.shape)}, late_start={late_start}")
    return late_rows[..., :late_start].sum(-2)


def pearson_rows(x: Tensor, y: Tensor) -> Tensor:
    """Pearson r along the last axis, ``[..., n] x [..., n] -> [...]``; NaN where either side is constant."""
    x, y = x.double(), y.double()
    xc, yc = x - x.mean(-1, keepdim=True), y - y.mean(-1, keepdim=True)
    denominator = (xc.square().sum(-1) * yc.square().sum(-1)).sqrt()
    r = (xc * yc).sum(-1) / denominator
    return r.masked_fill(denominator == 0, float("nan"))


def content_recency(influence: Tensor, key_norm: Tensor) -> tuple[Tensor, Tensor]:
    """(content r, recency r) across sources: influence vs ``key_norm`` and vs the source position 0..n-1.

    influence, key_norm ``[..., n]`` (e.g. one row per sequence) -> two ``[...]`` tensors.
    """
    if influence.shape != key_norm.shape:
        raise UserError(f"influence {tuple(influence.shape)} and key_norm {tuple(key_norm.shape)} must match: "
                        "one value per early source")
    position = torch.arange(influence.shape[-1], device=influence.device).expand_as(influence)
    return pearson_rows(influence, key_norm), pearson_rows(influence, position)
