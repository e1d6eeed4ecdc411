"""Listing the audio files under a folder, never failing on one bad entry.

Rules (the `bat-jax prepare --help` text states them too):
- recursive; folders whose name starts with "." are not entered; files are matched by extension;
- symlinks to folders are followed; a link to a folder above it (a loop) and a second way into a folder
  already listed are not followed, and listed as skipped ("symlink loop", "duplicate folder");
- a subfolder that cannot be listed (no read permission...) is listed as skipped ("unreadable folder");
- a file that cannot be stat'ed is listed as skipped: a symlink to nothing ("broken symlink"), a file gone
  between listing and stat ("missing file"), any other error ("unreadable file"); so is a name with an
  audio extension that is not a regular file ("not a file").
Only `--input` itself not being listable is an error.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from bat_jax.data.sources.base import SourceError

FOLDER_KINDS = ("unreadable folder", "symlink loop", "duplicate folder")  # skips that name a folder


@dataclass
class Listing:
    """`files`: relative posix path -> size in bytes, sorted by path. `skipped`: (relative path, kind,
    reason) of every entry that was not listed, in walk order."""

    files: dict[str, int] = field(default_factory=dict)
    skipped: list[tuple[str, str, str]] = field(default_factory=list)


def _relative(path: str, root: Path) -> str:
    return Path(path).relative_to(root).as_posix()


def _stat_problem(path: str, error: OSError) -> tuple[str, str]:
    """(kind, reason) for a file that os.walk listed but os.stat could not read."""
    if os.path.islink(path):
        return "broken symlink", f"symlink to {os.readlink(path)!r}: {error.strerror}"
    if isinstance(error, FileNotFoundError):
        return "missing file", f"listed, then gone before it could be read: {error.strerror}"
    return "unreadable file", f"cannot stat it: {error.strerror}"


def _prune(folder: str, dirs: list[str], seen: dict[str, str], root: Path, out: Listing) -> list[str]:
    """The subfolders of `folder` to enter: sorted, no hidden ones, each real folder once."""
    here = os.path.realpath(folder)
    keep = []
    for name in sorted(d for d in dirs if not d.startswith(".")):
        path = os.path.join(folder, name)
        real = os.path.realpath(path)
        if real not in seen:
            seen[real] = _relative(path, root)
            keep.append(name)
        elif here == real or here.startswith(real.rstrip(os.sep) + os.sep):
            out.skipped.append(
                (
                    _relative(path, root),
                    "symlink loop",
                    f"links to {seen[real]!r}, a folder above it: not followed",
                )
            )
        else:
            out.skipped.append(
                (_relative(path, root), "duplicate folder", f"the same folder as {seen[real]!r}: listed once")
            )
    return keep


def list_audio_files(root: Path, extensions: Sequence[str]) -> Listing:
    """Every audio file under `root` (a resolved folder) with its size, and every entry skipped on the way."""
    exts = tuple(e.lower() for e in extensions)
    out = Listing()
    seen = {str(root): "."}  # real path of each folder entered -> its relative path

    def on_error(error: OSError) -> None:
        if os.path.realpath(error.filename) == str(root):
            raise SourceError(
                f"--input: expected a folder that can be listed, found {root}: {error.strerror}"
            )
        reason = f"cannot list its files: {error.strerror}"
        out.skipped.append((_relative(error.filename, root), "unreadable folder", reason))

    found = {}
    for folder, dirs, names in os.walk(root, onerror=on_error, followlinks=True):
        dirs[:] = _prune(folder, dirs, seen, root, out)
        for name in sorted(n for n in names if n.lower().endswith(exts)):
            path = os.path.join(folder, name)
            rel = _relative(path, root)
            try:
                info = os.stat(path)
            except OSError as e:
                out.skipped.append((rel, *_stat_problem(path, e)))
                continue
            if not stat.S_ISREG(info.st_mode):
                out.skipped.append((rel, "not a file", "has an audio extension but is not a regular file"))
                continue
            found[rel] = info.st_size
    out.files = dict(sorted(found.items()))
    return out
