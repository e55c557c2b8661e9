"""Records as text: one progress line per measurement, and the end-of-training table."""
from __future__ import annotations

import math

from records.record import Record, Summary


def progress_line(record: Record) -> str:
    """One line per measurement, readable in a redirected log: step, losses, peak concentration, onset."""
    s = record.summary

    def num(value, digits=3):
        return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"

    peak = "-" if s.peak_layer is None else (
        f"{num(s.peak_max_share)} at L{s.peak_layer}"
        + ("" if s.peak_sink_source is None else f" (source {s.peak_sink_source})"))
    onset = "never" if s.onset_layer is None else f"L{s.onset_layer}"
    return (f"collapse step {record.step}: train loss {num(record.train_loss)}, val loss "
            f"{num(record.val_loss)}, peak max share {peak}, onset {onset}"
            + ("" if s.onset_step is None else f" (first at step {s.onset_step})")
            + ("" if s.solved_step is None else f", solved at step {s.solved_step}")
            + f" [{record.seconds:.1f}s" + (f", probe {n}" if (n := record.probe_sequences) else "") + "]")


def _fmt(value, width: int = 6) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-".rjust(width)
    return f"{value:.3f}".rjust(width)


def _layer_label(layer: int | None) -> str:
    return "never" if layer is None else f"L{layer}"


def _peak_where(summary: Summary) -> str:
    where = _layer_label(summary.peak_layer)
    if summary.peak_sink_source is not None:
        where += f", sink at source {summary.peak_sink_source} in {100 * summary.peak_sink_fraction:.0f}% of heads x sequences"
    return where


def training_table(first: Record, last: Record) -> str:
    """Per layer: norm-CV, VE with its Gaussian and shuffle nulls, mean max share — each at the first and
    the last measured step — then onset and peak concentration."""
    a, b = first.step, last.step
    key, ve = first.layers[0].geometry()
    header = (f"{'layer':>5} | {'norm-CV':^15} | {ve:^15} | {'gauss':>6} | {'shuffle':^15} | {'max share':^15}\n"
              f"{'':>5} | {f'{a} -> {b}':^15} | {f'{a} -> {b}':^15} | {'':>6} | {f'{a} -> {b}':^15} | {f'{a} -> {b}':^15}")
    probes = [r.probe_sequences for r in (first, last)]
    measured = f" (probe of {probes[0]} -> {probes[1]} sequences)" if all(probes) and probes[0] != probes[1] else ""
    lines = [f"collapse signature, step {a} -> step {b}{measured}", header, "-" * len(header.splitlines()[0])]
    for i, (r0, r1) in enumerate(zip(first.layers, last.layers)):
        v0, v1 = r0.ve(key), r1.ve(key)
        lines.append(
            f"{'L' + str(i):>5} | {_fmt(r0.norm_cv)} -> {_fmt(r1.norm_cv)} | "
            f"{_fmt(v0.ve)} -> {_fmt(v1.ve)} | {_fmt(v1.gauss)} | "
            f"{_fmt(v0.shuffle)} -> {_fmt(v1.shuffle)} | "
            f"{_fmt(r0.max_share)} -> {_fmt(r1.max_share)}")
    s0, s1 = first.summary, last.summary
    lines.append("")
    threshold = s1.get("onset_threshold", 0.2)  # as stored: its digits are the run's own
    lines.append(f"onset layer (mean max share > {threshold}): "
                 f"{_layer_label(s0.onset_layer)} -> {_layer_label(s1.onset_layer)}")
    if s1.onset_step is not None:
        lines.append(f"first measured step past onset: {s1.onset_step}")
    lines.append(f"peak max share: {_fmt(s0.peak_max_share, 0)} ({_peak_where(s0)}) -> "
                 f"{_fmt(s1.peak_max_share, 0)} ({_peak_where(s1)})")
    return "\n".join(lines)
