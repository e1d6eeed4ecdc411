"""Shared by the pretraining tests: a small prepared data folder, the tiny config's overrides, a straight run.

Fixtures: ``data_root`` (a synthetic `bat-jax prepare` folder at 64 frames per clip) and ``straight_run``
(STEPS updates of the tiny config in one run, checkpoints every 2). Both are per session: tests only read
them. Helpers are imported by the test modules (``from tests.train.conftest import ...``).
"""

from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from bat_jax import cli
from bat_jax.train import config as train_config
from bat_jax.train import pretrain
from bat_jax.train.cli import parse_config

REPO = Path(__file__).resolve().parents[2]
TINY = str(REPO / "configs" / "pretrain" / "tiny.py")
FRAMES = 64
STEPS = 4


def small_cfg(shape=(1, 1), *, batch: int, depth: int, fsdp: bool = True):
    """configs/pretrain/tiny.py cut down to compile fast: 64 frames, ``depth`` blocks, 1 decoder block,
    2 views, ``batch`` clips, the (data, fsdp) mesh ``shape``; ``fsdp=False`` replicates the parameters."""
    cfg = train_config.pretrain_config("tiny")
    cfg.frames = 64
    cfg.encoder.overrides.depth = depth
    cfg.ssl.decoder_depth = 1
    cfg.ssl.num_views = 2
    cfg.data.global_batch_size = batch
    cfg.mesh.shape.data, cfg.mesh.shape.fsdp = shape
    if not fsdp:
        cfg.mesh.rules = tuple((name, None if name == "embed" else axes) for name, axes in cfg.mesh.rules)
    return cfg


@pytest.fixture(scope="session")
def data_root(tmp_path_factory):
    """A synthetic prepared folder at 64 frames per clip (0.63 s)."""
    root = tmp_path_factory.mktemp("prepared") / "d64"
    rc = cli.main(
        ["prepare", "--source", "synthetic", "--out", str(root), "--num-clips", "24", "--num-eval-clips", "4",
         "--clip-seconds", "0.63", "--workers", "1", "--no-progress"]
    )  # fmt: skip
    assert rc == 0
    return root


def overrides(root, **train) -> list[str]:
    """The tests' command-line overrides of the tiny config (train.* fields from ``train``)."""
    base = {"steps": STEPS, "log_every": 2, "checkpoint_every": 2, "keep": 5, "keep_every": 0}
    base.update(train)
    return [f"--config.data.root={root}", f"--config.frames={FRAMES}", "--config.optim.warmup_steps=2"] + [
        f"--config.train.{k}={v}" for k, v in base.items()
    ]


def config(root, *extra, **train):
    return parse_config(TINY, overrides(root, **train) + list(extra))


def run(cfg, workdir) -> tuple[int, list[str]]:
    """`pretrain.run` in this process, without a progress bar: (exit status, the lines it said)."""
    lines = []
    return pretrain.run(cfg, workdir, progress=False, say=lines.append), lines


def saved_state(workdir: Path, step: int) -> dict:
    """The saved state item of a checkpoint, as numpy."""
    with ocp.PyTreeCheckpointer() as checkpointer:
        return checkpointer.restore((workdir / "checkpoints" / str(step) / "state").absolute())


def assert_trees_equal(a, b):
    """Same structure (more than 10 leaves) and bitwise equal leaves."""
    leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
    assert jax.tree.structure(a) == jax.tree.structure(b) and len(leaves_a) > 10
    for x, y in zip(leaves_a, leaves_b, strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.fixture(scope="session")
def straight_run(data_root, tmp_path_factory):
    """STEPS updates in one run (checkpoints every 2)."""
    workdir = tmp_path_factory.mktemp("straight") / "run"
    rc, lines = run(config(data_root), workdir)
    return workdir, rc, lines
