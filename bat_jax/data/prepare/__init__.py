"""`bat-jax prepare`: decode audio once, compute spectrograms, write ArrayRecord shards and a manifest.

    source (folder / TFDS / synthetic) ──plan──▶ per split: sorted ClipTasks ──▶ fixed shard ranges
        ──▶ (--part I/N: every N-th shard of the command, round-robin over its splits)
        ──▶ worker processes, one whole shard each: load → 16 kHz → cut → front-end (jax, CPU, 1 thread)
            → pad → encode → records in task order → <shard>.tmp → rename → <shard>.done.json
            (this process only hands out shards, shows progress and watches for Ctrl-C)
        ──▶ manifest.json (last); a part writes .progress/<split>/part-I-of-N.json instead, and
            `--merge` writes manifest.json once every part is done

Modules, in the order the data flows:
    frontend   Frontend: the front-end with all its parameters, clip cutting/padding, length bucketing
    folds      attach_folds (--fold-column: a per-clip fold from the labels CSV), the manifest's folds entry
    events     the manifest's events entry (--events-csv / --synthetic-events: sound events in the records)
    workers    process_clip (one clip -> one record or a skip), write_shard (one whole shard and its
               .done.json) and Runner (the worker-process pool, one shard per job)
    output     output checks, resume (a split's shards still to write), the manifest
    job        prepare(): the whole job for a SourcePlan (or one part of it)
    parts      --part I/N (which shards a part writes, its state file) and --merge
    summary    format_summary(): the text printed at the end
    cli        the command line (add_parser, run)
"""

from bat_jax.data.prepare.cli import add_parser, plan_source, run
from bat_jax.data.prepare.events import events_entry
from bat_jax.data.prepare.folds import NO_FOLD, attach_folds, folds_entry
from bat_jax.data.prepare.frontend import BUCKET_FRAMES, FRONTENDS, SAMPLE_RATE, Frontend
from bat_jax.data.prepare.job import CLIPS_PER_SHARD, PrepareResult, prepare
from bat_jax.data.prepare.output import OutputError, SplitRun, build_manifest, check_output
from bat_jax.data.prepare.parts import MERGE_RUN_FIELDS, merge
from bat_jax.data.prepare.summary import format_part_summary, format_summary
from bat_jax.data.prepare.workers import (
    ClipResult,
    Interrupted,
    LoaderContractError,
    Runner,
    ShardJob,
    default_workers,
    process_clip,
    write_shard,
)

__all__ = [
    "BUCKET_FRAMES",
    "CLIPS_PER_SHARD",
    "FRONTENDS",
    "MERGE_RUN_FIELDS",
    "SAMPLE_RATE",
    "ClipResult",
    "Frontend",
    "Interrupted",
    "LoaderContractError",
    "NO_FOLD",
    "OutputError",
    "PrepareResult",
    "Runner",
    "ShardJob",
    "SplitRun",
    "add_parser",
    "attach_folds",
    "build_manifest",
    "check_output",
    "events_entry",
    "default_workers",
    "folds_entry",
    "format_part_summary",
    "format_summary",
    "merge",
    "plan_source",
    "prepare",
    "process_clip",
    "run",
    "write_shard",
]
