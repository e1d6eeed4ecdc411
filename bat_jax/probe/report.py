"""Drawing CGP's learned layer gates (PAPER.md §4) from probe workdirs; the reading and the tables are in
`bat_jax.probe.runs`, re-exported here so that `report` is the one module a notebook imports.

The workdir's files and their checks: `bat_jax.probe.runs`.

    run = read_run("runs/bat_esc50")              # ProbeRun, every file checked
    plot_gates(run.gates, run.per_layer)          # one panel per gated probe, bars over layers 1..L
    plot_compare([run_bat, run_eat], probe="cgp") # the same probe across runs (depth fraction if L differs)
    gate_table(runs)                              # tidy rows: run, encoder, task, probe, member, fold, ...
    save_gates_png(workdir)                       # DIR/gates.png, what the probe job writes

Figures are `matplotlib.figure.Figure` objects made without pyplot, so nothing here selects a backend
(notebooks keep theirs) and saving to a file needs none.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure  # no pyplot: no backend is selected; savefig uses Agg for PNG

from bat_jax.probe.runs import (  # noqa: F401  (re-exported: one namespace for notebooks)
    CONFIG_FILE,
    GATE_TOLERANCE,
    GATES_FILE,
    GATES_PNG,
    METRICS_FILE,
    PER_LAYER_FILE,
    GateRow,
    GateSummary,
    GateValue,
    ProbeRun,
    check_gate_vector,
    check_gates,
    check_per_layer,
    gate_depth,
    gate_summary,
    gate_table,
    markdown_table,
    mean_gates,
    read_gates,
    read_per_layer,
    read_run,
    run_labels,
    split_probe_key,
)

# --------------------------------------------------------------------------------------------- figures


def _new_figure(width: float, height: float) -> Figure:
    return Figure(figsize=(width, height), layout="constrained")


def _layer_ticks(depth: int) -> list[int]:
    step = max(1, math.ceil(depth / 12))
    return list(range(1, depth + 1, step))


def _draw_gate_panel(ax, key: str, value: GateValue, per_layer: Mapping[str, Any] | None) -> None:
    mean, std = mean_gates(value)
    depth = mean.shape[0]
    layers = np.arange(1, depth + 1)
    folds = len(value) if isinstance(value, Mapping) else 0
    label = f"gate (mean ± std, {folds} folds)" if folds else "gate"
    ax.bar(layers, mean, yerr=std if folds else None, capsize=2 if folds else 0, color="C0", label=label)
    ax.axhline(1.0 / depth, color="0.5", linestyle="--", linewidth=0.8, label=f"uniform 1/L = 1/{depth}")
    ax.set_xlabel("layer")
    ax.set_ylabel("gate weight")
    ax.set_xticks(_layer_ticks(depth))
    ax.set_xlim(0.4, depth + 0.6)
    ax.set_title(key)
    handles, labels = ax.get_legend_handles_labels()
    if per_layer is not None:
        twin = ax.twinx()
        values = np.asarray(per_layer["values"], np.float64)
        metric = f"per-layer linear probe {per_layer['metric']}"
        twin.plot(layers, values, color="C3", marker="o", markersize=3, label=metric)
        twin.set_ylabel(metric, color="C3")
        twin.tick_params(axis="y", colors="C3")
        more_handles, more_labels = twin.get_legend_handles_labels()
        handles, labels = handles + more_handles, labels + more_labels
    ax.legend(handles, labels, fontsize="x-small", loc="upper left")


def plot_gates(
    gates: Mapping[str, Any],
    per_layer: Mapping[str, Any] | None = None,
    path: str | Path | None = None,
    title: str | None = None,
) -> Figure:
    """A matplotlib Figure with one panel per gated probe (gates.json's content): bars of the gate weight
    over layers 1..L (fold mean with std error bars when the probe has folds) and the uniform 1/L line;
    with `per_layer` (per_layer_lp.json's content) its curve on a twin y-axis in every panel. Saved to
    `path` when given (format from the suffix, e.g. .png). The figure's first len(gates) axes are the
    panels, in gates' order; the twin axes follow."""
    gates = check_gates(gates, "plot_gates: gates")
    if not gates:
        raise ValueError("plot_gates: expected at least one gated probe in gates, found none")
    if per_layer is not None:
        per_layer = check_per_layer(per_layer, "plot_gates: per_layer")
        depth = gate_depth(next(iter(gates.values())))
        if len(per_layer["values"]) != depth:
            raise ValueError(
                f"plot_gates: expected per_layer values for the {depth} gated layers, "
                f"found {len(per_layer['values'])} values"
            )
    ncols = min(len(gates), 3)
    nrows = math.ceil(len(gates) / ncols)
    fig = _new_figure(4.6 * ncols, 3.4 * nrows)
    panels = [fig.add_subplot(nrows, ncols, i + 1) for i in range(len(gates))]
    for ax, (key, value) in zip(panels, gates.items(), strict=True):
        _draw_gate_panel(ax, key, value, per_layer)
    if title:
        fig.suptitle(title)
    if path is not None:
        fig.savefig(path, dpi=120)
    return fig


def plot_compare(
    runs: Sequence[ProbeRun], probe: str = "cgp", path: str | Path | None = None, title: str | None = None
) -> Figure:
    """A matplotlib Figure comparing one probe key's gates (e.g. "cgp", "cgp@lr=0.001,seed=0") across
    runs (encoders, tasks): grouped bars over layers 1..L when all runs have the same depth; when depths
    differ, lines over the depth fraction l / L of weight * L (so that each curve integrates to 1 over the
    depth and a uniform gate is 1 everywhere), as the axis labels say. Fold means with std error bars."""
    if not runs:
        raise ValueError("plot_compare: expected at least one ProbeRun, found none")
    missing = [f"{r.workdir} (has {sorted(r.gates)})" for r in runs if probe not in r.gates]
    if missing:
        raise ValueError(
            f"plot_compare: expected the probe {probe!r} in every run's gates.json, missing in {missing}"
        )
    labels = run_labels(runs)
    stats = [mean_gates(r.gates[probe]) for r in runs]
    depths = sorted({m.shape[0] for m, _ in stats})
    fig_width = 7.0 if len(depths) > 1 else min(12.0, max(6.0, 0.3 * depths[0] * min(len(runs), 4) + 2.0))
    fig = _new_figure(fig_width, 3.8)
    ax = fig.add_subplot()
    if len(depths) == 1:
        depth, bar_width = depths[0], 0.8 / len(runs)
        layers = np.arange(1, depth + 1)
        for i, (label, (mean, std)) in enumerate(zip(labels, stats, strict=True)):
            has_folds = isinstance(runs[i].gates[probe], Mapping)
            offset = (i - (len(runs) - 1) / 2) * bar_width
            ax.bar(layers + offset, mean, bar_width, yerr=std if has_folds else None, capsize=2, label=label)
        ax.axhline(1.0 / depth, color="0.5", linestyle="--", linewidth=0.8, label=f"uniform 1/{depth}")
        ax.set_xlabel("layer")
        ax.set_ylabel("gate weight")
        ax.set_xticks(_layer_ticks(depth))
    else:
        for i, (label, (mean, std)) in enumerate(zip(labels, stats, strict=True)):
            depth = mean.shape[0]
            x = np.arange(1, depth + 1) / depth
            has_folds = isinstance(runs[i].gates[probe], Mapping)
            yerr = std * depth if has_folds else None
            ax.errorbar(
                x, mean * depth, yerr=yerr, marker="o", markersize=3, capsize=2, label=f"{label} (L={depth})"
            )
        ax.axhline(1.0, color="0.5", linestyle="--", linewidth=0.8, label="uniform")
        ax.set_xlabel(f"depth fraction l / L (runs differ in depth: L = {', '.join(map(str, depths))})")
        ax.set_ylabel("gate weight × L (1 = uniform)")
        ax.set_xlim(0.0, 1.05)
    ax.set_title(title or f"{probe}: gates across runs")
    ax.legend(fontsize="x-small")
    if path is not None:
        fig.savefig(path, dpi=120)
    return fig


def save_gates_png(workdir: str | Path) -> Path | None:
    """Write DIR/gates.png (`plot_gates` of DIR/gates.json, with DIR/per_layer_lp.json's curve when that
    file exists) and return its path; None, writing nothing, when gates.json lists no gated probe."""
    workdir = Path(workdir)
    if not workdir.is_dir():
        raise FileNotFoundError(f"save_gates_png: expected a probe workdir, found no folder at {workdir}")
    gates = read_gates(workdir / GATES_FILE)
    if not gates:
        return None
    per_layer = read_per_layer(workdir / PER_LAYER_FILE)
    title = f"layer gates: {workdir.name}"
    out = workdir / GATES_PNG
    plot_gates(gates, per_layer, path=out, title=title)
    return out
