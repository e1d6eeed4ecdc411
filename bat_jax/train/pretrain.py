"""The pretraining job (`bat-jax pretrain`): config checks → mesh → input → state (fresh, resumed or
init_from) → compiled step → loop with metrics, checkpoints, SIGTERM and NaN stops.

    from bat_jax.train import pretrain
    rc = pretrain.run(cfg, "runs/tiny")        # cfg: an ml_collections config (configs/pretrain/*.py)

The workdir (stable layout, README "Pretraining"):
    WORKDIR/config.json          the resolved config of the latest run
    WORKDIR/checkpoints/<step>/  Orbax: state/ (step, params, teacher, opt_state, rng), data/ (Grain iterator)
    WORKDIR/metrics.jsonl        one JSON object per log line (bat_jax/train/metrics.py)
    WORKDIR/tb/                  TensorBoard event files

Randomness: the key of update ``s`` (0-based) is ``fold_in(key(train.seed), s)``; the loader is seeded by
data.seed. A resumed run restores the state, the key and the loader's position, so it continues exactly.
Exit status of `run`: 0 finished or stopped by SIGTERM after saving, 1 NaN/Inf loss or a failed save.

Several processes (bat_jax/train/distributed.py; `jax.distributed` initialised before `run`): every process
runs this loop and reaches every collective (step, saves, restores, the stop agreement) in the same order;
each loader reads its process's share of the data. Only process 0 writes config.json, metrics.jsonl, tb/ and
the console (the others print only their errors); Orbax and Grain write the checkpoints from all of them
(the Grain state as one process_<i>-of-<n>.json per process). SIGTERM to any process stops all of them after
the same step, which they save together.
"""

from __future__ import annotations

import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from bat_jax.data.pipeline import make_pretrain_loader, shard_paths
from bat_jax.train import checkpoint as ckpt
from bat_jax.train import config as config_lib
from bat_jax.train import distributed
from bat_jax.train import setup as setup_lib
from bat_jax.train.metrics import MetricsWriter, Progress
from bat_jax.train.step import lr_schedule

_WHERE = "bat_jax/train/pretrain.py"
CONFIG_FILE = "config.json"
ConfigError = setup_lib.ConfigError


class _StopFlag:
    """SIGTERM → ``requested`` (polled at every step boundary); the previous handler is put back on exit."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def __enter__(self) -> _StopFlag:
        self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        self.requested = True

    def __exit__(self, *exc) -> None:
        signal.signal(signal.SIGTERM, self._previous)


def _jitted_helpers(cfg: ml_collections.ConfigDict):
    """Small jitted functions of device values (no host transfer in the loop): the step's key, the
    learning rate at a step, and the first step whose loss was not finite (-1: none yet)."""
    schedule = lr_schedule(
        peak_lr=cfg.optim.peak_lr,
        warmup_steps=cfg.optim.warmup_steps,
        total_steps=int(cfg.train.steps),
        end_lr=cfg.optim.end_lr,
    )
    key_for = jax.jit(lambda rng, step: jax.random.fold_in(rng, step))
    lr_at = jax.jit(lambda step: schedule(step - 1))  # the rate the update to `step` used
    track_bad = jax.jit(lambda bad, loss, step: jnp.where((bad < 0) & ~jnp.isfinite(loss), step, bad))
    return key_for, lr_at, track_bad


def _log_scalars(
    metrics: dict, lr, window: dict[str, float], global_batch: int, job: setup_lib.Job
) -> dict[str, float]:
    """Host floats of one log line: the step's metrics, lr, the window's mean timings and the MFU."""
    host = distributed.host_values({**metrics, "lr": lr})  # also on several processes
    scalars = {k: float(np.asarray(v)) for k, v in host.items()}
    steps = max(window["steps"], 1)
    step_time = window["time"] / steps
    scalars.update(
        step_time_s=step_time,
        data_wait_s=window["wait"] / steps,
        clips_per_s=global_batch / step_time if step_time > 0 else 0.0,
        mfu=job.mfu(step_time),
    )
    return scalars


def run(
    cfg: ml_collections.ConfigDict,
    workdir: str | Path,
    *,
    progress: bool = True,
    say: Callable[[str], None] = print,
) -> int:
    """Run (or resume) the job of ``cfg`` in ``workdir``; the exit status (see the module docstring)."""
    workdir = Path(workdir)
    setup_lib.check_config(cfg)  # ConfigError naming the field, before anything compiles
    if jax.process_count() > 1 and "mesh" not in cfg:
        raise ConfigError(
            f"config mesh ({_WHERE}): expected a mesh section (configs/pretrain/bat_base.py) for a run on "
            f"{jax.process_count()} processes, found none"
        )
    paths = shard_paths(cfg.data.root, cfg.data.split)
    primary = distributed.is_primary()
    if not primary:  # the other processes stay quiet (errors go to stderr from every process)
        progress, say = False, _quiet
    workdir.mkdir(parents=True, exist_ok=True)
    if primary:
        (workdir / CONFIG_FILE).write_text(cfg.to_json_best_effort(indent=2) + "\n")

    job = setup_lib.build(cfg)
    loader = make_pretrain_loader(paths, sharding=job.batch_sharding, **config_lib.loader_kwargs(cfg))
    manager = ckpt.make_manager(
        workdir, keep=int(cfg.train.keep), keep_every=int(cfg.train.keep_every) or None
    )
    try:
        with _StopFlag() as stop:  # installed before the restore and the compile: no SIGTERM is lost
            return _run(cfg, workdir, job, loader, manager, stop, progress, say)
    finally:
        error = ckpt.wait(manager)
        manager.close()
        loader.close()
        if error:
            _error(f"a checkpoint save failed: {error}")


def _start(cfg, workdir, job, loader, manager, say):
    """(state, rng, start step): restored from the workdir's latest checkpoint, or fresh (init_from)."""
    latest = manager.latest_step()
    if latest is not None:
        state, rng = ckpt.restore(manager, latest, job.abstract_tree(), loader)
        say(f"resuming from {workdir / ckpt.CHECKPOINTS / str(latest)} (step {latest})")
        return state, rng, latest
    state = job.init_state()
    if cfg.train.init_from:
        state = setup_lib.init_from(state, cfg.train.init_from, job, say)
    # the key's data on the host (one value for all processes), then placed replicated over the mesh
    key_data = np.asarray(jax.random.key_data(jax.random.key(int(cfg.train.seed))))
    rng = jax.device_put(key_data, job.replicated)
    return state, rng, 0


def _run(cfg, workdir, job, loader, manager, stop, progress, say) -> int:
    state, rng_data, start = _start(cfg, workdir, job, loader, manager, say)
    rng = jax.random.wrap_key_data(rng_data)
    total, log_every = int(cfg.train.steps), int(cfg.train.log_every)
    save_every = int(cfg.train.checkpoint_every)
    key_for, lr_at, track_bad = _jitted_helpers(cfg)
    step_fn, memory = job.compile(state, rng, loader)
    distributed.barrier("bat-jax pretrain: compiled")  # the first step starts together on every process
    say(job.describe(state, memory))
    if start >= total:
        say(f"nothing to do: the checkpoint is at step {start} and train.steps={total}")
        return 0
    global_batch = int(cfg.data.global_batch_size)
    bad = jax.device_put(np.int32(-1), job.replicated)
    last_saved = start if manager.latest_step() is not None else None
    primary = distributed.is_primary()
    writer = MetricsWriter(workdir) if primary else _NoWriter()
    bar = Progress(start, total, enabled=progress)
    tell = bar.write if primary else _quiet  # stderr lines under the bar, from process 0
    agree = distributed.StopAgreement(job.mesh)  # one process: the local flag; several: all-reduced (max)
    window = {"steps": 0, "time": 0.0, "wait": 0.0}
    step = start
    try:
        # No implicit transfer in the loop. The loader places each batch itself (make_array_from_process_local
        # _data); on several processes jax builds that array through make_array_from_callback, which the guard
        # counts as implicit (measured, jax 0.10.2), so the loader's call alone allows host-to-device copies.
        with jax.transfer_guard("disallow"):
            tick = time.perf_counter()
            while step < total:
                fetch = time.perf_counter()  # not `tick`: the log line's reads wait for the queued steps
                with jax.transfer_guard_host_to_device("allow"):  # the loader's placement is explicit,
                    batch = next(loader)  # but jax counts it implicit on several processes (see above)
                waited = time.perf_counter() - fetch
                key = key_for(rng, state.step)
                state, metrics = step_fn(state, batch["spec"], key)
                bad = track_bad(bad, metrics["loss"], state.step)
                step += 1
                bar.update()
                now = time.perf_counter()
                window["steps"] += 1
                window["time"] += now - tick
                window["wait"] += waited
                tick = now
                if step % log_every == 0 or step == total:
                    scalars = _log_scalars(metrics, lr_at(state.step), window, global_batch, job)
                    writer.write(step, scalars)
                    bar.show(scalars)
                    window = {"steps": 0, "time": 0.0, "wait": 0.0}
                stopping = agree.poll(stop.requested)  # the same value on every process
                if step % save_every == 0 or step == total or stopping:
                    first_bad = int(distributed.host_values(bad))
                    if first_bad >= 0:
                        return _nan_stop(first_bad, last_saved, workdir, tell)
                    try:
                        ckpt.save(manager, step, state, rng_data, loader)
                    except ckpt.SaveError as e:  # names the step, the cause, the latest complete one
                        _error(str(e), bar)
                        return 1
                    last_saved = step
                if stopping:
                    error = ckpt.wait(manager)
                    if error:
                        _error(f"SIGTERM at step {step}; the save FAILED: {error}", bar)
                        return 1
                    tell(
                        f"bat-jax pretrain: SIGTERM: saved step {step} to "
                        f"{workdir / ckpt.CHECKPOINTS / str(step)}; run the same command to resume"
                    )
                    return 0
                if step % log_every == 0:
                    first_bad = int(distributed.host_values(bad))
                    if first_bad >= 0:
                        return _nan_stop(first_bad, last_saved, workdir, tell)
    finally:
        bar.close()
        writer.close()
    error = ckpt.wait(manager)
    if error:
        _error(f"the final save of step {step} FAILED: {error}")
        return 1
    say(f"done: {total} steps; checkpoint {workdir / ckpt.CHECKPOINTS / str(step)}")
    return 0


def _quiet(line: str) -> None:
    """The `say` of processes other than 0."""


class _NoWriter:
    """The metrics writer of processes other than 0 (process 0 writes metrics.jsonl and tb/)."""

    def write(self, step: int, scalars: dict[str, float]) -> None:
        pass

    def close(self) -> None:
        pass


def _error(message: str, bar: Progress | None = None) -> None:
    """An error line on stderr from any process (its number named when there are several)."""
    who = f" (process {jax.process_index()} of {jax.process_count()})" if jax.process_count() > 1 else ""
    line = f"bat-jax pretrain{who}: {message}"
    if bar is not None:
        bar.write(line)
    else:
        print(line, file=sys.stderr, flush=True)


def _nan_stop(first_bad: int, last_saved: int | None, workdir: Path, tell: Callable[[str], None]) -> int:
    """The message of a non-finite loss: the step (the update count after it) and the last good checkpoint."""
    where = (
        f"the last good checkpoint is {workdir / ckpt.CHECKPOINTS / str(last_saved)} (step {last_saved})"
        if last_saved is not None
        else "no checkpoint was saved before it"
    )
    tell(f"bat-jax pretrain: the loss is NaN or Inf at step {first_bad}; stopped; {where}")
    return 1
