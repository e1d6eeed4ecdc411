"""What a probe run writes into its workdir, and the checks that protect an existing one.

config.json        the config, plus "resolved": depth, classes, vocabulary, loss, protocol, members
metrics.json       per probe (and sweep member "cgp@lr=…,seed=…"): {"test": {...}, "best_validation":
                   {..., "step"}} (the latter only with a validation split); with K folds:
                   {"folds": {fold: {...}}, "test": {"accuracy": mean, "accuracy_std": std, ...}}
gates.json         softmax layer weights of the gated probes {"cgp": [w_1, …, w_L]} ({fold: [...]})
gates.png          a bar plot per layer, one panel per gated probe
params/<fold|final>/   the probe parameters (Orbax; leaves with a leading sweep-member axis)
metrics.jsonl, tb/ training losses and validation figures (TensorBoard tags train/…, validation/…)
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np

from bat_jax.probe.heads import ProbeConfigError

PARAMS_DIR = "params"
SUMMARY_KEYS = ("accuracy", "map", "f1")


def write_json(path: Path, obj: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, allow_nan=False, default=_plain) + "\n")
    tmp.replace(path)


def _plain(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def check_workdir(workdir: Path, encoder_config: Any, overwrite: bool) -> None:
    """Refuse, before any compute, a workdir holding another run: a finished one (metrics.json) unless
    `overwrite`, and in any case probes saved for an encoder of another depth or width."""
    config = workdir / "config.json"
    if not config.is_file():
        return
    try:
        resolved = json.loads(config.read_text()).get("resolved", {})
    except (OSError, ValueError) as e:
        raise ProbeConfigError(f"{config}: cannot read this probe workdir's config ({e})") from None
    depth, dim = resolved.get("num_layers"), resolved.get("dim")
    if (depth, dim) != (encoder_config.depth, encoder_config.dim) and (workdir / PARAMS_DIR).exists():
        raise ProbeConfigError(
            f"{workdir}: holds probes trained on an encoder of depth {depth}, dim {dim}, but this encoder "
            f"has depth {encoder_config.depth}, dim {encoder_config.dim}: their gates and weights cannot be "
            "reused; choose another --workdir"
        )
    if (workdir / "metrics.json").is_file() and not overwrite:
        raise ProbeConfigError(
            f"{workdir}: already holds a finished probe run (metrics.json); choose another --workdir, or "
            "pass --overwrite to replace it"
        )


def save_params(workdir: Path, fold: str, params: Any, replicated: Any) -> Path:
    import orbax.checkpoint as ocp

    path = (workdir / PARAMS_DIR / (fold or "final")).absolute()
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(path, jax.device_get(params), force=True)
        checkpointer.wait_until_finished()
    return path


def aggregate_folds(results: dict[str, Any]) -> dict[str, Any]:
    """Add to each probe's {"folds": ...} the mean and (population) std over folds of the test figures."""
    out = {}
    for key, entry in results.items():
        folds = entry["folds"]
        summary: dict[str, Any] = {"num_folds": len(folds)}
        for metric in SUMMARY_KEYS:
            values = [f["test"].get(metric) for f in folds.values()]
            values = [v for v in values if v is not None]
            if values:
                summary[metric] = float(np.mean(values))
                summary[f"{metric}_std"] = float(np.std(values))
        out[key] = {"folds": folds, "test": summary}
    return out


class ProbeWriter:
    """metrics.jsonl (one JSON object per line: step, phase, figures) and TensorBoard scalars."""

    def __init__(self, workdir: Path):
        from tensorboardX import SummaryWriter

        self._file = open(workdir / "metrics.jsonl", "a", encoding="utf-8")  # noqa: SIM115 - closed in close()
        self._tb = SummaryWriter(str(workdir / "tb"))

    def write(self, step: int, scalars: dict[str, float], phase: str) -> None:
        row = {"step": int(step), "phase": phase, **{k: _finite(v) for k, v in scalars.items()}}
        row["time"] = time.time()
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()
        for name, value in scalars.items():
            if value is not None and math.isfinite(float(value)):
                self._tb.add_scalar(f"{phase}/{name}", float(value), int(step))
        self._tb.flush()

    def close(self) -> None:
        self._file.close()
        self._tb.close()


def _finite(value: Any) -> float | None:
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None
