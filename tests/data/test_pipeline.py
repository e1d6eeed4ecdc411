"""Grain input pipelines: roll/crop/pad, checkpointable pretraining iterator, exact-once evaluation,
global arrays over a mesh, and a real two-process run."""

import json
import os
import pickle
import socket
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from array_record.python.array_record_module import ArrayRecordWriter
from jax.sharding import NamedSharding, PartitionSpec

from bat_jax.data import pipeline, records

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


def test_epoch_shuffle_sampler_reshuffles_each_epoch_and_keys_rngs_by_epoch_and_record():
    make = lambda: pipeline.EpochShuffleSampler(25, shard_index=1, shard_count=3, seed=4)
    sampler = make()
    # The DataLoader asks this shard for indices position * 3 + 1; a share is 25 // 3 = 8 records.
    meta = [sampler[position * 3 + 1] for position in range(24)]
    epochs = [[m.record_key for m in meta[8 * e : 8 * (e + 1)]] for e in range(3)]
    assert all(sorted(keys) == list(range(8, 16)) for keys in epochs)
    assert len({tuple(keys) for keys in epochs}) == 3, f"expected a new order every epoch, found {epochs}"
    draws = {(e, m.record_key): m.rng.integers(2**31) for e in range(3) for m in meta[8 * e : 8 * (e + 1)]}
    again = pickle.loads(pickle.dumps(make()))
    assert repr(again) == repr(sampler)
    for position in reversed(range(24)):  # any order, a fresh (unpickled) sampler: the same draws
        m = again[position * 3 + 1]
        assert m.rng.integers(2**31) == draws[(position // 8, m.record_key)]
    assert len(set(draws.values())) == len(draws)


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


def test_pretrain_roll_keeps_values_and_padding_at_the_end(dataset):
    _, paths, clips = dataset
    loader = pipeline.make_pretrain_loader(
        paths, global_batch_size=8, target_frames=MAX_FRAMES + 4, seed=5, num_classes=NUM_CLASSES
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
    target = 20  # shorter than some clips, longer than others
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
            paths, global_batch_size=4, target_frames=8, process_index=process_index, process_count=2
        )
        # 11 records per process (23 // 2, remainder dropped), 2 per batch: 11 batches span two epochs.
        indices = np.concatenate([b["clip_index"] for b in _take(loader, 11)])
        assert next(loader)["spec"].shape == (2, 8, NUM_MELS)
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
    kwargs = dict(global_batch_size=16, target_frames=24, seed=4, num_classes=NUM_CLASSES, dtype=dtype)
    batch = next(pipeline.make_pretrain_loader(paths, sharding=sharding, **kwargs))
    local = next(pipeline.make_pretrain_loader(paths, **kwargs))
    shapes = {
        "spec": (16, 24, NUM_MELS),
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
        pipeline.make_pretrain_loader(paths, global_batch_size=12, sharding=sharding)
    with pytest.raises(ValueError, match="global batch size 5 does not divide over 2 processes"):
        pipeline.make_pretrain_loader(paths, global_batch_size=5, process_index=0, process_count=2)
    with pytest.raises(ValueError, match="global batch size 10 does not divide over 3 processes"):
        pipeline.make_eval_loader(
            paths, global_batch_size=10, target_frames=8, process_index=0, process_count=3
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
            target_frames=24,
            process_index=process_index,
            process_count=process_count,
            num_classes=NUM_CLASSES,
        )
        batches = list(loader)
        assert len(batches) == len(loader)
        num_batches.add(len(batches))
        for batch in batches:
            assert batch["spec"].shape == (per_process_batch, 24, NUM_MELS)
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
                expected = np.zeros((24, NUM_MELS), np.float32)
                m = min(clip.num_frames, 24)
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
            paths, global_batch_size=18, target_frames=8, process_index=i, process_count=6
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
