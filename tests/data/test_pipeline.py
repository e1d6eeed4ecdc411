"""Grain input pipelines: roll/crop/pad, checkpointable pretraining iterator, exact-once evaluation,
global arrays over a mesh, and a real two-process run."""

import json
import multiprocessing
import os
import socket
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from array_record.python.array_record_module import ArrayRecordReader, ArrayRecordWriter
from jax.sharding import NamedSharding, PartitionSpec

from bat_jax.data import pipeline, records, transforms

NUM_RECORDS = 23
NUM_SHARDS = 3
NUM_MELS = 16
NUM_CLASSES = 6
MAX_FRAMES = 48
REPO = Path(__file__).resolve().parents[2]


def _write_clips(directory: Path, split: str, num_records: int, seed: int) -> dict[int, records.Clip]:
    """`num_records` random clips over NUM_SHARDS shards; stored padding after num_frames is non-zero
    garbage so the pipeline must ignore it."""
    rng = np.random.default_rng(seed)
    (directory / split).mkdir(parents=True, exist_ok=True)
    clips, index = {}, 0
    for shard in range(NUM_SHARDS):
        writer = ArrayRecordWriter(
            str(directory / split / f"{split}-{shard:05d}-of-{NUM_SHARDS:05d}.arrayrecord"), "group_size:1"
        )
        for _ in range(num_records * (shard + 1) // NUM_SHARDS - num_records * shard // NUM_SHARDS):
            frames = int(rng.integers(8, MAX_FRAMES + 1))
            num_frames = int(rng.integers(4, frames + 1))
            features = rng.uniform(0.01, 1.0, (frames, NUM_MELS)).astype(np.float16)  # [frames, F]
            features[num_frames:] = 7.0  # garbage padding
            labels = tuple(int(c) for c in rng.choice(NUM_CLASSES, int(rng.integers(0, 3)), replace=False))
            clips[index] = records.Clip(features, num_frames, f"clip{index}", labels)
            writer.write(records.encode(clips[index]))
            index += 1
        writer.close()
    return clips


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("shards")
    clips = _write_clips(root, "train", NUM_RECORDS, seed=0)
    return root, pipeline.shard_paths(root, "train"), clips


def _take(loader, n):
    return [next(loader) for _ in range(n)]


def _assert_same_batches(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert x.keys() == y.keys()
        for key in x:
            np.testing.assert_array_equal(np.asarray(x[key]), np.asarray(y[key]), err_msg=key)


# ---------------------------------------------------------------------------------------- per-clip pieces


def test_roll_crop_pad_matches_np_roll():
    rng = np.random.default_rng(1)
    for frames, num_frames, target in [(20, 13, 32), (20, 20, 8), (40, 33, 16), (5, 1, 4), (12, 12, 12)]:
        features = rng.standard_normal((frames, 3)).astype(np.float16)
        for offset in range(num_frames):
            expected = np.zeros((max(target, num_frames), 3), np.float16)
            expected[:num_frames] = np.roll(features[:num_frames], offset, axis=0)
            out = pipeline.roll_crop_pad(features, num_frames, offset, target)
            assert out.dtype == np.float16
            np.testing.assert_array_equal(out, expected[:target])
    with pytest.raises(ValueError, match=r"expected an offset in \[0, 5\), found 5"):
        pipeline.roll_crop_pad(features, 5, 5, 8)


def test_multi_hot_and_bad_label():
    np.testing.assert_array_equal(pipeline.multi_hot(np.array([0, 3]), 4), [1, 0, 0, 1])
    np.testing.assert_array_equal(pipeline.multi_hot(np.array([], np.int32), 3), [0, 0, 0])
    with pytest.raises(ValueError, match=r"expected labels in \[0, 4\), found \[5\]"):
        pipeline.multi_hot(np.array([5]), 4, "clip 'x'")


def test_shard_paths_manifest_and_glob(dataset, tmp_path):
    root, paths, _ = dataset
    assert [Path(p).name for p in paths] == [f"train-0000{i}-of-00003.arrayrecord" for i in range(3)]
    (tmp_path / "manifest.json").write_text(
        json.dumps({"splits": {"eval": {"shards": [{"path": "e/b.arrayrecord", "num_records": 2}]}}})
    )
    assert pipeline.shard_paths(tmp_path, "eval") == [str(tmp_path / "e" / "b.arrayrecord")]
    with pytest.raises(ValueError, match="expected split 'train'"):
        pipeline.shard_paths(tmp_path, "train")
    with pytest.raises(FileNotFoundError, match="found none"):
        pipeline.shard_paths(root, "test")


# ------------------------------------------------------------------------------------------- pretraining


def test_shard_source_locates_every_record_across_uneven_shards(dataset):
    _, paths, clips = dataset
    source = pipeline.ShardSource(paths)
    sizes = [NUM_RECORDS * (s + 1) // NUM_SHARDS - NUM_RECORDS * s // NUM_SHARDS for s in range(NUM_SHARDS)]
    expected = [(paths[s], local) for s, size in enumerate(sizes) for local in range(size)]  # 7, 8, 8
    assert [source.locate(i) for i in range(len(source))] == expected
    for i in (0, sizes[0] - 1, sizes[0], NUM_RECORDS - 1):  # each side of a shard boundary
        index, clip = source[i]
        assert index == i and clip["clip_id"] == clips[i].clip_id
    with pytest.raises(IndexError, match=rf"expected a record index in \[0, {NUM_RECORDS}\), found 23"):
        source[NUM_RECORDS]


def test_pretrain_reshuffles_each_epoch_and_keys_rolls_by_seed_epoch_and_record(dataset):
    _, paths, clips = dataset
    # Process 1 of 2: a share of 23 // 2 = 11 records (11..21), batches of 1 clip, three epochs.
    loader = pipeline.make_pretrain_loader(
        paths, global_batch_size=2, target_frames=64, seed=4, process_index=1, process_count=2
    )
    batches = _take(loader, 33)
    epochs = [[int(b["clip_index"][0]) for b in batches[11 * e : 11 * (e + 1)]] for e in range(3)]
    assert all(sorted(keys) == list(range(11, 22)) for keys in epochs)
    assert len({tuple(keys) for keys in epochs}) == 3, f"expected a new order every epoch, found {epochs}"
    for position, batch in enumerate(batches):
        record, epoch = int(batch["clip_index"][0]), position // 11
        clip = clips[record]
        offset = transforms.record_offset(4, epoch, record, clip.num_frames)
        expected = np.roll(clip.spec[: clip.num_frames], offset, axis=0).astype(np.float32)
        np.testing.assert_array_equal(batch["spec"][0, : clip.num_frames], expected)
    assert len({tuple(b["spec"][0, 0].tolist()) for b in batches[:11]}) > 5  # rolled: varied first frames


def test_record_offsets_are_uniform_and_differ_by_seed_epoch_and_record():
    offsets = np.array([transforms.record_offset(3, 0, record, 10) for record in range(20_000)])
    counts = np.bincount(offsets, minlength=10)
    assert offsets.min() == 0 and offsets.max() == 9
    chi2 = float(((counts - 2_000) ** 2 / 2_000).sum())
    assert chi2 < 27.9, f"expected uniform offsets (chi2 < 27.9, p = 0.001 at 9 dof), found {counts}"
    wide = [transforms.record_offset(3, e, r, 2**40) for e in range(3) for r in range(100)]
    wide += [transforms.record_offset(s, 0, r, 2**40) for s in (4, 5) for r in range(100)]
    assert len(set(wide)) == 500, "every (seed, epoch, record) key draws its own offset"


def test_pretrain_roll_keeps_values_and_padding_at_the_end(dataset):
    _, paths, clips = dataset
    loader = pipeline.make_pretrain_loader(
        paths, global_batch_size=8, target_frames=64, seed=5, num_classes=NUM_CLASSES
    )
    offsets = []
    for batch in _take(loader, 4):
        for spec, num_frames, index, labels in zip(
            batch["spec"], batch["num_frames"], batch["clip_index"], batch["labels"], strict=True
        ):
            clip = clips[int(index)]
            valid = clip.spec[: clip.num_frames].astype(np.float32)  # [n, F]
            assert num_frames == clip.num_frames
            assert not spec[num_frames:].any(), "padding must be zeros at the end"
            # The valid frames are a circular roll of the clip: the same values, in rotated order.
            np.testing.assert_array_equal(np.sort(spec[:num_frames], axis=None), np.sort(valid, axis=None))
            matches = [
                k for k in range(clip.num_frames) if np.array_equal(np.roll(valid, k, 0), spec[:num_frames])
            ]
            assert len(matches) == 1
            offsets.append(matches[0])
            np.testing.assert_array_equal(labels, np.isin(np.arange(NUM_CLASSES), clip.labels))
    assert len(set(offsets)) > 5, f"expected random roll offsets, found {offsets}"


@pytest.mark.parametrize("dtype", [np.float32, jnp.bfloat16])
def test_pretrain_crop_pad_shapes_and_dtypes(dataset, dtype):
    _, paths, clips = dataset
    target = 32  # shorter than some clips, longer than others
    loader = pipeline.make_pretrain_loader(paths, global_batch_size=6, target_frames=target, dtype=dtype)
    batch = next(loader)
    assert batch["spec"].shape == (6, target, NUM_MELS) and batch["spec"].dtype == jnp.dtype(dtype)
    assert batch["num_frames"].dtype == np.int32 and batch["clip_index"].dtype == np.int32
    assert "labels" not in batch
    expected = [min(clips[int(i)].num_frames, target) for i in batch["clip_index"]]
    np.testing.assert_array_equal(batch["num_frames"], expected)
    for spec, n, index in zip(batch["spec"], batch["num_frames"], batch["clip_index"], strict=True):
        assert not np.asarray(spec[n:], np.float32).any()
        clip = clips[int(index)]
        valid = clip.spec[: clip.num_frames].astype(dtype)  # [n, F]
        windows = [np.roll(valid, k, axis=0)[:n] for k in range(clip.num_frames)]
        assert any(np.array_equal(w, spec[:n]) for w in windows), "expected a window of the rolled clip"


def test_pretrain_is_reproducible_and_seeded(dataset):
    _, paths, _ = dataset
    make = lambda seed: pipeline.make_pretrain_loader(paths, global_batch_size=4, target_frames=16, seed=seed)
    _assert_same_batches(_take(make(1), 3), _take(make(1), 3))
    a, b = next(make(1)), next(make(2))
    assert not np.array_equal(a["clip_index"], b["clip_index"])


def test_pretrain_repeats_and_simulated_processes_are_disjoint(dataset):
    _, paths, _ = dataset
    seen = []
    for process_index in range(2):
        loader = pipeline.make_pretrain_loader(
            paths, global_batch_size=4, target_frames=16, process_index=process_index, process_count=2
        )
        # 11 records per process (23 // 2, remainder dropped), 2 per batch: 11 batches span two epochs.
        indices = np.concatenate([b["clip_index"] for b in _take(loader, 11)])
        assert next(loader)["spec"].shape == (2, 16, NUM_MELS)
        assert sorted(set(indices[:11].tolist())) == sorted(indices[:11].tolist()), "an epoch repeats no clip"
        assert set(indices[11:]) <= set(indices[:11])
        seen.append(set(indices.tolist()))
    assert not seen[0] & seen[1] and len(seen[0] | seen[1]) == 22


@pytest.mark.slow  # spawns worker processes
@pytest.mark.parametrize("worker_count", [0, 1])
def test_pretrain_state_restore_continues_the_same_batches(dataset, worker_count):
    _, paths, _ = dataset
    kwargs = dict(global_batch_size=4, target_frames=16, seed=7, worker_count=worker_count, num_classes=6)
    with pipeline.make_pretrain_loader(paths, **kwargs) as loader:
        first = _take(loader, 3)
        state = loader.get_state()
        expected = _take(loader, 3)
    json.loads(state)  # JSON bytes, storable anywhere
    with pipeline.make_pretrain_loader(paths, **kwargs) as restored:
        restored.set_state(state)
        _assert_same_batches(_take(restored, 3), expected)
    assert not np.array_equal(first[0]["clip_index"], expected[0]["clip_index"])
    if worker_count == 1:  # one worker sees the records in the in-process order: the same batches
        _assert_same_batches(
            first + expected, _take(pipeline.make_pretrain_loader(paths, **kwargs | {"worker_count": 0}), 6)
        )


def test_pretrain_state_through_orbax(dataset, tmp_path):
    import grain
    import orbax.checkpoint as ocp

    _, paths, _ = dataset
    kwargs = dict(global_batch_size=4, target_frames=16, seed=9)
    handlers = {"data": grain.checkpoint.CheckpointHandler()}
    loader = pipeline.make_pretrain_loader(paths, **kwargs)
    _take(loader, 2)
    with ocp.CheckpointManager(tmp_path / "ckpt", item_handlers=handlers) as manager:
        manager.save(2, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(loader)))
        manager.wait_until_finished()
    expected = _take(loader, 2)
    restored = pipeline.make_pretrain_loader(paths, **kwargs)
    with ocp.CheckpointManager(tmp_path / "ckpt", item_handlers=handlers) as manager:
        manager.restore(2, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(restored)))
    _assert_same_batches(_take(restored, 2), expected)


@pytest.mark.parametrize("dtype", [np.float32, jnp.bfloat16])
def test_pretrain_global_arrays_over_an_8_device_mesh(dataset, dtype):
    _, paths, _ = dataset
    assert jax.device_count() == 8
    mesh = jax.make_mesh((4, 2), ("data", "fsdp"))
    sharding = NamedSharding(mesh, PartitionSpec(("data", "fsdp"), None, None))
    kwargs = dict(global_batch_size=16, target_frames=32, seed=4, num_classes=NUM_CLASSES, dtype=dtype)
    batch = next(pipeline.make_pretrain_loader(paths, sharding=sharding, **kwargs))
    local = next(pipeline.make_pretrain_loader(paths, **kwargs))
    shapes = {
        "spec": (16, 32, NUM_MELS),
        "num_frames": (16,),
        "clip_index": (16,),
        "labels": (16, NUM_CLASSES),
    }
    for key, shape in shapes.items():
        assert isinstance(batch[key], jax.Array) and batch[key].shape == shape
        assert batch[key].sharding.spec[0] == ("data", "fsdp") and batch[key].sharding.mesh == mesh
        assert all(s.data.shape[0] == 2 for s in batch[key].addressable_shards)
        np.testing.assert_array_equal(np.asarray(batch[key]), local[key])  # cast on device == cast on host
    assert batch["spec"].dtype == jnp.dtype(dtype)


def test_batch_that_does_not_divide_fails_early(dataset):
    _, paths, _ = dataset
    mesh = jax.make_mesh((8,), ("data",))
    sharding = NamedSharding(mesh, PartitionSpec("data"))
    with pytest.raises(ValueError, match="global batch size 12 does not divide over the 8 batch shards"):
        pipeline.make_pretrain_loader(paths, global_batch_size=12, target_frames=16, sharding=sharding)
    with pytest.raises(ValueError, match="global batch size 5 does not divide over 2 processes"):
        pipeline.make_pretrain_loader(
            paths, global_batch_size=5, target_frames=16, process_index=0, process_count=2
        )
    with pytest.raises(ValueError, match="global batch size 10 does not divide over 3 processes"):
        pipeline.make_eval_loader(
            paths, global_batch_size=10, target_frames=16, process_index=0, process_count=3
        )


# -------------------------------------------------------------------------------------------- evaluation


@pytest.mark.parametrize("process_count", [1, 2, 3])
def test_eval_covers_every_clip_exactly_once(dataset, process_count):
    _, paths, clips = dataset
    per_process_batch = 4
    seen, num_batches = [], set()
    for process_index in range(process_count):
        loader = pipeline.make_eval_loader(
            paths,
            global_batch_size=per_process_batch * process_count,
            target_frames=32,
            process_index=process_index,
            process_count=process_count,
            num_classes=NUM_CLASSES,
        )
        batches = list(loader)
        assert len(batches) == len(loader)
        num_batches.add(len(batches))
        for batch in batches:
            assert batch["spec"].shape == (per_process_batch, 32, NUM_MELS)
            valid = batch["valid"]
            assert valid.dtype == bool and (batch["clip_index"][~valid] == -1).all()
            assert not batch["spec"][~valid].any() and not batch["labels"][~valid].any()
            assert not batch["num_frames"][~valid].any()
            for spec, n, index, labels in zip(
                batch["spec"][valid],
                batch["num_frames"][valid],
                batch["clip_index"][valid],
                batch["labels"][valid],
                strict=True,
            ):
                clip = clips[int(index)]
                expected = np.zeros((32, NUM_MELS), np.float32)
                m = min(clip.num_frames, 32)
                expected[:m] = clip.spec[:m]  # no roll, cropped, zero-padded
                assert n == m
                np.testing.assert_array_equal(spec, expected)
                np.testing.assert_array_equal(labels, np.isin(np.arange(NUM_CLASSES), clip.labels))
            seen += batch["clip_index"][valid].tolist()
    assert len(num_batches) == 1, f"every process must yield the same number of batches, found {num_batches}"
    assert sorted(seen) == list(range(NUM_RECORDS))


def test_eval_pads_processes_with_fewer_records_with_invalid_batches(dataset):
    _, paths, _ = dataset
    # 23 records over 6 processes: 3 or 4 each, per-process batch 3 -> 2 batches, the 2nd may be all padding.
    loaders = [
        pipeline.make_eval_loader(
            paths, global_batch_size=18, target_frames=16, process_index=i, process_count=6
        )
        for i in range(6)
    ]
    counts = [[int(b["valid"].sum()) for b in loader] for loader in loaders]
    assert all(len(c) == 2 for c in counts) and [0] in [c[1:] for c in counts]
    assert sum(map(sum, counts)) == NUM_RECORDS


@pytest.mark.slow  # spawns worker processes
def test_eval_global_arrays_and_workers(dataset):
    _, paths, _ = dataset
    mesh = jax.make_mesh((8,), ("data",))
    sharding = NamedSharding(mesh, PartitionSpec("data"))
    loader = pipeline.make_eval_loader(paths, global_batch_size=8, target_frames=16, sharding=sharding)
    batches = list(loader)
    assert len(batches) == 3 and batches[-1]["valid"].shape == (8,)
    assert isinstance(batches[-1]["valid"], jax.Array) and batches[-1]["valid"].sharding.spec[0] == "data"
    assert int(batches[-1]["valid"].sum()) == NUM_RECORDS - 16
    with_workers = list(
        pipeline.make_eval_loader(paths, global_batch_size=8, target_frames=16, worker_count=1)
    )
    _assert_same_batches([jax.device_get(b) for b in batches], with_workers)


# --------------------------------------------------------------------------------------- two processes


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


@pytest.mark.slow  # spawns worker processes
def test_two_real_processes_get_disjoint_records_in_global_batches(dataset, tmp_path):
    root, _, _ = dataset
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu"}
    script = str(Path(__file__).with_name("_pipeline_two_process.py"))
    outs = [tmp_path / f"process{i}.json" for i in range(2)]
    procs = [
        subprocess.Popen(
            [sys.executable, script, str(i), str(port), str(root), str(outs[i])],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        for i in range(2)
    ]
    logs = []
    try:
        for proc in procs:
            logs.append(proc.communicate(timeout=120)[0].decode(errors="replace"))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    for proc, log in zip(procs, logs, strict=True):
        assert proc.returncode == 0, log[-3000:]
    results = [json.loads(out.read_text()) for out in outs]
    for result in results:
        assert result["process_count"] == 2
        assert all(s["spec"] == [8, 32, NUM_MELS] and s["clip_index"] == [8] for s in result["shapes"])
        assert result["specs"] == ["data", "data"]
        assert len(result["clip_index"]) == 2 * 4  # 2 batches of 4 local rows
    first, second = (set(r["clip_index"]) for r in results)
    assert not first & second, "the two processes must read disjoint records"
    assert first | second <= set(range(NUM_RECORDS))
    # The jitted sum over the global array sees both processes' rows.
    for b in range(2):
        local_sums = [sum(r["num_frames"][4 * b : 4 * b + 4]) for r in results]
        assert (
            results[0]["global_num_frames_sum"][b]
            == results[1]["global_num_frames_sum"][b]
            == sum(local_sums)
        )


def test_malloc_tuning_reaches_workers_env(monkeypatch):
    """Spawned Grain workers read glibc's malloc settings from the environment at start-up."""
    for name in pipeline.MALLOC_TUNING:
        monkeypatch.delenv(name, raising=False)
    pipeline.tune_malloc.cache_clear()
    pipeline.tune_malloc()
    for name, value in pipeline.MALLOC_TUNING.items():
        assert int(os.environ[name]) == value
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "12345")  # the user's own setting wins
    pipeline.tune_malloc.cache_clear()
    pipeline.tune_malloc()
    assert os.environ["MALLOC_TRIM_THRESHOLD_"] == "12345"


# -------------------------------------------------------------------------------------------- bad input

LOADERS = {
    "pretrain": lambda paths, **kw: pipeline.make_pretrain_loader(paths, global_batch_size=4, **kw),
    "eval": lambda paths, **kw: pipeline.make_eval_loader(paths, global_batch_size=4, **kw),
}


def _drain(loader, batches=12):
    """Every batch of an eval loader, or 12 pretraining batches (two epochs of 23 records)."""
    if isinstance(loader, pipeline.EvalLoader):
        return list(loader)
    with loader:
        return _take(loader, batches)


@pytest.mark.parametrize("kind", LOADERS)
def test_bare_string_or_path_as_paths_is_refused_with_a_sentence(dataset, kind):
    root, paths, _ = dataset
    for bare in (paths[0], Path(paths[0]), str(root)):
        with pytest.raises(
            TypeError,
            match=r"expected a list of shard paths, found the string '/.*'; use "
            r"pipeline\.shard_paths\(root, split\) for a prepared folder, or \[path\]",
        ):
            LOADERS[kind](bare, target_frames=16)
    assert len(_drain(LOADERS[kind]([paths[0]], target_frames=16), 1)) >= 1  # [path] reads that shard


def test_pretrain_batch_larger_than_the_process_share_fails_before_any_worker(dataset):
    _, paths, _ = dataset
    # 23 records over 2 processes: 11 each; a global batch of 24 is 12 per process.
    with pytest.raises(ValueError) as error:
        pipeline.make_pretrain_loader(
            paths, global_batch_size=24, target_frames=16, process_index=0, process_count=2, worker_count=2
        )
    message = str(error.value)
    for part in (
        "batch of 12 clips per process",
        "global batch 24 over 2 processes",
        "23 records in 3 shards // 2 processes = 11",
        "at most 22",
    ):
        assert part in message, message
    assert not multiprocessing.active_children()
    with pytest.raises(ValueError, match=r"batch of 24 clips per process .*\(23 records in 3 shards // 1"):
        pipeline.make_pretrain_loader(paths, global_batch_size=24, target_frames=16)
    fits = pipeline.make_pretrain_loader(
        paths, global_batch_size=22, target_frames=16, process_index=1, process_count=2
    )
    assert next(fits)["spec"].shape[0] == 11  # the whole share in one batch is fine


@pytest.mark.parametrize("kind", LOADERS)
def test_target_frames_not_a_multiple_of_the_time_patch_fails_before_any_worker(dataset, kind):
    _, paths, _ = dataset
    for bad in (20, 1000, 0, -16):
        with pytest.raises(
            ValueError,
            match=rf"expected target_frames a positive multiple of 16 "
            rf"\(frames_multiple, the encoder's time patch size\), found {bad}",
        ):
            LOADERS[kind](paths, target_frames=bad, worker_count=2)
    assert not multiprocessing.active_children()
    batch = _drain(LOADERS[kind](paths, target_frames=20, frames_multiple=4), 1)[0]  # another patch size
    assert batch["spec"].shape == (4, 20, NUM_MELS)
    with pytest.raises(ValueError, match="expected frames_multiple a positive integer, found 0"):
        LOADERS[kind](paths, target_frames=16, frames_multiple=0)


def _flip_bytes(path: Path, offset: int, count: int = 8) -> None:
    """Bit rot: invert `count` bytes at `offset`, the file keeps its size."""
    data = bytearray(path.read_bytes())
    size = len(data)
    data[offset : offset + count] = bytes(255 - b for b in data[offset : offset + count])
    path.write_bytes(bytes(data))
    assert path.stat().st_size == size


def _unreadable_records(path: Path) -> list[int]:
    reader = ArrayRecordReader(str(path))
    bad = []
    for i in range(reader.num_records()):
        try:
            reader.read([i])
        except Exception:
            bad.append(i)
    reader.close()
    return bad


@pytest.fixture(scope="module")
def corrupted(tmp_path_factory):
    """The dataset's three shards, the middle one with bytes flipped inside its 4th record's chunk."""
    root = tmp_path_factory.mktemp("corrupted")
    _write_clips(root, "train", NUM_RECORDS, seed=0)
    paths = pipeline.shard_paths(root, "train")
    _flip_bytes(Path(paths[1]), 3000)  # the records of this shard occupy its first ~5 kB
    bad = _unreadable_records(Path(paths[1]))
    assert len(bad) == 1, f"expected exactly one unreadable record, found {bad}"
    return paths, bad[0]


@pytest.mark.parametrize(
    "worker_count",
    [0, pytest.param(1, marks=pytest.mark.slow)],  # 1: the error crosses a worker process
)
@pytest.mark.parametrize("kind", LOADERS)
def test_corrupted_shard_error_names_the_file_and_the_record(corrupted, kind, worker_count):
    paths, local = corrupted
    first = NUM_RECORDS * 1 // NUM_SHARDS  # global index of the middle shard's first record
    loader = LOADERS[kind](paths, target_frames=16, worker_count=worker_count)
    with pytest.raises(pipeline.ShardError) as error:
        _drain(loader)
    message = str(error.value)
    assert message.startswith(
        f"shard {paths[1]}: record {local} of that shard (record {first + local} of "
        f"the {NUM_RECORDS} in {NUM_SHARDS} shards) cannot be read"
    ), message
    assert "Corrupted Riegeli" in message and f"bat-jax verify {Path(paths[1]).parent}" in message


def _shard_with_a_bad_record(root: Path, bad: bytes) -> list[str]:
    """Two shards of 6 good records each, record 4 of the second replaced by `bad`."""
    rng = np.random.default_rng(3)
    paths = []
    for shard in range(2):
        path = root / f"s{shard}.arrayrecord"
        writer = ArrayRecordWriter(str(path), "group_size:1")
        for i in range(6):
            clip = records.Clip(rng.uniform(0, 1, (20, NUM_MELS)).astype(np.float16), 20, f"c{shard}{i}")
            writer.write(bad if (shard, i) == (1, 4) else records.encode(clip))
        writer.close()
        paths.append(str(path))
    return paths


@pytest.mark.parametrize(
    ("bad", "reason"),
    [
        (b"\xc1 this is not msgpack", "does not decode (ValueError: expected a msgpack shard record"),
        (
            records.encode(records.Clip(np.zeros((20, NUM_MELS + 1), np.float16), 20, "wide")),
            f"has the wrong shape (expected n_mels {NUM_MELS} as record 0, found spec [20, {NUM_MELS + 1}])",
        ),
    ],
    ids=["garbage", "wrong_shape"],
)
@pytest.mark.parametrize(
    "worker_count",
    [0, pytest.param(1, marks=pytest.mark.slow)],  # 1: the error crosses a worker process
)
@pytest.mark.parametrize("kind", LOADERS)
def test_record_that_reads_but_does_not_decode_names_the_file_and_the_record(
    tmp_path, kind, worker_count, bad, reason
):
    paths = _shard_with_a_bad_record(tmp_path, bad)
    with pytest.raises(pipeline.ShardError) as error:
        _drain(LOADERS[kind](paths, target_frames=16, worker_count=worker_count))
    message = str(error.value)
    assert message.startswith(
        f"shard {paths[1]}: record 4 of that shard (record 10 of the 12 in 2 shards) {reason}"
    ), message
    assert f"bat-jax verify {tmp_path}" in message
