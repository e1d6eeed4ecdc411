"""convert/workdir.py reads a pretraining workdir's decoder (train.init_from) as it reads its encoder: the
asked subtree of a checkpoint's state, alone, into numpy arrays.

The workdirs are written here with Orbax in the saved state's layout ({"step", "params": {"encoder",
"decoder"}, "teacher", "opt_state", "rng"}), no training run needed.
"""

import json

import numpy as np
import orbax.checkpoint as ocp
import pytest

from bat_jax.convert import workdir
from bat_jax.convert.errors import CheckpointError


def _tree(seed: int, with_decoder: bool = True) -> dict:
    rng = np.random.default_rng(seed)
    leaf = lambda *shape: rng.standard_normal(shape).astype(np.float32)  # noqa: E731
    params = {"encoder": {"norm": {"scale": leaf(8), "bias": leaf(8)}}}
    if with_decoder:
        params["decoder"] = {
            "blocks_0": {"mlp": {"kernel": leaf(8, 16), "bias": leaf(16)}},
            "pos": leaf(1, 8),
        }
    return {
        "step": np.int32(seed),
        "params": params,
        "teacher": {"norm": {"scale": leaf(8), "bias": leaf(8)}},
        "opt_state": {"mu": leaf(3)},
        "rng": np.zeros(2, np.uint32),
    }


def _workdir(path, trees: dict[int, dict]):
    path.mkdir(parents=True)
    (path / workdir.CONFIG_FILE).write_text(json.dumps({"encoder": {"preset": "tiny", "overrides": {}}}))
    with ocp.PyTreeCheckpointer() as checkpointer:
        for step, tree in trees.items():
            checkpointer.save((path / workdir.CHECKPOINTS / str(step) / "state").absolute(), tree)
    return path


def _equal(a, b):
    assert set(a) == set(b)
    for key in a:
        if isinstance(a[key], dict):
            _equal(a[key], b[key])
        else:
            assert isinstance(b[key], np.ndarray) and b[key].dtype == a[key].dtype
            np.testing.assert_array_equal(a[key], b[key])


def test_load_workdir_decoder_reads_the_latest_or_the_given_steps_decoder_bitwise(tmp_path):
    trees = {2: _tree(2), 4: _tree(4)}
    path = _workdir(tmp_path / "w", trees)
    step, decoder = workdir.load_workdir_decoder(path)
    assert step == 4
    _equal(trees[4]["params"]["decoder"], decoder)
    step, decoder = workdir.load_workdir_decoder(path, step=2)
    assert step == 2
    _equal(trees[2]["params"]["decoder"], decoder)
    _, encoder = workdir.load_workdir(path, step=2)  # the encoder of the same state, read the same way
    _equal(trees[2]["params"]["encoder"], encoder)
    _, teacher = workdir.load_workdir(path, teacher=True)
    _equal(trees[4]["teacher"], teacher)


def test_load_workdir_decoder_errors_name_the_folder_and_the_cause(tmp_path):
    path = _workdir(tmp_path / "w", {3: _tree(3, with_decoder=False)})
    with pytest.raises(
        CheckpointError, match=r"3/state: not a readable pretraining state with params\.decoder"
    ):
        workdir.load_workdir_decoder(path)
    _, encoder = workdir.load_workdir(path)  # the encoder alone is still readable
    assert set(encoder) == {"norm"}
    with pytest.raises(CheckpointError, match=r"expected a checkpoint of step 5, found steps \[3\]"):
        workdir.load_workdir_decoder(path, step=5)
    empty = tmp_path / "empty"
    (empty / workdir.CHECKPOINTS).mkdir(parents=True)
    (empty / workdir.CONFIG_FILE).write_text("{}")
    with pytest.raises(CheckpointError, match="expected at least one finished checkpoint, found none"):
        workdir.load_workdir_decoder(empty)
