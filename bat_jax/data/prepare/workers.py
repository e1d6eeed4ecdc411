"""Per-clip and per-shard work and the worker pool of `prepare`: load -> cut -> front-end -> encode -> write
a whole shard (and its .done.json), in this process or in spawned worker processes (JAX on the CPU, one thread
each); the main process only hands out shards and collects their states.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import math
import multiprocessing
import os
import signal
import textwrap
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bat_jax.data import records, shards
from bat_jax.data.prepare.frontend import SAMPLE_RATE, Frontend
from bat_jax.data.sources import ClipTask, Skipped

POLL_SECONDS = 0.1  # how often the main process looks at Ctrl-C and the workers' progress
# Workers write their own shards, so the main process is no bottleneck (benchmarks/prepare_scaling.py);
# the default stays below the core count of large machines because each worker holds JAX (~0.6 GB RSS).
MAX_DEFAULT_WORKERS = 16
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


class Interrupted(KeyboardInterrupt):
    """SIGINT arrived: the run stopped between two clips; finished shards stay, the ones being written are
    dropped."""


@dataclass(frozen=True)
class ShardJob:
    """One shard to write: `tasks` (the shard's clips, in order) into OUT/<split>/<name>, whose .done.json
    gets `config_digest`. Small and picklable: this is what a worker process receives."""

    split: str
    index: int  # the shard's index in its split
    name: str
    tasks: tuple[ClipTask, ...]
    config_digest: str


def write_shard(
    out: Path,
    job: ShardJob,
    loader,
    frontend: Frontend,
    num_classes: int,
    stop=None,
    on_clip: Callable[[], None] | None = None,
) -> dict:
    """Compute and write one whole shard: OUT/<split>/<name>.tmp, renamed when complete, then its .done.json
    (records, inputs, frames, samples, bytes, sha256, skipped inputs, notes, folds and events of its records,
    the settings digest). Returns that .done.json state.

    stop: an Event checked before every clip; once set, the shard is dropped (its .tmp deleted, no .done.json)
    and Interrupted is raised. on_clip: called after every clip (progress).
    """
    writer = None
    state = {"num_records": 0, "num_inputs": len(job.tasks), "total_frames": 0, "num_samples": 0}
    skipped, notes = [], []
    folds = [] if any(t.fold is not None for t in job.tasks) else None  # of written records
    events = None  # {"num_events", "num_clips_without_events"} of the written records that carry events
    try:
        if stop is not None and stop.is_set():
            raise Interrupted()
        writer = shards.ShardWriter(out / job.split / job.name)
        for task in job.tasks:
            if stop is not None and stop.is_set():
                raise Interrupted()
            result = process_clip(task, loader, frontend, num_classes)
            for kind, reason in result.notes:
                notes.append({"split": job.split, "source": task.source, "kind": kind, "reason": reason})
            if result.record is None:
                skipped.append(Skipped(job.split, task.source, result.kind, result.reason).to_json())
            else:
                writer.write(result.record)
                if folds is not None:
                    folds.append(task.fold)
                if result.num_events is not None:
                    events = events or {"num_events": 0, "num_clips_without_events": 0}
                    events["num_events"] += result.num_events
                    events["num_clips_without_events"] += result.num_events == 0
                state["total_frames"] += result.num_frames
                state["num_samples"] += result.num_samples
            if on_clip is not None:
                on_clip()
        size = writer.commit()
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    state = {
        **state,
        "num_records": writer.num_records,
        "bytes": size,
        "sha256": shards.sha256_file(writer.path),
        "skipped": skipped,
        "notes": notes,
    }
    if folds is not None:
        state["folds"] = folds
    if events is not None:
        state["events"] = events
    state["config_digest"] = job.config_digest
    shards.write_json(out / shards.PROGRESS_DIR / job.split / (job.name + shards.DONE_SUFFIX), state)
    return state


_WORKER: dict[str, Any] = {}


def _init_worker(
    loaders: dict, frontend: Frontend, num_classes: int, in_process: bool = False, halt=None, clips=None
) -> None:
    import jax

    if not in_process:
        # Ctrl-C reaches the whole process group: the main process alone decides when to stop (it sets
        # `halt`, which every worker checks between clips), then shuts the pool down; a worker killed mid-job
        # would only break the pool.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        jax.config.update("jax_platforms", "cpu")
    _WORKER.update(loaders=loaders, frontend=frontend, num_classes=num_classes, halt=halt, clips=clips)


def _count_clip() -> None:
    clips = _WORKER["clips"]
    with clips.get_lock():
        clips.value += 1


def _shard_work(out: str, job: ShardJob) -> dict | None:
    """A worker process writes one whole shard; None when the main process halted the run."""
    loader, frontend = _WORKER["loaders"][job.split], _WORKER["frontend"]
    try:
        return write_shard(
            Path(out), job, loader, frontend, _WORKER["num_classes"], _WORKER["halt"], _count_clip
        )
    except Interrupted:
        return None


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
    """Writes shards in this process (workers <= 1) or in spawned worker processes, each of which computes
    and writes whole shards itself (ShardJob -> write_shard); this process only hands out shards and collects
    their .done.json states, so it is never the bottleneck.

    Started lazily (a resumed run with nothing left to do spawns nothing); use as a context manager.
    """

    def __init__(self, workers: int, loaders: dict, frontend: Frontend, num_classes: int):
        self.workers = workers
        self._init = (loaders, frontend, num_classes)
        self._stack = contextlib.ExitStack()
        self._pool = None
        self._started = False
        self._halt = self._clips = None

    def __enter__(self):
        return self

    def _start(self) -> None:
        self._started = True
        self._stack.callback(_WORKER.clear)
        if self.workers <= 1:
            _init_worker(*self._init, in_process=True)
            return
        self._stack.enter_context(_worker_environment())  # inherited by the spawned workers
        context = multiprocessing.get_context("spawn")
        self._halt = context.Event()  # set by this process: every worker drops its shard at the next clip
        self._clips = context.Value("q", 0)  # clips done by all workers (the progress bar)
        self._pool = self._stack.enter_context(
            concurrent.futures.ProcessPoolExecutor(
                self.workers,
                mp_context=context,
                initializer=_init_worker,
                initargs=(*self._init, False, self._halt, self._clips),
            )
        )

    def run(
        self,
        out: Path,
        jobs: Sequence[ShardJob],
        stop=None,
        on_clips: Callable[[int], None] | None = None,
    ) -> Iterator[tuple[ShardJob, dict]]:
        """Write every shard of `jobs`; yields (job, its .done.json state) as shards finish (in `jobs` order
        with one worker, in completion order with several: each shard's bytes do not depend on it).

        stop: a threading.Event (SIGINT) checked between clips; once set, the shards being written are dropped
        and Interrupted is raised. on_clips(n): n more clips are done (progress). An error in one shard (a
        LoaderContractError) stops the others and is raised here.
        """
        if not jobs:
            return
        if not self._started:
            self._start()
        if self._pool is None:
            import jax

            cpu = jax.devices("cpu")[0]  # the same numbers as the CPU workers, whatever the default backend
            loaders, frontend, num_classes = self._init
            count = (lambda: on_clips(1)) if on_clips is not None else None
            for job in jobs:
                with jax.default_device(cpu):
                    state = write_shard(out, job, loaders[job.split], frontend, num_classes, stop, count)
                yield job, state
            return
        order = {id(job): k for k, job in enumerate(jobs)}
        futures = {self._pool.submit(_shard_work, str(out), job): job for job in jobs}
        pending, seen, finished = set(futures), self._clips.value, False
        try:
            while pending:
                done, pending = concurrent.futures.wait(
                    pending, timeout=POLL_SECONDS, return_when=concurrent.futures.FIRST_COMPLETED
                )
                clips = self._clips.value
                if on_clips is not None and clips > seen:
                    on_clips(clips - seen)
                seen = clips
                if stop is not None and stop.is_set():
                    raise Interrupted()
                for future in sorted(done, key=lambda f: order[id(futures[f])]):
                    state = future.result()  # a worker's error is raised here
                    if state is None:  # halted: only after this process set the flag
                        raise Interrupted()
                    yield futures[future], state
            finished = True
        finally:
            if (
                not finished
            ):  # Ctrl-C, an error, or the caller stopped: running shards stop at their next clip
                self._halt.set()
                for future in pending:
                    future.cancel()

    def __exit__(self, *exc):
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
        self._stack.close()
