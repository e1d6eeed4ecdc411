"""Reading a probe job's workdir: its files checked, the gates as tables (PAPER.md §4); the figures are in
`bat_jax.probe.report`, which re-exports every name here.

A probe workdir (`bat-jax probe --workdir DIR`) holds:
  metrics.json        {"<probe>": {"test": {...}, "best_validation": {...}}}, with K folds
                      {"<probe>": {"folds": {"<fold>": {...}}, "test": {<means and stds>}}}
  gates.json          {"<probe>": [w_1, ..., w_L] or {"<fold>": [w_1, ..., w_L], ...}} for the gated probes
                      (cgp*, lcgp): the convex gate alpha = softmax(a), one weight per encoder block
  per_layer_lp.json   optional: {"metric": "map" | "accuracy", "values": [v_1, ..., v_L]}, a linear probe
                      on each block's CLS token alone (the paper's Figure 4 view)
  config.json         optional here: the probe config (encoder.path, data.root, probes, task, ...)
Sweep members are separate probe keys "<probe>@<member>", e.g. "cgp@lr=0.0003,seed=1".

    run = read_run("runs/bat_esc50")              # ProbeRun, every file checked
    gate_table(runs)                              # tidy rows: run, encoder, task, probe, member, fold, ...
    markdown_table(gate_summary(runs))            # one row per gated probe: peak layer, entropy, ...
"""

from __future__ import annotations

import json
import math
import reprlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

GATE_TOLERANCE = 1e-4  # |sum(w) - 1| allowed for a gate vector written as float32 softmax output
METRICS_FILE = "metrics.json"
GATES_FILE = "gates.json"
PER_LAYER_FILE = "per_layer_lp.json"
CONFIG_FILE = "config.json"
GATES_PNG = "gates.png"

GateValue = list[float] | dict[str, list[float]]  # one probe's gates: one vector, or one per fold


@dataclass(frozen=True)
class ProbeRun:
    """One probe workdir, read and checked by `read_run`.

    gates: probe key -> [w_1..w_L] or {fold: [w_1..w_L]} (floats, each vector sums to 1).
    per_layer: {"metric": str, "values": [float (NaN for null), ...]} or None without per_layer_lp.json.
    config: the probe config dict, or None without config.json. label: a name for tables and legends
    (default: the workdir's folder name)."""

    workdir: Path
    metrics: dict[str, Any]
    gates: dict[str, GateValue]
    per_layer: dict[str, Any] | None
    config: dict[str, Any] | None
    label: str = ""

    @property
    def depth(self) -> int | None:
        """L, the number of encoder blocks the gates weigh (None when gates.json lists no gated probe)."""
        return next((gate_depth(v) for v in self.gates.values()), None)

    @property
    def encoder(self) -> str | None:
        """The encoder checkpoint's name (last part of config encoder.path), or None without one."""
        path = _config_get(self.config, "encoder", "path")
        if not path:
            return None
        return Path(str(path).rstrip("/")).name or str(path)

    @property
    def task(self) -> str | None:
        task = _config_get(self.config, "task")
        return None if task is None else str(task)


def _config_get(config: Mapping[str, Any] | None, *keys: str) -> Any:
    value: Any = config
    for key in keys:
        if not isinstance(value, Mapping) or key not in value:
            return None
        value = value[key]
    return value


# --------------------------------------------------------------------------------------------- reading


def _read_json(path: Path) -> Any:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: expected a JSON file written by the probe job, found no such file")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: expected valid UTF-8 JSON, found undecodable content ({err})") from None


def _read_object(path: Path) -> dict[str, Any]:
    data = _read_json(path)
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object at the top level, found {type(data).__name__}")
    return data


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def check_gate_vector(value: Any, where: str) -> list[float]:
    """value as a list of floats, after checking it is a non-empty list of finite numbers >= 0 summing to 1
    within GATE_TOLERANCE; `where` names the file and key in the error."""
    if not isinstance(value, list) or not value:
        raise ValueError(f"{where}: expected a non-empty list of gate weights, found {reprlib.repr(value)}")
    bad = [(i, v) for i, v in enumerate(value) if not _is_number(v) or not math.isfinite(v)]
    if bad:
        i, v = bad[0]
        raise ValueError(f"{where}: expected finite numbers as gate weights, found {v!r} at index {i}")
    weights = [float(v) for v in value]
    if min(weights) < 0.0:
        raise ValueError(f"{where}: expected gate weights >= 0 (a softmax), found min {min(weights)!r}")
    total = math.fsum(weights)
    if abs(total - 1.0) > GATE_TOLERANCE:
        raise ValueError(
            f"{where}: expected gate weights summing to 1 within {GATE_TOLERANCE:g} (a softmax), "
            f"found sum {total!r}"
        )
    return weights


def check_gates(gates: Any, where: str = "gates") -> dict[str, GateValue]:
    """The gates mapping (gates.json's content) with every vector checked (`check_gate_vector`), the folds
    of a probe of one depth, and every probe of the same depth (one encoder); `where` names the source."""
    if not isinstance(gates, Mapping):
        raise ValueError(
            f"{where}: expected an object of probe -> gate weights, found {type(gates).__name__}"
        )
    out: dict[str, GateValue] = {}
    depths: dict[str, int] = {}
    for probe, value in gates.items():
        if isinstance(value, Mapping):
            if not value:
                raise ValueError(f"{where} [{probe!r}]: expected fold -> gate weights, found an empty object")
            folds = {str(k): check_gate_vector(v, f"{where} [{probe!r}][{k!r}]") for k, v in value.items()}
            fold_depths = {k: len(v) for k, v in folds.items()}
            if len(set(fold_depths.values())) > 1:
                raise ValueError(
                    f"{where} [{probe!r}]: expected the same number of layers in every fold, "
                    f"found {fold_depths}"
                )
            out[str(probe)] = folds
        else:
            out[str(probe)] = check_gate_vector(value, f"{where} [{probe!r}]")
        depths[str(probe)] = gate_depth(out[str(probe)])
    if len(set(depths.values())) > 1:
        raise ValueError(
            f"{where}: expected every gated probe to weigh the same encoder blocks (one depth L), "
            f"found layers per probe {depths}"
        )
    return out


def check_per_layer(data: Any, where: str = "per_layer") -> dict[str, Any]:
    """per_layer_lp.json's content checked: {"metric": str, "values": [number or null, ...]} with nulls
    read as NaN; returns {"metric": str, "values": [float, ...]}."""
    if not isinstance(data, Mapping):
        raise ValueError(
            f"{where}: expected an object with 'metric' and 'values', found {type(data).__name__}"
        )
    metric, values = data.get("metric"), data.get("values")
    if not isinstance(metric, str) or not metric:
        raise ValueError(
            f"{where}: expected 'metric' to be a name such as 'map' or 'accuracy', "
            f"found {reprlib.repr(metric)}"
        )
    if not isinstance(values, list) or not values:
        raise ValueError(
            f"{where}: expected 'values' to be a non-empty list (one per layer), found {reprlib.repr(values)}"
        )
    bad = [(i, v) for i, v in enumerate(values) if v is not None and not _is_number(v)]
    if bad:
        raise ValueError(
            f"{where}: expected numbers or null in 'values', found {bad[0][1]!r} at index {bad[0][0]}"
        )
    return {"metric": metric, "values": [math.nan if v is None else float(v) for v in values]}


def read_gates(path: str | Path) -> dict[str, GateValue]:
    """gates.json (a file, or the workdir holding it) read and checked (`check_gates`)."""
    path = Path(path)
    path = path / GATES_FILE if path.is_dir() else path
    return check_gates(_read_json(path), str(path))


def read_per_layer(path: str | Path) -> dict[str, Any] | None:
    """per_layer_lp.json (a file, or the workdir holding it) read and checked; None when it does not exist
    (the job writes it only with the per_layer_lp option)."""
    path = Path(path)
    path = path / PER_LAYER_FILE if path.is_dir() else path
    return check_per_layer(_read_json(path), str(path)) if path.is_file() else None


def read_run(workdir: str | Path, label: str | None = None) -> ProbeRun:
    """A probe workdir read and checked: metrics.json and gates.json required, per_layer_lp.json and
    config.json optional; per_layer_lp.json must have one value per gated layer."""
    workdir = Path(workdir)
    if not workdir.is_dir():
        what = "a file" if workdir.exists() else "nothing"
        raise FileNotFoundError(
            f"{workdir}: expected a probe workdir (bat-jax probe --workdir), found {what}"
        )
    metrics = _read_object(workdir / METRICS_FILE)
    gates = read_gates(workdir / GATES_FILE)
    per_layer = read_per_layer(workdir / PER_LAYER_FILE)
    config = _read_object(workdir / CONFIG_FILE) if (workdir / CONFIG_FILE).exists() else None
    run = ProbeRun(workdir, metrics, gates, per_layer, config, label or workdir.name)
    if per_layer is not None and run.depth is not None and len(per_layer["values"]) != run.depth:
        raise ValueError(
            f"{workdir / PER_LAYER_FILE}: expected {run.depth} values (one per layer, as in {GATES_FILE}), "
            f"found {len(per_layer['values'])}"
        )
    return run


# ---------------------------------------------------------------------------------------------- tables


def gate_depth(value: GateValue) -> int:
    """L of one probe's gates (a vector, or fold -> vector)."""
    return len(next(iter(value.values()))) if isinstance(value, Mapping) else len(value)


def mean_gates(value: GateValue, ddof: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(mean, std), float64 [L] each, of one probe's gates over its folds (np.std with `ddof`, the
    population std by default); a single vector gives itself and zeros."""
    if isinstance(value, Mapping):
        if not value:
            raise ValueError("mean_gates: expected fold -> gate weights, found an empty mapping")
        stack = np.asarray(list(value.values()), np.float64)
        if stack.ndim != 2:
            raise ValueError(f"mean_gates: expected folds with one number of layers each, found {value!r}")
        std = stack.std(axis=0, ddof=ddof) if stack.shape[0] > ddof else np.full(stack.shape[1], np.nan)
        return stack.mean(axis=0), std
    vector = np.asarray(value, np.float64)
    if vector.ndim != 1:
        raise ValueError(f"mean_gates: expected a list of gate weights, found {value!r}")
    return vector, np.zeros_like(vector)


def split_probe_key(key: str) -> tuple[str, str | None]:
    """ "cgp@lr=0.0003,seed=1" -> ("cgp", "lr=0.0003,seed=1"); "cgp" -> ("cgp", None)."""
    probe, sep, member = key.partition("@")
    return probe, (member if sep else None)


def run_labels(runs: Sequence[ProbeRun]) -> list[str]:
    """The runs' labels made distinct: a label shared by several runs becomes the shortest tail of the
    workdir paths ("bat/esc50", "eat/esc50") that tells those runs apart."""
    labels = [r.label for r in runs]
    for label in {x for x in labels if labels.count(x) > 1}:
        idx = [i for i, x in enumerate(labels) if x == label]
        parts = [Path(runs[i].workdir).resolve().parts for i in idx]
        for k in range(2, max(len(p) for p in parts) + 1):
            tails = ["/".join(p[-k:]) for p in parts]
            if len(set(tails)) == len(tails):
                break
        else:
            tails = [f"{label} #{n}" for n in range(1, len(idx) + 1)]  # the same workdir read twice
        for i, tail in zip(idx, tails, strict=True):
            labels[i] = tail
    return labels


class GateRow(NamedTuple):
    """One gate weight: fold is None for a single run, member None outside a sweep; layer is 1-based."""

    run: str
    encoder: str | None
    task: str | None
    probe: str
    member: str | None
    fold: str | None
    layer: int
    depth: int
    weight: float


def gate_table(runs: Sequence[ProbeRun]) -> list[GateRow]:
    """Every gate weight of every run as a tidy row (pandas.DataFrame(rows) works), in run, probe key,
    fold, layer order."""
    rows = []
    for run, label in zip(runs, run_labels(runs), strict=True):
        for key, value in run.gates.items():
            probe, member = split_probe_key(key)
            folds = value.items() if isinstance(value, Mapping) else [(None, value)]
            for fold, weights in folds:
                for layer, weight in enumerate(weights, start=1):
                    rows.append(
                        GateRow(
                            label, run.encoder, run.task, probe, member, fold, layer, len(weights), weight
                        )
                    )
    return rows


class GateSummary(NamedTuple):
    """One gated probe of one run: folds = 0 without folds; peak_layer (1-based) and centre_layer (the
    weight-averaged layer sum_l l * w_l) from the fold-mean gates; centre_fraction = centre_layer / depth;
    lp_correlation = Pearson correlation of the mean gates with the per-layer linear probe (None without
    per_layer_lp.json or when either is constant)."""

    run: str
    encoder: str | None
    task: str | None
    probe: str
    member: str | None
    folds: int
    depth: int
    peak_layer: int
    peak_weight: float
    centre_layer: float
    centre_fraction: float
    lp_correlation: float | None


def _correlation(a: np.ndarray, b: np.ndarray) -> float | None:
    keep = np.isfinite(a) & np.isfinite(b)
    if keep.sum() < 2 or np.std(a[keep]) == 0 or np.std(b[keep]) == 0:
        return None
    return float(np.corrcoef(a[keep], b[keep])[0, 1])


def gate_summary(runs: Sequence[ProbeRun]) -> list[GateSummary]:
    """One row per (run, gated probe key): where the gate mass sits."""
    rows = []
    for run, label in zip(runs, run_labels(runs), strict=True):
        lp = None if run.per_layer is None else np.asarray(run.per_layer["values"], np.float64)
        for key, value in run.gates.items():
            probe, member = split_probe_key(key)
            mean, _ = mean_gates(value)
            layers = np.arange(1, mean.shape[0] + 1)
            centre = float((layers * mean).sum() / mean.sum())
            peak = int(np.argmax(mean))
            rows.append(
                GateSummary(
                    run=label,
                    encoder=run.encoder,
                    task=run.task,
                    probe=probe,
                    member=member,
                    folds=len(value) if isinstance(value, Mapping) else 0,
                    depth=mean.shape[0],
                    peak_layer=peak + 1,
                    peak_weight=float(mean[peak]),
                    centre_layer=centre,
                    centre_fraction=centre / mean.shape[0],
                    lp_correlation=None if lp is None else _correlation(mean, lp),
                )
            )
    return rows


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value).replace("|", "\\|")


def markdown_table(rows: Sequence[tuple]) -> str:
    """Rows of one NamedTuple type (GateRow, GateSummary) as a Markdown table; floats with 3 decimals,
    None as an empty cell."""
    if not rows:
        return "(no rows)"
    fields = type(rows[0])._fields if hasattr(type(rows[0]), "_fields") else None
    if fields is None:
        raise ValueError(f"markdown_table: expected NamedTuple rows, found {type(rows[0]).__name__}")
    lines = ["| " + " | ".join(fields) + " |", "|" + "---|" * len(fields)]
    lines += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)
