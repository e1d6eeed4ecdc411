"""Labels CSV of the folder source: rows of (path relative to --input, class names)."""

from __future__ import annotations

import csv
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from bat_jax.data.sources.base import SourceError

CSV_COLUMNS = ("path", "labels")  # default columns of a labels CSV
LABEL_SEPARATOR = ";"  # between class names inside a CSV labels cell


@dataclass(frozen=True)
class _CsvRow:
    line: int
    path: str
    names: tuple[str, ...]


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
