"""Figures drawn from the monitor's records (``collapse.jsonl`` lines): depth profiles over training."""
from __future__ import annotations

import math

import matplotlib

matplotlib.use("Agg")  # headless: runs on clusters and CI
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402


def _column(layers: list[dict], key: str) -> list[float]:
    return [float("nan") if row.get(key) is None else row[key] for row in layers]


def depth_profile_figure(records: list[dict], rank: int = 8, threshold: float = 0.2, title: str = "") -> Figure:
    """Max share and VE@rank per layer, one line per measured step (dark = early, bright = late),
    with the causal-uniform baseline, the onset threshold and the Gaussian / shuffle nulls."""
    fig, (ax_share, ax_ve) = plt.subplots(1, 2, figsize=(11, 4.2))
    cmap = plt.get_cmap("viridis")
    for i, record in enumerate(records):
        layers = record["layers"]
        color = cmap(i / max(1, len(records) - 1))
        x = list(range(len(layers)))
        ax_share.plot(x, _column(layers, "max_share"), marker="o", ms=3, color=color, label=f"step {record['step']}")
        ax_ve.plot(x, _column(layers, f"ve@{rank}"), marker="o", ms=3, color=color)
    last = records[-1]["layers"]
    x = list(range(len(last)))
    baseline = _column(last, "baseline")
    if not all(math.isnan(b) for b in baseline):
        ax_share.plot(x, baseline, ls=":", color="grey", label="uniform baseline")
    ax_share.axhline(threshold, ls="--", color="crimson", lw=1, label=f"onset threshold {threshold}")
    ax_ve.plot(x, _column(last, f"ve@{rank}_gauss"), ls="--", color="grey", label="Gaussian null")
    shuffle = _column(last, f"ve@{rank}_shuffle")
    if not all(math.isnan(v) for v in shuffle):
        ax_ve.plot(x, shuffle, ls="-.", color="black", label="shuffle null (last step)")
    ax_share.set(xlabel="layer", ylabel="mean max share", title="concentration")
    ax_ve.set(xlabel="layer", ylabel=f"VE@{rank}", title="key geometry", ylim=(0, 1))
    ax_share.legend(fontsize=7, ncol=2)
    ax_ve.legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig
