"""The feature cache (opt-in, `cache.enabled=True`): the frozen encoder's per-layer tokens of the training
clips, computed once and reused at every later epoch. Valid because probing has no augmentation: a clip's
input, hence its features, is the same at every epoch.

Stored in bfloat16: per clip L × (1 + T'·F') × D × 2 bytes (BAT-B on 10 s clips: 12 × 513 × 768 × 2 =
9.4 MB). In host memory when it fits in half of the available memory (`cache.where=auto`), else in a
memory-mapped file under `cache.dir` (default WORKDIR/cache) when the disk holds it; otherwise the run is
refused before any compute, naming the figure. The size and the place are printed before the cache is built.

Training from the cache: a seeded permutation per epoch (drop the remainder), batches gathered on the host
and placed with the batch sharding; the probes' step is the same jitted step with a `forward` that reads
the cached tokens instead of running the encoder (`cached_forward`). VQT needs the encoder itself: a run
with vqt and the cache is refused.
"""

from __future__ import annotations

import math
import os
import shutil
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from bat_jax.models import xla_options
from bat_jax.probe.heads import ProbeConfigError

BF16 = np.dtype(ml_dtypes.bfloat16)
MEMORY_SHARE = 0.5  # the cache may take this share of the available host memory


def bytes_per_clip(num_layers: int, tokens: int, dim: int) -> int:
    """bfloat16 bytes of one clip's cached tokens: L × (1 + patches) × D × 2."""
    return num_layers * tokens * dim * BF16.itemsize


def available_memory() -> int:
    """MemAvailable of /proc/meminfo (bytes), or the free physical pages where there is none."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def plan(num_clips: int, per_clip: int, where: str, folder: Path) -> tuple[str, int]:
    """("memory" or "disk", total bytes), or ProbeConfigError naming the figures when neither holds it."""
    total = num_clips * per_clip
    if where not in ("auto", "memory", "disk"):
        raise ProbeConfigError(f"cache.where: expected auto, memory or disk, found {where!r}")
    memory = available_memory()
    if where in ("auto", "memory") and total <= MEMORY_SHARE * memory:
        return "memory", total
    if where == "memory":
        raise ProbeConfigError(
            f"cache.where=memory: the feature cache needs {_gb(total)} ({num_clips} clips × "
            f"{_gb(per_clip)}), more than half of the {_gb(memory)} of available memory; use "
            "cache.where=disk or auto"
        )
    folder.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(folder).free
    if total > free:
        raise ProbeConfigError(
            f"cache: the feature cache needs {_gb(total)} ({num_clips} clips × {_gb(per_clip)}), more than "
            f"half of the {_gb(memory)} of available memory and more than the {_gb(free)} free on the disk "
            f"of {folder}; set cache.dir to a larger disk, or run without the cache (cache.enabled=False)"
        )
    return "disk", total


def _gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"


class FeatureCache:
    """cls [N, L, D] and patches [N, L, T', F', D] (bfloat16) of the training clips, and their targets on the
    host: labels [N, C], num_frames [N] and, with `frame_patches` (frame-wise probes), frame_labels
    [N, frame_patches, C]."""

    def __init__(self, num_clips: int, num_layers: int, grid: tuple[int, int], dim: int, num_classes: int,
                 place: str, folder: Path, frame_patches: int = 0):  # fmt: skip
        shapes = {"cls": (num_clips, num_layers, dim), "patches": (num_clips, num_layers, *grid, dim)}
        self.place, self.num_clips = place, num_clips
        self.arrays: dict[str, np.ndarray] = {}
        for name, shape in shapes.items():
            if place == "memory":
                self.arrays[name] = np.empty(shape, BF16)
            else:  # raw bfloat16 bits in a .npy of uint16 (numpy's formats know no bfloat16)
                path = folder / f"{name}.npy"
                self.arrays[name] = np.lib.format.open_memmap(path, "w+", np.uint16, shape).view(BF16)
        self.targets = {
            "labels": np.zeros((num_clips, num_classes), np.float32),
            "num_frames": np.zeros((num_clips,), np.int32),
        }
        if frame_patches:
            self.targets["frame_labels"] = np.zeros((num_clips, frame_patches, num_classes), np.float32)

    @property
    def labels(self) -> np.ndarray:
        return self.targets["labels"]

    def put(
        self, rows: np.ndarray, cls: np.ndarray, patches: np.ndarray, targets: dict[str, np.ndarray]
    ) -> None:
        """Rows `rows` from the encoder's outputs (cls [L, B, D], patches [L, B, T', F', D]) and the batch's
        targets (each [B, ...]: every key of `self.targets`)."""
        self.arrays["cls"][rows] = np.moveaxis(cls, 0, 1).astype(BF16)  # [L, B, D] -> [B, L, D]
        self.arrays["patches"][rows] = np.moveaxis(patches, 0, 1).astype(BF16)
        for key, array in self.targets.items():
            array[rows] = targets[key]

    def batch(self, rows: np.ndarray) -> dict[str, Any]:
        rows = np.sort(rows)  # a memmap reads sorted rows faster; order within a batch does not matter
        return {
            "spec": {"cls": self.arrays["cls"][rows], "patches": self.arrays["patches"][rows]},
            **{key: array[rows] for key, array in self.targets.items()},
        }


def cached_forward(params: Any, spec: dict[str, jax.Array]) -> tuple[jax.Array, jax.Array]:
    """The step's `forward` on cached tokens: (cls [L, B, D], patches [L, B, T', F', D]) in float32."""
    del params
    cls = jnp.moveaxis(spec["cls"], 1, 0).astype(jnp.float32)
    patches = jnp.moveaxis(spec["patches"], 1, 0).astype(jnp.float32)
    return cls, patches


def build(cache: FeatureCache, loader, forward, encoder_params, say, compiler_options=None) -> float:
    """Fill `cache` from an evaluation loader over the training clips (record order, padded last batch);
    returns the seconds it took. `compiler_options`: the forward's XLA options (None:
    `xla_options.inference()`, a float32 encoder's)."""
    start = time.perf_counter()
    options = xla_options.inference() if compiler_options is None else compiler_options
    encode = jax.jit(forward, compiler_options=options)
    row = 0
    for batch in loader:
        cls, patches = jax.device_get(encode(encoder_params, batch["spec"]))
        valid = np.asarray(jax.device_get(batch["valid"]))
        n = int(valid.sum())
        keep = np.flatnonzero(valid)
        targets = {key: np.asarray(jax.device_get(batch[key]))[keep] for key in cache.targets}
        cache.put(np.arange(row, row + n), cls[:, keep], patches[:, keep], targets)
        row += n
    if row != cache.num_clips:
        raise RuntimeError(f"feature cache: expected {cache.num_clips} training clips, read {row}")
    seconds = time.perf_counter() - start
    say(f"feature cache built: {row} clips in {seconds:.1f} s ({cache.place})")
    return seconds


class CachedBatches:
    """Endless batches from a FeatureCache, placed with `sharding` (global arrays; one process).

    `sampler` (the config's data.sampler): "shuffle", a permutation per epoch from (seed, epoch), remainder
    dropped; "class_balanced", rows drawn with replacement in proportion to
    `bat_jax.data.sampling.class_balanced_weights` of the cached multi-hot labels (the same weights as the
    loader's), `per_epoch` batches of draws per epoch from (seed, 0, epoch)."""

    def __init__(self, cache: FeatureCache, batch_size: int, seed: int, sharding, sampler: str = "shuffle"):
        from bat_jax.data import sampling

        if batch_size > cache.num_clips:
            raise ProbeConfigError(
                f"train.batch_size: {batch_size} clips per batch, more than the {cache.num_clips} cached "
                "clips"
            )
        if sampler not in sampling.SAMPLERS:
            raise ProbeConfigError(
                f"data.sampler: expected one of {', '.join(sampling.SAMPLERS)}, found {sampler!r}"
            )
        self.cache, self.batch_size, self.seed, self.sharding = cache, batch_size, seed, sharding
        self.sampler = sampler
        self.per_epoch = cache.num_clips // batch_size
        self.step = 0
        self._weights = sampling.class_balanced_weights(cache.labels) if sampler == "class_balanced" else None
        self._draws: tuple[int, np.ndarray] | None = None  # (epoch, its draws)

    def __iter__(self):
        return self

    def _order(self, epoch: int) -> np.ndarray:
        from bat_jax.data.sampling import draws

        if self._weights is None:
            return np.random.default_rng([self.seed, epoch]).permutation(self.cache.num_clips)
        if self._draws is None or self._draws[0] != epoch:
            size = self.per_epoch * self.batch_size
            self._draws = (epoch, draws(self._weights, size, (self.seed, 0, epoch)))
        return self._draws[1]

    def __next__(self) -> dict[str, Any]:
        epoch, k = divmod(self.step, self.per_epoch)
        order = self._order(epoch)
        rows = order[k * self.batch_size : (k + 1) * self.batch_size]
        self.step += 1
        return jax.device_put(self.cache.batch(rows), self.sharding)

    def close(self) -> None:
        pass


def tokens_per_clip(frames: int, config) -> tuple[int, tuple[int, int]]:
    """(1 + T'·F', (T', F')) tokens of a clip of `frames` frames for an encoder config."""
    grid = (frames // config.patch_size[0], config.n_mels // config.patch_size[1])
    return 1 + math.prod(grid), grid
