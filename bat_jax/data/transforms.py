"""Per-clip functions of the loaders: roll / crop / pad a decoded record into an example, multi-hot labels,
frame-wise event targets (`bat_jax.data.events.frame_targets`), and the Grain transforms that apply them
(see `bat_jax.data.pipeline` for what each loader does)."""

from __future__ import annotations

import dataclasses
from typing import Any

import grain
import numpy as np

from bat_jax.data.events import frame_targets

Example = dict[str, np.ndarray]


def roll_crop_pad(spec: np.ndarray, num_frames: int, offset: int, target_frames: int) -> np.ndarray:
    """spec [frames, F] → [target_frames, F]: roll spec[:num_frames] by `offset` (as np.roll),
    keep the first `target_frames` frames, zero-pad the rest. One copy, in the input dtype."""
    n, m = int(num_frames), min(int(num_frames), target_frames)
    if not 0 <= offset < n:
        raise ValueError(f"roll: expected an offset in [0, {n}), found {offset}")
    out = np.empty((target_frames, spec.shape[1]), spec.dtype)  # [T, F]
    head = min(offset, m)  # rolled[:offset] = valid[n - offset:]
    out[:head] = spec[n - offset : n - offset + head]
    out[head:m] = spec[: m - head]
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
    element: tuple[int, dict[str, Any]],
    target_frames: int,
    num_classes: int | None = None,
    offset: int = 0,
    frame_labels: tuple[int, float] | None = None,
) -> Example:
    """(record index, decoded record) → {"spec": fp16 [T, F], "num_frames", "clip_index"[, "labels"]
    [, "frame_labels"]}.

    The valid frames are rolled by `offset`, in [0, num_frames) (0: no roll). `frame_labels` = (patch_frames,
    hop_seconds) adds "frame_labels" float32 [T // patch_frames, num_classes]: the record's events at each
    time patch's centre (`frame_targets`; the record must hold events, and there must be no roll)."""
    index, clip = element
    n = int(clip["num_frames"])
    example = {
        "spec": roll_crop_pad(clip["spec"], n, offset, target_frames),  # fp16 [T, F]
        "num_frames": np.int32(min(n, target_frames)),
        "clip_index": np.int32(index),
    }
    if num_classes is not None:
        where = f"clip {clip['clip_id']!r} (record {index})"
        example["labels"] = multi_hot(clip["labels"], num_classes, where)
    if frame_labels is not None:
        where = f"clip {clip['clip_id']!r} (record {index})"
        if num_classes is None or offset:
            raise ValueError(
                f"{where}: frame_labels need num_classes and no roll, found num_classes {num_classes}, "
                f"roll offset {offset}"
            )
        if "event_times" not in clip:
            raise ValueError(
                f"{where}: expected event annotations (bat-jax prepare --events-csv or --synthetic-events), "
                f"found a record without them"
            )
        patch_frames, hop = frame_labels
        times, classes = clip["event_times"], clip["event_classes"]  # [k, 2], [k]
        patches = target_frames // patch_frames
        example["frame_labels"] = frame_targets(times, classes, num_classes, patches, patch_frames, hop)
    return example


_MASK64 = (1 << 64) - 1


def record_offset(seed: int, epoch: int, record: int, num_frames: int) -> int:
    """The roll offset of one record in one epoch, uniform in [0, num_frames): a function of
    (seed, epoch, record) and nothing else.

    SplitMix64's finaliser (Steele, Lea & Flood 2014) over the key, then Lemire's multiply-shift to the
    range: 0.5 µs, against 28 µs for a `np.random.Generator(np.random.Philox(key))` per record, which was
    ~8 % of a clip's CPU time in the loader (benchmarks/RESULTS.md)."""
    z = (seed * 0x9E3779B97F4A7C15 + epoch * 0xD1B54A32D192ED03 + record * 0x8CB92BA72F3D8DD7) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    z ^= z >> 31
    return (z * int(num_frames)) >> 64


@dataclasses.dataclass(frozen=True)
class RollCropPad(grain.transforms.MapWithIndex):
    """Pretraining: random circular roll of the valid frames, crop / zero-pad.

    Applied to the endless shuffled stream of this process's `records_per_epoch` records: element `index`
    belongs to epoch index // records_per_epoch, and its roll is `record_offset(seed, epoch, record, n)`,
    so it does not depend on the worker count nor on the record's position in the epoch."""

    target_frames: int
    seed: int
    records_per_epoch: int
    num_classes: int | None = None
    roll: bool = True  # False: probing (no augmentation), the first target_frames frames of every clip
    frame_labels: tuple[int, float] | None = None  # (patch_frames, hop_seconds), with roll=False only

    def map_with_index(self, index: int, element: tuple[int, dict[str, Any]]) -> Example:
        if not self.roll:
            return clip_example(element, self.target_frames, self.num_classes, frame_labels=self.frame_labels)
        record, clip = element
        epoch = index // self.records_per_epoch
        offset = record_offset(self.seed, epoch, record, clip["num_frames"])
        return clip_example(element, self.target_frames, self.num_classes, offset)


@dataclasses.dataclass(frozen=True)
class CropPad(grain.transforms.Map):
    """Evaluation: first `target_frames` frames, zero-pad (no roll)."""

    target_frames: int
    num_classes: int | None = None
    frame_labels: tuple[int, float] | None = None  # (patch_frames, hop_seconds)

    def map(self, element: tuple[int, dict[str, Any]]) -> Example:
        return clip_example(element, self.target_frames, self.num_classes, frame_labels=self.frame_labels)
