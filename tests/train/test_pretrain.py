"""The pretraining job: workdir layout, resume, SIGTERM, NaN stop, config errors, load_encoder(WORKDIR)."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bat_jax
from bat_jax import cli
from bat_jax.convert.errors import CheckpointError
from bat_jax.train import setup as setup_lib
from bat_jax.train.metrics import read_metrics
from tests.train.conftest import FRAMES, STEPS, TINY
from tests.train.conftest import assert_trees_equal as _assert_trees_equal
from tests.train.conftest import config as _config
from tests.train.conftest import overrides as _overrides
from tests.train.conftest import run as _run
from tests.train.conftest import saved_state as _state


def test_run_writes_the_documented_workdir_layout(straight_run):
    workdir, rc, lines = straight_run
    assert rc == 0
    first = "bat-jax pretrain: mesh {'data': 8, 'fsdp': 1}, 8 cpu devices, 1 clips x 4 views per device"
    assert lines[0].startswith(first), lines
    assert "student parameters" in lines[0] and "compiled step memory" in lines[0]
    assert "model FLOPs per step" in lines[0] and "MFU against" in lines[0]
    config = json.loads((workdir / "config.json").read_text())
    assert config["train"]["steps"] == STEPS and config["frames"] == FRAMES
    steps = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
    assert steps == [2, 4]
    for step in steps:
        assert {p.name for p in (workdir / "checkpoints" / str(step)).iterdir()} >= {"state", "data"}
    rows = read_metrics(workdir)
    assert [r["step"] for r in rows] == [2, 4]
    keys = {"loss", "global_loss", "local_loss", "target_var", "pred_var", "lr", "ema_decay"}
    keys |= {"grad_norm", "mfu", "clips_per_s", "step_time_s", "data_wait_s"}
    for row in rows:
        assert keys <= set(row) and np.isfinite(row["loss"])
        assert row["grad_norm"] > 0 and 0 < row["mfu"] < 1
        assert row["loss"] == pytest.approx(row["global_loss"] + row["local_loss"], rel=1e-5)
    assert list((workdir / "tb").glob("events.out.tfevents.*"))
    state = _state(workdir, 4)
    assert set(state) == {"step", "params", "teacher", "opt_state", "rng"} and int(state["step"]) == 4


def test_resume_after_a_lost_checkpoint_is_bitwise_the_straight_run(straight_run, data_root, tmp_path):
    """k=2 steps, the checkpoint of step 4 lost (as after a kill), resumed to 4: bitwise the straight run. The
    interrupted run is a copy of the straight run's workdir (the same config: the same 4 steps, bit for bit)
    without its step-4 checkpoint."""
    straight, rc, _ = straight_run
    assert rc == 0
    workdir = tmp_path / "resumed"
    shutil.copytree(straight, workdir)
    shutil.rmtree(workdir / "checkpoints" / "4")
    rc, lines = _run(_config(data_root), workdir)
    assert rc == 0
    assert any(line.startswith("resuming from") and "(step 2)" in line for line in lines), lines
    _assert_trees_equal(_state(straight, 4), _state(workdir, 4))
    assert [r["step"] for r in read_metrics(workdir)] == [2, 4, 4]  # the copied rows, then the resumed run's
    assert read_metrics(workdir)[-1]["loss"] == read_metrics(straight)[-1]["loss"]


def test_finished_run_says_so_and_does_nothing(straight_run, data_root):
    workdir, _, _ = straight_run
    before = (workdir / "metrics.jsonl").read_text()
    rc, lines = _run(_config(data_root), workdir)
    assert rc == 0 and any("nothing to do" in line for line in lines), lines
    assert (workdir / "metrics.jsonl").read_text() == before


def test_load_encoder_of_a_workdir_is_the_latest_student_or_the_teacher(straight_run):
    workdir, _, _ = straight_run
    state = _state(workdir, 4)
    student = bat_jax.load_encoder(workdir)
    _assert_trees_equal(student.params, state["params"]["encoder"])
    teacher = bat_jax.load_encoder(workdir, step=2, teacher=True)
    _assert_trees_equal(teacher.params, _state(workdir, 2)["teacher"])
    spec = np.random.default_rng(0).uniform(size=(2, FRAMES, 128)).astype(np.float32)
    assert student(spec).cls.shape == (3, 2, 64)
    with pytest.raises(CheckpointError, match=r"expected a checkpoint of step 3, found steps \[2, 4\]"):
        bat_jax.load_encoder(workdir, step=3)


def test_step_and_teacher_are_refused_for_a_non_workdir(tmp_path):
    (tmp_path / "x.pt").write_bytes(b"")
    with pytest.raises(ValueError, match="select a checkpoint of a `bat-jax pretrain` workdir"):
        bat_jax.load_encoder(tmp_path / "x.pt", teacher=True)


def test_nan_loss_stops_naming_the_step_and_the_last_good_checkpoint(
    data_root, tmp_path, monkeypatch, capsys
):
    """The step's loss turns NaN from update 3 on: the run stops at the log of step 4, names step 3 and the
    checkpoint of step 2, and saves nothing after it."""
    compile_ = setup_lib.Job.compile
    poison = jax.jit(lambda loss, step: jnp.where(step >= 3, jnp.nan, loss))

    def poisoned_compile(self, state, rng, loader):
        step_fn, memory = compile_(self, state, rng, loader)

        def step(state, spec, key):
            state, metrics = step_fn(state, spec, key)
            return state, {**metrics, "loss": poison(metrics["loss"], state.step)}

        return step, memory

    monkeypatch.setattr(setup_lib.Job, "compile", poisoned_compile)
    workdir = tmp_path / "nan"
    rc, _ = _run(_config(data_root, steps=6, checkpoint_every=2, log_every=4), workdir)
    err = capsys.readouterr().err
    assert rc == 1
    expected = f"NaN or Inf at step 3; stopped; the last good checkpoint is {workdir}/checkpoints/2"
    assert expected in err, err
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == ["2"]
    assert int(_state(workdir, 2)["step"]) == 2


def _cli_error(argv, capsys) -> str:
    rc = cli.main(argv)
    err = capsys.readouterr().err
    assert rc == 2, err
    return err


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        (["--config.train.stepz=3"], "--config.train.stepz: no config field 'stepz' in"),
        (["--config.trainx.steps=3"], "--config.trainx.steps: no config field 'trainx'"),
        (["--config.train.steps=1.5"], "flag --config.train.steps=1.5: invalid literal for int()"),
        (["--config.frames=72"], "config frames (bat_jax/train/setup.py): expected a multiple of the"),
        (["--config.frames=128"], "prepared at (64, manifest.json clip.frames)"),
        (["--config.data.split=nope"], "config data.split (bat_jax/train/setup.py): expected one of"),
        (["--config.data.global_batch_size=12"], "config data.global_batch_size"),
        (["--config.train.checkpoint_every=0"], "config train.checkpoint_every (bat_jax/train/setup.py)"),
        (["--config.optim.warmup_steps=9"], "config optim.warmup_steps (bat_jax/train/setup.py)"),
        (["--data.root=x"], "--data.root=x: expected config overrides of the form --config.FIELD=VALUE"),
    ],
)
def test_config_errors_name_the_field_before_compiling(data_root, tmp_path, capsys, extra, expected):
    workdir = tmp_path / "w"
    argv = ["pretrain", "--config", TINY, "--workdir", str(workdir), *_overrides(data_root), *extra]
    err = _cli_error(argv, capsys)
    assert expected in err and err.startswith("bat-jax pretrain: error:"), err
    assert not (workdir / "checkpoints").exists()


def test_missing_data_root_is_named(tmp_path, capsys):
    argv = ["pretrain", "--config", TINY, "--workdir", str(tmp_path / "w"), *_overrides(tmp_path / "none")]
    assert "config data.root (bat_jax/train/setup.py): expected a folder written by `bat-jax prepare`" in (
        _cli_error(argv, capsys)
    )


def test_other_subcommands_still_refuse_unknown_arguments(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["verify", str(tmp_path), "--config.x=1"])
    assert e.value.code == 2 and "unrecognized arguments: --config.x=1" in capsys.readouterr().err


def test_help_teaches_the_contract_keys(capsys):
    with pytest.raises(SystemExit):
        cli.main(["pretrain", "--help"])
    out = capsys.readouterr().out
    for key in ("data.root", "data.split", "data.worker_count", "train.steps", "train.checkpoint_every"):
        assert f"--config.{key}=" in out
    assert "train.log_every" in out and "train.seed" in out and "metrics.jsonl" in out and "SIGTERM" in out


@pytest.mark.slow
def test_sigterm_saves_at_the_next_step_and_exits_cleanly(data_root, tmp_path):
    workdir = tmp_path / "term"
    argv = [sys.executable, "-m", "bat_jax.cli", "pretrain", "--config", TINY, "--workdir", str(workdir)]
    argv += _overrides(data_root, steps=100_000, log_every=1, checkpoint_every=100_000) + ["--no-progress"]
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"}
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while time.time() < deadline and not (
        (workdir / "metrics.jsonl").exists() and (workdir / "metrics.jsonl").read_text().count("\n") >= 2
    ):
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    saved = [int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()]
    assert len(saved) == 1 and saved[0] >= 2
    assert f"SIGTERM: saved step {saved[0]} to {workdir}/checkpoints/{saved[0]}; run the same command" in err
