"""Per-clip work and the worker pool of `prepare`: load -> cut -> front-end -> encode, in this process or in
spawned worker processes (JAX on the CPU, one thread each), results in task order.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import math
import multiprocessing
import os
import signal
import textwrap
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from bat_jax.data import records
from bat_jax.data.prepare.frontend import SAMPLE_RATE, Frontend
from bat_jax.data.sources import ClipTask

TASKS_PER_SUBMIT = 4  # clips per job sent to a worker process
JOBS_IN_FLIGHT_PER_WORKER = 4  # bounded look-ahead: memory stays flat, order stays fixed
MAX_DEFAULT_WORKERS = 4
# By default, one worker process per this many clips (each takes seconds to start and compile):
CLIPS_PER_DEFAULT_WORKER = 256
WORKER_XLA_FLAGS = ("--xla_cpu_multi_thread_eigen=false", "intra_op_parallelism_threads=1")
WORKER_THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


def default_workers(num_clips: int | None = None) -> int:
    """min(MAX_DEFAULT_WORKERS, CPUs), and one worker per CLIPS_PER_DEFAULT_WORKER clips when fewer."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    by_size = MAX_DEFAULT_WORKERS if num_clips is None else math.ceil(num_clips / CLIPS_PER_DEFAULT_WORKER)
    return max(1, min(MAX_DEFAULT_WORKERS, cpus, by_size))


@dataclass(frozen=True)
class ClipResult:
    """A record to write (`record` set, with the loader's `notes`) or a skip (`kind` and `reason` set)."""

    record: bytes | None = None
    num_frames: int = 0
    num_samples: int = 0
    kind: str = ""
    reason: str = ""
    notes: tuple[tuple[str, str], ...] = ()  # (kind, reason) of a kept clip worth reporting (e.g. truncated)
    num_events: int | None = None  # events in the record; None: a record without event annotations


def _load_error_kind(message: str) -> str:
    for needle, kind in (
        ("no such file", "missing file"),
        ("empty", "empty file"),
        ("finite", "non-finite audio"),
    ):
        if needle in message:
            return kind
    return "unreadable audio"


class LoaderContractError(TypeError):
    """A loader returned something other than (wave, labels), (wave, labels, notes) or (wave, labels, notes,
    events): the code is wrong, not one input, so the run stops (every clip would be skipped otherwise)."""


def _checked(loaded, loader, task: ClipTask) -> tuple[tuple[tuple[str, str], ...], tuple | None]:
    """(notes, events) of a loader's (wave, labels), (wave, labels, notes) or (wave, labels, notes, events)
    result, checked; events None (not returned, or None) are the task's own."""
    where = f"loader {getattr(loader, '__name__', type(loader).__name__)} on {task.source!r}"
    if not isinstance(loaded, tuple | list) or len(loaded) not in (2, 3, 4):
        found = (
            f"{len(loaded)} values"
            if isinstance(loaded, tuple | list)
            else f"a value of type {type(loaded).__name__}"
        )
        raise LoaderContractError(
            f"{where}: expected a loader to return (wave, labels), (wave, labels, notes) or (wave, labels, "
            f"notes, events), found {found}"
        )
    try:
        notes = tuple(tuple(n) for n in loaded[2]) if len(loaded) >= 3 else ()
    except TypeError:
        notes = None
    if notes is None or not all(len(n) == 2 and all(isinstance(x, str) for x in n) for n in notes):
        raise LoaderContractError(
            f"{where}: expected a loader's notes to be (kind, reason) string pairs, found {loaded[2]!r}"
        )
    if len(loaded) < 4 or loaded[3] is None:
        return notes, task.events
    try:
        events = records._check_events(loaded[3], "its events")  # [[onset, offset, class], ...]
    except ValueError as e:
        raise LoaderContractError(
            f"{where}: expected a loader's events to be (onset s, offset s, class) triples or None, found "
            f"{textwrap.shorten(repr(loaded[3]), 80)} ({e})"
        ) from None
    return notes, tuple(tuple(e) for e in events)


def process_clip(task: ClipTask, loader, frontend: Frontend, num_classes: int) -> ClipResult:
    """Load, cut, compute and encode one clip; any failure becomes a skip with its reason, except a loader
    result that breaks the contract below (LoaderContractError, which stops the run).

    The loader returns (wave, labels) or (wave, labels, notes): notes are (kind, reason) string pairs about
    a clip that is kept (e.g. ("truncated", "read 8000 frames, header says 16000")); they go with the record.
    Or (wave, labels, notes, events): the clip's sound events (onset s, offset s, class), written into the
    record; without them (or None) the task's own `events` (from an events CSV) are.
    """
    from bat_jax.audio.io import AudioLoadError

    try:
        loaded = loader(task)
    except AudioLoadError as e:
        return ClipResult(kind=_load_error_kind(str(e)), reason=str(e))
    except Exception as e:  # noqa: BLE001 - an unusable input is skipped, not fatal
        return ClipResult(kind="unreadable input", reason=f"{type(e).__name__}: {e}")
    # outside the try: a loader that breaks the contract fails the run (LoaderContractError), not one clip
    notes, events = _checked(loaded, loader, task)
    wave, labels = loaded[0], loaded[1]
    bad = [c for c in (*labels, *(e[2] for e in events or ())) if not 0 <= c < num_classes]
    if bad:
        return ClipResult(
            kind="unknown label", reason=f"class indices {bad} outside the vocabulary [0, {num_classes})"
        )
    if frontend.clip_samples is not None:
        wave = wave[: frontend.clip_samples]
    if wave.shape[0] < frontend.min_samples:
        return ClipResult(
            kind="too short",
            reason=(
                f"{wave.shape[0]} samples at {SAMPLE_RATE} Hz; the {frontend.name} front-end needs at least "
                f"{frontend.min_samples}"
            ),
        )
    try:
        features, frames = frontend(wave)
    except Exception as e:  # noqa: BLE001
        return ClipResult(kind="front-end error", reason=f"{type(e).__name__}: {e}")
    record = records.encode(records.Clip(features, frames, task.clip_id, tuple(labels), task.fold, events))
    num_events = None if events is None else len(events)
    return ClipResult(record, frames, int(wave.shape[0]), notes=notes, num_events=num_events)


_WORKER: dict[str, Any] = {}


def _init_worker(loaders: dict, frontend: Frontend, num_classes: int, in_process: bool = False) -> None:
    import jax

    if not in_process:
        # Ctrl-C reaches the whole process group: the main process alone decides when to stop (between
        # clips), then shuts the pool down; a worker killed mid-job would only break the pool.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        jax.config.update("jax_platforms", "cpu")
    _WORKER.update(loaders=loaders, frontend=frontend, num_classes=num_classes)


def _work(split: str, tasks: Sequence[ClipTask]) -> list[ClipResult]:
    loader, frontend = _WORKER["loaders"][split], _WORKER["frontend"]
    return [process_clip(t, loader, frontend, _WORKER["num_classes"]) for t in tasks]


@contextlib.contextmanager
def _worker_environment():
    """Environment inherited by spawned workers: JAX on the CPU with one thread each (no oversubscription)."""
    saved = {k: os.environ.get(k) for k in ("JAX_PLATFORMS", "XLA_FLAGS", *WORKER_THREAD_VARS)}
    prefixes = (
        "--xla_force_host_platform_device_count",
        "--xla_cpu_multi_thread_eigen",
        "intra_op_parallelism",
    )
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if not f.startswith(prefixes)]
    os.environ.update({"JAX_PLATFORMS": "cpu", "XLA_FLAGS": " ".join([*flags, *WORKER_XLA_FLAGS])})
    os.environ.update({k: "1" for k in WORKER_THREAD_VARS})
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


class Runner:
    """Runs clips in this process (workers <= 1) or in spawned processes; results come back in task order.

    Started lazily (a resumed run with nothing left to do spawns nothing); use as a context manager.
    """

    def __init__(self, workers: int, loaders: dict, frontend: Frontend, num_classes: int):
        self.workers = workers
        self._init = (loaders, frontend, num_classes)
        self._stack = contextlib.ExitStack()
        self._pool = None
        self._started = False

    def __enter__(self):
        return self

    def _start(self) -> None:
        self._started = True
        self._stack.callback(_WORKER.clear)
        if self.workers <= 1:
            _init_worker(*self._init, in_process=True)
            return
        self._stack.enter_context(_worker_environment())  # inherited by the spawned workers
        self._pool = self._stack.enter_context(
            concurrent.futures.ProcessPoolExecutor(
                self.workers,
                mp_context=multiprocessing.get_context("spawn"),
                initializer=_init_worker,
                initargs=self._init,
            )
        )

    def map(self, split: str, tasks: Sequence[ClipTask]) -> Iterator[ClipResult]:
        if not self._started:
            self._start()
        if self._pool is None:
            import jax

            cpu = jax.devices("cpu")[0]  # the same numbers as the CPU workers, whatever the default backend
            for task in tasks:
                with jax.default_device(cpu):
                    result = _work(split, [task])[0]
                yield result
            return
        pending = deque()
        for i in range(0, len(tasks), TASKS_PER_SUBMIT):
            pending.append(self._pool.submit(_work, split, tasks[i : i + TASKS_PER_SUBMIT]))
            if len(pending) >= self.workers * JOBS_IN_FLIGHT_PER_WORKER:
                yield from pending.popleft().result()
        while pending:
            yield from pending.popleft().result()

    def __exit__(self, *exc):
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
        self._stack.close()
