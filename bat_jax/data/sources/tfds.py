"""The TFDS source: a TFDS dataset prepared in the array_record format, read item by item.

TFDS datasets are read with `tfds.data_source` when TensorFlow is installed. Without TensorFlow, TFDS
cannot even build the `Audio` feature of a dataset's metadata, so the prepared array_record files are read
directly (`TfFreeTfdsSource`): the `Audio` feature is read as the `Tensor` it is stored as, and its
`sample_rate` kept as metadata.
"""

from __future__ import annotations

import copy
import glob
import importlib.util
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bat_jax.data.sources.base import ClipTask, SourceError, SourcePlan, SplitPlan, _digest
from bat_jax.data.sources.items import ItemLoader

TFDS_SPLIT_FILE_FORMAT = "array_record"


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
