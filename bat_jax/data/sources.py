"""Input sources of `bat-jax prepare`: a folder of audio files, a TFDS dataset, the synthetic dataset.

A source is planned up front into a `SourcePlan`: the label vocabulary and, per split, the sorted list of
clips to compute (`ClipTask`, small and picklable), the inputs already rejected while listing (`Skipped`)
and a picklable `loader` that turns a task into `(wave float32 [samples] at 16 kHz, labels)` inside a
worker process. Loaders raise `AudioLoadError` (or any error) for unusable inputs; `prepare` skips those.

Three loaders:
    FileLoader       reads `<root>/<task.source>` with `bat_jax.audio.load` (decode, mono, resample)
    SyntheticLoader  generates clip `task.index` with `bat_jax.audio.synthetic.make_clip`
    ItemLoader       reads item `task.index` of a random-access data source (`__len__`/`__getitem__`
                     returning dicts, the `tfds.data_source` protocol), opened once per process

TFDS datasets are read with `tfds.data_source` when TensorFlow is installed. Without TensorFlow, TFDS
cannot even build the `Audio` feature of a dataset's metadata, so the prepared array_record files are read
directly (`TfFreeTfdsSource`): the `Audio` feature is read as the `Tensor` it is stored as, and its
`sample_rate` kept as metadata.
"""

from __future__ import annotations

import copy
import csv
import glob
import hashlib
import importlib.util
import json
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

SAMPLE_RATE = 16000  # every front-end input is resampled to this rate
RESAMPLE_TYPE = "soxr_hq"  # librosa res_type, as BAT's loaders use
AUDIO_EXTENSIONS = (".wav", ".flac", ".ogg", ".mp3", ".m4a", ".aiff", ".aif")
CSV_COLUMNS = ("path", "labels")  # default columns of a labels CSV
LABEL_SEPARATOR = ";"  # between class names inside a CSV labels cell
SYNTHETIC_EVAL_INDEX = 1_000_000  # eval clips are synthetic indices from here on: never a train clip
TFDS_SPLIT_FILE_FORMAT = "array_record"


class SourceError(ValueError):
    """An input source cannot be planned (missing folder, malformed CSV, unknown TFDS dataset...)."""


@dataclass(frozen=True)
class ClipTask:
    """One input clip: its position in the split, stable id, where it comes from and its labels.

    `source` is what the manifest names when the clip is skipped (relative path, TFDS item...).
    `labels` are class indices; loaders that read labels from the data (TFDS) return their own.
    """

    index: int
    clip_id: str
    source: str
    labels: tuple[int, ...] = ()


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
    """What one split of the output is made of. `digest` identifies the inputs (resume checks it)."""

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


# ---------------------------------------------------------------------------------------- folder source


@dataclass(frozen=True)
class FileLoader:
    """Loads `<root>/<task.source>` as mono float32 at 16 kHz (bat_jax.audio.load); labels from the task."""

    root: str

    def __call__(self, task: ClipTask) -> tuple[np.ndarray, tuple[int, ...]]:
        from bat_jax.audio.io import load

        return load(os.path.join(self.root, task.source), SAMPLE_RATE, res_type=RESAMPLE_TYPE), task.labels


@dataclass(frozen=True)
class _CsvRow:
    line: int
    path: str
    names: tuple[str, ...]


def _list_audio_files(root: Path, extensions: Sequence[str]) -> list[str]:
    """Relative posix paths of the audio files under `root` (recursive, hidden folders skipped), sorted."""
    exts = tuple(e.lower() for e in extensions)
    found = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        rel = Path(folder).relative_to(root)
        found += [(rel / f).as_posix() for f in files if f.lower().endswith(exts)]
    return sorted(found)


def _normalise_csv_path(raw: str, root: Path) -> str:
    path = raw.strip().replace("\\", "/")
    if os.path.isabs(path):
        try:
            path = Path(path).resolve().relative_to(root).as_posix()
        except ValueError:
            return path  # outside the folder: reported as missing
    while path.startswith("./"):
        path = path[2:]
    return Path(path).as_posix()


def read_labels_csv(
    path: str | os.PathLike,
    root: Path,
    columns: Sequence[str] = CSV_COLUMNS,
    separator: str = LABEL_SEPARATOR,
) -> list[_CsvRow]:
    """Rows (line, relative path, class names) of a labels CSV.

    A header row is recognised when it holds the `columns` names (case-insensitive); the columns are then
    found by name (e.g. ESC-50's meta/esc50.csv with columns ("filename", "category")). Without a header,
    the first two columns are path and labels (only with the default column names).
    """
    path = Path(path)
    if not path.is_file():
        raise SourceError(
            f"--labels-csv: expected a CSV file of {','.join(columns)} rows, found no file {path}"
        )
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.reader(f)
        rows = [(reader.line_num, row) for row in reader if any(cell.strip() for cell in row)]
    if not rows:
        raise SourceError(f"{path}: expected {','.join(columns)} rows, found an empty CSV")
    header = [cell.strip().lower() for cell in rows[0][1]]
    wanted = [c.lower() for c in columns]
    if all(c in header for c in wanted):
        path_col, labels_col = header.index(wanted[0]), header.index(wanted[1])
        rows = rows[1:]
    elif tuple(wanted) == CSV_COLUMNS:
        path_col, labels_col = 0, 1
    else:
        raise SourceError(
            f"{path}: expected a header row with the columns {list(columns)} (--csv-columns), "
            f"found first row {rows[0][1]}"
        )
    out = []
    for line, row in rows:
        if len(row) <= path_col or not row[path_col].strip():
            raise SourceError(f"{path}, line {line}: expected a path in column {path_col + 1}, found {row}")
        cell = row[labels_col] if labels_col < len(row) else ""
        names = tuple(n.strip() for n in cell.split(separator) if n.strip())
        out.append(_CsvRow(line, _normalise_csv_path(row[path_col], root), names))
    return out


def folder_source(
    input_dir: str | os.PathLike,
    *,
    split: str = "train",
    split_from_subdir: bool = False,
    labels_csv: str | os.PathLike | None = None,
    csv_columns: Sequence[str] = CSV_COLUMNS,
    label_separator: str = LABEL_SEPARATOR,
    labels_vocab: str | os.PathLike | Sequence[str] | None = None,
    labels_from_dir: bool = False,
    require_labels: bool = False,
    extensions: Sequence[str] = AUDIO_EXTENSIONS,
    vocabulary_origin: str = "given",
) -> SourcePlan:
    """Plan a folder of audio files (recursive): one split named `split`, or one per top-level subfolder.

    Labels come from `labels_csv` (paths relative to the folder, class names separated by
    `label_separator`), or from each file's parent folder name (`labels_from_dir`), or there are none.
    The vocabulary is `labels_vocab` (a file, or a list of names from `vocabulary_origin`), else the sorted
    set of class names seen.
    Files the CSV does not list are unlabeled (skipped with `require_labels`); CSV rows naming missing
    files, duplicate rows and class names outside a given vocabulary are skipped with their reason.
    """
    root = Path(input_dir).expanduser().resolve()
    if not root.is_dir():
        raise SourceError(f"--input: expected a folder of audio files, found no folder {root}")
    if labels_csv is not None and labels_from_dir:
        raise SourceError("expected either --labels-csv or --labels-from-dir, found both")
    files = _list_audio_files(root, extensions)
    rows = read_labels_csv(labels_csv, root, csv_columns, label_separator) if labels_csv is not None else []

    def split_of(rel: str) -> tuple[str, str]:
        """relative path -> (split, path inside the split folder)."""
        if not split_from_subdir:
            return split, rel
        parts = rel.split("/", 1)
        if len(parts) != 2:
            raise SourceError(
                f"--split-from-subdir: expected every audio file inside a split subfolder of {root} "
                f"(e.g. train/, eval/), found {rel!r} at the top level; move it or drop --split-from-subdir"
            )
        return parts[0], parts[1]

    def dir_label(rel: str) -> tuple[str, ...]:
        inner = split_of(rel)[1]
        return (inner.rsplit("/", 2)[-2],) if "/" in inner else ()

    if isinstance(labels_vocab, str | os.PathLike):
        vocabulary, vocab_origin = read_vocabulary(labels_vocab), str(Path(labels_vocab).resolve())
    elif labels_vocab is not None:
        vocabulary, vocab_origin = list(labels_vocab), vocabulary_origin
    elif labels_from_dir:
        vocabulary, vocab_origin = sorted({n for rel in files for n in dir_label(rel)}), "folder names"
    else:
        vocabulary, vocab_origin = sorted({n for row in rows for n in row.names}), "labels CSV"
    index = {name: i for i, name in enumerate(vocabulary)}

    skipped: dict[str, list[Skipped]] = {} if split_from_subdir else {split: []}
    clips: dict[str, list[tuple[str, tuple[int, ...]]]] = {} if split_from_subdir else {split: []}

    def skip(rel: str, kind: str, reason: str) -> None:
        name = split_of(rel)[0]
        skipped.setdefault(name, []).append(Skipped(name, rel, kind, reason))
        clips.setdefault(name, [])

    labelled: dict[str, tuple[str, ...]] = {}
    csv_name = str(labels_csv)
    existing = set(files)
    for row in rows:
        where = f"{csv_name}, line {row.line}"
        if os.path.isabs(row.path) or ".." in row.path.split("/"):
            raise SourceError(f"{where}: expected a path inside {root} (--input), found {row.path!r}")
        if row.path in labelled:
            skip(row.path, "duplicate CSV row", f"{where}: path already listed on an earlier line")
        elif not (root / row.path).is_file():
            skip(row.path, "missing file", f"{where}: listed, but no such file in {root}")
        else:
            labelled[row.path] = row.names
            existing.add(row.path)

    for rel in sorted(existing):
        if labels_csv is not None:
            names = labelled.get(rel)
            if names is None and require_labels:
                skip(rel, "unlabeled", f"no row in {csv_name} (--require-labels)")
                continue
            names = names or ()
        else:
            names = dir_label(rel) if labels_from_dir else ()
        unknown = [n for n in names if n not in index]
        if unknown:
            skip(
                rel, "unknown label", f"class name(s) {unknown} not in the label vocabulary ({vocab_origin})"
            )
        elif require_labels and not names:
            skip(rel, "unlabeled", "no labels (--require-labels)")
        else:
            clips.setdefault(split_of(rel)[0], []).append((rel, tuple(sorted({index[n] for n in names}))))

    loader = FileLoader(str(root))
    plans = []
    for name in sorted(clips):
        tasks = [ClipTask(i, rel, rel, labels) for i, (rel, labels) in enumerate(clips[name])]
        sizes = [(rel, labels, os.path.getsize(root / rel)) for rel, labels in clips[name]]
        plans.append(SplitPlan(name, tasks, skipped.get(name, []), loader, _digest(sizes)))
    description = {
        "kind": "folder",
        "input": str(root),
        "extensions": list(extensions),
        "labels_csv": str(Path(labels_csv).resolve()) if labels_csv is not None else None,
        "csv_columns": list(csv_columns),
        "label_separator": label_separator,
        "labels_from_dir": labels_from_dir,
        "require_labels": require_labels,
        "split_from_subdir": split_from_subdir,
    }
    return SourcePlan("folder", description, vocabulary, plans)


# ------------------------------------------------------------------------------------- synthetic source


@dataclass(frozen=True)
class SyntheticLoader:
    """Generates synthetic clip `task.index` (bat_jax.audio.synthetic.make_clip) at 16 kHz."""

    config: Any  # bat_jax.audio.synthetic.SyntheticConfig

    def __call__(self, task: ClipTask) -> tuple[np.ndarray, tuple[int, ...]]:
        from bat_jax.audio.synthetic import make_clip

        wave, labels = make_clip(task.index, self.config)
        return resample(wave, self.config.sample_rate), labels


def synthetic_source(
    *,
    num_clips: int,
    num_eval_clips: int,
    seed: int = 0,
    multilabel: bool = False,
    min_seconds: float | None = None,
    max_seconds: float | None = None,
) -> SourcePlan:
    """The built-in synthetic dataset: split "train" (indices 0..num_clips-1) and "eval" (indices from
    SYNTHETIC_EVAL_INDEX, disjoint from train and independent of num_clips); labels in CLASS_NAMES order."""
    from bat_jax.audio import synthetic

    if not 0 <= num_clips < SYNTHETIC_EVAL_INDEX:
        raise SourceError(f"--num-clips: expected 0 <= N < {SYNTHETIC_EVAL_INDEX}, found {num_clips}")
    if num_eval_clips < 0:
        raise SourceError(f"--num-eval-clips: expected N >= 0, found {num_eval_clips}")
    durations = {
        k: v for k, v in (("min_seconds", min_seconds), ("max_seconds", max_seconds)) if v is not None
    }
    try:
        config = synthetic.SyntheticConfig(
            num_clips=num_clips, seed=seed, multilabel=multilabel, sample_rate=SAMPLE_RATE, **durations
        )
    except ValueError as e:
        raise SourceError(str(e)) from e
    loader = SyntheticLoader(config)
    plans = []
    for name, start, count in (("train", 0, num_clips), ("eval", SYNTHETIC_EVAL_INDEX, num_eval_clips)):
        if count == 0:
            continue
        ids = [(i, synthetic.clip_id(i, config)) for i in range(start, start + count)]
        tasks = [ClipTask(i, cid, cid) for i, cid in ids]
        plans.append(SplitPlan(name, tasks, [], loader, _digest(ids)))
    description = {
        "kind": "synthetic",
        "config": {k: v for k, v in vars(config).items() if k != "num_clips"},
        "eval_first_index": SYNTHETIC_EVAL_INDEX,
    }
    return SourcePlan("synthetic", description, list(synthetic.CLASS_NAMES), plans)


# ------------------------------------------------------------------------------- data sources and TFDS


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


def tensorflow_installed() -> bool:
    return importlib.util.find_spec("tensorflow") is not None


def _tfds_data_dir(data_dir: str | None) -> Path:
    if data_dir:
        return Path(data_dir).expanduser()
    return Path(os.environ.get("TFDS_DATA_DIR", "~/tensorflow_datasets")).expanduser()


def _version_key(name: str) -> tuple[int, ...]:
    try:
        return tuple(int(p) for p in name.split("."))
    except ValueError:
        return (-1,)


def find_tfds_dir(name: str, data_dir: str | None) -> Path:
    """The prepared folder of `name` ("ds", "ds/config", "ds:1.2.0"): the highest version if none given."""
    base_name, _, version = name.partition(":")
    base = _tfds_data_dir(data_dir) / base_name
    if version:
        found = base / version
        if (found / "dataset_info.json").is_file():
            return found
        raise SourceError(f"TFDS dataset {name!r}: expected a prepared dataset in {found}, found none")
    versions = [p for p in base.glob("*") if (p / "dataset_info.json").is_file()] if base.is_dir() else []
    if not versions:
        raise SourceError(
            f"TFDS dataset {name!r}: expected a prepared dataset under {base} (<version>/dataset_info.json), "
            f"found none; prepare it with `tfds build {base_name} --file_format=array_record "
            f"--data_dir {base.parent}` (needs TensorFlow) or pass --tfds-data-dir"
        )
    return max(versions, key=lambda p: _version_key(p.name))


def _as_tensor_json(node: dict, audio_rates: dict[str, int], path: str) -> dict:
    """Rewrite Audio features of a features.json tree as the Tensor they are stored as (no TensorFlow)."""
    node = copy.deepcopy(node)
    if "audio" in node and isinstance(node["audio"], dict):
        audio = node["audio"]
        if audio.get("lazyDecode"):
            raise SourceError(
                f"{path}: the audio feature is stored encoded (lazy_decode=True); reading it needs TensorFlow"
            )
        audio_rates[path] = int(audio.get("sampleRate", 0) or 0)
        tensor = {"shape": audio["shape"], "dtype": audio["dtype"], "encoding": audio.get("encoding", "none")}
        return {
            "pythonClassName": "tensorflow_datasets.core.features.tensor_feature.Tensor",
            "tensor": tensor,
        }
    for key, value in node.items():
        if key == "features" and isinstance(value, dict):
            node[key] = {k: _as_tensor_json(v, audio_rates, k) for k, v in value.items()}
        elif isinstance(value, dict):
            node[key] = _as_tensor_json(value, audio_rates, path)
    return node


class TfFreeTfdsSource:
    """A split of a prepared TFDS dataset (array_record files) read without TensorFlow.

    `features` is the dataset's FeaturesDict with each Audio feature replaced by the Tensor it is stored
    as; `audio_sample_rates[key]` keeps the Audio features' sample rates. Items decode as tfds.data_source's.
    """

    def __init__(self, dataset_dir: str | os.PathLike, split: str):
        import tensorflow_datasets as tfds
        from array_record.python.array_record_data_source import ArrayRecordDataSource

        self.dataset_dir, self.split = Path(dataset_dir), split
        info = json.loads((self.dataset_dir / "dataset_info.json").read_text())
        file_format = info.get("fileFormat", "tfrecord")
        if file_format != TFDS_SPLIT_FILE_FORMAT:
            raise SourceError(
                f"{self.dataset_dir}: expected a dataset prepared in the array_record format (random "
                f"access), found {file_format!r}; rebuild it with `tfds build ... --file_format=array_record`"
            )
        splits = {s["name"]: s for s in info.get("splits", [])}
        if split not in splits:
            raise SourceError(
                f"{self.dataset_dir}: expected split {split!r} (slicing like train[:10%] needs TensorFlow), "
                f"found splits {sorted(splits)}"
            )
        num_shards = len(splits[split].get("shardLengths", []))
        pattern = f"*-{split}.{TFDS_SPLIT_FILE_FORMAT}-*-of-{num_shards:05d}"
        paths = sorted(glob.glob(str(self.dataset_dir / pattern)))
        if len(paths) != num_shards:
            raise SourceError(
                f"{self.dataset_dir}: expected {num_shards} files {pattern} for split {split!r}, "
                f"found {len(paths)}"
            )
        self.audio_sample_rates: dict[str, int] = {}
        features_json = json.loads((self.dataset_dir / "features.json").read_text())
        patched = _as_tensor_json(features_json, self.audio_sample_rates, "")
        self.features = tfds.features.FeatureConnector.from_json(patched)
        self.features.load_metadata(str(self.dataset_dir))  # ClassLabel names (<key>.labels.txt)
        self._records = ArrayRecordDataSource(paths)

    def __len__(self) -> int:
        return len(self._records)

    def __getitem__(self, index: int) -> dict:
        return self.features.deserialize_example_np(self._records[index])

    def __getstate__(self):
        return {"dataset_dir": self.dataset_dir, "split": self.split}

    def __setstate__(self, state):
        self.__init__(state["dataset_dir"], state["split"])


@dataclass(frozen=True)
class TfdsOpener:
    """Opens a TFDS split: tfds.data_source when TensorFlow is installed (reader "auto"/"tfds"), else
    (or with reader "files") the prepared array_record files directly."""

    name: str
    split: str
    data_dir: str | None
    reader: str = "auto"

    def use_files(self) -> bool:
        if self.reader not in ("auto", "tfds", "files"):
            raise SourceError(f"TFDS reader: expected 'auto', 'tfds' or 'files', found {self.reader!r}")
        return self.reader == "files" or (self.reader == "auto" and not tensorflow_installed())

    def __call__(self):
        if self.use_files():
            return TfFreeTfdsSource(find_tfds_dir(self.name, self.data_dir), self.split)
        import tensorflow_datasets as tfds

        # download=False: never start a multi-GB download and preparation from here
        return tfds.data_source(self.name, split=self.split, data_dir=self.data_dir, download=False)


def _feature_info(data: Any) -> tuple[Any, dict[str, int]]:
    """(FeaturesDict, audio sample rates by key) of an opened TFDS split."""
    if isinstance(data, TfFreeTfdsSource):
        return data.features, data.audio_sample_rates
    features = data.dataset_info.features
    rates = {k: int(getattr(f, "sample_rate", 0) or 0) for k, f in features.items()}
    return features, rates


def _class_names(feature: Any, where: str) -> list[str]:
    inner = getattr(feature, "feature", feature)  # Sequence(ClassLabel) -> ClassLabel
    names = getattr(inner, "names", None)
    if names is None:
        raise SourceError(
            f"{where}: expected a ClassLabel or Sequence(ClassLabel), found {type(feature).__name__}"
        )
    return list(names)


def tfds_source(
    name: str,
    splits: Sequence[str],
    *,
    data_dir: str | None = None,
    audio_key: str = "audio",
    label_key: str | None = None,
    sample_rate: int | None = None,
    reader: str = "auto",
) -> SourcePlan:
    """A TFDS dataset prepared in the array_record format; one output split per TFDS split.

    `label_key` None means "label" if the dataset has it (else unlabeled); the vocabulary is the ClassLabel
    names. The audio's rate is the Audio feature's `sample_rate`, or `sample_rate` when given (needed for
    datasets that store audio as a plain Tensor).
    """
    plans, vocabulary = [], None
    for split in splits:
        opener = TfdsOpener(name, split, data_dir, reader)
        try:
            data = opener()
        except SourceError:
            raise
        except Exception as e:  # tfds raises many kinds; keep its message
            raise SourceError(
                f"TFDS dataset {name!r} split {split!r}: expected it prepared in the array_record format "
                f"under {_tfds_data_dir(data_dir)} (tfds build {name} --file_format=array_record), "
                f"found: {type(e).__name__}: {e}"
            ) from e
        features, rates = _feature_info(data)
        where = f"TFDS dataset {name!r}"
        if audio_key not in features:
            raise SourceError(
                f"{where}: expected an audio feature {audio_key!r} (--tfds-audio-key), found {list(features)}"
            )
        rate = sample_rate or rates.get(audio_key, 0)
        if not rate:
            raise SourceError(f"{where}: feature {audio_key!r} has no sample_rate; pass --tfds-sample-rate")
        key = label_key if label_key is not None else ("label" if "label" in features else None)
        if label_key is not None and label_key not in features:
            raise SourceError(f"{where}: expected a label feature {label_key!r}, found {list(features)}")
        names = _class_names(features[key], f"{where}, feature {key!r}") if key else []
        if vocabulary is not None and names != vocabulary:
            raise SourceError(f"{where}: split {split!r} has a different label vocabulary from {splits[0]!r}")
        vocabulary = names
        n = len(data)
        tasks = [ClipTask(i, f"{name}/{split}/{i}", f"{name}[{split}][{i}]") for i in range(n)]
        loader = ItemLoader(opener, audio_key, key, rate)
        loader._data = data  # reuse the opened reader in this process (dropped when pickled)
        out_name = "".join(c if c.isalnum() or c in "-_." else "_" for c in split)
        plans.append(SplitPlan(out_name, tasks, [], loader, _digest([name, split, n, rate])))
    description = {
        "kind": "tfds",
        "name": name,
        "data_dir": str(_tfds_data_dir(data_dir).resolve()),
        "audio_key": audio_key,
        "label_key": label_key if label_key is not None else ("label" if vocabulary else None),
    }
    return SourcePlan("tfds", description, vocabulary or [], plans)
