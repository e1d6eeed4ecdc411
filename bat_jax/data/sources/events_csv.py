"""Events CSV of the folder source (--events-csv): sound events, rows of (path relative to --input, onset,
offset, label), times in seconds from the clip's start (DCASE-style strong labels).

The rules (refused before any work otherwise, naming the CSV and the line):
- the file is text in `encoding` (--csv-encoding, default utf-8; a UTF-8 byte-order mark is accepted);
- with `columns` (--events-columns PATH,ONSET,OFFSET,LABEL) the first row is a header naming the four
  columns (case-insensitive); other columns are ignored;
- without, every row has exactly four cells, path, onset, offset, label; the first row is either the
  header `path,onset,offset,label` or already a data row, whose path has an audio extension;
- a path may have many rows, one per event; a row whose onset, offset and label are all empty marks an
  annotated clip without events ('a.wav,,,'); otherwise all three are given, onset and offset finite
  numbers with 0 <= onset < offset; blank rows are ignored.

A clip's labels are the sorted set of its events' classes; an audio file with no row has no annotation
(`prepare` skips it: "no events").
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from bat_jax.data.sources.base import AUDIO_EXTENSIONS, SourceError
from bat_jax.data.sources.labels_csv import _decode, _normalise_csv_path, _rows

EVENTS_COLUMNS = ("path", "onset", "offset", "label")  # default columns of an events CSV
NO_EVENTS = "no events"  # the skip kind of an audio file without a row in the events CSV


@dataclass(frozen=True)
class ClipEvents:
    """The rows of one clip: the line of its first row, its path, its events (onset s, offset s, class
    name), sorted; () for an annotated clip without events."""

    line: int
    path: str
    events: tuple[tuple[float, float, str], ...]


def _columns(rows, path: Path, columns: Sequence[str] | None, extensions) -> tuple[list[int], int]:
    """(cell index of path, onset, offset, label; rows to drop)."""
    line, first = rows[0]
    header = [cell.strip().lower() for cell in first]
    if columns is not None:
        wanted = [c.strip().lower() for c in columns]
        missing = [c for c in wanted if c not in header]
        if missing:
            raise SourceError(
                f"{path}: expected a header row naming the columns {list(columns)} (--events-columns "
                f"{','.join(columns)}), found first row {first} without {missing}"
            )
        return [header.index(c) for c in wanted], 1
    is_header = tuple(header) == EVENTS_COLUMNS
    if not is_header and not first[0].strip().lower().endswith(tuple(e.lower() for e in extensions)):
        named = ",".join(cell.strip() for cell in first)
        raise SourceError(
            f"{path}: expected a first row that is the header {','.join(EVENTS_COLUMNS)} or a data row whose "
            f"path is an audio file ({' '.join(extensions)}), found {first}; if it is a header, name its "
            f"columns with --events-columns PATH,ONSET,OFFSET,LABEL (here --events-columns {named})"
        )
    for line, row in rows[int(is_header) :]:
        if len(row) != 4:
            raise SourceError(
                f"{path}, line {line}: expected four cells path,onset,offset,label (a clip without events: "
                f"'{row[0].strip()},,,'), found {len(row)}: {row}; with more columns use --events-columns"
            )
    return [0, 1, 2, 3], int(is_header)


def _seconds(cell: str, name: str, where: str) -> float:
    try:
        value = float(cell)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value < 0:
        raise SourceError(f"{where}: expected the {name} as a number of seconds >= 0, found {cell!r}")
    return value


def read_events_csv(
    path: str | os.PathLike,
    root: Path,
    columns: Sequence[str] | None = None,
    *,
    encoding: str = "utf-8",
    extensions: Sequence[str] = AUDIO_EXTENSIONS,
) -> list[ClipEvents]:
    """One `ClipEvents` per path of an events CSV (paths relative to `root`), in the order of their first
    rows, read by the rules above. `columns` names the (path, onset, offset, label) columns of a CSV with a
    header, None the four-column layout.

        >>> read_events_csv("events.csv", Path("audio"))  # doctest: +SKIP
        [ClipEvents(line=2, path='a.wav', events=((0.5, 1.25, 'dog'), (2.0, 3.0, 'bird'))), ...]
    """
    path = Path(path)
    if columns is not None and (len(columns) != 4 or not all(c.strip() for c in columns)):
        raise SourceError(
            f"--events-columns: expected four names PATH,ONSET,OFFSET,LABEL, found {','.join(columns)!r}"
        )
    if not path.is_file():
        raise SourceError(
            f"--events-csv: expected a CSV file of path,onset,offset,label rows, found no file {path}"
        )
    rows = _rows(_decode(path.read_bytes(), encoding, path), path)
    if not rows:
        raise SourceError(f"{path}: expected path,onset,offset,label rows, found an empty CSV")
    cols, drop = _columns(rows, path, columns, extensions)
    names = list(columns) if columns is not None else list(EVENTS_COLUMNS)
    lines: dict[str, int] = {}
    events: dict[str, list[tuple[float, float, str]]] = {}
    for line, row in rows[drop:]:
        where = f"{path}, line {line}"
        if len(row) <= max(cols):
            raise SourceError(
                f"{where}: expected cells in columns {[c + 1 for c in cols]} ({','.join(names)}) as the "
                f"header has, found {len(row)} cells: {row}"
            )
        rel, onset, offset, label = (row[c].strip() for c in cols)
        if not rel:
            raise SourceError(f"{where}: expected a path in column {cols[0] + 1}, found {row}")
        rel = _normalise_csv_path(rel, root)
        lines.setdefault(rel, line)
        clip = events.setdefault(rel, [])
        if not (onset or offset or label):
            continue  # an annotated clip without events
        if not (onset and offset and label):
            raise SourceError(
                f"{where}: expected onset, offset and label all given (an event) or all empty (a clip "
                f"without events), found onset {onset!r}, offset {offset!r}, label {label!r}"
            )
        start, end = _seconds(onset, "onset", where), _seconds(offset, "offset", where)
        if not start < end:
            raise SourceError(f"{where}: expected onset < offset, found onset {onset} and offset {offset}")
        clip.append((start, end, label))
    return [ClipEvents(lines[rel], rel, tuple(sorted(clip))) for rel, clip in events.items()]
