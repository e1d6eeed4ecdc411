"""The folder source: every audio file under a folder, labels from a CSV, from folder names, or none; or
sound events (and the labels they give) from an events CSV (events_csv.py).

Listing (listing.py) never fails on one bad entry: it is skipped with its reason. Labels asked for but
found nowhere are refused before any work: a CSV with no data row or none of whose rows names a listed
file, or
--labels-from-dir on a split with no file inside a class subfolder (both allowed by `allow_unlabelled`).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from bat_jax.data.sources.base import (
    AUDIO_EXTENSIONS,
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
from bat_jax.data.sources.events_csv import EVENTS_COLUMNS, NO_EVENTS, read_events_csv
from bat_jax.data.sources.labels_csv import LABEL_SEPARATOR, _CsvRow, read_labels_csv
from bat_jax.data.sources.listing import FOLDER_KINDS, list_audio_files


@dataclass(frozen=True)
class FileLoader:
    """Loads `<root>/<task.source>` as mono float32 at 16 kHz (bat_jax.audio.load); labels from the task.

    Returns `(wave, labels)`, or `(wave, labels, notes)` when the file is kept but worth reporting
    (a truncated WAV: `(("truncated", "... frames read, the WAV header promises ..."),)`).
    """

    root: str

    def __call__(self, task: ClipTask) -> tuple:
        from bat_jax.audio.io import load_with_notes

        path = os.path.join(self.root, task.source)
        wave, notes = load_with_notes(path, SAMPLE_RATE, res_type=RESAMPLE_TYPE)
        return (wave, task.labels, notes) if notes else (wave, task.labels)


@dataclass(frozen=True)
class _Splits:
    """Which split a relative path belongs to, and the class its folder names."""

    root: Path
    split: str
    from_subdir: bool

    def of(self, rel: str, folder: bool = False) -> tuple[str, str]:
        """relative path -> (split, path inside the split folder); a top-level folder is a split itself."""
        if not self.from_subdir:
            return self.split, rel
        parts = rel.split("/", 1)
        if len(parts) == 2:
            return parts[0], parts[1]
        if folder:
            return rel, ""
        raise SourceError(
            f"--split-from-subdir: expected every audio file inside a split subfolder of {self.root} "
            f"(e.g. train/, eval/), found {rel!r} at the top level; move it or drop --split-from-subdir"
        )

    def dir_label(self, rel: str) -> tuple[str, ...]:
        inner = self.of(rel)[1]
        return (inner.rsplit("/", 2)[-2],) if "/" in inner else ()


def _check_dir_labels(files: Sequence[str], splits: _Splits) -> None:
    """--labels-from-dir: refuse a split none of whose files is inside a class subfolder."""
    by_split: dict[str, list[str]] = {}
    for rel in files:
        by_split.setdefault(splits.of(rel)[0], []).append(rel)
    for name, rels in sorted(by_split.items()):
        if not any(splits.dir_label(rel) for rel in rels):
            where = splits.root / name if splits.from_subdir else splits.root
            raise SourceError(
                f"--labels-from-dir: expected audio files inside class subfolders of {where} (e.g. "
                f"dog/1.wav), found all {len(rels)} directly in it (e.g. {rels[0]!r}), so no file would get "
                f"a label; drop --labels-from-dir, use --labels-csv, or pass --allow-unlabelled"
            )


def _check_csv_matched(rows, files: Sequence[str], labels_csv, root: Path) -> None:
    """Refuse a labels CSV none of whose rows names an audio file under the folder (or with no row at all)."""
    example = repr(files[0]) if files else "none found"
    if not rows:  # a header and nothing else
        raise SourceError(
            f"{labels_csv}: expected rows naming audio files under {root} (--input), found no data rows "
            f"(only its header), so no file would get a label; add the rows, or pass --allow-unlabelled to "
            f"write the files without labels"
        )
    raise SourceError(
        f"{labels_csv}: expected rows naming audio files under {root} (--input), found none of its "
        f"{len(rows)} rows matching (e.g. row path {rows[0].path!r}, line {rows[0].line}; file under "
        f"--input: {example}); paths must be relative to --input. Pass --allow-unlabelled to write the "
        f"files without labels"
    )


def _vocabulary(labels_vocab, origin: str, labels_from_dir: bool, files, splits: _Splits, rows, csv_kind):
    """(vocabulary, where it came from)."""
    if isinstance(labels_vocab, str | os.PathLike):
        return read_vocabulary(labels_vocab), str(Path(labels_vocab).resolve())
    if labels_vocab is not None:
        return list(labels_vocab), origin
    if labels_from_dir:
        return sorted({n for rel in files for n in splits.dir_label(rel)}), "folder names"
    return sorted({n for row in rows for n in row.names}), csv_kind


def folder_source(
    input_dir: str | os.PathLike,
    *,
    split: str = "train",
    split_from_subdir: bool = False,
    labels_csv: str | os.PathLike | None = None,
    csv_columns: Sequence[str] | None = None,
    csv_encoding: str = "utf-8",
    label_separator: str = LABEL_SEPARATOR,
    labels_vocab: str | os.PathLike | Sequence[str] | None = None,
    labels_from_dir: bool = False,
    require_labels: bool = False,
    allow_unlabelled: bool = False,
    extensions: Sequence[str] = AUDIO_EXTENSIONS,
    vocabulary_origin: str = "given",
    events_csv: str | os.PathLike | None = None,
    events_columns: Sequence[str] | None = None,
) -> SourcePlan:
    """Plan a folder of audio files (recursive): one split named `split`, or one per top-level subfolder.

    Labels come from `labels_csv` (labels_csv.py: paths relative to the folder, class names separated by
    `label_separator`; `csv_columns` names its path and labels columns, None = two columns), or from
    each file's parent folder name (`labels_from_dir`), or there are none.
    Or sound events come from `events_csv` (events_csv.py: rows path,onset,offset,label; `events_columns`
    names those columns, None = four columns): each clip's events go into its task (`events`, class indices),
    its labels are the sorted set of their classes, and files without a row are skipped ("no events").
    The vocabulary is `labels_vocab` (a file, or a list of names from `vocabulary_origin`), else the sorted
    set of class names seen.
    Files the CSV does not list are unlabeled (skipped with `require_labels`); CSV rows naming missing
    files, duplicate rows, class names outside a given vocabulary and entries the listing could not read
    are skipped with their reason.
    """
    root = Path(input_dir).expanduser().resolve()
    if not root.is_dir():
        raise SourceError(f"--input: expected a folder of audio files, found no folder {root}")
    if labels_csv is not None and labels_from_dir:
        raise SourceError("expected either --labels-csv or --labels-from-dir, found both")
    if events_csv is not None and (labels_csv is not None or labels_from_dir):
        other = "--labels-csv" if labels_csv is not None else "--labels-from-dir"
        raise SourceError(f"expected either --events-csv (its events give the labels) or {other}, found both")
    rows, events = [], {}
    if labels_csv is not None:  # the CSV first: its errors cost no listing
        rows = read_labels_csv(
            labels_csv, root, csv_columns, label_separator, encoding=csv_encoding, extensions=extensions
        )
    if events_csv is not None:  # one row per clip: the names of its events' classes
        clip_events = read_events_csv(
            events_csv, root, events_columns, encoding=csv_encoding, extensions=extensions
        )
        rows = [_CsvRow(c.line, c.path, tuple(sorted({e[2] for e in c.events}))) for c in clip_events]
        events = {c.path: c.events for c in clip_events}
    csv_file = labels_csv if labels_csv is not None else events_csv
    listing = list_audio_files(root, extensions)
    sizes = dict(listing.files)  # relative path -> bytes, for the inputs digest
    splits = _Splits(root, split, split_from_subdir)
    if labels_from_dir and not allow_unlabelled:
        _check_dir_labels(list(listing.files), splits)
    csv_kind = "events CSV" if events_csv is not None else "labels CSV"
    vocabulary, vocab_origin = _vocabulary(
        labels_vocab, vocabulary_origin, labels_from_dir, listing.files, splits, rows, csv_kind
    )
    index = {name: i for i, name in enumerate(vocabulary)}

    skipped: dict[str, list[Skipped]] = {} if split_from_subdir else {split: []}
    clips: dict[str, list[tuple]] = {} if split_from_subdir else {split: []}  # (path, labels[, events])

    def skip(rel: str, kind: str, reason: str) -> None:
        name = splits.of(rel, folder=kind in FOLDER_KINDS)[0]
        skipped.setdefault(name, []).append(Skipped(name, rel, kind, reason))
        clips.setdefault(name, [])

    for rel, kind, reason in listing.skipped:
        skip(rel, kind, reason)
    unlisted = {rel for rel, _, _ in listing.skipped}
    labelled: dict[str, tuple[str, ...]] = {}
    csv_name = str(csv_file)
    for row in rows:
        where = f"{csv_name}, line {row.line}"
        if os.path.isabs(row.path) or ".." in row.path.split("/"):
            raise SourceError(f"{where}: expected a path inside {root} (--input), found {row.path!r}")
        if row.path in labelled:
            skip(row.path, "duplicate CSV row", f"{where}: path already listed on an earlier line")
        elif row.path in sizes:
            labelled[row.path] = row.names
        elif (root / row.path).is_file():  # listed by the CSV only (other extension, hidden folder)
            labelled[row.path], sizes[row.path] = row.names, (root / row.path).stat().st_size
        elif row.path not in unlisted:  # else already skipped with its reason
            skip(row.path, "missing file", f"{where}: listed, but no such file in {root}")
    if csv_file is not None and not labelled and not allow_unlabelled:
        _check_csv_matched(rows, list(listing.files), csv_file, root)

    for rel in sorted(sizes):
        if csv_file is not None:
            names = labelled.get(rel)
            if names is None and events_csv is not None:
                skip(rel, NO_EVENTS, f"no row in {csv_name} (--events-csv), so no event annotations")
                continue
            if names is None and require_labels:
                skip(rel, "unlabeled", f"no row in {csv_name} (--require-labels)")
                continue
            names = names or ()
        else:
            names = splits.dir_label(rel) if labels_from_dir else ()
        unknown = [n for n in names if n not in index]
        if unknown:
            skip(
                rel, "unknown label", f"class name(s) {unknown} not in the label vocabulary ({vocab_origin})"
            )
        elif require_labels and not names:
            skip(rel, "unlabeled", "no labels (--require-labels)")
        else:
            clip = (rel, tuple(sorted({index[n] for n in names})))
            if events_csv is not None:  # (onset, offset, class index), sorted
                clip += (tuple(sorted((on, off, index[n]) for on, off, n in events[rel])),)
            clips.setdefault(splits.of(rel)[0], []).append(clip)

    loader = FileLoader(str(root))
    plans = []
    for name in sorted(clips):
        tasks = [
            ClipTask(i, c[0], c[0], c[1], events=c[2] if len(c) > 2 else None)
            for i, c in enumerate(clips[name])
        ]
        digest = _digest((c[0], c[1], sizes[c[0]], *c[2:]) for c in clips[name])  # events only with them
        plans.append(SplitPlan(name, tasks, skipped.get(name, []), loader, digest))
    description = {"kind": "folder"}
    if events_csv is not None:  # only then (outputs made before the option existed still resume); early, so
        # that the message refusing to resume an output made without them shows them
        description["events_csv"] = str(Path(events_csv).resolve())
        description["events_columns"] = list(events_columns or EVENTS_COLUMNS)
    description |= {
        "input": str(root),
        "extensions": list(extensions),
        "labels_csv": str(Path(labels_csv).resolve()) if labels_csv is not None else None,
        "csv_columns": list(csv_columns) if csv_columns is not None else None,
        "csv_encoding": csv_encoding,
        "label_separator": label_separator,
        "labels_from_dir": labels_from_dir,
        "require_labels": require_labels,
        "allow_unlabelled": allow_unlabelled,
        "split_from_subdir": split_from_subdir,
    }
    return SourcePlan("folder", description, vocabulary, plans)
