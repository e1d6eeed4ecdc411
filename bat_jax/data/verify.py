"""`bat-jax verify DIR`: check a folder written by `bat-jax prepare` before training on it.

Checks, in order: manifest.json is present, readable and well-typed (an object whose splits, shard entries
and clip are what `prepare` writes); every shard it lists exists, has the listed size and sha256 (bit rot, a
bad copy, a truncated download); every shard opens as ArrayRecord with the listed number of records; every
record decodes (bat_jax.data.records) to a spec [frames, n_mels] with the manifest's n_mels (and the fixed
frame count of a --clip-seconds output), 1 <= num_frames <= frames, labels (and the event classes of records
with events) inside the vocabulary; and per split, the clip and frame counts of its records equal the
manifest's. Each problem is one line naming the shard (and the record index); the exit status is 0 when all
is well, 1 when anything is bad, 2 on bad usage.
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


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _kind(value) -> str:
    """How a JSON value is named in a problem: its JSON type and (shortened) text."""
    names = {dict: "an object", list: "an array", str: "a string", bool: "a boolean", type(None): "null"}
    text = json.dumps(value)
    return f"{names.get(type(value), 'a number')} {text if len(text) <= 40 else text[:37] + '...'}"


SHARD_KEYS = {"path": str, "num_records": int, "bytes": int, "sha256": str}  # a manifest shard entry


def _shard_entry_problems(shard, where: str) -> list[str]:
    """What is wrong with the type of manifest shard entry `shard` ({path, num_records, bytes, sha256})."""
    if not isinstance(shard, dict):
        return [f"{where}: expected an object with {', '.join(SHARD_KEYS)}, found {_kind(shard)}"]
    found = []
    for key, kind in SHARD_KEYS.items():
        value = shard.get(key)
        if key == "sha256" and value is None:
            continue  # an older bat-jax wrote none: reported per shard ("no sha256 in manifest.json")
        if not (_is_int(value) if kind is int else isinstance(value, kind)):
            what = "missing" if key not in shard else f"found {_kind(value)}"
            found.append(f"{where}.{key}: expected {'a whole number' if kind is int else 'a string'}, {what}")
    return found


def _manifest_problems(manifest) -> list[str]:
    """What is wrong with the shape of a parsed manifest.json (checked before any value is used)."""
    if not isinstance(manifest, dict):
        keys = "n_mels, label_vocabulary, splits, clip"
        return [f"expected an object with the keys {keys}; found {_kind(manifest)}"]
    missing = [k for k in ("n_mels", "label_vocabulary", "splits", "clip") if k not in manifest]
    if missing:
        return [f"expected the keys n_mels, label_vocabulary, splits, clip; missing {missing}"]
    found = []
    if not _is_int(manifest["n_mels"]):
        found.append(f"n_mels: expected a whole number, found {_kind(manifest['n_mels'])}")
    if not isinstance(manifest["label_vocabulary"], list):
        found.append(
            f"label_vocabulary: expected an array of class names, found {_kind(manifest['label_vocabulary'])}"
        )
    clip = manifest["clip"]
    if not isinstance(clip, dict):
        found.append(f"clip: expected an object (mode, frames...), found {_kind(clip)}")
    elif clip.get("mode") == "fixed" and not _is_int(clip.get("frames")):
        found.append(
            f"clip.frames: expected a whole number with mode 'fixed', found {_kind(clip.get('frames'))}"
        )
    splits = manifest["splits"]
    if not isinstance(splits, dict):
        return [*found, f"splits: expected an object of split name -> entry, found {_kind(splits)}"]
    for name, entry in splits.items():
        where = f"splits.{name}"
        if not isinstance(entry, dict):
            found.append(
                f"{where}: expected an object with shards, num_clips, total_frames, found {_kind(entry)}"
            )
        elif not isinstance(entry.get("shards"), list):
            what = "missing" if "shards" not in entry else f"found {_kind(entry['shards'])}"
            found.append(f"{where}.shards: expected an array of shard entries, {what}")
        else:
            for i, shard in enumerate(entry["shards"]):
                found += _shard_entry_problems(shard, f"{where}.shards[{i}]")
    return found


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
    found = _manifest_problems(manifest)
    if found:
        return None, [Problem(shards.MANIFEST, what) for what in found]
    return manifest, []


def _record_problem(clip: dict, expect: Expect) -> str | None:
    """What is wrong with one decoded record, or None."""
    spec = clip["spec"]  # [frames, n_mels] with 1 <= num_frames <= frames: records.decode checks both
    if spec.shape[1] != expect.n_mels:
        return f"spec shape {tuple(spec.shape)}, expected [frames, {expect.n_mels}] (the manifest's n_mels)"
    if expect.fixed_frames is not None and spec.shape[0] != expect.fixed_frames:
        return f"spec has {spec.shape[0]} frames, expected {expect.fixed_frames} (the manifest's clip frames)"
    bad = [int(c) for c in clip["labels"] if not 0 <= c < expect.num_classes]
    if bad:
        return f"labels {bad} outside the vocabulary [0, {expect.num_classes})"
    bad = [int(c) for c in clip.get("event_classes", ()) if not 0 <= c < expect.num_classes]
    if bad:  # onset and offset: records.decode checks 0 <= onset < offset
        return f"event classes {bad} outside the vocabulary [0, {expect.num_classes})"
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


def _check_shard(
    out: Path, shard: dict, expect: Expect, decode: bool, hash_of
) -> tuple[list[Problem], int, int | None]:
    """(problems, records, frames) of one manifest shard entry {path, num_records, bytes, sha256}: the file
    checks of shards.file_problems, each record decoded and checked on the way (decode)."""
    name = shard["path"]
    problems, counted = [], {"records": 0, "frames": 0 if decode else None}

    def count(path: Path) -> int:
        if not decode:
            counted["records"] = shards.count_records(path)
        else:  # the records' problems come after the file's, before the count's
            more, counted["records"], counted["frames"] = _check_records(path, name, expect)
            problems.extend(more)
        return counted["records"]

    for what in shards.file_problems(
        out / name,
        shard["bytes"],
        shard.get("sha256"),
        shard["num_records"],
        listed_in=shards.MANIFEST,
        hash_of=hash_of,
        count=count,
    ):
        problems.append(Problem(name, what))
    return problems, counted["records"], counted["frames"]


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
    listed = [s for entry in manifest["splits"].values() for s in entry["shards"]]
    hashed = [out / s["path"] for s in listed if s.get("sha256") and (out / s["path"]).is_file()]
    with shards.hashing(hashed) as hash_of:  # read ahead in threads; reported in manifest order
        for split, entry in manifest["splits"].items():
            _check_split(out, split, entry, expect, decode, hash_of, report)
    return report


def _check_split(
    out: Path, split: str, entry: dict, expect: Expect, decode: bool, hash_of, report: Report
) -> None:
    """Check one split's shards and counts, adding to `report`."""
    report.splits += 1
    split_records, split_frames = 0, 0
    for shard in entry["shards"]:
        found, count, frames = _check_shard(out, shard, expect, decode, hash_of)
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
                f"its shards hold {split_records} records, manifest.json says {entry.get('num_clips')} clips",
            )
        )
    if split_records == entry.get("num_clips") and split_frames not in (None, entry.get("total_frames")):
        report.problems.append(
            Problem(
                f"split {split}",
                f"its records hold {split_frames} frames, manifest.json says {entry.get('total_frames')}",
            )
        )


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
  manifest.json   present, readable, with n_mels, label_vocabulary, clip and splits of the right types
  every shard     listed in the manifest exists, has the listed size and sha256, opens as ArrayRecord and
                  holds the listed number of records
  every record    decodes (bat_jax.data.records) to spec [frames, n_mels] with the manifest's n_mels (and its
                  fixed frame count with --clip-seconds), 1 <= num_frames <= frames, labels (and event
                  classes) in the vocabulary, event times 0 <= onset < offset
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
