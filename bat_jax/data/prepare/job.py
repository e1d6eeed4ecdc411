"""`prepare()`: the whole job for a SourcePlan: shard plan, output checks, one pass per split, manifest."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from bat_jax.data import records, shards
from bat_jax.data.prepare.frontend import SAMPLE_RATE, Frontend
from bat_jax.data.prepare.output import (
    Interrupted,
    SplitRun,
    build_manifest,
    check_output,
    jsonable,
    refuse_foreign,
    split_config,
    write_split,
)
from bat_jax.data.prepare.workers import Runner
from bat_jax.data.sources import SourceError, SourcePlan

CLIPS_PER_SHARD = 1024
SPLIT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")  # split names become folder and file names


_STOPS: list[threading.Event] = []  # the Event of the stop_on_sigint block in force (outermost first)


@contextlib.contextmanager
def stop_on_sigint():
    """A threading.Event set by SIGINT while the block runs (in the main thread; elsewhere never set).

    The shard loop checks it between clips and stops cleanly (Interrupted), so an interrupt never lands inside
    a jit, a gc callback or the pool's machinery, where Python may swallow it ("Exception ignored in ...").
    A second SIGINT raises KeyboardInterrupt at once. Nested blocks share the outer block's Event.
    """
    if _STOPS:
        yield _STOPS[-1]
        return
    stop = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return

    def on_sigint(signum, frame):
        stop.set()
        signal.signal(signal.SIGINT, signal.default_int_handler)

    previous = signal.signal(signal.SIGINT, on_sigint)
    _STOPS.append(stop)
    try:
        yield stop
    finally:
        _STOPS.pop()
        signal.signal(signal.SIGINT, previous)


@dataclass
class PrepareResult:
    manifest: dict
    runs: list[SplitRun]
    unfinished: list[str]
    seconds: float
    exit_status: int


def prepare(
    source: SourcePlan,
    out: str | os.PathLike,
    frontend: Frontend,
    *,
    workers: int = 1,
    clips_per_shard: int | None = CLIPS_PER_SHARD,
    num_shards: int | None = None,
    overwrite: bool = False,
    strict: bool = False,
    command: Sequence[str] | None = None,
    progress: bool = True,
) -> PrepareResult:
    """Write `source` as spectrogram shards under `out` (resuming a previous run with the same settings).

    The exit status is 1 when this run's splits hold no clip at all, or (strict) when an input was skipped.
    With workers > 1 the workers are spawned processes: a script calling this needs an
    `if __name__ == "__main__":` guard, and the source's loaders must be picklable.
    """
    start = time.time()
    out = Path(out).expanduser().resolve()
    command = list(sys.argv if command is None else command)
    for split in source.splits:
        if not SPLIT_NAME.fullmatch(split.name):
            raise SourceError(f"split names: expected letters, digits, '_', '-' or '.', found {split.name!r}")
    if num_shards is not None:
        clips_per_shard = None
    sharding = {"clips_per_shard": clips_per_shard, "num_shards": num_shards}
    global_cfg = jsonable(
        {
            "format_version": records.FORMAT_VERSION,
            "sample_rate": SAMPLE_RATE,
            "n_mels": frontend.n_mels,
            "frontend": frontend.describe(),
            "clip": frontend.describe_clip(),
            "label_vocabulary": list(source.vocabulary),
        }
    )
    ranges = {
        s.name: shards.plan_shards(len(s.tasks), clips_per_shard=clips_per_shard, num_shards=num_shards)
        for s in source.splits
    }
    split_cfgs = {s.name: split_config(source, s, ranges[s.name], sharding) for s in source.splits}
    # Here, and only here (check_output does not repeat it): OutputLock creates OUT/.progress/lock, so a
    # foreign folder must be refused before the lock is taken, or the refusal would come after writing in it.
    refuse_foreign(out)
    out.mkdir(parents=True, exist_ok=True)
    runs: list[SplitRun] = []
    loaders = {s.name: s.loader for s in source.splits}
    with stop_on_sigint() as stop, shards.OutputLock(out):
        if stop.is_set():  # before any work (an interrupt while the inputs were listed)
            raise Interrupted()
        check_output(out, global_cfg, split_cfgs, overwrite)
        progress_dir = out / shards.PROGRESS_DIR
        shards.write_json(progress_dir / "global.json", global_cfg)
        with Runner(workers, loaders, frontend, len(source.vocabulary)) as runner:
            for split in source.splits:
                if stop.is_set():
                    raise Interrupted()
                split_start = time.time()
                state_dir = progress_dir / split.name
                state_dir.mkdir(parents=True, exist_ok=True)
                split_state = {
                    "config": split_cfgs[split.name],
                    "pre_skipped": [s.to_json() for s in split.skipped],
                    "command": command,
                }
                shards.write_json(state_dir / "split.json", split_state)
                digest = shards.digest({"global": global_cfg, "split": split_cfgs[split.name]})
                runs.append(write_split(out, split, ranges[split.name], digest, runner, progress, stop))
                shards.write_json(
                    state_dir / "split.json", {**split_state, "seconds": time.time() - split_start}
                )
        if (
            stop.is_set()
        ):  # arrived after the last clip: still an interrupted run (the rerun writes the manifest)
            raise Interrupted()
        seconds = time.time() - start
        computed = sum(r.clips_computed for r in runs)
        timing = {
            "seconds": round(seconds, 3),
            "clips_computed": computed,
            "clips_per_second": round(computed / seconds, 3) if seconds > 0 else None,
            "workers": workers,
            "shards_computed": sum(r.shards_total - r.shards_reused for r in runs),
            "shards_reused": sum(r.shards_reused for r in runs),
            "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        manifest, unfinished = build_manifest(out, global_cfg, command, timing)
        shards.write_json(out / shards.MANIFEST, manifest)
    this_run = [manifest["splits"][r.name] for r in runs if r.name in manifest["splits"]]
    written = sum(s["num_clips"] for s in this_run)
    skipped = sum(s["num_skipped"] for s in this_run)
    status = 1 if written == 0 or (strict and skipped > 0) else 0
    return PrepareResult(manifest, runs, unfinished, seconds, status)
