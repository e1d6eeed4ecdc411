"""The folder source: every audio file under a folder, labels from a CSV, from folder names, or none."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bat_jax.data.sources.base import (
    RESAMPLE_TYPE,
    SAMPLE_RATE,
    ClipTask,
    Skipped,
    SourceError,
    SourcePlan,
    SplitPlan,
    _digest,
    read_vocabulary,
)
from bat_jax.data.sources.labels_csv import CSV_COLUMNS, LABEL_SEPARATOR, read_labels_csv

AUDIO_EXTENSIONS = (".wav", ".flac", ".ogg", ".mp3", ".m4a", ".aiff", ".aif")


@dataclass(frozen=True)
class FileLoader:
    """Loads `<root>/<task.source>` as mono float32 at 16 kHz (bat_jax.audio.load); labels from the task."""

    root: str

    def __call__(self, task: ClipTask) -> tuple[np.ndarray, tuple[int, ...]]:
        from bat_jax.audio.io import load

        return load(os.path.join(self.root, task.source), SAMPLE_RATE, res_type=RESAMPLE_TYPE), task.labels


def _list_audio_files(root: Path, extensions: Sequence[str]) -> list[str]:
    """Relative posix paths of the audio files under `root` (recursive, hidden folders skipped), sorted."""
    exts = tuple(e.lower() for e in extensions)
    found = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        rel = Path(folder).relative_to(root)
        found += [(rel / f).as_posix() for f in files if f.lower().endswith(exts)]
    return sorted(found)


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
