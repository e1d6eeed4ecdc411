"""Where a loader's batches go: this JAX process's share of the global batch, worker processes, and the
placement of each local batch as numpy arrays or global `jax.Array`s (see `bat_jax.data.pipeline`)."""

from __future__ import annotations

import ctypes
import functools
import math
import os
import sys
from typing import Any

import grain
import jax
import jax.numpy as jnp
import numpy as np
from absl import flags
from jax.sharding import NamedSharding, PartitionSpec

Batch = dict[str, Any]

# Records read ahead by each worker's read threads, in batches (when read_threads > 0).
READ_BUFFER_BATCHES = 2

# glibc serves every allocation above 128 KiB (one 1024x128 fp16 clip is 256 KiB) with fresh mmap'ed pages
# and returns them on free, so each record read, decode and batch pays page faults again; on the VMs we
# measured that was ~40% of the per-clip cost (benchmarks/RESULTS.md). Raising the thresholds keeps those
# buffers on the reused heap. Env vars for the spawned Grain workers (read at their start), mallopt for
# this process; a value the user already set wins, and BAT_JAX_MALLOC_TUNING=0 turns it off. glibc only.
MALLOC_TUNING = {"MALLOC_MMAP_THRESHOLD_": 32 << 20, "MALLOC_TRIM_THRESHOLD_": 256 << 20}
_MALLOPT_PARAM = {"MALLOC_MMAP_THRESHOLD_": -3, "MALLOC_TRIM_THRESHOLD_": -1}  # M_MMAP_/M_TRIM_THRESHOLD


@functools.cache
def tune_malloc() -> None:
    """Keep large (per-clip, per-batch) allocations on the heap in this process and its future workers."""
    if not sys.platform.startswith("linux") or os.environ.get("BAT_JAX_MALLOC_TUNING") == "0":
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    for name, value in MALLOC_TUNING.items():
        value = int(os.environ.setdefault(name, str(value)))
        libc.mallopt(_MALLOPT_PARAM[name], value)


def allow_grain_workers() -> None:
    """Grain's worker processes read absl flags; outside an absl app (our argparse CLI, pytest, notebooks)
    they were never parsed, so take the defaults."""
    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def process_index_and_count(process_index: int | None, process_count: int | None) -> tuple[int, int]:
    index = jax.process_index() if process_index is None else int(process_index)
    count = jax.process_count() if process_count is None else int(process_count)
    if not 0 <= index < count:
        raise ValueError(f"expected 0 <= process_index < process_count, found {index} and {count}")
    return index, count


def _batch_axis_sharding(sharding: NamedSharding) -> NamedSharding:
    """The batch-dimension part of `sharding` (other dimensions replicated), valid for outputs of any rank."""
    spec = sharding.spec
    return NamedSharding(sharding.mesh, PartitionSpec(spec[0] if len(spec) else None))


def _num_batch_shards(sharding: NamedSharding) -> int:
    axes = sharding.spec[0] if len(sharding.spec) else None
    if axes is None:
        return 1
    axes = (axes,) if isinstance(axes, str) else tuple(axes)
    return math.prod(sharding.mesh.shape[axis] for axis in axes)


def check_global_batch(
    global_batch_size: int, process_count: int, sharding: NamedSharding | None, where: str
) -> int:
    """Fails early, with a sentence, when the global batch does not divide; returns the per-process batch."""
    if global_batch_size <= 0:
        raise ValueError(f"{where}: expected a positive global batch size, found {global_batch_size}")
    if global_batch_size % process_count:
        raise ValueError(
            f"{where}: the global batch size {global_batch_size} does not divide over {process_count} "
            f"processes; expected a multiple of {process_count}"
        )
    if sharding is not None:
        if process_count != jax.process_count():
            raise ValueError(
                f"{where}: global arrays need the real process count; found process_count={process_count} "
                f"but jax.process_count()={jax.process_count()} (use sharding=None to simulate processes)"
            )
        shards = _num_batch_shards(sharding)
        if global_batch_size % shards:
            raise ValueError(
                f"{where}: the global batch size {global_batch_size} does not divide over the {shards} "
                f"batch shards of the sharding {sharding.spec} on mesh {dict(sharding.mesh.shape)}; "
                f"expected a multiple of {shards}"
            )
        if shards % process_count:
            raise ValueError(
                f"{where}: expected the batch dimension of the sharding to be split over every process, "
                f"found {shards} batch shards for {process_count} processes (spec {sharding.spec})"
            )
    return global_batch_size // process_count


def check_target_frames(target_frames: int, frames_multiple: int, where: str) -> None:
    """`target_frames` must be a positive multiple of the encoder's time patch (`frames_multiple`)."""
    if not isinstance(frames_multiple, (int, np.integer)) or frames_multiple <= 0:
        raise ValueError(f"{where}: expected frames_multiple a positive integer, found {frames_multiple!r}")
    if (
        not isinstance(target_frames, (int, np.integer))
        or target_frames <= 0
        or target_frames % frames_multiple
    ):
        raise ValueError(
            f"{where}: expected target_frames a positive multiple of {frames_multiple} (frames_multiple, the "
            f"encoder's time patch size), found {target_frames!r}"
        )


def float_dtype(dtype: Any, where: str) -> np.dtype:
    dtype = jnp.dtype(dtype)
    if dtype not in (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
        raise ValueError(f"{where}: expected dtype float32, bfloat16 or float16, found {dtype}")
    return dtype


def read_options(read_threads: int, local_batch_size: int) -> grain.ReadOptions:
    """0 threads (read in the worker's own thread) was fastest on local disks; raise for remote storage."""
    return grain.ReadOptions(
        num_threads=read_threads, prefetch_buffer_size=READ_BUFFER_BATCHES * local_batch_size
    )


class BatchPlacement:
    """Local batch from the workers (spec float16) → output batch: numpy in `dtype` when `sharding` is None,
    else global `jax.Array`s. With a sharding the spectrogram travels as float16 and is cast on the devices:
    half the host→device bytes, and no host-side cast (numpy's float16 conversion is slow)."""

    def __init__(self, dtype: np.dtype, sharding: NamedSharding | None, global_batch_size: int):
        self.dtype = dtype
        self.global_batch_size = global_batch_size
        self.sharding = None if sharding is None else _batch_axis_sharding(sharding)
        if self.sharding is not None:
            self._cast = jax.jit(lambda x: x.astype(dtype), out_shardings=self.sharding)

    def __call__(self, batch: Batch) -> Batch:
        batch = {
            key: np.asarray(value) for key, value in batch.items()
        }  # plain arrays, not Grain's shm views
        if self.sharding is None:
            batch["spec"] = batch["spec"].astype(self.dtype, copy=False)
            return batch
        out = {
            key: jax.make_array_from_process_local_data(
                self.sharding, value, (self.global_batch_size, *value.shape[1:])
            )
            for key, value in batch.items()
        }
        if out["spec"].dtype != self.dtype:
            out["spec"] = self._cast(out["spec"])
        return out


def setup_loader(
    loader: Any,
    where: str,
    global_batch_size: int,
    target_frames: int,
    frames_multiple: int,
    sharding: NamedSharding | None,
    dtype: Any,
    process_index: int | None,
    process_count: int | None,
) -> None:
    """The checks and attributes both loaders share (process share of the batch, output dtype, placement)."""
    tune_malloc()
    check_target_frames(target_frames, frames_multiple, where)
    loader.process_index, loader.process_count = process_index_and_count(process_index, process_count)
    loader.global_batch_size = global_batch_size
    loader.local_batch_size = check_global_batch(global_batch_size, loader.process_count, sharding, where)
    loader.target_frames = target_frames
    loader.sharding = sharding
    loader.dtype = float_dtype(dtype, where)
    loader._place = BatchPlacement(loader.dtype, sharding, global_batch_size)
