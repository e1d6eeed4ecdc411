"""The `bat-jax prepare` command line: options, help text, the SourcePlan they describe, and `run`."""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

from bat_jax.data import shards, sources
from bat_jax.data.prepare import parts
from bat_jax.data.prepare.folds import attach_folds
from bat_jax.data.prepare.frontend import FRONTENDS, Frontend
from bat_jax.data.prepare.help_text import DESCRIPTION, EXAMPLES
from bat_jax.data.prepare.job import CLIPS_PER_SHARD, prepare, stop_on_sigint
from bat_jax.data.prepare.output import OutputError
from bat_jax.data.prepare.summary import format_part_summary, format_summary
from bat_jax.data.prepare.workers import (
    CLIPS_PER_DEFAULT_WORKER,
    MAX_DEFAULT_WORKERS,
    Interrupted,
    LoaderContractError,
    default_workers,
)
from bat_jax.data.sources import SourceError, SourcePlan
from bat_jax.data.sources.labels_csv import read_folds

# option -> the source it belongs to (used to reject options given to another source)
_SOURCE_OPTIONS = {
    "input": "folder",
    "split": "folder",
    "split_from_subdir": "folder",
    "labels_csv": "folder",
    "csv_columns": "folder",
    "csv_encoding": "folder",
    "fold_column": "folder",
    "allow_unlabelled": "folder",
    "label_separator": "folder",
    "labels_vocab": "folder",
    "labels_from_dir": "folder",
    "require_labels": "folder",
    "events_csv": "folder",
    "events_columns": "folder",
    "tfds_name": "tfds",
    "tfds_split": "tfds",
    "tfds_data_dir": "tfds",
    "tfds_audio_key": "tfds",
    "tfds_label_key": "tfds",
    "tfds_sample_rate": "tfds",
    "num_clips": "synthetic",
    "num_eval_clips": "synthetic",
    "seed": "synthetic",
    "multilabel": "synthetic",
    "min_seconds": "synthetic",
    "max_seconds": "synthetic",
    "synthetic_events": "synthetic",
}

_SYNTHETIC_DEFAULTS = {"num_clips": 200, "num_eval_clips": 50, "seed": 0}


def count(minimum: int):
    """An argparse type: a whole number >= minimum (the error names the flag: see bat_jax.cli.Parser)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < minimum:
            raise argparse.ArgumentTypeError(f"expected a whole number >= {minimum}, found {text}")
        return value

    return parse


def seconds(text: str) -> float:
    """An argparse type: a finite number of seconds > 0 (not inf, nan, 0 or negative)."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"expected a finite number of seconds > 0, found {text}")
    return value


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "prepare",
        help="decode audio once and write spectrogram shards (ArrayRecord) + manifest.json",
        description=DESCRIPTION,
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--source",
        choices=("folder", "tfds", "synthetic"),
        help="where the audio comes from (required, except with --merge)",
    )
    p.add_argument(
        "--out", required=True, metavar="DIR", help="output folder (created; resumed if it exists)"
    )
    g = p.add_argument_group("several machines (one dataset prepared in N parts into the same --out)")
    g.add_argument(
        "--part",
        type=parts.parse_part,
        metavar="I/N",
        help="write only part I of N: every N-th shard of the command (round-robin over its splits), and "
        "the part's state; no manifest",
    )
    g.add_argument(
        "--merge",
        action="store_true",
        help="once every part is done: check the parts of --out and write manifest.json (only --out, "
        "--strict and --no-progress go with it)",
    )
    g = p.add_argument_group("folder source")
    g.add_argument("--input", metavar="DIR", help="folder of audio files (searched recursively)")
    g.add_argument("--split", metavar="NAME", help="name of the split written (default: train)")
    g.add_argument(
        "--split-from-subdir", action="store_true", default=None, help="one split per subfolder of --input"
    )
    g.add_argument("--labels-csv", metavar="FILE", help="CSV of path,labels rows (paths relative to --input)")
    g.add_argument(
        "--csv-columns",
        metavar="PATH,LABELS",
        help="the path and labels column names of a CSV with a header row (default: two columns path,labels)",
    )
    g.add_argument(
        "--csv-encoding",
        metavar="ENC",
        help="text encoding of the labels or events CSV, e.g. latin-1 (default: utf-8, BOM accepted)",
    )
    g.add_argument(
        "--fold-column",
        metavar="NAME",
        help="store each clip's cross-validation fold from this column of --labels-csv (e.g. fold)",
    )
    g.add_argument(
        "--allow-unlabelled",
        action="store_true",
        default=None,
        help="write the files without labels when no CSV row names one (or no file is in a class folder)",
    )
    g.add_argument(
        "--label-separator", metavar="SEP", help="between class names in a labels cell (default: ';')"
    )
    g.add_argument(
        "--labels-vocab", metavar="FILE", help="class names, one per line (line i = label index i)"
    )
    g.add_argument(
        "--labels-from-dir", action="store_true", default=None, help="label = the folder holding the file"
    )
    g.add_argument(
        "--require-labels",
        action="store_true",
        default=None,
        help="skip files without labels instead of keeping them",
    )
    g.add_argument(
        "--events-csv",
        metavar="FILE",
        help="CSV of path,onset,offset,label sound events (seconds; one row per event), instead of labels",
    )
    g.add_argument(
        "--events-columns",
        metavar="PATH,ONSET,OFFSET,LABEL",
        help="the four column names of an events CSV with a header (default: path,onset,offset,label)",
    )
    g = p.add_argument_group("tfds source")
    g.add_argument(
        "--tfds-name",
        metavar="NAME",
        help="TFDS dataset name, e.g. speech_commands (name[/config][:version])",
    )
    g.add_argument("--tfds-split", metavar="SPLITS", help="comma-separated TFDS splits (default: train)")
    g.add_argument(
        "--tfds-data-dir",
        metavar="DIR",
        help="TFDS data dir (default: $TFDS_DATA_DIR or ~/tensorflow_datasets)",
    )
    g.add_argument("--tfds-audio-key", metavar="KEY", help="audio feature name (default: audio)")
    g.add_argument(
        "--tfds-label-key", metavar="KEY", help="ClassLabel feature name (default: label, if present)"
    )
    g.add_argument(
        "--tfds-sample-rate", type=count(1), metavar="HZ", help="the audio's rate when the feature has none"
    )
    g = p.add_argument_group("synthetic source")
    g.add_argument("--num-clips", type=count(1), metavar="N", help="clips in split train (default: 200)")
    g.add_argument("--num-eval-clips", type=count(0), metavar="N", help="clips in split eval (default: 50)")
    g.add_argument("--seed", type=count(0), help="generator seed (default: 0)")
    g.add_argument(
        "--multilabel", action="store_true", default=None, help="1-3 events of distinct classes per clip"
    )
    g.add_argument("--min-seconds", type=seconds, metavar="S", help="shortest clip (default: 1.0)")
    g.add_argument("--max-seconds", type=seconds, metavar="S", help="longest clip (default: 10.0)")
    g.add_argument(
        "--synthetic-events",
        action="store_true",
        default=None,
        help="store each clip's true sound events (onset, offset, class) in its record",
    )
    g = p.add_argument_group("output")
    g.add_argument("--frontend", choices=sorted(FRONTENDS), help="spectrogram front-end (default: bat)")
    g.add_argument(
        "--clip-seconds",
        type=seconds,
        metavar="N",
        help="cut / zero-pad every clip to N s (default: full length)",
    )
    g.add_argument(
        "--workers",
        type=count(1),
        default=None,
        metavar="N",
        help=(
            f"worker processes, each writing whole shards (default: min({MAX_DEFAULT_WORKERS}, CPUs), and "
            f"one per {CLIPS_PER_DEFAULT_WORKER} clips for small inputs; never more than shards to write)"
        ),
    )
    sharding = g.add_mutually_exclusive_group()
    sharding.add_argument(
        "--clips-per-shard", type=count(1), metavar="N", help=f"clips per shard (default: {CLIPS_PER_SHARD})"
    )
    sharding.add_argument("--num-shards", type=count(1), metavar="N", help="shards per split instead")
    g.add_argument("--strict", action="store_true", help="exit with status 1 when any input was skipped")
    g.add_argument(
        "--overwrite", action="store_true", help="delete an existing output made with other settings"
    )
    g.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    p.set_defaults(func=run)
    return p


def _existing_vocabulary(out: Path) -> list[str] | None:
    cfg = shards.read_json(out / shards.PROGRESS_DIR / "global.json")
    return cfg.get("label_vocabulary") if cfg else None


def _events_options(args: argparse.Namespace) -> tuple[str | None, tuple[str, ...] | None]:
    """(--events-csv, --events-columns as names), checked against the other label options."""
    events_csv, names = getattr(args, "events_csv", None), getattr(args, "events_columns", None)
    if events_csv is None:
        if names is not None:
            raise SourceError(
                f"--events-columns {names}: expected --events-csv FILE with those columns, found none"
            )
        return None, None
    for flag, given in (("--labels-csv", args.labels_csv), ("--labels-from-dir", args.labels_from_dir)):
        if given:
            raise SourceError(
                f"--events-csv: expected either --events-csv (its events give the labels) or {flag}, "
                f"found both"
            )
    if args.csv_columns is not None:
        raise SourceError(
            f"--csv-columns {args.csv_columns}: names the columns of --labels-csv; for --events-csv use "
            f"--events-columns PATH,ONSET,OFFSET,LABEL"
        )
    columns = None
    if names is not None:
        columns = tuple(c.strip() for c in names.split(","))
        if len(columns) != 4 or not all(columns):
            raise SourceError(
                f"--events-columns: expected four names PATH,ONSET,OFFSET,LABEL, found {names!r}"
            )
    return events_csv, columns


def plan_source(args: argparse.Namespace) -> SourcePlan:
    """The SourcePlan the command-line options describe."""
    for option, owner in _SOURCE_OPTIONS.items():
        if getattr(args, option, None) is not None and owner != args.source:
            flag = "--" + option.replace("_", "-")
            raise SourceError(f"{flag} belongs to --source {owner}, found --source {args.source}")
    if args.source == "synthetic":
        given = {k: getattr(args, k) for k in _SYNTHETIC_DEFAULTS if getattr(args, k) is not None}
        opts = {**_SYNTHETIC_DEFAULTS, **given}
        return sources.synthetic_source(
            num_clips=opts["num_clips"],
            num_eval_clips=opts["num_eval_clips"],
            seed=opts["seed"],
            multilabel=bool(args.multilabel),
            min_seconds=args.min_seconds,
            max_seconds=args.max_seconds,
            events=bool(getattr(args, "synthetic_events", None)),
        )
    if args.source == "tfds":
        if not args.tfds_name:
            raise SourceError("--source tfds: expected --tfds-name NAME (e.g. speech_commands), found none")
        splits = [s.strip() for s in (args.tfds_split or "train").split(",") if s.strip()]
        return sources.tfds_source(
            args.tfds_name,
            splits,
            data_dir=args.tfds_data_dir,
            audio_key=args.tfds_audio_key or "audio",
            label_key=args.tfds_label_key,
            sample_rate=args.tfds_sample_rate,
        )
    if not args.input:
        raise SourceError("--source folder: expected --input DIR, found none")
    columns = None  # without --csv-columns: the two-column layout (sources/labels_csv.py)
    if args.csv_columns is not None:
        columns = tuple(c.strip() for c in args.csv_columns.split(","))
        if len(columns) != 2 or not all(columns):
            raise SourceError(f"--csv-columns: expected two names PATH,LABELS, found {args.csv_columns!r}")
    events_csv, events_columns = _events_options(args)
    vocab, origin = args.labels_vocab, "given"
    if vocab is None and not args.overwrite and (args.labels_csv or args.labels_from_dir or events_csv):
        # adding a split to an existing output: keep its label indices
        vocab = _existing_vocabulary(Path(args.out).expanduser().resolve()) or None
        origin = f"the existing output {args.out}"
    fold_column = getattr(args, "fold_column", None)
    if fold_column is not None and not args.labels_csv:
        raise SourceError(
            f"--fold-column {fold_column}: expected --labels-csv FILE with that column, found no --labels-csv"
        )
    folds = None
    if fold_column is not None:  # read first: a CSV without the column costs no listing
        root = Path(args.input).expanduser().resolve()
        encoding = args.csv_encoding or "utf-8"
        folds = read_folds(args.labels_csv, root, fold_column, columns, encoding=encoding)
        columns = columns or sources.CSV_COLUMNS  # a fold column needs a header: path,labels,<fold column>
    plan = sources.folder_source(
        args.input,
        split=args.split or "train",
        split_from_subdir=bool(args.split_from_subdir),
        labels_csv=args.labels_csv,
        csv_columns=columns,
        csv_encoding=args.csv_encoding or "utf-8",
        label_separator=args.label_separator or sources.LABEL_SEPARATOR,
        labels_vocab=vocab,
        labels_from_dir=bool(args.labels_from_dir),
        require_labels=bool(args.require_labels),
        allow_unlabelled=bool(args.allow_unlabelled),
        vocabulary_origin=origin,
        events_csv=events_csv,
        events_columns=events_columns,
    )
    if folds is not None:
        plan = attach_folds(plan, folds, fold_column, args.labels_csv)
    return plan


# what --merge accepts besides --out (every other option of the parser is refused with it)
_MERGE_OPTIONS = ("out", "merge", "strict", "no_progress", "func", "overrides", "command")


def _merge_conflicts(args: argparse.Namespace) -> list[str]:
    """The options given with --merge that it does not take, as flags."""
    given = [k for k, v in vars(args).items() if k not in _MERGE_OPTIONS and v not in (None, False)]
    return ["--" + k.replace("_", "-") for k in given]


def run(args: argparse.Namespace) -> int:
    """The `bat-jax prepare` command: returns the exit status."""
    try:
        if args.merge:
            conflicts = _merge_conflicts(args)
            if conflicts:
                raise SourceError(
                    f"--merge: expected only --out (and --strict, --no-progress), found {' '.join(conflicts)}"
                )
            result = parts.merge(args.out, strict=args.strict)
            print(format_summary(result, Path(args.out)))
            return result.exit_status
        if args.source is None:
            raise SourceError("the following arguments are required: --source (or --merge)")
        with stop_on_sigint() as stop:  # Ctrl-C while listing inputs also ends in the message below
            frontend = Frontend.create(args.frontend or "bat", clip_seconds=args.clip_seconds)
            plan = plan_source(args)
            if stop.is_set():
                raise Interrupted()
            if not any(s.tasks or s.skipped for s in plan.splits):
                where = (
                    f" under {args.input} (extensions {' '.join(sources.AUDIO_EXTENSIONS)})"
                    if args.input
                    else ""
                )
                raise SourceError(f"--source {args.source}: expected input clips, found none{where}")
            result = prepare(
                plan,
                args.out,
                frontend,
                workers=args.workers or default_workers(sum(len(s.tasks) for s in plan.splits)),
                clips_per_shard=args.clips_per_shard or CLIPS_PER_SHARD,
                num_shards=args.num_shards,
                overwrite=args.overwrite,
                strict=args.strict,
                progress=not args.no_progress,
                part=args.part,
            )
    except (SourceError, OutputError, LoaderContractError, ValueError, RuntimeError, OSError) as e:
        print(f"bat-jax prepare: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("bat-jax prepare: interrupted; run the same command again to finish", file=sys.stderr)
        return 130
    if result.part is not None:
        print(format_part_summary(result, Path(args.out)))
    else:
        print(format_summary(result, Path(args.out)))
    return result.exit_status
