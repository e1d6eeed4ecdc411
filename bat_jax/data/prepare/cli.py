"""The `bat-jax prepare` command line: options, help text, the SourcePlan they describe, and `run`."""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

from bat_jax.data import shards, sources
from bat_jax.data.prepare.folds import attach_folds
from bat_jax.data.prepare.frontend import FRONTENDS, Frontend
from bat_jax.data.prepare.job import CLIPS_PER_SHARD, prepare, stop_on_sigint
from bat_jax.data.prepare.output import Interrupted, OutputError
from bat_jax.data.prepare.summary import format_summary
from bat_jax.data.prepare.workers import (
    CLIPS_PER_DEFAULT_WORKER,
    MAX_DEFAULT_WORKERS,
    LoaderContractError,
    default_workers,
)
from bat_jax.data.sources import SourceError, SourcePlan
from bat_jax.data.sources.labels_csv import read_folds

DESCRIPTION = """\
Decode audio once, compute spectrograms, and write them as ArrayRecord shards plus a manifest that the
training and probing pipelines read.

sources (--source):
  folder     every audio file under --input, recursively (.wav .flac .ogg .mp3 .m4a .aiff .aif), mixed to
             mono and resampled to 16 kHz (soxr_hq). Folders named .* are not entered. Symlinks to folders
             are followed, except a link to a folder above it (skipped as "symlink loop") or a second way
             into a folder already listed ("duplicate folder"). A subfolder that cannot be listed (no read
             permission), a broken symlink, a file that vanished or cannot be stat'ed are skipped, listed
             in the manifest with their reason and counted in the summary; the rest is written. A truncated
             WAV (its header promises more frames than its data holds) is kept and listed as truncated.
             Labels: --labels-csv FILE (rules below), or --labels-from-dir (the folder holding a file names
             its class; refused when no file of a split is inside a subfolder), or none. The vocabulary is
             the sorted set of class names, or --labels-vocab FILE (one name per line, line i = label i).
             Files the CSV does not list are unlabeled (skipped with --require-labels); rows naming missing
             files are skipped. Or sound events: --events-csv FILE (rules below; its events give the labels).
             One split named --split, or with --split-from-subdir one split per subfolder of --input
             (train/, eval/).
  tfds       a TFDS dataset prepared in the array_record format (tfds build NAME --file_format=array_record),
             read with tfds.data_source, or without TensorFlow from its files directly: --tfds-name,
             --tfds-split (comma-separated: one output split each), --tfds-data-dir. Audio from the feature
             --tfds-audio-key (default audio) at its sample_rate (or --tfds-sample-rate), int16 PCM divided by
             32768, resampled to 16 kHz; labels from the ClassLabel or Sequence(ClassLabel) feature
             --tfds-label-key (default label), vocabulary = its class names.
  synthetic  the built-in synthetic dataset (12 classes of sound events, generated from --seed, no
             download): splits train (--num-clips) and eval (--num-eval-clips), --multilabel,
             --min-seconds/--max-seconds; --synthetic-events stores each clip's true events (onset, offset,
             class) in its record, as --events-csv does.

labels CSV (--labels-csv FILE), checked before any work; a CSV breaking a rule is refused:
  - paths are relative to --input; class names in a labels cell are separated by ';' (--label-separator),
    an empty cell means no labels; blank rows are ignored
  - without --csv-columns: exactly two cells per row, path and labels; the first row is the header
    `path,labels` or already a data row whose path has an audio extension (a header like `file,class`
    needs --csv-columns file,class)
  - with --csv-columns PATH,LABELS: the first row is a header naming both columns (case-insensitive; other
    columns are ignored), e.g. ESC-50's meta/esc50.csv with --csv-columns filename,category
  - text in --csv-encoding (default utf-8, a byte-order mark accepted); a byte that does not decode is
    reported with its line; pass e.g. --csv-encoding latin-1
  - when no row names an audio file under --input the run is refused; --allow-unlabelled writes the files
    without labels instead (it also lets --labels-from-dir run on a flat folder)
  - --fold-column NAME stores each clip's cross-validation fold from that column (e.g. ESC-50's fold): the
    header must name it (without --csv-columns the header is path,labels,NAME), every row needs a value;
    integers when every value is one, else strings. A file with no CSV row is skipped ("no fold"). The fold
    goes into each record (fold) and, per split in record order, into the manifest
    (splits.<split>.folds: column, values, num_clips, by_record)

events CSV (--events-csv FILE), sound events for frame-wise targets (sound event detection, e.g. DCASE 2016
task 2), checked before any work; a bad value is refused naming the file and the line:
  - rows path,onset,offset,label: path relative to --input, onset and offset in seconds from the clip's
    start (0 <= onset < offset), label a class name; one row per event, so a path may have many rows
  - a row whose onset, offset and label are all empty ('a.wav,,,') marks an annotated clip without events
  - without --events-columns: exactly four cells per row; the first row is the header path,onset,offset,label
    or already a data row; with --events-columns PATH,ONSET,OFFSET,LABEL: a header naming the four columns
    (other columns ignored). Text in --csv-encoding
  - a clip's labels = the sorted set of its events' classes; the vocabulary = the sorted set of event labels
    (or --labels-vocab); an audio file with no row is skipped ("no events"). Not with --labels-csv or
    --labels-from-dir
  - the events go into each record (events: [[onset, offset, class], ...]) and the manifest counts them per
    split (splits.<split>.events: source, file, column_names, num_events, num_clips_without_events); the
    loaders' frame_labels turn them into targets per time patch (bat_jax.data.frame_targets)

what is written (--out OUT):
  OUT/<split>/<split>-00000-of-0000N.arrayrecord   one record per clip (bat_jax.data.records, msgpack):
        spec float16 [frames, 128], num_frames (true length; zero padding follows), clip_id
        (relative path, TFDS name/split/index or synthetic id), labels (class indices), and fold / events
        when asked for (--fold-column, --events-csv, --synthetic-events)
  OUT/manifest.json   format version, front-end name and all its parameters, sample rate, clip handling,
        label_vocabulary, per split: clips, skipped, notes, frames, hours and the shard list (path, records,
        bytes, sha256); every skipped input with its reason; notes on kept inputs (e.g. a truncated WAV:
        frames read vs header); the command line, bat-jax version and timing
  OUT/.progress/      per-shard completion records (records, bytes, sha256), used to resume
  `bat-jax verify OUT` checks a prepared folder: checksums, every record, counts against the manifest

front-ends (--frontend):
  bat    (default) BAT log-mel (bat_jax.audio.logmel): 1024-point STFT, hop 160, 128 HTK mels, dB with an
         80 dB floor, min-max to [0, 1] per clip
  kaldi  legacy EAT/SSLAM Kaldi fbank (bat_jax.audio.kaldi_fbank), stored raw: the (x - mean) / (2 std)
         dataset normalisation is applied later (bat_jax.audio.normalize_fbank)

clip length (--clip-seconds N): a clip longer than N s is cut to its first N s before the front-end; the
  features of a shorter clip are zero-padded after the front-end (after BAT's min-max, so padding = the
  minimum, as in BAT) to the frame count of N s (bat: N*16000 // 160 + 1; 10.23 s -> 1024 frames).
  num_frames keeps the true length. Default: every clip at its full length.

robustness: unreadable, corrupt, empty and too-short inputs are skipped, listed in the manifest with their
  reason and counted in the summary; the exit status is 1 only when nothing was written, or with --strict
  when anything was skipped. Output is deterministic (sorted inputs, fixed shard ranges, records in input
  order whatever the worker count). Rerunning an interrupted command writes only the missing shards, and
  recomputes a finished shard whose size or sha256 no longer matches its record (the summary names it).
  Ctrl-C (SIGINT) stops between two clips with exit status 130: finished shards are kept, the shard being
  written is dropped; run the same command again to finish.
  An output made with other settings is refused unless --overwrite. Separate runs may add splits to the
  same OUT when the front-end, clip handling and label vocabulary agree (a folder run reuses the
  vocabulary of an existing OUT).
"""

EXAMPLES = """\
examples:
  # the built-in synthetic dataset (train + eval)
  bat-jax prepare --source synthetic --out data/synth --num-clips 2000 --num-eval-clips 500

  # AudioSet from a folder of downloaded 10 s clips and a CSV `path,labels` you write from the segment
  # lists (labels = class names or MIDs separated by ';'); one run per split, same --out
  bat-jax prepare --source folder --input audioset/balanced_train --labels-csv balanced_train.csv \\
      --split train --clip-seconds 10.23 --out data/as20k --workers 8
  bat-jax prepare --source folder --input audioset/eval --labels-csv eval.csv \\
      --split eval --clip-seconds 10.23 --out data/as20k --workers 8

  # ESC-50 straight from its repository layout (meta/esc50.csv has columns filename, fold and category),
  # with its 5 folds for cross-validation
  bat-jax prepare --source folder --input ESC-50/audio --labels-csv ESC-50/meta/esc50.csv \\
      --csv-columns filename,category --fold-column fold --out data/esc50

  # Speech Commands v2 from its folder layout (one folder per word; move _background_noise_ out first,
  # or it becomes a class; the official validation/test lists are not applied: one split)
  bat-jax prepare --source folder --input speech_commands_v0.02 --labels-from-dir --out data/sc2

  # Speech Commands from TFDS (dataset speech_commands: splits train, validation, test)
  bat-jax prepare --source tfds --tfds-name speech_commands --tfds-split train,validation,test \\
      --out data/sc2_tfds
  # (AudioSet and ESC-50 are not in the TFDS catalog; use a folder for them)

  # DCASE 2016 task 2 style sound event detection: a CSV of strong labels, one row per event,
  #   path,onset,offset,label
  #   dev_1.wav,0.51,1.32,speech
  #   dev_1.wav,2.05,2.90,doorslam
  #   dev_2.wav,,,               (annotated, no event)
  bat-jax prepare --source folder --input dcase2016_task2/audio --events-csv dcase2016_task2/events.csv \\
      --split train --out data/dcase2016_t2
  # the synthetic dataset with its true events (frame-wise targets for the cgp_frame probe)
  bat-jax prepare --source synthetic --synthetic-events --out data/synth_sed

  # legacy Kaldi fbank features for EAT / SSLAM checkpoints
  bat-jax prepare --source folder --input ESC-50/audio --labels-csv ESC-50/meta/esc50.csv \\
      --csv-columns filename,category --frontend kaldi --out data/esc50_kaldi
"""

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
        "--source", required=True, choices=("folder", "tfds", "synthetic"), help="where the audio comes from"
    )
    p.add_argument(
        "--out", required=True, metavar="DIR", help="output folder (created; resumed if it exists)"
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
    g.add_argument(
        "--frontend", choices=sorted(FRONTENDS), default="bat", help="spectrogram front-end (default: bat)"
    )
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
            f"worker processes (default: min({MAX_DEFAULT_WORKERS}, CPUs), and one per "
            f"{CLIPS_PER_DEFAULT_WORKER} clips for small inputs)"
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


def run(args: argparse.Namespace) -> int:
    """The `bat-jax prepare` command: returns the exit status."""
    try:
        with stop_on_sigint() as stop:  # Ctrl-C while listing inputs also ends in the message below
            frontend = Frontend.create(args.frontend, clip_seconds=args.clip_seconds)
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
            )
    except (SourceError, OutputError, LoaderContractError, ValueError, RuntimeError, OSError) as e:
        print(f"bat-jax prepare: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("bat-jax prepare: interrupted; run the same command again to finish", file=sys.stderr)
        return 130
    print(format_summary(result, Path(args.out)))
    return result.exit_status
