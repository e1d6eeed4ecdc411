"""`bat-jax verify DIR`: check a folder written by `bat-jax prepare` before training on it.

Checks, in order: manifest.json is present and readable; every shard it lists exists, has the listed size
and sha256 (bit rot, a bad copy, a truncated download); every shard opens as ArrayRecord with the listed
number of records; every record decodes (bat_jax.data.records) to a spec [frames, n_mels] with the manifest's
n_mels (and the fixed frame count of a --clip-seconds output), 1 <= num_frames <= frames and labels inside
the vocabulary; and per split, the clip and frame counts of its records equal the manifest's. Each problem
is one line naming the shard (and the record index); the exit status is 0 when all is well, 1 when anything
is bad, 2 on bad usage.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from bat_jax.data import records, shards

READ_BATCH = 256  # records read at a time (a failing batch is read again one record at a time)
MAX_RECORD_PROBLEMS = 10  # per shard; more are counted, not listed


@dataclass(frozen=True)
class Problem:
    where: str  # "manifest.json", "train/train-00001-of-00004.arrayrecord", "... record 17", "split train"
    what: str

    def __str__(self) -> str:
        return f"{self.where}: {self.what}"


@dataclass
class Report:
    """What `verify` found: the problems, and how much was checked."""

    problems: list[Problem] = field(default_factory=list)
    splits: int = 0
    shards: int = 0
    records: int = 0
    bad_shards: set[str] = field(default_factory=set)

    @property
    def ok(self) -> bool:
        return not self.problems


@dataclass(frozen=True)
class Expect:
    """What every record must look like, from the manifest."""

    n_mels: int
    num_classes: int
    fixed_frames: int | None


def _read_manifest(out: Path) -> tuple[dict | None, list[Problem]]:
    path = out / shards.MANIFEST
    if not path.is_file():
        return None, [
            Problem(shards.MANIFEST, f"missing from {out} (not a finished `bat-jax prepare` output)")
        ]
    try:
        manifest = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        return None, [Problem(shards.MANIFEST, f"unreadable: {type(e).__name__}: {e}")]
    missing = [k for k in ("n_mels", "label_vocabulary", "splits", "clip") if k not in manifest]
    if not isinstance(manifest, dict) or missing:
        return None, [
            Problem(
                shards.MANIFEST,
                f"expected the keys n_mels, label_vocabulary, splits, clip; missing {missing}",
            )
        ]
    return manifest, []


def _record_problem(clip: dict, expect: Expect) -> str | None:
    """What is wrong with one decoded record, or None."""
    spec = clip["spec"]
    if spec.ndim != 2 or spec.shape[1] != expect.n_mels:
        return f"spec shape {tuple(spec.shape)}, expected [frames, {expect.n_mels}] (the manifest's n_mels)"
    if expect.fixed_frames is not None and spec.shape[0] != expect.fixed_frames:
        return f"spec has {spec.shape[0]} frames, expected {expect.fixed_frames} (the manifest's clip frames)"
    if not 1 <= int(clip["num_frames"]) <= spec.shape[0]:
        return f"num_frames {int(clip['num_frames'])} outside [1, {spec.shape[0]}]"
    bad = [int(c) for c in clip["labels"] if not 0 <= c < expect.num_classes]
    if bad:
        return f"labels {bad} outside the vocabulary [0, {expect.num_classes})"
    return None


def _records(reader, count: int) -> Iterator[tuple[int, bytes | None, str | None]]:
    """(index, record bytes or None, read error or None) for every record of an open ArrayRecordReader."""
    for start in range(0, count, READ_BATCH):
        indices = list(range(start, min(count, start + READ_BATCH)))
        try:
            batch = reader.read(indices)
        except Exception:  # noqa: BLE001 - read again one by one, to name the bad record
            batch = None
        for j, i in enumerate(indices):
            if batch is not None:
                yield i, batch[j], None
                continue
            try:
                yield i, reader.read([i])[0], None
            except Exception as e:  # noqa: BLE001
                yield i, None, f"{type(e).__name__}: {e}"


def _check_records(path: Path, name: str, expect: Expect) -> tuple[list[Problem], int, int]:
    """(problems, records read, sum of num_frames) of one shard's records."""
    from array_record.python.array_record_module import ArrayRecordReader

    problems, count, frames, bad = [], 0, 0, 0
    try:
        reader = ArrayRecordReader(str(path))
        total = int(reader.num_records())
    except Exception as e:  # noqa: BLE001
        return [Problem(name, f"not a readable ArrayRecord file: {type(e).__name__}: {e}")], 0, 0
    try:
        for i, record, error in _records(reader, total):
            count += 1
            if error is None:
                try:
                    clip = records.decode(record)
                    error = _record_problem(clip, expect)
                    frames += int(clip["num_frames"])
                except Exception as e:  # noqa: BLE001
                    error = f"does not decode: {type(e).__name__}: {e}"
            if error is not None:
                bad += 1
                if bad <= MAX_RECORD_PROBLEMS:
                    problems.append(Problem(f"{name} record {i}", error))
    finally:
        try:
            reader.close()
        except Exception as e:  # noqa: BLE001 - closing re-reads the file's end (its postscript)
            problems.append(Problem(name, f"not a readable ArrayRecord file: {type(e).__name__}: {e}"))
    if bad > MAX_RECORD_PROBLEMS:
        problems.append(Problem(name, f"{bad - MAX_RECORD_PROBLEMS} more bad records not listed"))
    return problems, count, frames


def _check_shard(out: Path, shard: dict, expect: Expect, decode: bool) -> tuple[list[Problem], int, int]:
    """(problems, records, frames) of one manifest shard entry {path, num_records, bytes, sha256}."""
    name = shard.get("path", "?")
    path = out / name
    if not path.is_file():
        return [Problem(name, "missing (listed in manifest.json)")], 0, 0
    problems = []
    size = path.stat().st_size
    if shard.get("bytes") is not None and size != shard["bytes"]:
        problems.append(Problem(name, f"size {size} bytes, manifest.json says {shard['bytes']}"))
    if not shard.get("sha256"):
        problems.append(Problem(name, "no sha256 in manifest.json (prepared by an older bat-jax?)"))
    else:
        found = shards.sha256_file(path)
        if found != shard["sha256"]:
            problems.append(
                Problem(
                    name,
                    f"checksum mismatch: sha256 {found[:16]}..., manifest.json says "
                    f"{shard['sha256'][:16]}...",
                )
            )
    if decode:
        more, count, frames = _check_records(path, name, expect)
        problems += more
    else:
        try:
            count, frames = shards.count_records(path), None
        except Exception as e:  # noqa: BLE001
            return (
                [*problems, Problem(name, f"not a readable ArrayRecord file: {type(e).__name__}: {e}")],
                0,
                0,
            )
    if count != shard.get("num_records"):
        problems.append(Problem(name, f"{count} records, manifest.json says {shard.get('num_records')}"))
    return problems, count, frames


def verify(out: str | Path, *, decode: bool = True) -> Report:
    """Check a prepared folder (see the module docstring). decode=False: sizes, checksums and counts only."""
    out = Path(out)
    manifest, problems = _read_manifest(out)
    report = Report(problems)
    if manifest is None:
        return report
    expect = Expect(
        int(manifest["n_mels"]),
        len(manifest["label_vocabulary"]),
        manifest["clip"].get("frames") if manifest["clip"].get("mode") == "fixed" else None,
    )
    for split, entry in manifest["splits"].items():
        report.splits += 1
        split_records, split_frames = 0, 0
        for shard in entry.get("shards", []):
            found, count, frames = _check_shard(out, shard, expect, decode)
            report.shards += 1
            report.records += count
            split_records += count
            split_frames = None if frames is None or split_frames is None else split_frames + frames
            report.problems += found
            if found:
                report.bad_shards.add(shard.get("path", "?"))
        if split_records != entry.get("num_clips"):
            report.problems.append(
                Problem(
                    f"split {split}",
                    f"its shards hold {split_records} records, manifest.json says "
                    f"{entry.get('num_clips')} clips",
                )
            )
        if split_records == entry.get("num_clips") and split_frames not in (None, entry.get("total_frames")):
            report.problems.append(
                Problem(
                    f"split {split}",
                    f"its records hold {split_frames} frames, manifest.json says {entry.get('total_frames')}",
                )
            )
    return report


def format_report(report: Report, out: Path) -> str:
    checked = f"{report.splits} splits, {report.shards} shards, {report.records} records"
    if report.ok:
        return f"bat-jax verify: {out}: {checked}: all good"
    lines = [str(p) for p in report.problems]
    shards_text = (
        f" in {len(report.bad_shards)} shard{'s' if len(report.bad_shards) != 1 else ''}"
        if report.bad_shards
        else ""
    )
    n = len(report.problems)
    lines.append(f"bat-jax verify: {out}: {checked}: {n} problem{'s' if n != 1 else ''}{shards_text}")
    if report.bad_shards:
        lines.append(
            "  to repair: rerun the `bat-jax prepare` command that wrote it (manifest.json 'command'); "
            "it recomputes bad shards"
        )
    return "\n".join(lines)


DESCRIPTION = """\
Check a folder written by `bat-jax prepare` before training on it (after a copy, a download, months on a
disk).

checks:
  manifest.json   present, readable, with n_mels, label_vocabulary, clip and splits
  every shard     listed in the manifest exists, has the listed size and sha256, opens as ArrayRecord and
                  holds the listed number of records
  every record    decodes (bat_jax.data.records) to spec [frames, n_mels] with the manifest's n_mels (and its
                  fixed frame count with --clip-seconds), 1 <= num_frames <= frames, labels in the vocabulary
  every split     its records' clip and frame counts equal the manifest's

Each problem is printed on one line naming the shard (and the record index), then a summary line.
Exit status: 0 all good, 1 anything bad, 2 bad usage (DIR is not a folder).
A bad shard is recomputed by rerunning the `bat-jax prepare` command that wrote the folder (resume checks
every shard's checksum before reusing it).
"""

EXAMPLES = """\
examples:
  bat-jax verify data/esc50
  bat-jax verify data/as2m --quick     # sizes, checksums and record counts only (no decoding)
"""


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "verify",
        help="check a prepared folder: manifest, shard checksums, every record, counts",
        description=DESCRIPTION,
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("dir", metavar="DIR", help="a folder written by `bat-jax prepare --out DIR`")
    p.add_argument(
        "--quick", action="store_true", help="skip decoding the records (sizes, checksums and counts only)"
    )
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    out = Path(args.dir)
    if not out.is_dir():
        what = "does not exist" if not out.exists() else "is not a folder"
        print(
            f"bat-jax verify: error: DIR: expected a folder written by `bat-jax prepare`, {out} {what}",
            file=sys.stderr,
        )
        return 2
    report = verify(out, decode=not args.quick)
    print(format_report(report, out))
    return 0 if report.ok else 1
