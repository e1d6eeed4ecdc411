"""Which clips a probe trains, validates and tests on, checked before any compute.

A probe reads a folder written by `bat-jax prepare` (`data.root`). Its evaluations, in this order:

1. K-fold cross-validation (`data.kfold=True`, e.g. ESC-50): the train split's per-clip folds (stored by
   `bat-jax prepare --fold-column`); for each fold value k, train on the other folds and test on fold k
   (no validation set). Final figures: per fold, and mean ± std over folds.
2. The prepared splits, when `data.test_split` exists: train on `data.train_split`, test on
   `data.test_split`, and track the best validation figures on `data.validation_split` when it exists
   (`data.eval_root` may name another prepared folder holding the validation / test splits: its label
   vocabulary must then be the same).
3. A dataset prepared as one split: a deterministic stratified hold-out (`data.holdout`, a fraction,
   seeded by `data.holdout_seed`; `bat_jax.probe.splits.holdout_split`) is the test set and the rest the
   training set, so that a user's own folder of labelled audio just works.

Frame-wise probes (`cgp_frame`, sound event detection) also need every split they read to carry event
annotations (`bat-jax prepare --events-csv`, or `--synthetic-events`): the loaders turn them into targets per
time patch of the encoder (`bat_jax.data.frame_targets`), at the folder's front-end hop (`hop_seconds`).

Single- or multi-label: `data.multilabel` ("single" / "multi"), or "auto": multi-label when any training clip
has not exactly one label (this reads every training record once, as does the hold-out's stratification).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import ml_collections
import numpy as np

from bat_jax.data.shard_reader import open_source, record_labels, shard_paths
from bat_jax.data.shards import read_json
from bat_jax.models.config import POS_GRID_EAT, EncoderConfig
from bat_jax.probe import heads as heads_lib
from bat_jax.probe.heads import ProbeConfigError
from bat_jax.probe.splits import holdout_split, kfold_splits

MANIFEST = "manifest.json"


@dataclasses.dataclass(frozen=True)
class Subset:
    """Records of one prepared split: all of them (`indices` None) or those at `indices`."""

    root: Path
    split: str
    indices: np.ndarray | None
    num_clips: int

    @property
    def paths(self) -> list[str]:
        return shard_paths(self.root, self.split)

    def describe(self) -> str:
        part = "" if self.indices is None else f" ({self.num_clips} selected)"
        return f"{self.root}/{self.split}{part}"


@dataclasses.dataclass(frozen=True)
class Evaluation:
    """One train / (validation) / test assignment; `name` is the fold ("" when there is one)."""

    name: str
    train: Subset
    validation: Subset | None
    test: Subset


@dataclasses.dataclass(frozen=True)
class TaskData:
    root: Path
    vocabulary: list[str]
    multilabel: bool
    frontend: str
    evaluations: list[Evaluation]
    protocol: str  # "kfold", "splits" or "holdout"
    frame_wise: bool = False  # a frame-wise probe is asked: the loaders add "frame_labels"
    hop_seconds: float = 0.01  # the front-end's frame hop (frame targets are placed in seconds)

    @property
    def num_classes(self) -> int:
        return len(self.vocabulary)


def read_manifest(root: Path) -> dict[str, Any]:
    manifest = read_json(root / MANIFEST)
    if not isinstance(manifest, dict) or not isinstance(manifest.get("splits"), dict):
        raise ProbeConfigError(
            f"data.root: expected a folder written by `bat-jax prepare` (with {MANIFEST}), found "
            f"{'no folder' if not root.is_dir() else 'no readable manifest'} at {root}"
        )
    return manifest


def _split_size(manifest: dict, root: Path, split: str, field: str) -> int:
    info = manifest["splits"].get(split)
    if info is None:
        raise ProbeConfigError(
            f"{field}: expected a split of {root} ({sorted(manifest['splits'])}), found {split!r}"
        )
    n = int(info.get("num_clips", 0))
    if n == 0:
        raise ProbeConfigError(f"{field}: the split {split!r} of {root} is empty (0 clips); prepare it again")
    return n


def expected_frontend(config: EncoderConfig, setting: str = "auto") -> str:
    """The front-end an encoder was trained on: "kaldi" (EAT/SSLAM layout, positions grid (64, 8)) or
    "bat"; `setting` overrides "auto"."""
    if setting != "auto":
        return setting
    return "kaldi" if tuple(config.pos_grid) == POS_GRID_EAT else "bat"


def check_frontend(manifest: dict, root: Path, config: EncoderConfig, setting: str) -> str:
    found = manifest.get("frontend", {}).get("name", "bat")
    want = expected_frontend(config, setting)
    if found != want:
        names = {"bat": "BAT log-mel (bat_jax.audio.logmel)", "kaldi": "Kaldi fbank (EAT/SSLAM)"}
        raise ProbeConfigError(
            f"data.root: {root} was prepared with the {names.get(found, found)} front-end, but the encoder "
            f"expects {names.get(want, want)} input; prepare the audio again with `bat-jax prepare "
            f"--frontend {want}` (or set --config.encoder.frontend if the encoder was trained otherwise)"
        )
    return found


def _labels_multilabel(labels: list[tuple[int, ...]]) -> bool:
    return any(len(v) != 1 for v in labels)


def resolve(cfg: ml_collections.ConfigDict, encoder_config: EncoderConfig) -> TaskData:
    """The run's evaluations from the config and the prepared folder(s); ProbeConfigError on bad input."""
    d = cfg.data
    if not d.root:
        raise ProbeConfigError("data.root: expected a folder written by `bat-jax prepare`, found none set")
    root = Path(d.root).expanduser()
    manifest = read_manifest(root)
    vocabulary = list(manifest.get("label_vocabulary") or [])
    if not vocabulary:
        raise ProbeConfigError(
            f"data.root: {root}/{MANIFEST} has no label vocabulary: probing needs labelled clips"
        )
    frontend = check_frontend(manifest, root, encoder_config, cfg.encoder.get("frontend", "auto"))
    eval_root = Path(d.eval_root).expanduser() if d.get("eval_root") else root
    eval_manifest = manifest if eval_root == root else read_manifest(eval_root)
    if eval_root != root:
        other = list(eval_manifest.get("label_vocabulary") or [])
        if other != vocabulary:
            diff = sorted(set(other) ^ set(vocabulary))[:8]
            raise ProbeConfigError(
                f"data.eval_root: the label vocabulary of {eval_root} differs from that of {root} "
                f"({len(other)} vs {len(vocabulary)} classes; differing or reordered names, e.g. "
                f"{diff or 'same names, another order'}); prepare both with the same labels"
            )
        check_frontend(eval_manifest, eval_root, encoder_config, cfg.encoder.get("frontend", "auto"))
    n_train = _split_size(manifest, root, d.train_split, "data.train_split")
    train_all = Subset(root, d.train_split, None, n_train)
    if d.multilabel not in ("auto", "single", "multi"):
        raise ProbeConfigError(
            f"data.multilabel: expected 'auto', 'single' or 'multi', found {d.multilabel!r}"
        )
    need_labels = d.multilabel == "auto"

    if d.get("kfold", False):
        folds = manifest["splits"][d.train_split].get("folds", {}).get("by_record")
        if folds is None:
            raise ProbeConfigError(
                f"data.kfold: the split {d.train_split!r} of {root} has no per-clip folds; prepare it with "
                "`bat-jax prepare --fold-column COLUMN` (e.g. ESC-50's fold)"
            )
        if len(folds) != n_train:
            raise ProbeConfigError(
                f"data.kfold: {root}/{MANIFEST} lists {len(folds)} folds for {n_train} clips of "
                f"{d.train_split!r}; prepare it again"
            )
        try:
            splits = kfold_splits(folds)
        except ValueError as e:
            raise ProbeConfigError(f"data.kfold: {root}: {e}") from None
        evaluations = [
            Evaluation(
                str(f.value),
                Subset(root, d.train_split, f.train, len(f.train)),
                None,
                Subset(root, d.train_split, f.test, len(f.test)),
            )
            for f in splits
        ]
        protocol = "kfold"
        labels = _scan(train_all) if need_labels else None
    elif d.test_split in eval_manifest["splits"]:
        test = Subset(
            eval_root,
            d.test_split,
            None,
            _split_size(eval_manifest, eval_root, d.test_split, "data.test_split"),
        )
        validation = None
        if d.validation_split and d.validation_split in eval_manifest["splits"]:
            n = _split_size(eval_manifest, eval_root, d.validation_split, "data.validation_split")
            validation = Subset(eval_root, d.validation_split, None, n)
        evaluations = [Evaluation("", train_all, validation, test)]
        protocol = "splits"
        labels = _scan(train_all) if need_labels else None
    else:
        fraction = float(d.holdout)
        if not 0.0 < fraction < 1.0:
            raise ProbeConfigError(
                f"data.holdout: {root} has no test split {d.test_split!r} (splits "
                f"{sorted(manifest['splits'])}), so a hold-out fraction in (0, 1) is needed, found {fraction}"
            )
        labels = _scan(train_all)
        train_idx, test_idx = holdout_split(labels, fraction, int(d.holdout_seed))
        if not len(test_idx) or not len(train_idx):
            raise ProbeConfigError(
                f"data.holdout: {root}/{d.train_split} has {n_train} clips: too few to hold out "
                f"{fraction:g} of them per class (every class with one clip stays in training)"
            )
        evaluations = [
            Evaluation(
                "",
                Subset(root, d.train_split, train_idx, len(train_idx)),
                None,
                Subset(root, d.train_split, test_idx, len(test_idx)),
            )
        ]
        protocol = "holdout"
    multilabel = _labels_multilabel(labels) if need_labels else d.multilabel == "multi"
    frame_wise = any(n in heads_lib.FRAME_WISE for n in heads_lib.probe_names(cfg.probes))
    hop = 0.01
    if frame_wise:
        manifests = {root: manifest, eval_root: eval_manifest}
        for subset in _subsets(evaluations):
            check_events(manifests[subset.root], subset.root, subset.split)
        hop = _hop_seconds(manifest, root)
    return TaskData(root, vocabulary, multilabel, frontend, evaluations, protocol, frame_wise, hop)


def _subsets(evaluations: list[Evaluation]) -> list[Subset]:
    out = {}
    for e in evaluations:
        for s in (e.train, e.validation, e.test):
            if s is not None:
                out[(s.root, s.split)] = s
    return list(out.values())


def check_events(manifest: dict, root: Path, split: str) -> None:
    """ProbeConfigError unless the split's records carry event annotations (splits.<split>.events)."""
    if manifest["splits"][split].get("events") is None:
        raise ProbeConfigError(
            f"probes: {', '.join(heads_lib.FRAME_WISE)} learn frame-wise targets (sound event detection), "
            f"but the split {split!r} of {root} has no event annotations; prepare it with `bat-jax prepare "
            "--events-csv FILE` (columns path,onset,offset,label, in seconds), or --synthetic-events for the "
            "built-in dataset"
        )


def _hop_seconds(manifest: dict, root: Path) -> float:
    from bat_jax.data import hop_seconds

    try:
        return float(hop_seconds(manifest))
    except (KeyError, TypeError, ValueError) as e:
        raise ProbeConfigError(
            f"data.root: {root}/{MANIFEST} does not say its front-end's frame hop ({e}); prepare it again"
        ) from None


def _scan(subset: Subset) -> list[tuple[int, ...]]:
    return record_labels(open_source(subset.paths, subset.indices))
