"""Reading spectrogram shards for the loaders: the shard list of a split, and a Grain data source of decoded
records whose errors name the shard file and the record (see `bat_jax.data.records` for the format)."""

from __future__ import annotations

import bisect
import itertools
import json
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grain
import numpy as np

from bat_jax.data import records

# Shards opened at once while counting their records (opening is I/O-bound: remote file systems are slow).
OPEN_THREADS = 16


class ShardError(ValueError):
    """A record of a shard that cannot be read or decoded; the message names the file and the record.

    One string argument only, so that it pickles unchanged out of Grain's worker processes."""


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


def check_paths(paths: Any, where: str) -> list[str]:
    """A list of existing shard files, or a sentence saying what is wrong with `paths`."""
    if isinstance(paths, (str, Path)):
        raise TypeError(
            f"{where}: expected a list of shard paths, found the string {str(paths)!r}; use "
            f"pipeline.shard_paths(root, split) for a prepared folder, or [path] for one shard"
        )
    if not isinstance(paths, Sequence):
        raise TypeError(f"{where}: expected a list of shard paths, found a {type(paths).__name__}")
    bad = [p for p in paths if not isinstance(p, (str, Path))]
    if bad:
        raise TypeError(f"{where}: expected shard paths as str or Path, found {bad[:3]!r}")
    paths = [str(p) for p in paths]
    if not paths:
        raise ValueError(f"{where}: expected at least one shard path, found an empty list")
    missing = [p for p in paths if not Path(p).is_file()]
    if missing:
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise FileNotFoundError(
            f"{where}: expected ArrayRecord shard files, these do not exist: {missing[:5]}{more}"
        )
    return paths


def _prepared_folder(path: str) -> Path:
    """The folder to pass to `bat-jax verify`: the one holding manifest.json above the shard, if any."""
    for folder in list(Path(path).parents)[:2]:
        if (folder / "manifest.json").exists():
            return folder
    return Path(path).parent


class ShardSource(grain.sources.RandomAccessDataSource):
    """ArrayRecord shards, concatenated in order, as a source of (global record index, decoded record).

    Every read or decode failure raises `ShardError` naming the shard file, the record's index in that
    shard and its global index; records whose n_mels differ from record 0's are refused too, and with
    `require_events` (frame-wise targets) records without event annotations."""

    def __init__(self, paths: Sequence[str], require_events: bool = False):
        self.paths = list(paths)
        self.require_events = require_events
        with ThreadPoolExecutor(max(1, min(OPEN_THREADS, len(self.paths)))) as pool:
            self._shards = list(pool.map(self._open, self.paths))
        counts = [len(shard) for shard in self._shards]
        self._starts = [0, *itertools.accumulate(counts)]  # record index of each shard's first record
        self.num_mels = None
        if len(self):
            self.num_mels = int(self[0][1]["spec"].shape[1])

    def _open(self, path: str) -> grain.sources.ArrayRecordDataSource:
        try:
            return grain.sources.ArrayRecordDataSource([path])
        except Exception as e:
            raise ShardError(
                f"shard {path}: cannot be opened as an ArrayRecord file ({type(e).__name__}: {e}); "
                f"check the prepared folder with `bat-jax verify {_prepared_folder(path)}`"
            ) from e

    def __len__(self) -> int:
        return self._starts[-1]

    def _locate(self, index: int) -> tuple[int, int]:
        """Global record index → (shard number, index inside that shard)."""
        shard = bisect.bisect_right(self._starts, index) - 1
        return shard, index - self._starts[shard]

    def locate(self, index: int) -> tuple[str, int]:
        """Global record index → (shard path, index inside that shard)."""
        shard, local = self._locate(index)
        return self.paths[shard], local

    def __getitem__(self, index: int) -> tuple[int, dict[str, Any]]:
        index = int(index)
        if not 0 <= index < len(self):
            raise IndexError(f"expected a record index in [0, {len(self)}), found {index}")
        shard, local = self._locate(index)
        try:
            data = self._shards[shard][local]
        except Exception as e:
            raise self._error(index, "cannot be read", e) from e
        try:
            clip = records.decode(data)
        except Exception as e:
            raise self._error(index, "does not decode", e) from e
        if self.num_mels is not None and clip["spec"].shape[1] != self.num_mels:
            raise self._error(
                index,
                "has the wrong shape",
                f"expected n_mels {self.num_mels} as record 0, found spec {list(clip['spec'].shape)}",
            )
        if self.require_events and "event_times" not in clip:
            path, local = self.locate(index)
            raise ShardError(
                f"shard {path}: record {local} of that shard (record {index} of the {len(self)} in "
                f"{len(self.paths)} shards, clip {clip['clip_id']!r}) has no events: frame labels expected "
                f"event annotations (bat-jax prepare --events-csv or --synthetic-events), found a record "
                f"without them; prepare the folder again with one of them"
            )
        return index, clip

    def _error(self, index: int, what: str, cause: Any) -> ShardError:
        path, local = self.locate(index)
        reason = f"{type(cause).__name__}: {cause}" if isinstance(cause, BaseException) else cause
        return ShardError(
            f"shard {path}: record {local} of that shard (record {index} of the {len(self)} in "
            f"{len(self.paths)} shards) {what} ({reason}); the shard is damaged: check the prepared folder "
            f"with `bat-jax verify {_prepared_folder(path)}`, then prepare it again or restore the shard"
        )

    def __repr__(self) -> str:
        return f"ShardSource({len(self.paths)} shards, num_records={len(self)})"


class SubsetSource(grain.sources.RandomAccessDataSource):
    """The records of `source` at `indices` (global record indices, in that order), as (global record index,
    decoded record): a hold-out or cross-validation fold of a prepared split. Errors name the shard as
    `ShardSource`'s do."""

    def __init__(self, source: ShardSource, indices: Sequence[int]):
        self.source = source
        self.indices = np.asarray(indices, np.int64).reshape(-1)
        bad = self.indices[(self.indices < 0) | (self.indices >= len(source))]
        if bad.size:
            raise IndexError(
                f"record subset: expected record indices in [0, {len(source)}) of {source!r}, found "
                f"{bad[:5].tolist()}"
            )
        self.num_mels = source.num_mels

    def __len__(self) -> int:
        return int(self.indices.shape[0])

    def __getitem__(self, index: int) -> tuple[int, dict[str, Any]]:
        return self.source[int(self.indices[int(index)])]

    def __repr__(self) -> str:
        return f"SubsetSource({len(self)} of {self.source!r})"


def open_source(
    paths: Sequence[str], indices: Sequence[int] | None = None, require_events: bool = False
) -> ShardSource | SubsetSource:
    """The shards `paths` as one source, or only their records at `indices` (global record indices);
    `require_events`: a record without event annotations raises ShardError."""
    source = ShardSource(paths, require_events)
    return source if indices is None else SubsetSource(source, indices)


def record_labels(source: ShardSource | SubsetSource) -> list[tuple[int, ...]]:
    """Every record's class indices, in order (reads every record: the labels live beside the spectrogram)."""
    return [tuple(int(v) for v in source[i][1]["labels"]) for i in range(len(source))]
