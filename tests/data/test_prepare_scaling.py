"""`bat-jax prepare` at scale: each worker process computes and writes whole shards (the main process only
hands them out), with the same bytes for any worker count."""

import json
from pathlib import Path

import numpy as np
import pytest

from bat_jax.data import prepare, shards, sources

BAT = prepare.Frontend.create("bat")


def shard_files(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.glob("*/*.arrayrecord"))}


def normalised_manifest(out: Path) -> dict:
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["command"] = manifest["timing"] = None
    for split in manifest["splits"].values():
        split["command"] = split["seconds"] = None
    return manifest


def synthetic_plan() -> sources.SourcePlan:
    return sources.synthetic_source(
        num_clips=14, num_eval_clips=5, multilabel=True, min_seconds=0.3, max_seconds=1.0, events=True
    )


class NoWritingHere:
    """Stands in for ShardWriter in the main process: the workers must write every shard themselves."""

    def __init__(self, path):
        raise AssertionError(f"the main process opened a shard writer for {path}")


@pytest.mark.slow  # spawns worker processes
def test_workers_write_whole_shards_and_any_worker_count_gives_the_same_output(tmp_path, monkeypatch):
    plan = synthetic_plan()
    one = prepare.prepare(plan, tmp_path / "w1", BAT, workers=1, clips_per_shard=3, progress=False)
    assert one.exit_status == 0 and len(shard_files(tmp_path / "w1")) == 5 + 2
    # this process's ShardWriter; the spawned workers import their own
    monkeypatch.setattr(shards, "ShardWriter", NoWritingHere)
    for workers in (2, 3):
        out = tmp_path / f"w{workers}"
        result = prepare.prepare(plan, out, BAT, workers=workers, clips_per_shard=3, progress=False)
        assert result.exit_status == 0 and result.manifest["timing"]["workers"] == workers
        assert shard_files(out) == shard_files(tmp_path / "w1")
        assert normalised_manifest(out) == normalised_manifest(tmp_path / "w1")
        for split, count in (("train", 5), ("eval", 2)):  # every shard's .done.json, written by its worker
            assert len(list(out.glob(f".progress/{split}/*{shards.DONE_SUFFIX}"))) == count


def _contract_breaking_loader(task):
    """Clip 4 (in the second shard) breaks the loader contract; the others load."""
    wave = np.sin(np.arange(4000 + 400 * task.index, dtype=np.float32) / 7.0)
    return wave if task.index == 4 else (wave, (0,))


@pytest.mark.slow  # spawns worker processes
def test_an_error_in_a_worker_stops_every_shard_and_writes_no_manifest(tmp_path):
    tasks = [sources.ClipTask(i, f"c{i}", f"c{i}.wav") for i in range(12)]
    split = sources.SplitPlan("train", tasks, [], _contract_breaking_loader, "d12")
    plan = sources.SourcePlan("custom", {"kind": "custom"}, ["a"], [split])
    out = tmp_path / "out"
    with pytest.raises(prepare.LoaderContractError, match="loader _contract_breaking_loader on 'c4.wav'"):
        prepare.prepare(plan, out, BAT, workers=2, clips_per_shard=3, progress=False)
    assert not list(out.glob("train/*.tmp")) and not (out / "manifest.json").exists()
    assert not (out / ".progress/train/train-00001-of-00004.arrayrecord.done.json").exists()
    for done in out.glob(f".progress/train/*{shards.DONE_SUFFIX}"):  # shards finished before the error
        state = json.loads(done.read_text())
        shard = out / "train" / done.name.removesuffix(shards.DONE_SUFFIX)
        assert shards.sha256_file(shard) == state["sha256"] and shards.count_records(shard) == 3


def test_no_more_worker_processes_than_shards(tmp_path):
    # one shard to write: it is written in this process (a lambda loader could not reach a spawned worker)
    tasks = [sources.ClipTask(i, f"c{i}", f"c{i}.wav") for i in range(3)]
    loader = lambda task: (np.sin(np.arange(5000, dtype=np.float32) / (3.0 + task.index)), (0,))  # noqa: E731
    plan = sources.SourcePlan(
        "custom", {"kind": "custom"}, ["a"], [sources.SplitPlan("train", tasks, [], loader, "d")]
    )
    result = prepare.prepare(plan, tmp_path / "out", BAT, workers=8, progress=False)
    assert result.exit_status == 0 and result.manifest["splits"]["train"]["num_clips"] == 3


def test_default_workers_follow_the_cores_up_to_the_cap(monkeypatch):
    monkeypatch.setattr(prepare.workers.os, "sched_getaffinity", lambda pid: set(range(64)), raising=False)
    assert prepare.default_workers() == prepare.workers.MAX_DEFAULT_WORKERS == 16
    assert prepare.default_workers(600) == 3  # small inputs: one worker per 256 clips
    monkeypatch.setattr(prepare.workers.os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    assert prepare.default_workers(100_000) == 2
