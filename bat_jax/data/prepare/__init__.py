"""`bat-jax prepare`: decode audio once, compute spectrograms, write ArrayRecord shards and a manifest.

    source (folder / TFDS / synthetic) ──plan──▶ per split: sorted ClipTasks ──▶ fixed shard ranges
        ──▶ worker processes: load → 16 kHz → cut → front-end (jax, CPU, 1 thread) → pad → encode
        ──▶ this process: records in task order → <shard>.tmp → rename → <shard>.done.json
        ──▶ manifest.json (last)

Modules, in the order the data flows:
    frontend   Frontend: the front-end with all its parameters, clip cutting/padding, length bucketing
    folds      attach_folds (--fold-column: a per-clip fold from the labels CSV), the manifest's folds entry
    events     the manifest's events entry (--events-csv / --synthetic-events: sound events in the records)
    workers    process_clip (one clip -> one record or a skip) and Runner (the worker-process pool)
    output     output checks, resume, writing a split's missing shards, the manifest
    job        prepare(): the whole job for a SourcePlan
    summary    format_summary(): the text printed at the end
    cli        the command line (add_parser, run)
"""

from bat_jax.data.prepare.cli import add_parser, plan_source, run
from bat_jax.data.prepare.events import events_entry
from bat_jax.data.prepare.folds import NO_FOLD, attach_folds, folds_entry
from bat_jax.data.prepare.frontend import BUCKET_FRAMES, FRONTENDS, SAMPLE_RATE, Frontend
from bat_jax.data.prepare.job import CLIPS_PER_SHARD, PrepareResult, prepare
from bat_jax.data.prepare.output import OutputError, SplitRun, build_manifest, check_output
from bat_jax.data.prepare.summary import format_summary
from bat_jax.data.prepare.workers import (
    TASKS_PER_SUBMIT,
    ClipResult,
    LoaderContractError,
    Runner,
    default_workers,
    process_clip,
)

__all__ = [
    "BUCKET_FRAMES",
    "CLIPS_PER_SHARD",
    "FRONTENDS",
    "SAMPLE_RATE",
    "TASKS_PER_SUBMIT",
    "ClipResult",
    "Frontend",
    "LoaderContractError",
    "NO_FOLD",
    "OutputError",
    "PrepareResult",
    "Runner",
    "SplitRun",
    "add_parser",
    "attach_folds",
    "build_manifest",
    "check_output",
    "events_entry",
    "default_workers",
    "folds_entry",
    "format_summary",
    "plan_source",
    "prepare",
    "process_clip",
    "run",
]
