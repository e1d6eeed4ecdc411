"""What every input source of `bat-jax prepare` plans into, and the helpers the sources share.

A source is planned up front into a `SourcePlan`: the label vocabulary and, per split, the sorted list of
clips to compute (`ClipTask`, small and picklable), the inputs already rejected while listing (`Skipped`)
and a picklable `loader` that turns a task into `(wave float32 [samples] at 16 kHz, labels)` (or
`(wave, labels, notes)`, or `(wave, labels, notes, events)`, see `SplitPlan`) inside a worker process.
Loaders raise `AudioLoadError` (or any error) for unusable inputs; `prepare` skips those.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

SAMPLE_RATE = 16000  # every front-end input is resampled to this rate
RESAMPLE_TYPE = "soxr_hq"  # librosa res_type, as BAT's loaders use
AUDIO_EXTENSIONS = (".wav", ".flac", ".ogg", ".mp3", ".m4a", ".aiff", ".aif")  # what a folder source lists


class SourceError(ValueError):
    """An input source cannot be planned (missing folder, malformed CSV, unknown TFDS dataset...)."""


@dataclass(frozen=True)
class ClipTask:
    """One input clip: its position in the split, stable id, where it comes from and its labels.

    `source` is what the manifest names when the clip is skipped (relative path, TFDS item...).
    `labels` are class indices; loaders that read labels from the data (TFDS) return their own.
    `fold` is the clip's cross-validation fold (`prepare --fold-column`), written into its record; None
    when the source has none.
    `events` are the clip's sound events (onset s, offset s, class index) from an events CSV (`prepare
    --events-csv`), written into its record; () for an annotated clip without events, None when the source
    has no annotations (a loader that makes its own events, the synthetic one, returns them instead).
    """

    index: int
    clip_id: str
    source: str
    labels: tuple[int, ...] = ()
    fold: int | str | None = None
    events: tuple[tuple[float, float, int], ...] | None = None


@dataclass(frozen=True)
class Skipped:
    """An input that was not written: `kind` groups reasons in the summary, `reason` is the detail."""

    split: str
    source: str
    kind: str
    reason: str

    def to_json(self) -> dict:
        return {"split": self.split, "source": self.source, "kind": self.kind, "reason": self.reason}


@dataclass
class SplitPlan:
    """What one split of the output is made of. `digest` identifies the inputs (resume checks it).

    `loader(task)` returns (wave, labels), (wave, labels, notes) or (wave, labels, notes, events): notes are
    (kind, reason) string pairs about a kept clip; events, (onset s, offset s, class) triples of the clip
    (None: the task's own `events`)."""

    name: str
    tasks: list[ClipTask]
    skipped: list[Skipped]
    loader: Callable[[ClipTask], tuple[np.ndarray, tuple[int, ...]]]
    digest: str


@dataclass
class SourcePlan:
    """A planned source: `description` goes into the manifest; `vocabulary[i]` names label index i."""

    kind: str
    description: dict
    vocabulary: list[str]
    splits: list[SplitPlan]
    notes: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------------------------- helpers


def _digest(items: Iterable[Any]) -> str:
    h = hashlib.sha256()
    for item in items:
        h.update(json.dumps(item, sort_keys=True, default=str).encode())
        h.update(b"\n")
    return h.hexdigest()


def resample(wave: np.ndarray, rate: int, target: int = SAMPLE_RATE) -> np.ndarray:
    """float32 [samples] at `rate` -> float32 [samples'] at `target` (librosa soxr_hq, as BAT)."""
    if rate == target:
        return np.ascontiguousarray(wave, dtype=np.float32)
    import librosa

    return np.ascontiguousarray(
        librosa.resample(wave, orig_sr=rate, target_sr=target, res_type=RESAMPLE_TYPE), dtype=np.float32
    )


def to_float_wave(audio: np.ndarray, where: str) -> np.ndarray:
    """Audio samples as stored by a dataset -> mono float32 [samples] in [-1, 1].

    Integer audio is PCM: int16 and int64 (TFDS's default Audio dtype, holding 16-bit samples) are divided
    by 2**15, int32 by 2**31, int8 by 2**7, uint8 is offset by 128. [samples, channels] is averaged.
    """
    audio = np.asarray(audio)
    if audio.ndim not in (1, 2):
        raise ValueError(
            f"{where}: expected audio [samples] or [samples, channels], found shape {audio.shape}"
        )
    kind, size = audio.dtype.kind, audio.dtype.itemsize
    if kind == "f":
        wave = audio.astype(np.float32)
    elif kind == "i":
        scale = {1: 2.0**7, 2: 2.0**15, 4: 2.0**31, 8: 2.0**15}[size]
        wave = (audio / scale).astype(np.float32)
    elif kind == "u" and size == 1:
        wave = ((audio.astype(np.float32) - 128.0) / 128.0).astype(np.float32)
    else:
        raise ValueError(f"{where}: expected float or PCM integer audio, found dtype {audio.dtype}")
    if wave.ndim == 2:
        wave = wave.mean(axis=1, dtype=np.float32)  # [samples]
    if wave.size == 0:
        raise ValueError(f"{where}: expected at least one sample, found empty audio")
    if not np.all(np.isfinite(wave)):
        raise ValueError(f"{where}: expected finite samples, found NaN or inf")
    return wave


def read_vocabulary(path: str | os.PathLike) -> list[str]:
    """A labels vocabulary file: one class name per line (line i names label index i); blank lines skipped."""
    path = Path(path)
    if not path.is_file():
        raise SourceError(
            f"--labels-vocab: expected a text file with one class name per line, found no file {path}"
        )
    names = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise SourceError(f"{path}: expected distinct class names, found duplicates {duplicates[:10]}")
    if not names:
        raise SourceError(f"{path}: expected at least one class name, found an empty file")
    return names
