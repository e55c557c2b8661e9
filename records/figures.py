"""The two figures of a run's records: the depth profile over training and the layer x step heatmap of max
share. Matplotlib is imported inside the functions, so importing ``records`` does not load it."""
from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING

from common import atomic
from records.files import HEATMAP_PNG, PROFILE_PNG
from records.record import Record
from common.constants import ONSET_THRESHOLD, RANK

if TYPE_CHECKING:
    from matplotlib.figure import Figure

LABELLED_STEPS = 8  # legend entries for the measured steps; the colour order carries the rest
HEATMAP_COLUMNS = 4  # panels per row of the heatmap figure


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # headless: runs on clusters and CI
    import matplotlib.pyplot as plt

    return plt


def _top(values) -> float:
    return max((v for v in values if not math.isnan(v)), default=0.0)


def mark_threshold(ax, threshold: float, values) -> None:
    """The onset threshold as a line when it lies near the data, else as a note in the corner: a line at
    0.2 over max shares of 0.03-0.07 would flatten the data against the bottom of the panel."""
    if threshold <= 1.3 * _top(values):
        ax.axhline(threshold, ls="--", lw=1, color="crimson", label=f"onset threshold {threshold}", zorder=1)
    else:  # above the panel, where it hides no data
        ax.set_title(f"onset threshold {threshold}: off scale", loc="right", fontsize=7, color="crimson")


def depth_profile_figure(records: list[Record], rank: int = RANK, threshold: float = ONSET_THRESHOLD, title: str = "") -> Figure:
    """Max share and VE@rank per layer, one line per measured step (dark = early, bright = late, the last
    one bold and above the reference lines), with the causal-uniform baseline, the onset threshold (a note
    when it lies far above the data) and the Gaussian / shuffle nulls."""
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator

    fig, (ax_share, ax_ve) = plt.subplots(1, 2, figsize=(11, 4.2), layout="constrained")
    cmap = plt.get_cmap("viridis")
    n = len(records)
    spacing = max(1.0, (n - 1) / (LABELLED_STEPS - 1))
    labelled = {round(i * spacing) for i in range(LABELLED_STEPS)} | {n - 1}
    shares = []
    most = max((r.probe_sequences or 0 for r in records), default=0)
    for i, record in enumerate(records):
        layers = record.layers
        last = i == n - 1
        style = {"marker": "o", "ms": 3, "color": cmap(i / max(1, n - 1)), "lw": 2.2 if last else 1.2,
                 "zorder": 3 + i / n}
        x = list(range(len(layers)))
        curve = [layer.max_share for layer in layers]
        shares += curve
        live = (record.probe_sequences or most) < most  # the monitor's live probe (callbacks/collapse_monitor.py)
        label = f"step {record.step}" + (f" ({record.probe_sequences} seq)" if live else "")
        ax_share.plot(x, curve, label=label if i in labelled else None, **style)
        ax_ve.plot(x, [layer.ve(rank).ve for layer in layers], **style)
    last = records[-1].layers
    x = list(range(len(last)))
    baseline = [layer.baseline for layer in last]
    if not all(math.isnan(b) for b in baseline):
        ax_share.plot(x, baseline, ls=":", color="grey", label="uniform baseline", zorder=1)
    mark_threshold(ax_share, threshold, shares)
    ax_ve.plot(x, [layer.ve(rank).gauss for layer in last], ls="--", color="grey", label="Gaussian null", zorder=1)
    shuffle = [layer.ve(rank).shuffle for layer in last]
    if not all(math.isnan(v) for v in shuffle):
        # on top: the trained keys often sit on it near VE = 1, where drawn below it would vanish
        ax_ve.plot(x, shuffle, ls="-.", color="black", lw=1.2, label="shuffle null (last step)", zorder=10)
    ax_share.set(xlabel="layer index ℓ (0-based; depth = ℓ / L)", ylabel="mean max share")
    ax_share.set_title("concentration", loc="left")  # the right is kept for the threshold note
    ax_ve.set(xlabel="layer index ℓ (0-based; depth = ℓ / L)", ylabel=f"VE@{rank}", ylim=(0, 1.03))  # headroom: curves at VE = 1 stay off the frame
    ax_ve.set_title("key geometry", loc="left")
    for ax in (ax_share, ax_ve):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax_share.legend(fontsize=7, ncol=2)
    ax_ve.legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=9)
    return fig


def max_share_heatmaps(panels: list[tuple[str, list[Record]]], threshold: float = ONSET_THRESHOLD, title: str = "") -> Figure:
    """Collapse as it forms: per run, mean max share by layer (rows) and measured step (columns), on one
    colour scale shared by the panels and set by the data (it reaches the threshold only when the data come
    near it); cells past the onset threshold are outlined, the step of first onset is marked.
    ``panels``: (label, monitor records in step order)."""
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator

    grids = [[r.max_share_curve() for r in records] for _, records in panels]
    finite = [v for grid in grids for col in grid for v in col if not math.isnan(v)]
    low, top = min(finite, default=0.0), _top(finite)
    if threshold <= 1.3 * top:
        top = max(top, threshold)
    cols = min(HEATMAP_COLUMNS, len(panels))
    rows = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols + 1.2, 3.0 * rows + 0.4), squeeze=False,
                             layout="constrained")
    for ax in axes.flat[len(panels):]:
        ax.set_axis_off()
    for ax, (label, records), grid in zip(axes.flat, panels, grids):
        steps = [r.step for r in records]
        values = [[col[i] for col in grid] for i in range(len(grid[0]))]  # layers x steps
        image = ax.imshow(values, aspect="auto", origin="lower", cmap="magma", vmin=low, vmax=top,
                          interpolation="nearest")
        for layer, row in enumerate(values):
            for j, value in enumerate(row):
                if value > threshold:
                    ax.add_patch(plt.Rectangle((j - 0.5, layer - 0.5), 1, 1, fill=False, ec="cyan", lw=1))
        onset = next((j for j, col in enumerate(grid) if any(v > threshold for v in col)), None)
        where = "no onset" if onset is None else f"onset first at step {steps[onset]}"
        ax.set_title(f"{label}\n{where}", fontsize=8)
        ticks = list(range(0, len(steps), max(1, math.ceil(len(steps) / 5))))  # at most 5 labels: no overprint
        ax.set_xticks(ticks, [str(steps[j]) for j in ticks])
        ax.set(xlabel="training step", ylabel="layer")
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    scale = f"cyan: > {threshold}" if top >= threshold else f"threshold {threshold}: off scale"
    fig.colorbar(image, ax=list(axes.flat), label=f"mean max share\n({scale})")
    if title:
        fig.suptitle(title, fontsize=9)
    return fig


def save_run_figures(run_dir: str | Path, records: list[Record], threshold: float, title: str) -> dict[str, Path]:
    """Draw both figures of one run's records into its directory (atomically); returns {file name: path}."""
    plt = _pyplot()
    run_dir = Path(run_dir)
    figures = {PROFILE_PNG: depth_profile_figure(records, threshold=threshold, title=title),
               HEATMAP_PNG: max_share_heatmaps([(title, records)], threshold)}
    paths = {}
    for filename, figure in figures.items():
        paths[filename] = atomic.save_figure(figure, run_dir / filename, dpi=120)
        plt.close(figure)
    return paths
