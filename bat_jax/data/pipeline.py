"""Grain input pipelines over the spectrogram shards (see `bat_jax.data.records`).

Both loaders are Grain `MapDataset` pipelines turned into `IterDataset`s (worker processes through
`mp_prefetch`); the per-clip functions live in `bat_jax.data.transforms`, the shard reading in
`bat_jax.data.shard_reader`, the batch placement in `bat_jax.data.placement`.

Pretraining, `make_pretrain_loader` (a `PretrainLoader`):

    shards → this JAX process's contiguous share (remainder dropped) → Grain's seeded global shuffle, a new
           order every epoch, repeated forever → decode → random circular roll over the valid frames
           → crop / zero-pad to `target_frames` → batch (drop remainder), all in float16 in `worker_count`
           worker processes (0: in this process)
           → global `jax.Array`s with the given `NamedSharding`, cast to `dtype` on the devices
             (numpy arrays in `dtype` when `sharding` is None)
           → `prefetch` placed batches ahead, in a thread (Grain's ThreadPrefetchIterDataset; 0: none)

    batch = {"spec": [B, target_frames, F] float32 (or the `dtype` asked for),
             "num_frames": int32 [B]  min(num_frames, target_frames),
             "clip_index": int32 [B]  global record index in the concatenated shards,
             "labels": float32 [B, num_classes] multi-hot, only when `num_classes` is given,
             "frame_labels": float32 [B, target_frames // patch_frames, num_classes], only with
                             `frame_labels` (below)}

  B is the global batch; each process supplies `global_batch_size // process_count` rows. The loader fails
  early, with a sentence, before any worker starts, when the batch does not divide over the processes or
  the sharding, when a process's batch is larger than its share of the records (it would repeat clips
  within a batch), or when `target_frames` is not a multiple of `frames_multiple` (the encoder's time
  patch size, 16 for BAT).
  * The roll is the spectrogram form of BAT's waveform roll (a deviation from the reference, which rolls
    the waveform before the front-end): the valid frames `spec[:num_frames]` are rolled circularly by
    an offset drawn uniformly in [0, num_frames); the padding stays at the end. BAT's per-clip min-max
    normalisation is invariant to the roll, so the values are unchanged as a multiset.
  * Crop: clips longer than `target_frames` keep the first `target_frames` frames *after* the roll, which
    with the random roll is a random (circular) window. The reference cuts waveforms to 10.23 s at load
    instead (1024 frames). Shorter clips are zero-padded at the end (0 is the minimum after the min-max
    normalisation, as in the reference).
  * Randomness: the epoch order is Grain's `shuffle` seeded by (seed, process) and the epoch, and each
    record's roll by (seed, epoch, record) (`transforms.record_offset`), so the pipeline is reproducible,
    resumable, and a record's roll in an epoch does not depend on the worker count.
  * `get_state() -> bytes` / `set_state(bytes)` checkpoint the iterator (JSON, restoring continues the
    exact same batches; the restoring loader needs the same shards, seed, batch size and worker count).
    The state is that of the last batch `next()` returned, not of the ones prefetched behind it.
  * Prefetch: a thread reads, rolls, batches and places `prefetch` batches (default 1) ahead while the
    step runs, so `next()` only takes a ready batch (with `worker_count` 0 the reading happens in that
    thread, else in the workers). The placed batches are on the devices: each prefetched batch costs its
    device memory.
    With orbax, save the loader itself through Grain's handler:
        mngr = ocp.CheckpointManager(path, item_handlers={"data": grain.checkpoint.CheckpointHandler()})
        mngr.save(step, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(loader)))
        mngr.restore(step, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(loader)))
    (one `process_<i>-of-<n>.json` file per JAX process).

Probe training: the same loader with `roll=False` (probing has no augmentation: every clip's first
`target_frames` frames, zero-padded) and `num_classes` for the multi-hot labels. Both loaders take `indices`
(global record indices of the split's shards) to read only a hold-out or cross-validation subset of it.

Sampler (the training loader's `sampler`): "shuffle" (default) is the seeded permutation per epoch above.
"class_balanced" (BirdSet HSN's class-balanced `WeightedRandomSampler`) draws records *with replacement*,
P(record) ∝ mean_{c ∈ labels} 1 / count(c) (`bat_jax.data.sampling.class_balanced_weights`: the formula,
the official rule, unlabelled records), the counts taken over all the selected records (`indices`), read
once when the loader is built (every record is read: the labels live beside the spectrograms). Each process
draws from its own contiguous share as above, `records_per_process` draws per "epoch", from numpy's Generator
seeded by (seed, process, epoch) (`sampling.WeightedDrawsMapDataset`): reproducible, and `get_state` /
`set_state` resume it exactly as the shuffle. Several processes: the counts are global (all selected
records) and each process fills its B / process_count rows from its own share, so the global batch is
balanced when the classes spread about evenly over the contiguous shares (each share's total weight near
1 / process_count of the whole); records grouped by class in the shards would skew it (one process: exact).

Frame-wise targets (sound event detection probes): both loaders take `frame_labels=(patch_frames,
hop_seconds)` (the training loader only with `roll=False`; both need `num_classes`), and every batch then
carries "frame_labels": float32 [B, target_frames // patch_frames, num_classes], row t of a clip = the
classes of its events active at the centre of time patch t (`bat_jax.data.events.frame_targets`; hop_seconds
from the folder's manifest: `bat_jax.data.hop_seconds`). Placed and sharded like "labels"; padding rows of
the evaluation loader are all zero. The records must carry events (`bat-jax prepare --events-csv` or
`--synthetic-events`): a record without them raises `ShardError` naming its shard and record.

Evaluation, `make_eval_loader` (an `EvalLoader`): every clip exactly once over all processes, in record
order. Process p reads a contiguous slice of the records, no roll, crop / zero-pad to `target_frames`,
batches of `global_batch_size // process_count`. The last batch is zero-padded and every process yields
the same number of batches (fully padded ones where it has fewer records), so collective steps don't hang.
Batches carry also "valid": bool [B] and "clip_index" = -1 on padding rows.

A record that cannot be read or decoded raises `ShardError` naming the shard file and the record (its
index in the shard and in the concatenation), also from a worker process; `bat-jax verify DIR` checks a
whole prepared folder. Worker processes are spawned: scripts that use `worker_count > 0` need an
`if __name__ == "__main__":` guard. Speed (benchmarks/pipeline.py): the record read dominates; shards
written uncompressed ("group_size:1,uncompressed") read several times faster than the default (brotli).
"""

from __future__ import annotations

import gc
import json
import math
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import grain
import numpy as np
from jax.sharding import NamedSharding

from bat_jax.data.placement import (  # noqa: F401  (re-exported: the pipeline's public names)
    MALLOC_TUNING,
    READ_BUFFER_BATCHES,
    Batch,
    BatchPlacement,
    allow_grain_workers,
    check_global_batch,
    read_options,
    setup_loader,
    tune_malloc,
)
from bat_jax.data.sampling import (  # noqa: F401
    SAMPLERS,
    WeightedDrawsMapDataset,
    check_sampler,
    class_balanced_weights,
)
from bat_jax.data.shard_reader import (  # noqa: F401
    ShardError,
    ShardSource,
    SubsetSource,
    check_paths,
    open_source,
    record_labels,
    shard_paths,
)
from bat_jax.data.transforms import (  # noqa: F401
    CropPad,
    RollCropPad,
    clip_example,
    frame_targets,
    multi_hot,
    roll_crop_pad,
)

# Batches the pretraining loader reads and places ahead, in a thread, while the step runs (0: in next()).
PREFETCH_BATCHES = 1

# Default of the encoder's time patch: BAT's patches are 16 frames × 16 mel bins. data/ does not import
# models/: bat_jax.train.config.loader_kwargs passes the config's encoder's patch_size[0] instead.
FRAMES_MULTIPLE = 16


def check_frame_labels(
    frame_labels: Any, num_classes: int | None, target_frames: int, where: str
) -> tuple[int, float] | None:
    """`frame_labels` = (patch_frames, hop_seconds) checked against the loader's other arguments, or None."""
    if frame_labels is None:
        return None
    try:
        patch_frames, hop = frame_labels
    except (TypeError, ValueError):
        raise ValueError(
            f"{where}: expected frame_labels (patch_frames, hop_seconds), found {frame_labels!r}"
        ) from None
    if isinstance(patch_frames, bool) or not isinstance(patch_frames, (int, np.integer)) or patch_frames <= 0:
        raise ValueError(
            f"{where}: expected frame_labels' patch_frames a positive integer, found {patch_frames!r}"
        )
    if isinstance(hop, bool) or not isinstance(hop, (int, float, np.floating)) or not (0 < hop < math.inf):
        raise ValueError(f"{where}: expected frame_labels' hop_seconds a positive number, found {hop!r}")
    if target_frames % patch_frames:
        raise ValueError(
            f"{where}: expected target_frames a multiple of frame_labels' patch_frames {patch_frames}, found "
            f"{target_frames}"
        )
    if num_classes is None:
        raise ValueError(
            f"{where}: frame_labels need num_classes (targets [patches, num_classes]), found num_classes=None"
        )
    return int(patch_frames), float(hop)


def shuffle_seed(seed: int, process_index: int) -> int:
    """Grain's shuffle seed of one process: every process orders its share differently."""
    return int(np.random.SeedSequence([seed, process_index]).generate_state(1)[0])


class PretrainLoader:
    """Endless, shuffled (or class-balanced), rolled batches; a checkpointable iterator (see the module
    docstring)."""

    def __init__(
        self,
        paths: Sequence[str | Path],
        *,
        global_batch_size: int,
        target_frames: int,
        frames_multiple: int = FRAMES_MULTIPLE,
        seed: int = 0,
        sharding: NamedSharding | None = None,
        worker_count: int = 0,
        worker_buffer_size: int = 2,
        read_threads: int = 0,
        dtype: Any = np.float32,
        num_classes: int | None = None,
        process_index: int | None = None,
        process_count: int | None = None,
        prefetch: int = PREFETCH_BATCHES,
        roll: bool = True,
        indices: Sequence[int] | None = None,
        frame_labels: tuple[int, float] | None = None,
        sampler: str = "shuffle",
    ):
        where = "pretraining pipeline" if roll else "probe training pipeline"
        self.sampler = check_sampler(sampler, where)
        if roll and frame_labels is not None:
            raise ValueError(
                f"{where}: frame_labels need roll=False (a rolled clip's events would move), found roll=True "
                f"and frame_labels={frame_labels!r}"
            )
        if isinstance(prefetch, bool) or not isinstance(prefetch, (int, np.integer)) or prefetch < 0:
            raise ValueError(
                f"{where}: expected prefetch an integer >= 0 (batches placed ahead), found {prefetch!r}"
            )
        paths = check_paths(paths, where)
        setup_loader(
            self, where, global_batch_size, target_frames, frames_multiple, sharding, dtype,
            process_index, process_count,
        )  # fmt: skip
        if not 0 <= seed < 2**32:
            raise ValueError(f"{where}: expected a seed in [0, 2**32), found {seed}")
        frame_labels = check_frame_labels(frame_labels, num_classes, target_frames, where)
        source = open_source(paths, indices, require_events=frame_labels is not None)
        self.num_records = len(source)
        self.records_per_process = self.num_records // self.process_count
        if self.local_batch_size > self.records_per_process:
            raise ValueError(
                f"{where}: the batch of {self.local_batch_size} clips per process (global batch "
                f"{global_batch_size} over {self.process_count} processes) is larger than a process's share "
                f"of the records ({self.num_records} records in {len(paths)} shards // {self.process_count} "
                f"processes = {self.records_per_process}); expected a global batch of at most "
                f"{self.records_per_process * self.process_count}, or more records"
            )
        start = self.process_index * self.records_per_process
        # Grain's shuffle permutes each index on its own (a Feistel network with cycle walking): ~10 µs
        # per clip from 10,000 records up, 37 µs at 2,000, 0.6 ms at 100 (dev VM). Against ~350 µs of CPU
        # per 1024-frame clip that is noise for real datasets, so the old EpochShuffleSampler (one numpy
        # permutation per epoch) went: 1 worker gives >1,000 clips/s (benchmarks/RESULTS.md).
        share = grain.MapDataset.source(source)[start : start + self.records_per_process]
        if sampler == "shuffle":
            stream = share.shuffle(seed=shuffle_seed(seed, self.process_index)).repeat()
        else:  # class-balanced: weights from every selected record's labels, draws from this share
            weights = class_balanced_weights(record_labels(source))[start : start + self.records_per_process]
            stream = WeightedDrawsMapDataset(share, weights, seed=seed, process_index=self.process_index)
        ds = (
            stream.map_with_index(
                RollCropPad(target_frames, seed, self.records_per_process, num_classes, roll, frame_labels)
            )
            .batch(self.local_batch_size, drop_remainder=True)
            .to_iter_dataset(read_options(read_threads, self.local_batch_size))
        )
        if worker_count:
            allow_grain_workers()
            ds = ds.mp_prefetch(
                grain.MultiprocessingOptions(
                    num_workers=worker_count, per_worker_buffer_size=worker_buffer_size
                )
            )
        # Placement is part of the pipeline, so that the prefetch thread reads, rolls and places the next
        # batches while the step runs; Grain's thread prefetch hands out each batch with the iterator state
        # taken right after it was fetched, so get_state() is that of the last batch handed out (the one the
        # step consumed), whatever is buffered, in the same format as without it.
        ds = ds.map(self._place)
        if prefetch:
            ds = grain.experimental.ThreadPrefetchIterDataset(ds, prefetch_buffer_size=int(prefetch))
        self._iterator = iter(ds)

    def __iter__(self) -> PretrainLoader:
        return self

    def __next__(self) -> Batch:
        if self._iterator is None:
            raise RuntimeError("this PretrainLoader was closed; build a new one (and set_state) to go on")
        return next(self._iterator)

    def get_state(self) -> bytes:
        """The iterator position as JSON bytes (Grain's dataset iterator state)."""
        return json.dumps(self._iterator.get_state()).encode()

    def set_state(self, state: bytes) -> None:
        """Continue from a `get_state()` of a loader built with the same arguments."""
        self._iterator.set_state(json.loads(state))

    def start_prefetch(self) -> None:
        """Start the workers now (Grain's orbax handler calls this after a restore)."""
        self._iterator.start_prefetch()

    def close(self) -> None:
        """Stop the worker processes (otherwise they stop when the loader is garbage-collected)."""
        if self._iterator is not None:
            self._iterator.close()
        # Drop the iterator now: left to interpreter shutdown, Grain's __del__ hooks run after its
        # modules are torn down and print tracebacks.
        self._iterator = None
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
        frames_multiple: int = FRAMES_MULTIPLE,
        process_index: int | None = None,
        process_count: int | None = None,
        sharding: NamedSharding | None = None,
        num_classes: int | None = None,
        worker_count: int = 0,
        read_threads: int = 0,
        dtype: Any = np.float32,
        indices: Sequence[int] | None = None,
        frame_labels: tuple[int, float] | None = None,
    ):
        where = "evaluation pipeline"
        paths = check_paths(paths, where)
        setup_loader(
            self, where, global_batch_size, target_frames, frames_multiple, sharding, dtype,
            process_index, process_count,
        )  # fmt: skip
        self.num_classes = num_classes
        self.frame_labels = check_frame_labels(frame_labels, num_classes, target_frames, where)
        self.worker_count = worker_count
        self.read_threads = read_threads
        self._source = open_source(paths, indices, require_events=self.frame_labels is not None)
        self.num_records = len(self._source)
        # Contiguous slices; sizes differ by at most one record, the largest sets the number of batches.
        self.start = self.num_records * self.process_index // self.process_count
        self.end = self.num_records * (self.process_index + 1) // self.process_count
        largest = math.ceil(self.num_records / self.process_count)
        self.num_batches = math.ceil(largest / self.local_batch_size)
        self._template = {
            "spec": ((target_frames, self._source.num_mels or 0), np.float16),
            "num_frames": ((), np.int32),
            "clip_index": ((), np.int32),
        }
        if num_classes is not None:
            self._template["labels"] = ((num_classes,), np.float32)
        if self.frame_labels is not None:
            patches = target_frames // self.frame_labels[0]
            self._template["frame_labels"] = ((patches, num_classes), np.float32)  # padding rows: all zero

    def __len__(self) -> int:
        return self.num_batches

    def _batches(self) -> grain.IterDataset:
        ds = (
            grain.MapDataset.source(self._source)[self.start : self.end]
            .map(CropPad(self.target_frames, self.num_classes, self.frame_labels))
            .batch(self.local_batch_size, drop_remainder=False)
            .to_iter_dataset(read_options(self.read_threads, self.local_batch_size))
        )
        if self.worker_count:
            allow_grain_workers()
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
