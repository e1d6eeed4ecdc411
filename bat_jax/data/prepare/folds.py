"""`prepare --fold-column NAME`: a per-clip cross-validation fold from a column of the labels CSV.

The fold of every clip of a folder source is read from the CSV (sources/labels_csv.read_folds: the header
must name the column; an empty cell is refused) and travels with its task into its record (`fold`, see
bat_jax.data.records) and into the manifest, per split, in record order:

    "folds": {"column": "fold", "values": [1, 2, 3, 4, 5], "num_clips": [400, 400, 400, 400, 400],
              "by_record": [1, 1, ..., 5]}

`by_record[i]` is the fold of record i of the split (shards in manifest order, records in shard order: the
index `bat_jax.data.shard_reader` gives a record), so a probe picks each fold's records from the manifest
alone (`bat_jax.probe.kfold_splits(by_record)`), without decoding a record. An audio file that the CSV does
not list has no fold and is skipped ("no fold"), so every record of such an output has one.
"""

from __future__ import annotations

import dataclasses
import os
from collections import Counter
from collections.abc import Mapping

from bat_jax.data.sources import Skipped, SourceError, SourcePlan
from bat_jax.data.sources.base import _digest

NO_FOLD = "no fold"  # the skip kind of a file without a CSV row when --fold-column is given


def attach_folds(
    plan: SourcePlan, folds: Mapping[str, int | str], fold_column: str, labels_csv: str | os.PathLike
) -> SourcePlan:
    """`plan` (a folder source) with each task's fold from `folds` (path relative to the folder -> fold:
    `bat_jax.data.sources.labels_csv.read_folds` of `labels_csv`, column `fold_column`).

    Tasks whose file has no fold are moved to the split's skipped inputs ("no fold"); the inputs digest of
    each split and the source description (`fold_column`) change with the folds, so resuming an output
    made without them, or with another column, is refused.

        >>> csv, audio, columns = "ESC-50/meta/esc50.csv", "ESC-50/audio", ("filename", "category")
        >>> plan = sources.folder_source(audio, labels_csv=csv, csv_columns=columns)  # doctest: +SKIP
        >>> folds = read_folds(csv, Path(audio).resolve(), "fold", columns)  # doctest: +SKIP
        >>> attach_folds(plan, folds, "fold", csv).splits[0].tasks[0].fold  # doctest: +SKIP
        1
    """
    if plan.kind != "folder":
        raise SourceError(f"--fold-column: expected --source folder, found --source {plan.kind}")
    splits = []
    for split in plan.splits:
        tasks, skipped = [], list(split.skipped)
        for task in split.tasks:
            fold = folds.get(task.source)
            if fold is None:
                reason = f"no row in {labels_csv}, so no fold (--fold-column {fold_column})"
                skipped.append(Skipped(split.name, task.source, NO_FOLD, reason))
                continue
            tasks.append(dataclasses.replace(task, index=len(tasks), fold=fold))
        digest = _digest([split.digest, fold_column, *((t.source, t.fold) for t in tasks)])
        splits.append(dataclasses.replace(split, tasks=tasks, skipped=skipped, digest=digest))
    description = {**plan.description, "fold_column": fold_column}
    return dataclasses.replace(plan, description=description, splits=splits)


def folds_entry(column: str, by_record: list) -> dict:
    """The manifest's per-split "folds" entry (module docstring) from the folds of its records, in order."""
    counts = Counter(by_record)
    values = sorted(counts)
    return {
        "column": column,
        "values": values,
        "num_clips": [counts[v] for v in values],
        "by_record": list(by_record),
    }
