"""Labels CSV of the folder source: rows of (path relative to --input, class names).

The rules (refused before any work otherwise, naming the CSV, its first row and the flag):
- the file is text in `encoding` (--csv-encoding, default utf-8; a UTF-8 byte-order mark is accepted);
- with `columns` (--csv-columns PATH,LABELS) the first row is a header naming both columns
  (case-insensitive); other columns are ignored; every row has a cell in both;
- without, every row has exactly two cells, path and labels; the first row is either the header
  `path,labels` or already a data row, whose path has an audio extension;
- blank rows are ignored; a labels cell holds class names separated by `separator` (may be empty).

`read_folds` reads one more column of the same CSV, a per-clip fold (--fold-column, e.g. ESC-50's `fold`):
the header must name it (without --csv-columns the header is then `path,labels,<fold column>`, other columns
ignored), and every data row needs a non-empty cell in it. Fold values are integers when every cell of the
column is one (ESC-50's 1..5), else strings as written (stripped).
"""

from __future__ import annotations

import codecs
import csv
import io
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from bat_jax.data.sources.base import AUDIO_EXTENSIONS, SourceError

CSV_COLUMNS = ("path", "labels")  # default columns of a labels CSV
LABEL_SEPARATOR = ";"  # between class names inside a CSV labels cell


@dataclass(frozen=True)
class _CsvRow:
    line: int
    path: str
    names: tuple[str, ...]


def _inside(path: str, root: Path) -> str | None:
    """An absolute `path` relative to `root`, or None when it is outside. Tried as written first (normpath:
    a path through a symlinked subfolder of `root` is inside), then with symlinks resolved (`root` itself
    is resolved, so a path through another name of `root` is inside too)."""
    for absolute in (os.path.normpath(path), os.path.realpath(path)):
        relative = os.path.relpath(absolute, root)
        if relative != os.pardir and not relative.startswith(os.pardir + os.sep):
            return Path(relative).as_posix()
    return None


def _normalise_csv_path(raw: str, root: Path) -> str:
    path = raw.strip().replace("\\", "/")
    if os.path.isabs(path):
        inside = _inside(path, root)
        if inside is None:
            return path  # outside the folder: kept absolute, so folder_source refuses the run
        path = inside
    while path.startswith("./"):
        path = path[2:]
    return Path(path).as_posix()


def _decode(data: bytes, encoding: str, path: Path) -> str:
    """The CSV's text; a decoding error names the line and byte, and the flag that fixes it."""
    try:
        codec = codecs.lookup(encoding).name
    except LookupError:
        raise SourceError(
            f"--csv-encoding: expected a Python codec name (utf-8, latin-1, cp1252...), found {encoding!r}"
        ) from None
    try:
        return data.decode("utf-8-sig" if codec == "utf-8" else codec)
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        column = e.start - (data.rfind(b"\n", 0, e.start) + 1) + 1
        raise SourceError(
            f"{path}, line {line}, byte {column} (offset {e.start}, 0x{data[e.start]:02x}): expected text in "
            f"{encoding} (--csv-encoding), found a byte it cannot decode ({e.reason}); pass the file's "
            f"encoding, e.g. --csv-encoding latin-1 or --csv-encoding cp1252"
        ) from None


def _rows(text: str, path: Path) -> list[tuple[int, list[str]]]:
    """(line number, cells) of every non-blank CSV row."""
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        return [(reader.line_num, row) for row in reader if any(cell.strip() for cell in row)]
    except csv.Error as e:
        raise SourceError(f"{path}, line {reader.line_num}: expected CSV rows, found: {e}") from None


def _default_columns(rows, path: Path, extensions: Sequence[str]) -> tuple[int, int, int]:
    """(path column, labels column, rows to drop) of a CSV read without --csv-columns."""
    line, first = rows[0]
    if len(first) > 2:
        raise SourceError(
            f"{path}: expected two columns path,labels, found {len(first)} in its first row {first}; "
            f"pick the two columns by name with --csv-columns PATH,LABELS "
            f"(e.g. --csv-columns {first[0].strip()},<labels column>)"
        )
    header = [cell.strip().lower() for cell in first]
    is_header = tuple(header) == CSV_COLUMNS
    if not is_header and not first[0].strip().lower().endswith(tuple(e.lower() for e in extensions)):
        named = ",".join(cell.strip() for cell in first)
        raise SourceError(
            f"{path}: expected a first row that is the header {','.join(CSV_COLUMNS)} or a data row whose "
            f"path is an audio file ({' '.join(extensions)}), found {first}; if it is a header, name its "
            f"columns with --csv-columns PATH,LABELS (here --csv-columns {named})"
        )
    for line, row in rows[int(is_header) :]:
        if len(row) != 2:
            raise SourceError(
                f"{path}, line {line}: expected two cells path,labels (the labels may be empty: "
                f"'{row[0].strip()},'), found {len(row)}: {row}; with more columns use --csv-columns"
            )
    return 0, 1, int(is_header)


def _named_columns(rows, columns: Sequence[str], path: Path, flag: str | None = None) -> tuple[int, int, int]:
    """(path column, labels column, rows to drop) of a CSV whose header names `columns`."""
    line, first = rows[0]
    header = [cell.strip().lower() for cell in first]
    wanted = [c.strip().lower() for c in columns]
    missing = [c for c in wanted if c not in header]
    if missing:
        flag = flag or f"--csv-columns {','.join(columns)}"
        raise SourceError(
            f"{path}: expected a header row naming the columns {list(columns)} ({flag}), found first row "
            f"{first} without {missing}"
        )
    path_col, labels_col = header.index(wanted[0]), header.index(wanted[1])
    for line, row in rows[1:]:
        if len(row) <= max(path_col, labels_col):
            raise SourceError(
                f"{path}, line {line}: expected a cell in columns {path_col + 1} ({columns[0]}) and "
                f"{labels_col + 1} ({columns[1]}) as the header has, found {len(row)} cells: {row}"
            )
    return path_col, labels_col, 1


def read_labels_csv(
    path: str | os.PathLike,
    root: Path,
    columns: Sequence[str] | None = None,
    separator: str = LABEL_SEPARATOR,
    *,
    encoding: str = "utf-8",
    extensions: Sequence[str] = AUDIO_EXTENSIONS,
) -> list[_CsvRow]:
    """Rows (line, path relative to `root`, class names) of a labels CSV, read by the rules above.

    `columns` (path column, labels column) selects two named columns of a CSV with a header, e.g. ESC-50's
    meta/esc50.csv with ("filename", "category"); None means the two-column layout.
    """
    path = Path(path)
    if not path.is_file():
        raise SourceError(f"--labels-csv: expected a CSV file of path,labels rows, found no file {path}")
    rows = _rows(_decode(path.read_bytes(), encoding, path), path)
    if not rows:
        raise SourceError(f"{path}: expected path,labels rows, found an empty CSV")
    if columns is None:
        path_col, labels_col, drop = _default_columns(rows, path, extensions)
    else:
        path_col, labels_col, drop = _named_columns(rows, columns, path)
    out = []
    for line, row in rows[drop:]:
        if not row[path_col].strip():
            raise SourceError(f"{path}, line {line}: expected a path in column {path_col + 1}, found {row}")
        names = tuple(n.strip() for n in row[labels_col].split(separator) if n.strip())
        out.append(_CsvRow(line, _normalise_csv_path(row[path_col], root), names))
    return out


def _fold_value(cell: str) -> int | None:
    try:
        return int(cell)
    except ValueError:
        return None


def read_folds(
    path: str | os.PathLike,
    root: Path,
    fold_column: str,
    columns: Sequence[str] | None = None,
    *,
    encoding: str = "utf-8",
) -> dict[str, int | str]:
    """Path relative to `root` -> fold value, from the `fold_column` column of a labels CSV (rules above).

    `columns` is the (path, labels) pair of --csv-columns, None for the `path,labels` header. A path listed
    twice keeps its first row's fold (the labels follow the first row too).

        >>> csv, audio = Path("ESC-50/meta/esc50.csv"), Path("ESC-50/audio")
        >>> read_folds(csv, audio, "fold", ("filename", "category"))  # doctest: +SKIP
        {'1-100032-A-0.wav': 1, '1-100038-A-14.wav': 1, ...}
    """
    path = Path(path)
    if not fold_column.strip():
        raise SourceError("--fold-column: expected a column name of the labels CSV, found an empty name")
    if not path.is_file():
        raise SourceError(f"--labels-csv: expected a CSV file with a fold column, found no file {path}")
    rows = _rows(_decode(path.read_bytes(), encoding, path), path)
    if not rows:
        raise SourceError(
            f"{path}: expected a header naming --fold-column {fold_column!r}, found an empty CSV"
        )
    named = tuple(columns) if columns is not None else CSV_COLUMNS
    how = "--csv-columns " + ",".join(named) if columns is not None else "the default header path,labels"
    path_col, _, _ = _named_columns(rows, named, path, flag=f"{how}, needed by --fold-column")
    header = [cell.strip().lower() for cell in rows[0][1]]
    wanted = fold_column.strip().lower()
    if wanted not in header:
        found = [cell.strip() for cell in rows[0][1]]
        raise SourceError(
            f"{path}: expected a column {fold_column!r} (--fold-column) in the header, found columns {found}"
        )
    fold_col = header.index(wanted)
    cells: dict[str, str] = {}
    for line, row in rows[1:]:
        cell = row[fold_col].strip() if fold_col < len(row) else ""
        if not cell:
            raise SourceError(
                f"{path}, line {line}: expected a fold value in column {fold_col + 1} ({fold_column}, "
                f"--fold-column), found an empty cell: {row}"
            )
        cells.setdefault(_normalise_csv_path(row[path_col], root), cell)
    as_int = {rel: _fold_value(cell) for rel, cell in cells.items()}
    if all(v is not None for v in as_int.values()):
        return dict(as_int)
    return cells
