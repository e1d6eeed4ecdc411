"""`prepare()`: the whole job for a SourcePlan: shard plan, output checks, the shards still to write (of every
split, or of one part's share) handed to the workers, then the manifest (or a part's state)."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import sys
import threading
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from bat_jax.data import records, shards
from bat_jax.data.prepare import parts
from bat_jax.data.prepare.frontend import SAMPLE_RATE, Frontend
from bat_jax.data.prepare.output import (
    OutputError,
    SplitRun,
    build_manifest,
    check_output,
    jsonable,
    refuse_foreign,
    split_config,
    split_jobs,
)
from bat_jax.data.prepare.workers import Interrupted, Runner
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
    manifest: dict | None  # None for a part (`part`): parts write no manifest, `--merge` does
    runs: list[SplitRun]
    unfinished: list[str]
    seconds: float
    exit_status: int
    part: tuple[int, int] | None = None
    parts_done: list[int] = field(default_factory=list)  # a part's run: the parts of its splits finished
    part_states: dict[str, dict] = field(default_factory=dict)  # a part's run: split -> its part state


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
    part: tuple[int, int] | None = None,
) -> PrepareResult:
    """Write `source` as spectrogram shards under `out` (resuming a previous run with the same settings).

    Each shard is computed and written whole by one worker (in this process when workers <= 1, else in
    spawned worker processes, at most one per shard to write), so any worker count writes the same bytes.
    part=(I, N): write only part I's share of the shards and its part state, no manifest (bat_jax.data.
    prepare.parts; `parts.merge` writes the manifest once every part is done).
    The exit status is 1 when this run's splits (a part: its shards) hold no clip at all, or (strict) when an
    input was skipped. With workers > 1 the workers are spawned processes: a script calling this needs an
    `if __name__ == "__main__":` guard, and the source's loaders must be picklable.
    """
    start = time.time()
    out = Path(out).expanduser().resolve()
    command = list(sys.argv if command is None else command)
    for split in source.splits:
        if not SPLIT_NAME.fullmatch(split.name):
            raise SourceError(f"split names: expected letters, digits, '_', '-' or '.', found {split.name!r}")
    if part is not None:
        if not 1 <= part[0] <= part[1]:
            raise ValueError(f"--part: expected I/N with N >= 1 and 1 <= I <= N, found {part[0]}/{part[1]}")
        if overwrite:
            raise OutputError(
                f"--part {parts.part_name(part)}: --overwrite would delete the other parts' shards; run "
                "without --overwrite (or empty OUT first, before any part starts)"
            )
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
    digests = {name: shards.digest({"global": global_cfg, "split": cfg}) for name, cfg in split_cfgs.items()}
    mine = dict(zip(ranges, parts.assign([len(r) for r in ranges.values()], part), strict=True))
    # Here, and only here (check_output does not repeat it): OutputLock creates OUT/.progress/lock, so a
    # foreign folder must be refused before the lock is taken, or the refusal would come after writing in it.
    refuse_foreign(out)
    out.mkdir(parents=True, exist_ok=True)
    lock = shards.OutputLock(out) if part is None else parts.locks(out, part)
    with stop_on_sigint() as stop, lock:
        if stop.is_set():  # before any work (an interrupt while the inputs were listed)
            raise Interrupted()
        if part is not None:
            parts.check_part(out, part, global_cfg, split_cfgs)
        check_output(out, global_cfg, split_cfgs, overwrite)
        progress_dir = out / shards.PROGRESS_DIR
        shards.write_json(progress_dir / "global.json", global_cfg)
        jobs, repaired = [], {}
        for split in source.splits:
            (progress_dir / split.name).mkdir(parents=True, exist_ok=True)
            pre_skipped = [s.to_json() for s in split.skipped]
            state = parts.split_state(split_cfgs[split.name], pre_skipped, command, part)
            shards.write_json(progress_dir / split.name / "split.json", state)
            if part is None:
                parts.forget_parts(out, split.name)
            split_todo, repaired[split.name] = split_jobs(
                out, split, ranges[split.name], digests[split.name], mine[split.name]
            )
            jobs += split_todo
        from tqdm import tqdm

        bar = tqdm(
            total=sum(len(j.tasks) for j in jobs),
            desc="prepare " + (f"part {parts.part_name(part)}" if part else "/".join(ranges)),
            unit="clip",
            file=sys.stderr,
            disable=not progress,
        )
        left = Counter(j.split for j in jobs)
        split_seconds = {name: time.time() - start for name in ranges if not left[name]}
        try:
            loaders = {s.name: s.loader for s in source.splits}
            with Runner(min(workers, len(jobs)), loaders, frontend, len(source.vocabulary)) as runner:
                for job, _ in runner.run(out, jobs, stop, bar.update):
                    left[job.split] -= 1
                    if not left[job.split]:
                        split_seconds[job.split] = time.time() - start
        finally:
            bar.close()
        if stop.is_set():  # arrived after the last clip: still an interrupted run (the rerun finishes it)
            raise Interrupted()
        runs = [
            SplitRun(
                name,
                len(mine[name]),
                len(mine[name]) - sum(j.split == name for j in jobs),
                sum(len(j.tasks) for j in jobs if j.split == name),
                repaired[name],
            )
            for name in ranges
        ]
        seconds = time.time() - start
        computed = sum(r.clips_computed for r in runs)
        timing = {
            "seconds": round(seconds, 3),
            "clips_computed": computed,
            "clips_per_second": round(computed / seconds, 3) if seconds > 0 else None,
            "workers": workers,
            "shards_computed": len(jobs),
            "shards_reused": sum(r.shards_reused for r in runs),
            "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        if part is not None:
            return _finish_part(out, part, source, runs, mine, split_cfgs, digests, strict, command, timing)
        for split in source.splits:
            state = parts.split_state(
                split_cfgs[split.name], [s.to_json() for s in split.skipped], command, None
            )
            state["seconds"] = split_seconds[split.name]
            shards.write_json(progress_dir / split.name / "split.json", state)
        manifest, unfinished = build_manifest(out, global_cfg, command, timing)
        shards.write_json(out / shards.MANIFEST, manifest)
    this_run = [manifest["splits"][r.name] for r in runs if r.name in manifest["splits"]]
    written = sum(s["num_clips"] for s in this_run)
    skipped = sum(s["num_skipped"] for s in this_run)
    status = 1 if written == 0 or (strict and skipped > 0) else 0
    return PrepareResult(manifest, runs, unfinished, seconds, status)


def _finish_part(
    out, part, source, runs, mine, split_cfgs, digests, strict, command, timing
) -> PrepareResult:
    """A part's end: its part state per split (no manifest), the exit status, which parts are done."""
    run = {**timing, "command": command, "host": socket.gethostname()}
    states = {
        r.name: parts.write_part_state(out, r, part, mine[r.name], split_cfgs[r.name], digests[r.name], run)
        for r in runs
    }
    written = sum(s["num_clips"] for s in states.values())
    skipped = sum(s["num_skipped"] for s in states.values()) + sum(len(s.skipped) for s in source.splits)
    has_shards = any(mine[r.name] for r in runs)
    status = 1 if (has_shards and written == 0) or (strict and skipped > 0) else 0
    done, _ = parts.parts_done(out, list(mine), part[1])
    return PrepareResult(None, runs, [], timing["seconds"], status, part, done, states)
