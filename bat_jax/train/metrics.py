"""What a pretraining run reports: WORKDIR/metrics.jsonl, TensorBoard events under WORKDIR/tb/, the console.

metrics.jsonl: one JSON object per log line, e.g.
    {"step": 10, "loss": 1.93, "global_loss": 0.97, "local_loss": 0.96, "target_var": 0.99, "pred_var": 0.41,
     "lr": 0.0005, "ema_decay": 0.9998, "grad_norm": 3.1, "clips_per_s": 41.0, "step_time_s": 0.19,
     "data_wait_s": 0.002, "mfu": 0.41, "time": 1764620000.0}
The names (``step`` = completed updates; the step's values are those of the update to ``step``, the timings
means over the steps since the previous line; NaN / Inf are written as null):
    loss, global_loss, local_loss  the SSL loss = global_weight · global + local_weight · local (float32)
    target_var, pred_var           mean over features of the std of the teacher targets / of the decoder's
                                   predictions on masked patches over the whole batch (collapse detectors:
                                   they fall towards 1e-3 when the features stop varying)
    lr, ema_decay                  the learning rate and the EMA decay that update used
    grad_norm                      global L2 norm of the student's gradient (float32; with micro-batches the
                                   averaged gradient the update used)
    clips_per_s, step_time_s       global batch / mean step time, and the mean wall time of one step
    data_wait_s                    mean time per step spent waiting for the loader
    mfu                            model FLOPs utilisation: analytic model FLOPs per step / step_time_s /
                                   (peak FLOP/s per device x devices); the peak and where it came from are
                                   on the run's first line (bat_jax/train/flops.py, setup.Job.mfu)
    time                           Unix time of the line
TensorBoard: the same scalars, tagged ``train/<name>``: ``tensorboard --logdir WORKDIR/tb``.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import tqdm
from tensorboardX import SummaryWriter

from bat_jax.convert import workdir as workdir_lib

METRICS_FILE = "metrics.jsonl"
TB_DIR = "tb"


class MetricsWriter:
    """Appends log lines to metrics.jsonl (a resumed run continues the file) and TensorBoard events."""

    def __init__(self, workdir: str | Path):
        workdir = Path(workdir)
        self._file = open(workdir / METRICS_FILE, "a", encoding="utf-8")  # noqa: SIM115 - closed in close()
        self._tb = SummaryWriter(str(workdir / TB_DIR))

    def write(self, step: int, scalars: dict[str, float]) -> None:
        row = {"step": int(step), **{k: _number(v) for k, v in scalars.items()}, "time": time.time()}
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()
        for name, value in scalars.items():
            if math.isfinite(float(value)):
                self._tb.add_scalar(f"train/{name}", float(value), int(step))
        self._tb.flush()

    def close(self) -> None:
        self._file.close()
        self._tb.close()


def _number(value: Any) -> float | None:
    """A JSON number; NaN / Inf as null (JSON has no NaN)."""
    value = float(value)
    return value if math.isfinite(value) else None


def read_metrics(workdir: str | Path) -> list[dict[str, Any]]:
    """The rows of WORKDIR/metrics.jsonl."""
    path = Path(workdir) / METRICS_FILE
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class Progress:
    """A console progress bar with ETA (stderr), its postfix the last logged loss, clips/s and MFU (when the
    line has one)."""

    def __init__(self, start: int, total: int, enabled: bool = True):
        self._bar = tqdm.tqdm(
            initial=start, total=total, unit="step", file=sys.stderr, disable=not enabled, dynamic_ncols=True
        )

    def update(self, n: int = 1) -> None:
        self._bar.update(n)

    def show(self, scalars: dict[str, float]) -> None:
        postfix = {"loss": f"{scalars['loss']:.4f}", "clips_s": f"{scalars['clips_per_s']:.1f}"}
        if math.isfinite(scalars.get("mfu", math.nan)):
            postfix["mfu"] = f"{scalars['mfu']:.3f}"
        self._bar.set_postfix(postfix)

    def write(self, line: str) -> None:
        self._bar.write(line, file=sys.stderr)

    def close(self) -> None:
        self._bar.close()


def summary(workdir: str | Path) -> str:
    """What a finished run left: first and last logged loss, the workdir's layout, the TensorBoard command."""
    workdir = Path(workdir)
    rows = read_metrics(workdir)
    steps = workdir_lib.steps(workdir)
    lines = [
        f"loss: {rows[0]['loss']:.4f} at step {rows[0]['step']} -> {rows[-1]['loss']:.4f} at step "
        f"{rows[-1]['step']} ({len(rows)} log lines)",
        f"{workdir}/",
        "  config.json            the resolved config",
        f"  checkpoints/<step>/    Orbax checkpoints, steps {steps}",
        f"  {METRICS_FILE}          one JSON object per log line",
        f"  {TB_DIR}/                    TensorBoard events:  tensorboard --logdir {workdir / TB_DIR}",
        f"the encoder: python -c \"import bat_jax; enc = bat_jax.load_encoder('{workdir}')\"",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    print(summary(sys.argv[1]))
