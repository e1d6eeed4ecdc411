"""The pretraining loader's prefetch thread: same batches as without it, a checkpointed state that is the
consumed batch's (not the prefetched ones'), placement off the main thread, errors still raised by next()."""

import json
import threading
import time

import grain
import jax
import orbax.checkpoint as ocp
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from bat_jax.data import pipeline
from tests.data.test_pipeline import NUM_CLASSES, _assert_same_batches, _take, _write_clips

KWARGS = dict(global_batch_size=4, target_frames=16, seed=3, num_classes=NUM_CLASSES)


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    root = tmp_path_factory.mktemp("prefetch_shards")
    _write_clips(root, "train", 23, seed=1)
    return pipeline.shard_paths(root, "train")


def _wait_until_buffered(loader, count: int, timeout: float = 30.0) -> None:
    """Block until the prefetch thread holds `count` batches (so that it is ahead of the consumer)."""
    deadline = time.monotonic() + timeout
    while loader._iterator._buffer.qsize() < count:
        assert time.monotonic() < deadline, "the prefetch thread did not fill its buffer"
        time.sleep(0.01)


def test_prefetch_gives_the_same_batches_as_none(paths):
    with pipeline.make_pretrain_loader(paths, prefetch=0, **KWARGS) as plain:
        expected = _take(plain, 8)
    with pipeline.make_pretrain_loader(paths, prefetch=3, **KWARGS) as ahead:
        _assert_same_batches(_take(ahead, 8), expected)


@pytest.mark.parametrize("restore_prefetch", [0, 3])
def test_state_is_that_of_the_consumed_batch_while_the_thread_runs_ahead(paths, restore_prefetch):
    with pipeline.make_pretrain_loader(paths, prefetch=3, **KWARGS) as loader:
        _take(loader, 2)
        _wait_until_buffered(loader, 3)  # batches 3, 4, 5 fetched, not consumed
        state = loader.get_state()
        expected = _take(loader, 4)
    assert json.loads(state)
    with pipeline.make_pretrain_loader(paths, prefetch=restore_prefetch, **KWARGS) as restored:
        restored.set_state(state)
        _assert_same_batches(_take(restored, 4), expected)


def test_set_state_on_a_running_prefetch_drops_its_buffer(paths):
    with pipeline.make_pretrain_loader(paths, prefetch=2, **KWARGS) as loader:
        state = loader.get_state()  # before the first batch
        first = _take(loader, 3)
        _wait_until_buffered(loader, 2)
        loader.set_state(state)
        _assert_same_batches(_take(loader, 3), first)


def test_orbax_save_while_prefetching_restores_the_next_batch(paths, tmp_path):
    handlers = {"data": grain.checkpoint.CheckpointHandler()}
    loader = pipeline.make_pretrain_loader(paths, prefetch=2, **KWARGS)
    _take(loader, 3)
    _wait_until_buffered(loader, 2)
    with ocp.CheckpointManager(tmp_path / "ckpt", item_handlers=handlers) as manager:
        manager.save(3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(loader)))
        manager.wait_until_finished()
    expected = _take(loader, 2)
    loader.close()
    restored = pipeline.make_pretrain_loader(paths, prefetch=2, **KWARGS)
    with ocp.CheckpointManager(tmp_path / "ckpt", item_handlers=handlers) as manager:
        manager.restore(3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(restored)))
    _assert_same_batches(_take(restored, 2), expected)
    restored.close()


@pytest.mark.parametrize("prefetch", [0, 1])
def test_batches_are_placed_in_the_prefetch_thread(paths, prefetch, monkeypatch):
    threads = []
    place = pipeline.BatchPlacement.__call__

    def recorded(self, batch):
        threads.append(threading.current_thread())
        return place(self, batch)

    monkeypatch.setattr(pipeline.BatchPlacement, "__call__", recorded)
    mesh = jax.make_mesh((4, 2), ("data", "fsdp"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    sharding = NamedSharding(mesh, PartitionSpec(("data", "fsdp"), None, None))
    kwargs = KWARGS | {"global_batch_size": 8}
    with pipeline.make_pretrain_loader(paths, sharding=sharding, prefetch=prefetch, **kwargs) as loader:
        with jax.transfer_guard("disallow"):
            batches = _take(loader, 2)
    assert threads and all((t is threading.main_thread()) == (prefetch == 0) for t in threads)
    for batch in batches:
        assert isinstance(batch["spec"], jax.Array) and batch["spec"].sharding.spec[0] == ("data", "fsdp")
    monkeypatch.undo()
    with pipeline.make_pretrain_loader(paths, prefetch=0, **kwargs) as plain:
        _assert_same_batches(batches, _take(plain, 2))


@pytest.mark.parametrize("bad", [-1, 1.5, True, "2"])
def test_bad_prefetch_is_refused_with_a_sentence(paths, bad):
    with pytest.raises(ValueError, match="expected prefetch an integer >= 0"):
        pipeline.make_pretrain_loader(paths, prefetch=bad, **KWARGS)


def test_a_read_error_in_the_thread_is_raised_by_next(paths, monkeypatch):
    def broken(self, index):
        raise pipeline.ShardError(f"shard x: record {index} does not decode")

    monkeypatch.setattr(pipeline.ShardSource, "__getitem__", broken)
    with pytest.raises(pipeline.ShardError, match="does not decode"):
        pipeline.make_pretrain_loader(paths, prefetch=2, **KWARGS)  # record 0 is read at construction
    monkeypatch.undo()
    loader = pipeline.make_pretrain_loader(paths, prefetch=2, **KWARGS)
    monkeypatch.setattr(pipeline.ShardSource, "__getitem__", broken)
    with pytest.raises(pipeline.ShardError, match="does not decode"):
        next(loader)
    loader.close()
