"""Figures of the post-hoc analysis and the studies. Each function takes plain rows/arrays and returns a Figure."""
from __future__ import annotations

import math

import matplotlib

matplotlib.use("Agg")  # headless: clusters and CI
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from common.constants import ONSET_THRESHOLD, RANK  # noqa: E402
from records.figures import mark_threshold  # noqa: E402  (one rule for the threshold line, run and study figures)
from records import LayerRow, column, number  # noqa: E402


def _has(values: list[float]) -> bool:
    return any(not math.isnan(v) for v in values)


def write_in_panel(ax, text: str) -> None:
    """A panel with nothing to draw says why instead of showing empty axes."""
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, fontsize=9, color="dimgrey", wrap=True)
    ax.set_xticks([])
    ax.set_yticks([])


def figure_legend(fig: Figure, axes) -> None:
    """One legend for the figure, right of the panels, one entry per label across all panels."""
    entries: dict = {}
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            entries.setdefault(label, handle)
    if entries:
        fig.legend(list(entries.values()), list(entries), loc="outside right upper", fontsize=7, frameon=False)


def signature_figure(layers: list[LayerRow], rank: int = RANK, threshold: float = ONSET_THRESHOLD, title: str = "") -> Figure:
    """One model's signature by depth: max share (mean and per head) against the uniform baseline and the
    onset threshold; VE@rank pre/post-RoPE against the shuffle and Gaussian nulls; norm-CV against its
    Gaussian value; norm-CV vs max share per (layer, head), the pairs behind r_cv,sh."""
    fig, axes = plt.subplots(1, 4, figsize=(18, 3.8), layout="constrained")
    x = list(range(len(layers)))
    ax = axes[0]
    units = []
    for i, row in enumerate(layers):
        heads = row.max_share_units
        units += heads
        ax.scatter([i] * len(heads), heads, s=6, color="tab:blue", alpha=0.35, lw=0, label="per head" if i == 0 else None)
    shares = [row.max_share for row in layers]
    ax.plot(x, [row.baseline for row in layers], ":", color="grey", label="uniform (causal) baseline", zorder=1)
    ax.plot(x, shares, "o-", color="tab:blue", label="mean over heads", zorder=3)
    mark_threshold(ax, threshold, units + shares)
    ax.set(xlabel="layer index ℓ (0-based; depth = ℓ / L)", ylabel="max share")
    ax.set_title("concentration", loc="left")  # the right is kept for the threshold note
    ax = axes[1]
    ve = [row.ve(rank) for row in layers]
    shuffle = [v.shuffle for v in ve]
    if _has(shuffle):
        ax.plot(x, shuffle, "-.", color="black", label="shuffle null", zorder=5)  # on top: it often lies on the keys near 1
    ax.plot(x, [v.gauss for v in ve], "--", color="grey", label="Gaussian null", zorder=1)
    ax.plot(x, [v.ve for v in ve], "o-", label="real (pre-RoPE)", zorder=3)
    post = [v.post for v in ve]
    if _has(post):
        ax.plot(x, post, "s-", ms=3, label="real post-RoPE", zorder=3)
    ax.set(xlabel="layer index ℓ (0-based; depth = ℓ / L)", ylabel=f"VE@{rank}", ylim=(0, 1.03))  # headroom: curves at VE = 1 stay off the frame
    ax.set_title("key geometry", loc="left")
    ax = axes[2]
    ax.plot(x, [row.norm_cv_gauss for row in layers], "--", color="grey", label="Gaussian 1/sqrt(2d)", zorder=1)
    ax.plot(x, [row.norm_cv for row in layers], "o-", label="norm-CV", zorder=3)
    ax.set(xlabel="layer index ℓ (0-based; depth = ℓ / L)", ylabel="norm-CV")
    ax.set_title("norm stratification", loc="left")
    ax.set_ylim(bottom=0)
    ax = axes[3]
    cmap = plt.get_cmap("viridis")
    for i, row in enumerate(layers):
        cv, share = row.norm_cv_units, row.max_share_units
        if cv and len(share) % len(cv) == 0:
            repeat = len(share) // len(cv)
            ax.scatter([c for c in cv for _ in range(repeat)], share, s=10,
                       color=cmap(i / max(1, len(layers) - 1)), label=f"L{i}" if len(layers) <= 12 else None)
    ax.set(xlabel="norm-CV (layer, head)", ylabel="max share")
    ax.set_title("r(norm-CV, max share)", loc="left")
    for ax in axes:
        ax.legend(fontsize=6)
    for ax in axes[:3]:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if title:
        fig.suptitle(title, fontsize=9)
    return fig


SHARE_PANELS = ("peak_max_share", "max_share")  # panels of max shares: the onset threshold applies there


def curves_figure(series: list[dict], keys: list[tuple[str, str]], title: str = "", log_steps: bool = False,
                  nulls: dict | None = None, threshold: float | None = None, empty: dict | None = None,
                  references: dict | None = None) -> Figure:
    """Collapse over training: one panel per statistic, one line per series, one legend entry per label.

    ``series``: ``{"label" (None: a faint line outside the legend), "steps", "values": {key: [...]}, "color"?,
    "style"?, "alpha"?}``; ``keys``: (key, axis label). Under the data, per panel key, ``[(label, values key,
    line style)]``: ``references`` are drawn once, grey, from the first series (what every arm shares: the
    causal-uniform baseline, the Gaussian null); ``nulls`` by the first series of each label from its own
    values, in its colour (the shuffle null). ``threshold``: the onset threshold, on the max-share panel.
    ``empty``: per panel key, what to write when no series has a value there (e.g. "no onset").
    ``log_steps`` puts steps on a symlog axis, so a pretrained model's 143k steps and a CPU run's 2k sit side
    by side.
    """
    fig, axes = plt.subplots(1, len(keys), figsize=(4.4 * len(keys) + 1.6, 3.6), squeeze=False,
                             layout="constrained")
    for ax, (key, axis_label) in zip(axes[0], keys):
        ax.set(xlabel="training step", ylabel=axis_label)
        if log_steps:
            ax.set_xscale("symlog", linthresh=100)
        if not any(_has(s["values"][key]) for s in series):
            write_in_panel(ax, (empty or {}).get(key, "no data"))
            continue
        for ref_label, ref_key, style in (references or {}).get(key, []):
            ax.plot(series[0]["steps"], series[0]["values"][ref_key], style, lw=1, color="grey", label=ref_label,
                    zorder=1)
        drawn: set = set()
        for s in series:
            if s["label"] is not None and s["label"] not in drawn:
                drawn.add(s["label"])
                for null_label, null_key, style in (nulls or {}).get(key, []):
                    ax.plot(s["steps"], s["values"][null_key], style, lw=1, color=s.get("color", "grey"), zorder=1)
                    ax.plot([], [], style, lw=1, color="grey", label=null_label)  # one grey legend entry
            ax.plot(s["steps"], s["values"][key], s.get("style", "o-"), ms=3, color=s.get("color"),
                    label=s["label"] if s["label"] is not None else "_nolegend_", alpha=s.get("alpha", 1.0),
                    zorder=3 if s["label"] is not None else 2)
        if threshold is not None and key in SHARE_PANELS:
            mark_threshold(ax, threshold, [v for s in series for v in s["values"][key]])
    figure_legend(fig, axes[0])
    if title:
        fig.suptitle(title, fontsize=9)
    return fig


def arm_profiles_figure(arms: list[dict], panels: list[tuple[str, str]], references: dict | None = None,
                        title: str = "", threshold: float | None = None, nulls: dict | None = None) -> Figure:
    """Depth profiles per arm (mean across seeds with its t-interval band): one panel per statistic.

    ``arms``: ``{"label", "profiles": {key: (mean, low, high) lists per layer}}``; ``references``: per panel
    key, ``[(label, values per layer, line style)]`` drawn grey under the data (baseline, Gaussian nulls); ``nulls``: per
    panel key, ``[(label, profile key, line style)]`` each arm draws from its own profile in its colour (the
    shuffle null); ``threshold``: the onset threshold, on the max-share panel. Norm-CV panels start at 0, where
    their Gaussian value is read.
    """
    fig, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels) + 1.6, 3.6), squeeze=False,
                             layout="constrained")
    for ax, (key, axis_label) in zip(axes[0], panels):
        for ref_label, values, style in (references or {}).get(key, []):
            ax.plot([(i + 0.5) / len(values) for i in range(len(values))], [number(v) for v in values], style,
                    color="grey", label=ref_label, zorder=1)
        for i, arm in enumerate(arms):
            mean, low, high = arm["profiles"][key]
            depth = [(j + 0.5) / len(mean) for j in range(len(mean))]
            color = arm.get("color", f"C{i}")
            for null_label, null_key, style in (nulls or {}).get(key, []):
                ax.plot(depth, arm["profiles"][null_key][0], style, lw=1, color=color, zorder=1)
                ax.plot([], [], style, lw=1, color="grey", label=null_label)
            line, = ax.plot(depth, mean, "o-", ms=3, color=color, label=arm["label"], zorder=3)
            if _has(low):
                ax.fill_between(depth, low, high, color=line.get_color(), alpha=0.2, lw=0, zorder=2)
        if threshold is not None and key in SHARE_PANELS:
            mark_threshold(ax, threshold, [v for arm in arms for band in arm["profiles"][key] for v in band])
        if key.startswith("norm_cv"):
            ax.set_ylim(bottom=0)
        ax.set(xlabel="depth: layer ℓ drawn at (ℓ + ½) / L", ylabel=axis_label, xlim=(0, 1))
    figure_legend(fig, axes[0])
    if title:
        fig.suptitle(title, fontsize=9)
    return fig


def seed_direction_figure(profiles: dict[str, list[dict]], rank: int = RANK, title: str = "") -> Figure:
    """Appendix C.6's figure, with both angles: VE@rank of the two models of the weight-seed pair by depth
    (geometry), then the key-space and token-space canonical angles per reseed type, each beside its
    random-subspace null and the angle of an untrained pair on the same probe (direction)."""
    fig, axes = plt.subplots(1, 3, figsize=(15, 3.8))
    first = profiles.get("weight") or next(iter(profiles.values()))
    x = [row["layer"] for row in first]
    which = "weight" if "weight" in profiles else next(iter(profiles))
    axes[0].plot(x, column(first, f"ve@{rank}_a"), "o-", label=f"model A ({which} pair)")
    axes[0].plot(x, column(first, f"ve@{rank}_b"), "s--", label=f"model B ({which} pair)")
    axes[0].plot(x, column(first, f"ve@{rank}_gauss"), ":", color="grey", label="Gaussian null")
    axes[0].set(xlabel="layer index ℓ (0-based; depth = ℓ / L)", ylabel=f"VE@{rank}", ylim=(0, 1),
                title=f"geometry: |dVE@{rank}| (pair mean) <= {max(column(first, f'delta_ve@{rank}')):.3f}")
    for ax, key, name in ((axes[1], "key_angle", "key space (paper)"), (axes[2], "token_angle", "token space (basis-free)")):
        for kind, rows in profiles.items():
            ax.plot(x, column(rows, key), "o-", ms=3, label=f"{kind} reseed", zorder=3)
        null, untrained = column(first, f"{key}_null"), column(first, f"{key}_untrained")
        if _has(null):
            ax.plot(x, null, "--", color="grey", label="random-subspace null", zorder=1)
        if _has(untrained):
            ax.plot(x, untrained, ":", color="black", label="untrained pair, same probe", zorder=1)
        ax.set(xlabel="layer index ℓ (0-based; depth = ℓ / L)", ylabel="mean canonical angle (deg)", ylim=(0, 92),
               title=f"direction: {name}")
    for ax in axes:
        ax.legend(fontsize=6)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig
