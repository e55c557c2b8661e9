"""Figures drawn from the monitor's records (``collapse.jsonl`` lines): depth profiles over training."""
from __future__ import annotations

import math

import matplotlib

matplotlib.use("Agg")  # headless: runs on clusters and CI
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from analysis.figures import mark_threshold  # noqa: E402

LABELLED_STEPS = 8  # legend entries for the measured steps; the colour order carries the rest


def _column(layers: list[dict], key: str) -> list[float]:
    return [float("nan") if row.get(key) is None else row[key] for row in layers]


def depth_profile_figure(records: list[dict], rank: int = 8, threshold: float = 0.2, title: str = "") -> Figure:
    """Max share and VE@rank per layer, one line per measured step (dark = early, bright = late, the last
    one bold and above the reference lines), with the causal-uniform baseline, the onset threshold (a note
    when it lies far above the data) and the Gaussian / shuffle nulls."""
    fig, (ax_share, ax_ve) = plt.subplots(1, 2, figsize=(11, 4.2), layout="constrained")
    cmap = plt.get_cmap("viridis")
    n = len(records)
    spacing = max(1.0, (n - 1) / (LABELLED_STEPS - 1))
    labelled = {round(i * spacing) for i in range(LABELLED_STEPS)} | {n - 1}
    shares = []
    for i, record in enumerate(records):
        layers = record["layers"]
        last = i == n - 1
        style = {"marker": "o", "ms": 3, "color": cmap(i / max(1, n - 1)), "lw": 2.2 if last else 1.2,
                 "zorder": 3 + i / n}
        x = list(range(len(layers)))
        shares += _column(layers, "max_share")
        ax_share.plot(x, _column(layers, "max_share"), label=f"step {record['step']}" if i in labelled else None,
                      **style)
        ax_ve.plot(x, _column(layers, f"ve@{rank}"), **style)
    last = records[-1]["layers"]
    x = list(range(len(last)))
    baseline = _column(last, "baseline")
    if not all(math.isnan(b) for b in baseline):
        ax_share.plot(x, baseline, ls=":", color="grey", label="uniform baseline", zorder=1)
    mark_threshold(ax_share, threshold, shares)
    ax_ve.plot(x, _column(last, f"ve@{rank}_gauss"), ls="--", color="grey", label="Gaussian null", zorder=1)
    shuffle = _column(last, f"ve@{rank}_shuffle")
    if not all(math.isnan(v) for v in shuffle):
        ax_ve.plot(x, shuffle, ls="-.", color="black", lw=1, label="shuffle null (last step)", zorder=2)
    ax_share.set(xlabel="layer", ylabel="mean max share")
    ax_share.set_title("concentration", loc="left")  # the right is kept for the threshold note
    ax_ve.set(xlabel="layer", ylabel=f"VE@{rank}", ylim=(0, 1))
    ax_ve.set_title("key geometry", loc="left")
    for ax in (ax_share, ax_ve):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax_share.legend(fontsize=7, ncol=2)
    ax_ve.legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=9)
    return fig
