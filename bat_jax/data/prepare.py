"""`bat-jax prepare`: decode audio once, compute spectrograms, write ArrayRecord shards and a manifest.

    source (folder / TFDS / synthetic) ──plan──▶ per split: sorted ClipTasks ──▶ fixed shard ranges
        ──▶ worker processes: load → 16 kHz → cut → front-end (jax, CPU, 1 thread) → pad → encode
        ──▶ this process: records in task order → <shard>.tmp → rename → <shard>.done.json
        ──▶ manifest.json (last)

Front-end work is bucketed: a clip of T frames is computed on a waveform zero-padded to a multiple of
`bucket_frames` frames, so jit compiles once per bucket, not once per clip length, and the frames past T are
dropped. The BAT front-end's dB floor and min-max run over the T valid frames only, so the result equals
`bat_jax.audio.logmel` on the unpadded clip (tests check it).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import functools
import inspect
import math
import multiprocessing
import os
import re
import sys
import textwrap
import time
from collections import Counter, deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bat_jax.data import records, shards, sources
from bat_jax.data.sources import ClipTask, SourceError, SourcePlan, SplitPlan

SAMPLE_RATE = sources.SAMPLE_RATE
BUCKET_FRAMES = 128  # front-end inputs are padded to a multiple of this many frames (one jit per bucket)
CLIPS_PER_SHARD = 1024
TASKS_PER_SUBMIT = 4  # clips per job sent to a worker process
JOBS_IN_FLIGHT_PER_WORKER = 4  # bounded look-ahead: memory stays flat, order stays fixed
MAX_DEFAULT_WORKERS = 4
# By default, one worker process per this many clips (each takes seconds to start and compile):
CLIPS_PER_DEFAULT_WORKER = 256
SPLIT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")  # split names become folder and file names
WORKER_XLA_FLAGS = ("--xla_cpu_multi_thread_eigen=false", "intra_op_parallelism_threads=1")
WORKER_THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")

# ------------------------------------------------------------------------------------------ front-ends


@functools.cache
def _bat_bucketed():
    """The BAT log-mel of a reflect-padded, bucket-padded waveform, normalised over its first T frames."""
    import jax
    import jax.numpy as jnp

    from bat_jax.audio import frontend as fe

    @functools.partial(
        jax.jit,
        static_argnames=("sample_rate", "n_fft", "hop_length", "n_mels", "f_min", "f_max", "top_db", "eps"),
    )
    def bat_bucketed(
        padded, valid_frames, *, sample_rate, n_fft, hop_length, n_mels, f_min, f_max, top_db, eps
    ):
        # padded: [(Tb - 1) * hop + n_fft] = the clip reflect-padded by n_fft // 2, then zero-padded
        f_max = sample_rate / 2 if f_max is None else f_max
        frames = fe._frames(padded, n_fft, hop_length) * fe._hann(n_fft, periodic=True)  # [Tb, n_fft]
        spectrum = jnp.fft.rfft(frames, axis=-1)  # [Tb, n_fft // 2 + 1]
        power = jnp.square(spectrum.real) + jnp.square(spectrum.imag)
        mel_fb = fe.htk_mel_filterbank(n_fft // 2 + 1, float(f_min), float(f_max), n_mels, sample_rate)
        mel = jnp.matmul(power, mel_fb, precision=fe._MATMUL_PRECISION)  # [Tb, n_mels]
        db = 10.0 * jnp.log10(jnp.maximum(mel, fe._POWER_FLOOR))
        valid = jnp.arange(db.shape[0])[:, None] < valid_frames  # [Tb, 1]
        high = jnp.max(jnp.where(valid, db, -jnp.inf))
        db = jnp.maximum(db, high - top_db)
        low = jnp.min(jnp.where(valid, db, jnp.inf))
        return jnp.where(valid, (db - low) / (high - low + eps), 0.0)  # [Tb, n_mels]

    return bat_bucketed


def _defaults(fn) -> dict[str, Any]:
    """Keyword defaults of a front-end function: its full parameter set."""
    return {
        name: p.default
        for name, p in inspect.signature(fn).parameters.items()
        if p.kind is inspect.Parameter.KEYWORD_ONLY
    }


FRONTENDS = {
    "bat": {
        "function": "bat_jax.audio.logmel",
        "normalization": "per-clip: dB with a top_db floor, then min-max to [0, 1] (applied here)",
    },
    "kaldi": {
        "function": "bat_jax.audio.kaldi_fbank",
        "normalization": (
            "none: raw Kaldi log-mel; the dataset normalisation (x - mean) / (2 std) is applied later "
            "(bat_jax.audio.normalize_fbank, bat_jax.audio.frontend.FBANK_STATS)"
        ),
    },
}


@dataclass(frozen=True)
class Frontend:
    """A front-end with all its parameters, the clip handling and the jit bucket size (picklable)."""

    name: str
    params: tuple[tuple[str, Any], ...]
    clip_seconds: float | None = None
    bucket_frames: int = BUCKET_FRAMES

    @classmethod
    def create(
        cls, name: str, clip_seconds: float | None = None, bucket_frames: int = BUCKET_FRAMES, **overrides
    ):
        from bat_jax.audio import frontend as fe

        if name not in FRONTENDS:
            raise ValueError(f"--frontend: expected one of {sorted(FRONTENDS)}, found {name!r}")
        params = _defaults(fe.logmel if name == "bat" else fe.kaldi_fbank)
        unknown = set(overrides) - set(params)
        if unknown:
            raise ValueError(
                f"front-end {name!r}: unknown parameters {sorted(unknown)}; known: {sorted(params)}"
            )
        params.update(overrides)
        if name == "kaldi" and not params["remove_mean"]:
            raise ValueError("front-end 'kaldi': remove_mean=False is not supported by prepare")
        frontend = cls(name, tuple(sorted(params.items())), clip_seconds, bucket_frames)
        if frontend.sample_rate != SAMPLE_RATE:
            raise ValueError(
                f"front-end {name!r}: expected sample_rate {SAMPLE_RATE}, found {frontend.sample_rate}"
            )
        if clip_seconds is not None and frontend.clip_samples < frontend.min_samples:
            raise ValueError(
                f"--clip-seconds: expected at least {frontend.min_samples / SAMPLE_RATE} s for the {name} "
                f"front-end, found {clip_seconds}"
            )
        return frontend

    @property
    def kwargs(self) -> dict[str, Any]:
        return dict(self.params)

    @property
    def sample_rate(self) -> int:
        return int(self.kwargs["sample_rate"])

    @property
    def n_mels(self) -> int:
        p = self.kwargs
        return int(p["n_mels"] if self.name == "bat" else p["num_mel_bins"])

    def _window_and_hop(self) -> tuple[int, int]:
        """(samples per frame, hop in samples)."""
        p = self.kwargs
        if self.name == "bat":
            return int(p["n_fft"]), int(p["hop_length"])
        return int(p["sample_rate"] * p["frame_length_ms"] * 0.001), int(
            p["sample_rate"] * p["frame_shift_ms"] * 0.001
        )

    @property
    def min_samples(self) -> int:
        window, _ = self._window_and_hop()
        return window // 2 + 1 if self.name == "bat" else window  # bat: reflect padding needs > n_fft // 2

    def frames(self, samples: int) -> int:
        """Frames the front-end makes of `samples` samples (bat: centred frames; kaldi: snip_edges)."""
        window, hop = self._window_and_hop()
        return samples // hop + 1 if self.name == "bat" else 1 + (samples - window) // hop

    @property
    def clip_samples(self) -> int | None:
        return None if self.clip_seconds is None else round(self.clip_seconds * self.sample_rate)

    @property
    def fixed_frames(self) -> int | None:
        return None if self.clip_seconds is None else self.frames(self.clip_samples)

    def describe(self) -> dict:
        return {"name": self.name, **FRONTENDS[self.name], "params": self.kwargs}

    def describe_clip(self) -> dict:
        if self.clip_seconds is None:
            return {"mode": "full", "description": "every clip at its full length; num_frames = frames"}
        return {
            "mode": "fixed",
            "seconds": self.clip_seconds,
            "samples": self.clip_samples,
            "frames": self.fixed_frames,
            "description": (
                f"clips longer than {self.clip_seconds} s are cut to their first {self.clip_samples} samples "
                "before the front-end; the features of shorter clips are zero-padded to "
                f"{self.fixed_frames} frames after the front-end (after normalisation); num_frames is the "
                "true number of frames"
            ),
        }

    def _bucket(self, frames: int) -> int:
        return math.ceil(frames / self.bucket_frames) * self.bucket_frames

    def compute(self, wave: np.ndarray) -> np.ndarray:
        """float32 [samples] -> float32 [frames(samples), n_mels], through one jit per length bucket."""
        p = self.kwargs
        window, hop = self._window_and_hop()
        frames = self.frames(wave.shape[0])
        need = (self._bucket(frames) - 1) * hop + window  # samples that make exactly the bucket's frames
        if self.name == "bat":
            pad = window // 2
            padded = np.pad(wave, (pad, pad), mode="reflect")  # = the front-end's centring
            padded = np.pad(padded[:need], (0, max(0, need - padded.shape[0])))
            out = _bat_bucketed()(padded, np.int32(frames), **p)
        else:
            from bat_jax.audio.frontend import kaldi_fbank

            centred = (wave - wave.mean(dtype=np.float64)).astype(np.float32)  # the mean of the true samples
            padded = np.pad(centred[:need], (0, max(0, need - centred.shape[0])))
            out = kaldi_fbank(padded, **{**p, "remove_mean": False})
        return np.asarray(out)[:frames]

    def __call__(self, wave: np.ndarray) -> tuple[np.ndarray, int]:
        """float32 [samples] (already cut) -> (float16 [frames or fixed_frames, n_mels], true frames)."""
        features = self.compute(wave)  # [T, n_mels]
        frames = features.shape[0]
        if self.fixed_frames is not None and frames < self.fixed_frames:
            features = np.pad(features, ((0, self.fixed_frames - frames), (0, 0)))
        return features.astype(np.float16), frames


# ----------------------------------------------------------------------------------- per-clip processing


@dataclass(frozen=True)
class ClipResult:
    """A record to write (`record` set) or a skip (`kind` and `reason` set)."""

    record: bytes | None = None
    num_frames: int = 0
    num_samples: int = 0
    kind: str = ""
    reason: str = ""


def _load_error_kind(message: str) -> str:
    for needle, kind in (
        ("no such file", "missing file"),
        ("empty", "empty file"),
        ("finite", "non-finite audio"),
    ):
        if needle in message:
            return kind
    return "unreadable audio"


def process_clip(task: ClipTask, loader, frontend: Frontend, num_classes: int) -> ClipResult:
    """Load, cut, compute and encode one clip; any failure becomes a skip with its reason."""
    from bat_jax.audio.io import AudioLoadError

    try:
        wave, labels = loader(task)
    except AudioLoadError as e:
        return ClipResult(kind=_load_error_kind(str(e)), reason=str(e))
    except Exception as e:  # noqa: BLE001 - an unusable input is skipped, not fatal
        return ClipResult(kind="unreadable input", reason=f"{type(e).__name__}: {e}")
    bad = [c for c in labels if not 0 <= c < num_classes]
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
    record = records.encode(records.Clip(features, frames, task.clip_id, tuple(labels)))
    return ClipResult(record, frames, int(wave.shape[0]))


_WORKER: dict[str, Any] = {}


def _init_worker(loaders: dict, frontend: Frontend, num_classes: int, in_process: bool = False) -> None:
    import jax

    if not in_process:
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


class _Runner:
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


# ------------------------------------------------------------------------------------ output and resume


class OutputError(RuntimeError):
    """The output folder cannot be written as asked (exists with other settings, not ours...)."""


def _jsonable(obj):
    import json

    return json.loads(json.dumps(obj, default=str))


def _diff(old: dict, new: dict, width: int = 200) -> str:
    """The keys whose values differ, with both values (shortened)."""
    keys = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    show = lambda v: textwrap.shorten(repr(v), width)
    return "; ".join(f"{k}: existing {show(old.get(k))} vs now {show(new.get(k))}" for k in keys)


def _refuse_foreign(out: Path) -> None:
    """Refuse a non-empty folder not written by `prepare` (never touch its files, even with --overwrite)."""
    progress = out / shards.PROGRESS_DIR
    others = [p.name for p in out.iterdir() if p.name != shards.PROGRESS_DIR] if out.is_dir() else []
    if others and not (progress / "global.json").is_file():
        raise OutputError(
            f"{out} exists and is not a `bat-jax prepare` output (no {shards.PROGRESS_DIR}/global.json), "
            f"found {sorted(others)[:5]}; choose a new or empty folder"
        )


def check_output(out: Path, global_cfg: dict, split_cfgs: dict[str, dict], overwrite: bool) -> None:
    """Refuse an output made with other settings (unless `overwrite`, which deletes what must be redone)."""
    _refuse_foreign(out)
    progress = out / shards.PROGRESS_DIR
    existing = shards.read_json(progress / "global.json")
    if existing is None:
        return
    if existing != global_cfg:
        if not overwrite:
            raise OutputError(
                f"{out} was prepared with other settings ({_diff(existing, global_cfg)}); "
                "use another --out, or --overwrite to delete it and start again"
            )
        for split in shards.progress_splits(out):
            shards.remove_split(out, split)
        (out / shards.MANIFEST).unlink(missing_ok=True)
        (progress / "global.json").unlink(missing_ok=True)
        return
    for split, cfg in split_cfgs.items():
        state = shards.read_json(progress / split / "split.json")
        if overwrite:
            shards.remove_split(out, split)
        elif state is None and (out / split).exists():
            raise OutputError(
                f"{out / split} exists but has no progress state; use --overwrite to replace it"
            )
        elif state is not None and state.get("config") != cfg:
            raise OutputError(
                f"split {split!r} of {out} was prepared from other inputs or settings "
                f"({_diff(state.get('config', {}), cfg)}); use --overwrite to redo it"
            )


def _split_config(source: SourcePlan, split: SplitPlan, ranges: list[range], sharding: dict) -> dict:
    names = [shards.shard_name(split.name, k, len(ranges)) for k in range(len(ranges))]
    return _jsonable(
        {
            "source": source.description,
            "inputs_digest": split.digest,
            "num_inputs": len(split.tasks),
            "sharding": sharding,
            "shards": names,
            "shard_sizes": [len(r) for r in ranges],
        }
    )


@dataclass
class SplitRun:
    """What one split's run did (for the summary)."""

    name: str
    shards_total: int
    shards_reused: int
    clips_computed: int


def _write_split(
    out: Path,
    split: SplitPlan,
    ranges: list[range],
    config_digest: str,
    runner: _Runner,
    progress: bool,
) -> SplitRun:
    """Write every shard of `split` that is not done yet, in order; returns what was done."""
    state_dir = out / shards.PROGRESS_DIR / split.name
    (out / split.name).mkdir(parents=True, exist_ok=True)
    names = [shards.shard_name(split.name, k, len(ranges)) for k in range(len(ranges))]
    todo = []
    for k, name in enumerate(names):
        done = shards.read_json(state_dir / (name + shards.DONE_SUFFIX))
        if not shards.shard_done(out / split.name / name, done, config_digest):
            todo.append(k)
    tasks = [split.tasks[i] for k in todo for i in ranges[k]]
    results = runner.map(split.name, tasks)
    from tqdm import tqdm

    bar = tqdm(
        total=len(tasks), desc=f"prepare {split.name}", unit="clip", file=sys.stderr, disable=not progress
    )
    try:
        for k in todo:
            done_path = state_dir / (names[k] + shards.DONE_SUFFIX)
            done_path.unlink(missing_ok=True)  # stale: this shard is being rewritten
            writer = shards.ShardWriter(out / split.name / names[k])
            state = {"num_records": 0, "num_inputs": len(ranges[k]), "total_frames": 0, "num_samples": 0}
            skipped = []
            try:
                for i in ranges[k]:
                    task, result = split.tasks[i], next(results)
                    if result.record is None:
                        skipped.append(
                            sources.Skipped(split.name, task.source, result.kind, result.reason).to_json()
                        )
                    else:
                        writer.write(result.record)
                        state["total_frames"] += result.num_frames
                        state["num_samples"] += result.num_samples
                    bar.update(1)
                size = writer.commit()
            except BaseException:
                writer.abort()
                raise
            state.update(
                num_records=writer.num_records, bytes=size, config_digest=config_digest, skipped=skipped
            )
            shards.write_json(done_path, state)
    finally:
        bar.close()
        results.close()
    return SplitRun(split.name, len(ranges), len(ranges) - len(todo), len(tasks))


def _split_entry(out: Path, split: str) -> dict | None:
    """The manifest entry of a finished split from its progress state, or None if it is not finished."""
    state_dir = out / shards.PROGRESS_DIR / split
    state = shards.read_json(state_dir / "split.json")
    if state is None:
        return None
    entry = {"num_clips": 0, "num_skipped": len(state["pre_skipped"]), "total_frames": 0, "num_samples": 0}
    shard_list, skipped, num_bytes = [], list(state["pre_skipped"]), 0
    for name in state["config"]["shards"]:
        done = shards.read_json(state_dir / (name + shards.DONE_SUFFIX))
        path = out / split / name
        if done is None or not path.is_file() or path.stat().st_size != done["bytes"]:
            return None
        shard_list.append({"path": f"{split}/{name}", "num_records": done["num_records"]})
        entry["num_clips"] += done["num_records"]
        entry["num_skipped"] += len(done["skipped"])
        entry["total_frames"] += done["total_frames"]
        entry["num_samples"] += done["num_samples"]
        skipped += done["skipped"]
        num_bytes += done["bytes"]
    entry["audio_hours"] = entry["num_samples"] / SAMPLE_RATE / 3600
    entry.update(
        shards=shard_list,
        bytes=num_bytes,
        source=state["config"]["source"],
        command=state["command"],
        seconds=state.get("seconds"),
        skipped=skipped,
    )
    return entry


def _split_order(name: str) -> tuple[int, str]:
    """Usual splits first, in their usual order, then the others alphabetically."""
    usual = ("train", "valid", "validation", "eval", "test")
    return (usual.index(name) if name in usual else len(usual), name)


def build_manifest(out: Path, global_cfg: dict, command: list[str], timing: dict) -> tuple[dict, list[str]]:
    """The manifest of every finished split in OUT, and the names of unfinished ones."""
    from bat_jax import __version__

    splits, skipped, unfinished = {}, [], []
    for split in sorted(shards.progress_splits(out), key=_split_order):
        entry = _split_entry(out, split)
        if entry is None:
            unfinished.append(split)
            continue
        skipped += entry.pop("skipped")
        splits[split] = entry
    manifest = {
        "format_version": records.FORMAT_VERSION,
        "bat_jax_version": __version__,
        "frontend": global_cfg["frontend"],
        "sample_rate": global_cfg["sample_rate"],
        "n_mels": global_cfg["n_mels"],
        "clip": global_cfg["clip"],
        "label_vocabulary": global_cfg["label_vocabulary"],
        "record_fields": {
            "features": "float16 [frames, n_mels]",
            "num_frames": "int: true number of frames (features past it are zero padding)",
            "clip_id": "str",
            "labels": "list[int]: indices into label_vocabulary",
        },
        "record_encoding": "msgpack (bat_jax.data.records)",
        "arrayrecord_options": shards.WRITER_OPTIONS,
        "splits": splits,
        "skipped": skipped,
        "command": command,
        "timing": timing,
    }
    return manifest, unfinished


# --------------------------------------------------------------------------------------------- prepare


@dataclass
class PrepareResult:
    manifest: dict
    runs: list[SplitRun]
    unfinished: list[str]
    seconds: float
    exit_status: int


def default_workers(num_clips: int | None = None) -> int:
    """min(MAX_DEFAULT_WORKERS, CPUs), and one worker per CLIPS_PER_DEFAULT_WORKER clips when fewer."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    by_size = MAX_DEFAULT_WORKERS if num_clips is None else math.ceil(num_clips / CLIPS_PER_DEFAULT_WORKER)
    return max(1, min(MAX_DEFAULT_WORKERS, cpus, by_size))


def prepare(
    source: SourcePlan,
    out: str | os.PathLike,
    frontend: Frontend,
    *,
    workers: int = 1,
    clips_per_shard: int | None = CLIPS_PER_SHARD,
    num_shards: int | None = None,
    overwrite: bool = False,
    strict: bool = False,
    command: Sequence[str] | None = None,
    progress: bool = True,
) -> PrepareResult:
    """Write `source` as spectrogram shards under `out` (resuming a previous run with the same settings).

    The exit status is 1 when this run's splits hold no clip at all, or (strict) when an input was skipped.
    With workers > 1 the workers are spawned processes: a script calling this needs an
    `if __name__ == "__main__":` guard, and the source's loaders must be picklable.
    """
    start = time.time()
    out = Path(out).expanduser().resolve()
    command = list(sys.argv if command is None else command)
    for split in source.splits:
        if not SPLIT_NAME.fullmatch(split.name):
            raise SourceError(f"split names: expected letters, digits, '_', '-' or '.', found {split.name!r}")
    if num_shards is not None:
        clips_per_shard = None
    sharding = {"clips_per_shard": clips_per_shard, "num_shards": num_shards}
    global_cfg = _jsonable(
        {
            "format_version": records.FORMAT_VERSION,
            "sample_rate": SAMPLE_RATE,
            "n_mels": frontend.n_mels,
            "frontend": frontend.describe(),
            "clip": frontend.describe_clip(),
            "label_vocabulary": list(source.vocabulary),
        }
    )
    ranges = {
        s.name: shards.plan_shards(len(s.tasks), clips_per_shard=clips_per_shard, num_shards=num_shards)
        for s in source.splits
    }
    split_cfgs = {s.name: _split_config(source, s, ranges[s.name], sharding) for s in source.splits}
    _refuse_foreign(out)  # before the lock file is created in it
    out.mkdir(parents=True, exist_ok=True)
    runs: list[SplitRun] = []
    loaders = {s.name: s.loader for s in source.splits}
    with shards.OutputLock(out):
        check_output(out, global_cfg, split_cfgs, overwrite)
        progress_dir = out / shards.PROGRESS_DIR
        shards.write_json(progress_dir / "global.json", global_cfg)
        with _Runner(workers, loaders, frontend, len(source.vocabulary)) as runner:
            for split in source.splits:
                split_start = time.time()
                state_dir = progress_dir / split.name
                state_dir.mkdir(parents=True, exist_ok=True)
                split_state = {
                    "config": split_cfgs[split.name],
                    "pre_skipped": [s.to_json() for s in split.skipped],
                    "command": command,
                }
                shards.write_json(state_dir / "split.json", split_state)
                digest = shards.digest({"global": global_cfg, "split": split_cfgs[split.name]})
                runs.append(_write_split(out, split, ranges[split.name], digest, runner, progress))
                shards.write_json(
                    state_dir / "split.json", {**split_state, "seconds": time.time() - split_start}
                )
        seconds = time.time() - start
        computed = sum(r.clips_computed for r in runs)
        timing = {
            "seconds": round(seconds, 3),
            "clips_computed": computed,
            "clips_per_second": round(computed / seconds, 3) if seconds > 0 else None,
            "workers": workers,
            "shards_computed": sum(r.shards_total - r.shards_reused for r in runs),
            "shards_reused": sum(r.shards_reused for r in runs),
            "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        manifest, unfinished = build_manifest(out, global_cfg, command, timing)
        shards.write_json(out / shards.MANIFEST, manifest)
    this_run = [manifest["splits"][r.name] for r in runs if r.name in manifest["splits"]]
    written = sum(s["num_clips"] for s in this_run)
    skipped = sum(s["num_skipped"] for s in this_run)
    status = 1 if written == 0 or (strict and skipped > 0) else 0
    return PrepareResult(manifest, runs, unfinished, seconds, status)


# --------------------------------------------------------------------------------------------- summary


def _size(num_bytes: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if num_bytes < 1000 or unit == "GB":
            return f"{num_bytes:.1f} {unit}" if unit != "B" else f"{int(num_bytes)} B"
        num_bytes /= 1000
    return ""


def format_summary(result: PrepareResult, out: Path) -> str:
    m = result.manifest
    clip = m["clip"]
    clip_text = "full-length clips" if clip["mode"] == "full" else f"clips cut/padded to {clip['seconds']} s"
    lines = [f"bat-jax prepare: {out}  ({m['frontend']['name']} front-end, {clip_text})"]
    columns = ("clips", 8), ("skipped", 8), ("frames", 12), ("hours", 8), ("shards", 7), ("size", 10)
    header = f"  {'split':<12} " + " ".join(f"{name:>{width}}" for name, width in columns) + "  run"
    lines.append(header)
    computed = {r.name: r for r in result.runs}
    for name, s in m["splits"].items():
        r = computed.get(name)
        run = (
            "kept from an earlier run"
            if r is None
            else f"{r.clips_computed} clips computed, {r.shards_reused} shards reused"
        )
        lines.append(
            f"  {name:<12} {s['num_clips']:>8} {s['num_skipped']:>8} {s['total_frames']:>12} "
            f"{s['audio_hours']:>8.3f} {len(s['shards']):>7} {_size(s['bytes']):>10}  {run}"
        )
    run_skips = [s for s in m["skipped"] if s["split"] in computed]
    if run_skips:
        lines.append(f"  skipped inputs ({len(run_skips)}; every one is listed in manifest.json):")
        by_kind = Counter(s["kind"] for s in run_skips)
        for kind, count in by_kind.most_common():
            example = next(s for s in run_skips if s["kind"] == kind)
            lines.append(
                f"    {kind}: {count}  (e.g. {example['source']}: {textwrap.shorten(example['reason'], 90)})"
            )
    for name in result.unfinished:
        lines.append(f"  split {name!r} is unfinished (an interrupted run): rerun its command to finish it")
    t = m["timing"]
    total = sum(s["bytes"] for s in m["splits"].values())
    rate = f"{t['clips_per_second']:.1f} clips/s" if t["clips_per_second"] is not None else "-"
    lines.append(
        f"  output {_size(total)}; {t['clips_computed']} clips computed in {t['seconds']:.1f} s ({rate}, "
        f"{t['workers']} worker{'s' if t['workers'] != 1 else ''})"
    )
    if result.exit_status:
        lines.append(
            "  exit status 1: "
            + (
                "nothing was written"
                if not any(s["num_clips"] for n, s in m["splits"].items() if n in computed)
                else "inputs were skipped (--strict)"
            )
        )
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------ command line

DESCRIPTION = """\
Decode audio once, compute spectrograms, and write them as ArrayRecord shards plus a manifest that the
training and probing pipelines read.

sources (--source):
  folder     every audio file under --input, recursively (.wav .flac .ogg .mp3 .m4a .aiff .aif), mixed to
             mono and resampled to 16 kHz (soxr_hq). Labels: --labels-csv FILE with rows `path,labels`
             (path relative to --input; class names separated by ';'; a header row is optional, and
             --csv-columns picks two named columns of a CSV that has one), or --labels-from-dir (the folder
             holding a file names its class), or none. The vocabulary is the sorted set of class names, or
             --labels-vocab FILE (one name per line, line i = label i). Files the CSV does not list are
             unlabeled (skipped with --require-labels); rows naming missing files are skipped. One split
             named --split, or with --split-from-subdir one split per subfolder of --input (train/, eval/).
  tfds       a TFDS dataset prepared in the array_record format (tfds build NAME --file_format=array_record),
             read with tfds.data_source, or without TensorFlow from its files directly: --tfds-name,
             --tfds-split (comma-separated: one output split each), --tfds-data-dir. Audio from the feature
             --tfds-audio-key (default audio) at its sample_rate (or --tfds-sample-rate), int16 PCM divided by
             32768, resampled to 16 kHz; labels from the ClassLabel or Sequence(ClassLabel) feature
             --tfds-label-key (default label), vocabulary = its class names.
  synthetic  the built-in synthetic dataset (12 classes of sound events, generated from --seed, no
             download): splits train (--num-clips) and eval (--num-eval-clips), --multilabel,
             --min-seconds/--max-seconds.

what is written (--out OUT):
  OUT/<split>/<split>-00000-of-0000N.arrayrecord   one record per clip (bat_jax.data.records, msgpack):
        features float16 [frames, 128], num_frames (true length; zero padding follows), clip_id
        (relative path, TFDS name/split/index or synthetic id), labels (class indices)
  OUT/manifest.json   format version, front-end name and all its parameters, sample rate, clip handling,
        label_vocabulary, per split: clips, skipped, frames, hours and the shard list; every skipped input
        with its reason; the command line, bat-jax version and timing
  OUT/.progress/      per-shard completion records, used to resume

front-ends (--frontend):
  bat    (default) BAT log-mel (bat_jax.audio.logmel): 1024-point STFT, hop 160, 128 HTK mels, dB with an
         80 dB floor, min-max to [0, 1] per clip
  kaldi  legacy EAT/SSLAM Kaldi fbank (bat_jax.audio.kaldi_fbank), stored raw: the (x - mean) / (2 std)
         dataset normalisation is applied later (bat_jax.audio.normalize_fbank)

clip length (--clip-seconds N): a clip longer than N s is cut to its first N s before the front-end; the
  features of a shorter clip are zero-padded after the front-end (after BAT's min-max, so padding = the
  minimum, as in BAT) to the frame count of N s (bat: N*16000 // 160 + 1; 10.23 s -> 1024 frames).
  num_frames keeps the true length. Default: every clip at its full length.

robustness: unreadable, corrupt, empty and too-short inputs are skipped, listed in the manifest with their
  reason and counted in the summary; the exit status is 1 only when nothing was written, or with --strict
  when anything was skipped. Output is deterministic (sorted inputs, fixed shard ranges, records in input
  order whatever the worker count). Rerunning an interrupted command writes only the missing shards.
  An output made with other settings is refused unless --overwrite. Separate runs may add splits to the
  same OUT when the front-end, clip handling and label vocabulary agree (a folder run reuses the
  vocabulary of an existing OUT).
"""

EXAMPLES = """\
examples:
  # the built-in synthetic dataset (train + eval)
  bat-jax prepare --source synthetic --out data/synth --num-clips 2000 --num-eval-clips 500

  # AudioSet from a folder of downloaded 10 s clips and a CSV `path,labels` you write from the segment
  # lists (labels = class names or MIDs separated by ';'); one run per split, same --out
  bat-jax prepare --source folder --input audioset/balanced_train --labels-csv balanced_train.csv \\
      --split train --clip-seconds 10.23 --out data/as20k --workers 8
  bat-jax prepare --source folder --input audioset/eval --labels-csv eval.csv \\
      --split eval --clip-seconds 10.23 --out data/as20k --workers 8

  # ESC-50 straight from its repository layout (meta/esc50.csv has columns filename and category)
  bat-jax prepare --source folder --input ESC-50/audio --labels-csv ESC-50/meta/esc50.csv \\
      --csv-columns filename,category --out data/esc50

  # Speech Commands v2 from its folder layout (one folder per word; move _background_noise_ out first,
  # or it becomes a class; the official validation/test lists are not applied: one split)
  bat-jax prepare --source folder --input speech_commands_v0.02 --labels-from-dir --out data/sc2

  # Speech Commands from TFDS (dataset speech_commands: splits train, validation, test)
  bat-jax prepare --source tfds --tfds-name speech_commands --tfds-split train,validation,test \\
      --out data/sc2_tfds
  # (AudioSet and ESC-50 are not in the TFDS catalog; use a folder for them)

  # legacy Kaldi fbank features for EAT / SSLAM checkpoints
  bat-jax prepare --source folder --input ESC-50/audio --labels-csv ESC-50/meta/esc50.csv \\
      --csv-columns filename,category --frontend kaldi --out data/esc50_kaldi
"""

# option -> the source it belongs to (used to reject options given to another source)
_SOURCE_OPTIONS = {
    "input": "folder",
    "split": "folder",
    "split_from_subdir": "folder",
    "labels_csv": "folder",
    "csv_columns": "folder",
    "label_separator": "folder",
    "labels_vocab": "folder",
    "labels_from_dir": "folder",
    "require_labels": "folder",
    "tfds_name": "tfds",
    "tfds_split": "tfds",
    "tfds_data_dir": "tfds",
    "tfds_audio_key": "tfds",
    "tfds_label_key": "tfds",
    "tfds_sample_rate": "tfds",
    "num_clips": "synthetic",
    "num_eval_clips": "synthetic",
    "seed": "synthetic",
    "multilabel": "synthetic",
    "min_seconds": "synthetic",
    "max_seconds": "synthetic",
}
_SYNTHETIC_DEFAULTS = {"num_clips": 200, "num_eval_clips": 50, "seed": 0}


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "prepare",
        help="decode audio once and write spectrogram shards (ArrayRecord) + manifest.json",
        description=DESCRIPTION,
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--source", required=True, choices=("folder", "tfds", "synthetic"), help="where the audio comes from"
    )
    p.add_argument(
        "--out", required=True, metavar="DIR", help="output folder (created; resumed if it exists)"
    )
    g = p.add_argument_group("folder source")
    g.add_argument("--input", metavar="DIR", help="folder of audio files (searched recursively)")
    g.add_argument("--split", metavar="NAME", help="name of the split written (default: train)")
    g.add_argument(
        "--split-from-subdir", action="store_true", default=None, help="one split per subfolder of --input"
    )
    g.add_argument("--labels-csv", metavar="FILE", help="CSV of path,labels rows (paths relative to --input)")
    g.add_argument(
        "--csv-columns",
        metavar="PATH,LABELS",
        help="the path and labels column names of a CSV with a header row (default: path,labels)",
    )
    g.add_argument(
        "--label-separator", metavar="SEP", help="between class names in a labels cell (default: ';')"
    )
    g.add_argument(
        "--labels-vocab", metavar="FILE", help="class names, one per line (line i = label index i)"
    )
    g.add_argument(
        "--labels-from-dir", action="store_true", default=None, help="label = the folder holding the file"
    )
    g.add_argument(
        "--require-labels",
        action="store_true",
        default=None,
        help="skip files without labels instead of keeping them",
    )
    g = p.add_argument_group("tfds source")
    g.add_argument(
        "--tfds-name",
        metavar="NAME",
        help="TFDS dataset name, e.g. speech_commands (name[/config][:version])",
    )
    g.add_argument("--tfds-split", metavar="SPLITS", help="comma-separated TFDS splits (default: train)")
    g.add_argument(
        "--tfds-data-dir",
        metavar="DIR",
        help="TFDS data dir (default: $TFDS_DATA_DIR or ~/tensorflow_datasets)",
    )
    g.add_argument("--tfds-audio-key", metavar="KEY", help="audio feature name (default: audio)")
    g.add_argument(
        "--tfds-label-key", metavar="KEY", help="ClassLabel feature name (default: label, if present)"
    )
    g.add_argument(
        "--tfds-sample-rate", type=int, metavar="HZ", help="the audio's rate when the feature has none"
    )
    g = p.add_argument_group("synthetic source")
    g.add_argument("--num-clips", type=int, metavar="N", help="clips in split train (default: 200)")
    g.add_argument("--num-eval-clips", type=int, metavar="N", help="clips in split eval (default: 50)")
    g.add_argument("--seed", type=int, help="generator seed (default: 0)")
    g.add_argument(
        "--multilabel", action="store_true", default=None, help="1-3 events of distinct classes per clip"
    )
    g.add_argument("--min-seconds", type=float, metavar="S", help="shortest clip (default: 1.0)")
    g.add_argument("--max-seconds", type=float, metavar="S", help="longest clip (default: 10.0)")
    g = p.add_argument_group("output")
    g.add_argument(
        "--frontend", choices=sorted(FRONTENDS), default="bat", help="spectrogram front-end (default: bat)"
    )
    g.add_argument(
        "--clip-seconds",
        type=float,
        metavar="N",
        help="cut / zero-pad every clip to N s (default: full length)",
    )
    g.add_argument(
        "--workers",
        type=int,
        default=None,
        metavar="N",
        help=(
            f"worker processes (default: min({MAX_DEFAULT_WORKERS}, CPUs), and one per "
            f"{CLIPS_PER_DEFAULT_WORKER} clips for small inputs)"
        ),
    )
    sharding = g.add_mutually_exclusive_group()
    sharding.add_argument(
        "--clips-per-shard", type=int, metavar="N", help=f"clips per shard (default: {CLIPS_PER_SHARD})"
    )
    sharding.add_argument("--num-shards", type=int, metavar="N", help="shards per split instead")
    g.add_argument("--strict", action="store_true", help="exit with status 1 when any input was skipped")
    g.add_argument(
        "--overwrite", action="store_true", help="delete an existing output made with other settings"
    )
    g.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    p.set_defaults(func=run)
    return p


def _existing_vocabulary(out: Path) -> list[str] | None:
    cfg = shards.read_json(out / shards.PROGRESS_DIR / "global.json")
    return cfg.get("label_vocabulary") if cfg else None


def plan_source(args: argparse.Namespace) -> SourcePlan:
    """The SourcePlan the command-line options describe."""
    for option, owner in _SOURCE_OPTIONS.items():
        if getattr(args, option, None) is not None and owner != args.source:
            flag = "--" + option.replace("_", "-")
            raise SourceError(f"{flag} belongs to --source {owner}, found --source {args.source}")
    if args.source == "synthetic":
        given = {k: getattr(args, k) for k in _SYNTHETIC_DEFAULTS if getattr(args, k) is not None}
        opts = {**_SYNTHETIC_DEFAULTS, **given}
        return sources.synthetic_source(
            num_clips=opts["num_clips"],
            num_eval_clips=opts["num_eval_clips"],
            seed=opts["seed"],
            multilabel=bool(args.multilabel),
            min_seconds=args.min_seconds,
            max_seconds=args.max_seconds,
        )
    if args.source == "tfds":
        if not args.tfds_name:
            raise SourceError("--source tfds: expected --tfds-name NAME (e.g. speech_commands), found none")
        splits = [s.strip() for s in (args.tfds_split or "train").split(",") if s.strip()]
        return sources.tfds_source(
            args.tfds_name,
            splits,
            data_dir=args.tfds_data_dir,
            audio_key=args.tfds_audio_key or "audio",
            label_key=args.tfds_label_key,
            sample_rate=args.tfds_sample_rate,
        )
    if not args.input:
        raise SourceError("--source folder: expected --input DIR, found none")
    columns = tuple(c.strip() for c in (args.csv_columns or ",".join(sources.CSV_COLUMNS)).split(","))
    if len(columns) != 2 or not all(columns):
        raise SourceError(f"--csv-columns: expected two names PATH,LABELS, found {args.csv_columns!r}")
    vocab, origin = args.labels_vocab, "given"
    if vocab is None and not args.overwrite and (args.labels_csv or args.labels_from_dir):
        # adding a split to an existing output: keep its label indices
        vocab = _existing_vocabulary(Path(args.out).expanduser().resolve()) or None
        origin = f"the existing output {args.out}"
    return sources.folder_source(
        args.input,
        split=args.split or "train",
        split_from_subdir=bool(args.split_from_subdir),
        labels_csv=args.labels_csv,
        csv_columns=columns,
        label_separator=args.label_separator or sources.LABEL_SEPARATOR,
        labels_vocab=vocab,
        labels_from_dir=bool(args.labels_from_dir),
        require_labels=bool(args.require_labels),
        vocabulary_origin=origin,
    )


def run(args: argparse.Namespace) -> int:
    """The `bat-jax prepare` command: returns the exit status."""
    try:
        if args.workers is not None and args.workers < 1:
            raise SourceError(f"--workers: expected N >= 1, found {args.workers}")
        if args.clip_seconds is not None and args.clip_seconds <= 0:
            raise SourceError(f"--clip-seconds: expected N > 0, found {args.clip_seconds}")
        frontend = Frontend.create(args.frontend, clip_seconds=args.clip_seconds)
        plan = plan_source(args)
        if not any(s.tasks or s.skipped for s in plan.splits):
            where = (
                f" under {args.input} (extensions {' '.join(sources.AUDIO_EXTENSIONS)})" if args.input else ""
            )
            raise SourceError(f"--source {args.source}: expected input clips, found none{where}")
        result = prepare(
            plan,
            args.out,
            frontend,
            workers=args.workers or default_workers(sum(len(s.tasks) for s in plan.splits)),
            clips_per_shard=args.clips_per_shard or CLIPS_PER_SHARD,
            num_shards=args.num_shards,
            overwrite=args.overwrite,
            strict=args.strict,
            progress=not args.no_progress,
        )
    except (SourceError, OutputError, ValueError, RuntimeError, OSError) as e:
        print(f"bat-jax prepare: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("bat-jax prepare: interrupted; run the same command again to finish", file=sys.stderr)
        return 130
    print(format_summary(result, Path(args.out)))
    return result.exit_status
