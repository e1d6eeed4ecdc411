"""Grain input pipelines over the spectrogram shards (see `bat_jax.data.records`).

Pretraining, `make_pretrain_loader` (a `PretrainLoader`, Grain's `DataLoader` inside):

    shards → this JAX process's contiguous share (remainder dropped) → seeded shuffle, new order every
           epoch, repeated forever (`EpochShuffleSampler`) → decode → random circular roll over the valid
           frames → crop / zero-pad to `target_frames` → batch (drop remainder), all in float16 in
           `worker_count` worker processes (0: in this process)
           → global `jax.Array`s with the given `NamedSharding`, cast to `dtype` on the devices
             (numpy arrays in `dtype` when `sharding` is None)

    batch = {"spec": [B, target_frames, F] float32 (or the `dtype` asked for),
             "num_frames": int32 [B]  min(num_frames, target_frames),
             "clip_index": int32 [B]  global record index in the concatenated shards,
             "labels": float32 [B, num_classes] multi-hot, only when `num_classes` is given}

  B is the global batch; each process supplies `global_batch_size // process_count` rows, and the loader
  fails early, with a sentence, when the batch does not divide over the processes or the sharding.
  * The roll is the spectrogram form of BAT's waveform roll (a deviation from the reference, which rolls
    the waveform before the front-end): the valid frames `features[:num_frames]` are rolled circularly by
    an offset drawn uniformly in [0, num_frames); the padding stays at the end. BAT's per-clip min-max
    normalisation is invariant to the roll, so the values are unchanged as a multiset.
  * Crop: clips longer than `target_frames` keep the first `target_frames` frames *after* the roll, which
    with the random roll is a random (circular) window. The reference cuts waveforms to 10.23 s at load
    instead (1024 frames). Shorter clips are zero-padded at the end (0 is the minimum after the min-max
    normalisation, as in the reference).
  * Randomness: the epoch order is seeded by (seed, process, epoch) and each record's roll by
    (seed, epoch, record) through Grain's per-record generator, so the pipeline is reproducible,
    resumable, and a record's roll in an epoch does not depend on the worker count.
  * `get_state() -> bytes` / `set_state(bytes)` checkpoint the iterator (JSON, restoring continues the
    exact same batches; the restoring loader needs the same shards, seed, batch size and worker count).
    With orbax, save the loader itself through Grain's handler:
        mngr = ocp.CheckpointManager(path, item_handlers={"data": grain.checkpoint.CheckpointHandler()})
        mngr.save(step, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(loader)))
        mngr.restore(step, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(loader)))
    (one `process_<i>-of-<n>.json` file per JAX process).

Evaluation, `make_eval_loader` (an `EvalLoader`): every clip exactly once over all processes, in record
order. Process p reads a contiguous slice of the records, no roll, crop / zero-pad to `target_frames`,
batches of `global_batch_size // process_count`. The last batch is zero-padded and every process yields
the same number of batches (fully padded ones where it has fewer records), so collective steps don't hang.
Batches carry also "valid": bool [B] and "clip_index" = -1 on padding rows.

Worker processes are spawned: scripts that use `worker_count > 0` need an `if __name__ == "__main__":`
guard. Speed (benchmarks/pipeline.py): the record read dominates; shards written uncompressed
("group_size:1,uncompressed") read several times faster than the default (brotli) compression.
"""

from __future__ import annotations

import ctypes
import dataclasses
import functools
import gc
import json
import math
import os
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import grain
import jax
import jax.numpy as jnp
import numpy as np
from absl import flags
from jax.sharding import NamedSharding, PartitionSpec

from bat_jax.data import records

Batch = dict[str, Any]

# Records read ahead by each worker's read threads, in batches (when read_threads > 0).
READ_BUFFER_BATCHES = 2


# ---------------------------------------------------------------------------------------------- paths


def shard_paths(root: str | Path, split: str) -> list[str]:
    """The shard files of `split` under `root`: from `<root>/manifest.json` if present, else a sorted glob."""
    root = Path(root)
    manifest = root / "manifest.json"
    if manifest.exists():
        splits = json.loads(manifest.read_text()).get("splits", {})
        if split not in splits:
            raise ValueError(f"{manifest}: expected split {split!r} in 'splits', found {sorted(splits)}")
        paths = [str(root / shard["path"]) for shard in splits[split]["shards"]]
    else:
        paths = [str(p) for p in sorted((root / split).glob("*.arrayrecord"))]
    if not paths:
        raise FileNotFoundError(f"expected shards of split {split!r} under {root}, found none")
    return paths


# ------------------------------------------------------------------------------------ per-clip functions


def roll_crop_pad(features: np.ndarray, num_frames: int, offset: int, target_frames: int) -> np.ndarray:
    """features [frames, F] → [target_frames, F]: roll features[:num_frames] by `offset` (as np.roll),
    keep the first `target_frames` frames, zero-pad the rest. One copy, in the input dtype."""
    n, m = int(num_frames), min(int(num_frames), target_frames)
    if not 0 <= offset < n:
        raise ValueError(f"roll: expected an offset in [0, {n}), found {offset}")
    out = np.empty((target_frames, features.shape[1]), features.dtype)  # [T, F]
    head = min(offset, m)  # rolled[:offset] = valid[n - offset:]
    out[:head] = features[n - offset : n - offset + head]
    out[head:m] = features[: m - head]
    out[m:] = 0
    return out


def multi_hot(labels: np.ndarray, num_classes: int, where: str = "labels") -> np.ndarray:
    """Class indices [k] → float32 [num_classes]."""
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"{where}: expected labels in [0, {num_classes}), found {labels.tolist()}")
    out = np.zeros((num_classes,), np.float32)
    out[labels] = 1.0
    return out


def clip_example(
    element: tuple[int, bytes],
    target_frames: int,
    num_classes: int | None = None,
    rng: np.random.Generator | None = None,
) -> dict[str, np.ndarray]:
    """(record index, record bytes) → {"spec": fp16 [T, F], "num_frames", "clip_index"[, "labels"]}.

    With `rng` the valid frames are rolled by an offset drawn in [0, num_frames); without, no roll."""
    index, record = element
    clip = records.decode(record)
    n = int(clip["num_frames"])
    offset = int(rng.integers(n)) if rng is not None else 0
    example = {
        "spec": roll_crop_pad(clip["spec"], n, offset, target_frames),  # fp16 [T, F]
        "num_frames": np.int32(min(n, target_frames)),
        "clip_index": np.int32(index),
    }
    if num_classes is not None:
        where = f"clip {clip['clip_id']!r} (record {index})"
        example["labels"] = multi_hot(clip["labels"], num_classes, where)
    return example


@dataclasses.dataclass(frozen=True)
class RollCropPad(grain.transforms.RandomMap):
    """Pretraining: decode, random circular roll of the valid frames, crop / zero-pad."""

    target_frames: int
    num_classes: int | None = None

    def random_map(self, element: tuple[int, bytes], rng: np.random.Generator) -> dict[str, np.ndarray]:
        return clip_example(element, self.target_frames, self.num_classes, rng)


@dataclasses.dataclass(frozen=True)
class CropPad(grain.transforms.Map):
    """Evaluation: decode, first `target_frames` frames, zero-pad (no roll)."""

    target_frames: int
    num_classes: int | None = None

    def map(self, element: tuple[int, bytes]) -> dict[str, np.ndarray]:
        return clip_example(element, self.target_frames, self.num_classes)


class IndexedSource(grain.sources.RandomAccessDataSource):
    """ArrayRecord shards as a data source of (record index, record bytes), so batches name their clips."""

    def __init__(self, paths: Sequence[str | Path]):
        paths = [str(p) for p in paths]
        if not paths:
            raise ValueError("expected at least one shard path, found an empty list")
        missing = [p for p in paths if not Path(p).exists()]
        if missing:
            raise FileNotFoundError(f"expected ArrayRecord shards, these files do not exist: {missing}")
        self._source = grain.sources.ArrayRecordDataSource(paths)

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int) -> tuple[int, bytes]:
        return int(index), self._source[index]

    def __repr__(self) -> str:
        return f"IndexedSource({self._source!r}, num_records={len(self)})"


class EpochShuffleSampler:
    """Grain sampler: this process's contiguous share of the records (remainder dropped), reshuffled every
    epoch, repeated forever.

    Epoch e visits the share in the order of a permutation seeded by (seed, shard, e); the record's random
    generator is keyed by (seed, epoch, record), so its augmentation depends on nothing else (not on the
    worker count, nor on the position). One O(n) permutation per epoch instead of Grain's per-index shuffle.
    """

    def __init__(self, num_records: int, *, shard_index: int, shard_count: int, seed: int):
        if not 0 <= seed < 2**32:
            raise ValueError(f"sampler: expected a seed in [0, 2**32), found {seed}")
        self.records_per_shard = num_records // shard_count
        if self.records_per_shard == 0:
            raise ValueError(
                f"sampler: expected at least one record per process ({shard_count}), found {num_records}"
            )
        self.num_records = num_records
        self.shard_index = shard_index
        self.shard_count = shard_count
        self.seed = seed
        self.start = shard_index * self.records_per_shard
        self._permutations: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return sys.maxsize  # endless

    def __getitem__(self, index: int) -> grain.RecordMetadata:
        # Grain's DataLoader asks for index = position * shard_count + shard_index.
        if index < 0:
            raise IndexError(f"sampler: expected a non-negative index, found {index}")
        epoch, position = divmod(index // self.shard_count, self.records_per_shard)
        record = self.start + int(self._permutation(epoch)[position])
        rng = np.random.Generator(np.random.Philox(key=[record, (self.seed << 32) | epoch]))
        return grain.RecordMetadata(index=index, record_key=record, rng=rng)

    def _permutation(self, epoch: int) -> np.ndarray:
        permutation = self._permutations.get(epoch)
        if permutation is None:
            rng = np.random.default_rng([self.seed, self.shard_index, epoch])
            permutation = rng.permutation(self.records_per_shard)
            # Keep the previous epoch too: read-ahead threads may straddle the boundary.
            kept = {e: p for e, p in self._permutations.items() if e == epoch - 1}
            self._permutations = {**kept, epoch: permutation}
        return permutation

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_permutations": {}}  # workers rebuild their own

    def __repr__(self) -> str:
        return (
            f"EpochShuffleSampler(num_records={self.num_records}, shard_index={self.shard_index}, "
            f"shard_count={self.shard_count}, seed={self.seed})"
        )


# --------------------------------------------------------------------------------- processes and devices


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


def _allow_grain_workers() -> None:
    """Grain's worker processes read absl flags; outside an absl app (our argparse CLI, pytest, notebooks)
    they were never parsed, so take the defaults."""
    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def _process_index_and_count(process_index: int | None, process_count: int | None) -> tuple[int, int]:
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


def _float_dtype(dtype: Any, where: str) -> np.dtype:
    dtype = jnp.dtype(dtype)
    if dtype not in (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
        raise ValueError(f"{where}: expected dtype float32, bfloat16 or float16, found {dtype}")
    return dtype


def _read_options(read_threads: int, local_batch_size: int) -> grain.ReadOptions:
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


# ---------------------------------------------------------------------------------------------- loaders


def _setup_loader(
    loader: Any,
    where: str,
    global_batch_size: int,
    target_frames: int,
    sharding: NamedSharding | None,
    dtype: Any,
    process_index: int | None,
    process_count: int | None,
) -> None:
    """The checks and attributes both loaders share (process share of the batch, output dtype, placement)."""
    tune_malloc()
    if target_frames <= 0:
        raise ValueError(f"{where}: expected target_frames > 0, found {target_frames}")
    loader.process_index, loader.process_count = _process_index_and_count(process_index, process_count)
    loader.global_batch_size = global_batch_size
    loader.local_batch_size = check_global_batch(global_batch_size, loader.process_count, sharding, where)
    loader.sharding = sharding
    loader.dtype = _float_dtype(dtype, where)
    loader._place = BatchPlacement(loader.dtype, sharding, global_batch_size)


class PretrainLoader:
    """Endless, shuffled, rolled batches; a checkpointable iterator (see the module docstring)."""

    def __init__(
        self,
        paths: Sequence[str | Path],
        *,
        global_batch_size: int,
        target_frames: int = 1024,
        seed: int = 0,
        sharding: NamedSharding | None = None,
        worker_count: int = 0,
        worker_buffer_size: int = 2,
        read_threads: int = 0,
        dtype: Any = np.float32,
        num_classes: int | None = None,
        process_index: int | None = None,
        process_count: int | None = None,
    ):
        where = "pretraining pipeline"
        _setup_loader(
            self, where, global_batch_size, target_frames, sharding, dtype, process_index, process_count
        )
        source = IndexedSource(paths)
        if len(source) < self.process_count:
            raise ValueError(
                f"{where}: expected at least one record per process ({self.process_count}), "
                f"found {len(source)} records in {len(paths)} shards"
            )
        shard_options = grain.sharding.ShardOptions(
            shard_index=self.process_index, shard_count=self.process_count, drop_remainder=True
        )
        sampler = EpochShuffleSampler(
            len(source), shard_index=self.process_index, shard_count=self.process_count, seed=seed
        )
        self._loader = grain.DataLoader(
            data_source=source,
            sampler=sampler,
            operations=[
                RollCropPad(target_frames, num_classes),
                grain.transforms.Batch(self.local_batch_size, drop_remainder=True),
            ],
            worker_count=worker_count,
            worker_buffer_size=worker_buffer_size,
            shard_options=shard_options,
            read_options=_read_options(read_threads, self.local_batch_size),
        )
        if worker_count:
            _allow_grain_workers()
        self._iterator = iter(self._loader)

    def __iter__(self) -> PretrainLoader:
        return self

    def __next__(self) -> Batch:
        if self._iterator is None:
            raise RuntimeError("this PretrainLoader was closed; build a new one (and set_state) to go on")
        return self._place(next(self._iterator))

    def get_state(self) -> bytes:
        """The iterator position as JSON bytes (Grain's DataLoader state)."""
        return self._iterator.get_state()

    def set_state(self, state: bytes) -> None:
        """Continue from a `get_state()` of a loader built with the same arguments."""
        self._iterator.set_state(state)

    def start_prefetch(self) -> None:
        """Start the workers now (Grain's orbax handler calls this after a restore)."""
        self._iterator.start_prefetch()

    def close(self) -> None:
        """Stop the worker processes (otherwise they stop when the loader is garbage-collected)."""
        # grain 0.2.18's DataLoaderIterator has no close(); its dataset iterator does.
        inner = getattr(self._iterator, "_iterator", None)
        if inner is not None and hasattr(inner, "close"):
            inner.close()
        # Drop the iterators now: left to interpreter shutdown, Grain's __del__ hooks run after its
        # modules are torn down and print tracebacks.
        self._iterator = inner = None
        gc.collect()

    def __enter__(self) -> PretrainLoader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# The names for the two pipelines (same signatures as the classes).
make_pretrain_loader = PretrainLoader


class EvalLoader:
    """Every clip exactly once over all processes, in order; padded last batches with a "valid" mask.

    Re-iterable: each `iter()` starts again from the first batch. `len()` is the number of batches, the
    same in every process."""

    def __init__(
        self,
        paths: Sequence[str | Path],
        *,
        global_batch_size: int,
        target_frames: int,
        process_index: int | None = None,
        process_count: int | None = None,
        sharding: NamedSharding | None = None,
        num_classes: int | None = None,
        worker_count: int = 0,
        read_threads: int = 0,
        dtype: Any = np.float32,
    ):
        where = "evaluation pipeline"
        _setup_loader(
            self, where, global_batch_size, target_frames, sharding, dtype, process_index, process_count
        )
        self.target_frames = target_frames
        self.num_classes = num_classes
        self.worker_count = worker_count
        self.read_threads = read_threads
        self._source = IndexedSource(paths)
        self.num_records = len(self._source)
        # Contiguous slices; sizes differ by at most one record, the largest sets the number of batches.
        self.start = self.num_records * self.process_index // self.process_count
        self.end = self.num_records * (self.process_index + 1) // self.process_count
        largest = math.ceil(self.num_records / self.process_count)
        self.num_batches = math.ceil(largest / self.local_batch_size)
        num_mels = records.decode(self._source[0][1])["spec"].shape[1] if self.num_records else 0
        self._template = {
            "spec": ((target_frames, num_mels), np.float16),
            "num_frames": ((), np.int32),
            "clip_index": ((), np.int32),
        }
        if num_classes is not None:
            self._template["labels"] = ((num_classes,), np.float32)

    def __len__(self) -> int:
        return self.num_batches

    def _batches(self) -> grain.IterDataset:
        ds = (
            grain.MapDataset.source(self._source)[self.start : self.end]
            .map(CropPad(self.target_frames, self.num_classes))
            .batch(self.local_batch_size, drop_remainder=False)
            .to_iter_dataset(_read_options(self.read_threads, self.local_batch_size))
        )
        if self.worker_count:
            _allow_grain_workers()
            ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=self.worker_count))
        return ds

    def _pad(self, batch: Batch | None) -> Batch:
        """A partial (or missing) local batch → full size, zeros and clip_index -1 on padding rows."""
        size = self.local_batch_size
        n = 0 if batch is None else len(batch["clip_index"])
        if n == size:
            out = dict(batch)
        else:
            out = {}
            for key, (shape, dtype) in self._template.items():
                out[key] = np.full((size, *shape), -1 if key == "clip_index" else 0, dtype)
                if n:
                    out[key][:n] = batch[key]
        out["valid"] = np.arange(size) < n  # [B]
        return out

    def __iter__(self) -> Iterator[Batch]:
        iterator = iter(self._batches())
        try:
            for _ in range(self.num_batches):
                batch = next(iterator, None)
                yield self._place(self._pad(batch))
        finally:
            iterator.close()


make_eval_loader = EvalLoader
