"""Random-access data sources as input: any `__len__`/`__getitem__` object returning dicts (the
`tfds.data_source` protocol), read item by item in the workers."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from bat_jax.data.sources.base import ClipTask, SourcePlan, SplitPlan, _digest, resample, to_float_wave


def labels_of(value: Any, where: str) -> tuple[int, ...]:
    """A ClassLabel value (int) or a Sequence(ClassLabel) value (list/array) -> sorted class indices."""
    if value is None:
        return ()
    values = np.asarray(value).reshape(-1)
    if values.dtype.kind not in "iu":
        raise ValueError(f"{where}: expected integer class indices, found dtype {values.dtype}")
    return tuple(sorted({int(v) for v in values if v >= 0}))


@dataclass
class ItemLoader:
    """Reads item `task.index` of a random-access data source: `opener()` returns an object with
    `__len__`/`__getitem__` giving dicts (the tfds.data_source protocol). Opened lazily, once per process."""

    opener: Callable[[], Sequence[dict]]
    audio_key: str
    label_key: str | None
    sample_rate: int
    _data: Sequence[dict] | None = field(default=None, repr=False, compare=False)

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_data"] = None  # each worker process opens its own reader
        return state

    def __call__(self, task: ClipTask) -> tuple[np.ndarray, tuple[int, ...]]:
        if self._data is None:
            self._data = self.opener()
        item = self._data[task.index]
        where = f"item {task.source}"
        if self.audio_key not in item:
            raise KeyError(
                f"{where}: expected an audio feature {self.audio_key!r}, found keys {sorted(item)}"
            )
        wave = resample(to_float_wave(item[self.audio_key], where), self.sample_rate)
        labels = labels_of(item.get(self.label_key), where) if self.label_key else ()
        return wave, labels


@dataclass(frozen=True)
class _Fixed:
    """A picklable `opener()` returning an object that already exists (must be picklable for workers > 1)."""

    data: Any

    def __call__(self):
        return self.data


def items_source(
    splits: dict[str, Sequence[dict]],
    *,
    vocabulary: Sequence[str],
    sample_rate: int,
    audio_key: str = "audio",
    label_key: str | None = "label",
    name: str = "items",
) -> SourcePlan:
    """Any random-access data sources (`__len__` and `__getitem__` returning dicts with `audio_key` audio and
    an optional `label_key` class index or list of indices), one per split. With workers > 1 each data
    source is pickled to the worker processes."""
    plans = []
    for split, data in splits.items():
        n = len(data)
        tasks = [ClipTask(i, f"{name}/{split}/{i}", f"{name}/{split}[{i}]") for i in range(n)]
        loader = ItemLoader(_Fixed(data), audio_key, label_key, sample_rate)
        plans.append(SplitPlan(split, tasks, [], loader, _digest([name, split, n])))
    description = {"kind": "items", "name": name, "audio_key": audio_key, "label_key": label_key}
    return SourcePlan("items", description, list(vocabulary), plans)
