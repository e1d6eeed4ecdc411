"""Never lose work (issue 7 §4-5): SIGKILL and resume with data workers, a kill mid-save, failed saves,
restores across meshes (4x2 → 8x1 → 1 device), and train.init_from.

The kill tests run `bat-jax pretrain` as a subprocess in its own session (process group) and SIGKILL the
whole group, so the Grain worker processes die with it, as on a preempted machine.
"""

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

import bat_jax
from bat_jax import cli
from bat_jax.convert.checkpoint import save_encoder
from bat_jax.convert.load import load_weights
from bat_jax.models.config import tiny
from bat_jax.models.encoder import FrozenEncoder
from bat_jax.train import pretrain
from bat_jax.train import setup as setup_lib
from bat_jax.train.metrics import read_metrics
from tests.train.conftest import REPO, STEPS, TINY, assert_trees_equal, config, overrides, run, saved_state

GOLDEN_HF = REPO / "tests" / "golden" / "bat_encoder"  # a HF BAT folder (model.safetensors + config.json)
_TIMEOUT = 420  # seconds for one subprocess run on 2 busy cores

# `bat-jax pretrain` with Grain's checkpoint handler patched for the save of step AT: "hang" writes MARKER
# and sleeps inside the save (its <AT>.orbax-checkpoint-tmp* folder exists), "raise" fails it.
_DRIVER = """\
import sys, time
from pathlib import Path
import grain

mode, at, marker = sys.argv[1], sys.argv[2], Path(sys.argv[3])
original = grain.checkpoint.CheckpointHandler.save

def save(self, directory, item=None, args=None):
    if Path(str(directory)).parent.name.startswith(at + "."):
        if mode == "raise":
            raise OSError(28, "No space left on device (injected)")
        marker.write_text(str(directory))
        time.sleep(600)
    return original(self, directory, item=item, args=args)

grain.checkpoint.CheckpointHandler.save = save
from bat_jax import cli
sys.exit(cli.main(sys.argv[4:]))
"""


def _env(devices: int = 8) -> dict[str, str]:
    return {
        **os.environ,
        "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
        "JAX_PLATFORMS": "cpu",
        "PYTHONPATH": str(REPO),
    }


def _pretrain_args(workdir: Path, root: Path, *extra: str, **train) -> list[str]:
    return ["pretrain", "--config", TINY, "--workdir", str(workdir), *overrides(root, **train), *extra]


def _proc_table() -> dict[int, tuple[int, int, str]]:
    """pid → (parent pid, process group, state letter) of every process (Linux /proc)."""
    table = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()  # after "pid (comm) "
        table[int(entry.name)] = (int(fields[1]), int(fields[2]), fields[0])
    return table


def _descendants(pid: int) -> set[int]:
    table, found, frontier = _proc_table(), set(), {pid}
    while frontier:
        frontier = {p for p, (ppid, _, _) in table.items() if ppid in frontier} - found
        found |= frontier
    return found


def _cmdline(pid: int) -> str:
    try:
        return (Path("/proc") / str(pid) / "cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def _living(pids: set[int] | None = None, group: int | None = None) -> set[int]:
    """The pids (or members of process group ``group``) that still run (zombies count as gone)."""
    return {
        p
        for p, (_, pgrp, state) in _proc_table().items()
        if state != "Z" and ((pids is not None and p in pids) or (group is not None and pgrp == group))
    }


def _assert_all_gone(pids: set[int], group: int) -> None:
    deadline = time.time() + 20
    while time.time() < deadline and _living(pids, group):
        time.sleep(0.1)
    assert not _living(pids, group), f"orphan processes left: {_living(pids, group)}"


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=30)


def _complete_steps(workdir: Path) -> list[int]:
    folder = workdir / "checkpoints"
    return sorted(
        int(p.name) for p in folder.iterdir() if p.name.isdigit() and (p / "commit_success.txt").is_file()
    )


def _wait_until(condition, proc: subprocess.Popen, what: str, timeout: float = _TIMEOUT) -> None:
    deadline = time.time() + timeout
    while not condition():
        if proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"the run ended (rc {proc.returncode}) before {what}:\n{out[-3000:]}\n{err[-3000:]}")
        if time.time() > deadline:
            _kill_group(proc)
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.02)


# ---------------------------------------------------------------------------------------------------------
# 1. SIGKILL after a committed checkpoint, with data workers: bitwise the straight run


@pytest.fixture(scope="module")
def straight_with_workers(data_root, tmp_path_factory):
    """STEPS updates in one run with one Grain worker process."""
    workdir = tmp_path_factory.mktemp("straight_workers") / "run"
    rc, _ = run(config(data_root, "--config.data.worker_count=1"), workdir)
    assert rc == 0
    return workdir


@pytest.mark.slow
def test_sigkill_after_a_checkpoint_then_resume_is_bitwise_the_straight_run(
    straight_with_workers, data_root, tmp_path
):
    workdir = tmp_path / "killed"
    argv = [sys.executable, "-m", "bat_jax.cli"]
    argv += _pretrain_args(
        workdir, data_root, "--config.data.worker_count=1", "--no-progress", checkpoint_every=1
    )
    proc = subprocess.Popen(
        argv, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        _wait_until(
            lambda: (workdir / "checkpoints").is_dir() and _complete_steps(workdir), proc, "a checkpoint"
        )
        children = _descendants(proc.pid)
        workers = [p for p in children if "spawn_main" in _cmdline(p)]  # multiprocessing's spawned children
        assert proc.poll() is None
        os.killpg(proc.pid, signal.SIGKILL)  # the job and its Grain workers, at once
        proc.wait(timeout=30)
    finally:
        _kill_group(proc)
    assert proc.returncode == -signal.SIGKILL
    assert workers, f"expected a Grain worker process among the job's children {children}"
    _assert_all_gone(children, proc.pid)
    killed_at = _complete_steps(workdir)[-1]
    assert killed_at < STEPS, f"the run had finished ({killed_at} steps) before the kill"

    again = subprocess.Popen(
        argv, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        out, err = again.communicate(timeout=_TIMEOUT)
    finally:
        _kill_group(again)
    assert again.returncode == 0, err[-3000:]
    assert f"resuming from {workdir}/checkpoints/{killed_at} (step {killed_at})" in out, out[-3000:]
    assert f"done: {STEPS} steps" in out, out[-3000:]
    _assert_all_gone(set(), again.pid)  # a finished run leaves no worker behind either
    assert_trees_equal(saved_state(straight_with_workers, STEPS), saved_state(workdir, STEPS))
    student = bat_jax.load_encoder(workdir)
    assert_trees_equal(student.params, saved_state(straight_with_workers, STEPS)["params"]["encoder"])
    assert read_metrics(workdir)[-1]["loss"] == read_metrics(straight_with_workers)[-1]["loss"]


# ---------------------------------------------------------------------------------------------------------
# 2. A kill during an asynchronous save; failed saves


@pytest.mark.slow
def test_a_kill_mid_save_leaves_the_previous_checkpoint_the_latest_readable(data_root, tmp_path):
    workdir, marker = tmp_path / "midsave", tmp_path / "in_save"
    driver = tmp_path / "driver.py"
    driver.write_text(_DRIVER)
    args = _pretrain_args(workdir, data_root, "--no-progress", steps=6, checkpoint_every=2)
    proc = subprocess.Popen(
        [sys.executable, str(driver), "hang", "4", str(marker), *args],
        env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
    )  # fmt: skip
    try:
        _wait_until(marker.exists, proc, "the save of step 4 started")
        children = _descendants(proc.pid)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        _kill_group(proc)
    _assert_all_gone(children, proc.pid)
    names = sorted(p.name for p in (workdir / "checkpoints").iterdir())
    assert names[0] == "2" and len(names) == 2 and names[1].startswith("4.orbax-checkpoint-tmp"), names
    # The latest readable checkpoint is step 2's, for load_encoder and for the resume.
    assert_trees_equal(bat_jax.load_encoder(workdir).params, saved_state(workdir, 2)["params"]["encoder"])
    rc, lines = run(config(data_root, steps=6, checkpoint_every=2), workdir)
    assert rc == 0, lines
    assert f"resuming from {workdir}/checkpoints/2 (step 2)" in lines, lines
    assert lines[-1] == f"done: 6 steps; checkpoint {workdir}/checkpoints/6", lines
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == ["2", "4", "6"]


def _failing_grain_save(monkeypatch, step: int) -> None:
    """Grain's checkpoint handler raises for the save of ``step`` (inside Orbax's save of that step)."""
    original = grain.checkpoint.CheckpointHandler.save

    def save(self, directory, item=None, args=None):
        if Path(str(directory)).parent.name.startswith(f"{step}."):
            raise OSError(28, "No space left on device (injected)")
        return original(self, directory, item=item, args=args)

    monkeypatch.setattr(grain.checkpoint.CheckpointHandler, "save", save)


_SAVE_FAILED = "No space left on device (injected)"


@pytest.mark.slow
def test_a_failed_save_stops_the_run_naming_the_latest_complete_checkpoint_and_the_rerun_resumes_there(
    data_root, tmp_path, monkeypatch, capsys
):
    """The save of step 4 of 6 fails: the run stops there (nothing saved after it), the error names the
    cause and the latest complete checkpoint (step 2), and the next run resumes from step 2."""
    workdir = tmp_path / "failed"
    _failing_grain_save(monkeypatch, 4)
    argv = _pretrain_args(workdir, data_root, "--no-progress", steps=6, checkpoint_every=2)
    rc = cli.main(argv)
    captured = capsys.readouterr()
    message = captured.out + captured.err
    assert rc == 1
    assert f"OSError: [Errno 28] {_SAVE_FAILED}" in message, message
    latest = workdir.resolve() / "checkpoints" / "2"
    assert f"the latest complete checkpoint is {latest} (step 2)" in message, message
    assert [p.name for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()] == ["2"]
    monkeypatch.undo()
    rc, lines = run(config(data_root, steps=6, checkpoint_every=2), workdir)
    assert rc == 0 and f"resuming from {workdir}/checkpoints/2 (step 2)" in lines, lines
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == ["2", "4", "6"]


@pytest.mark.slow
def test_a_failed_save_is_a_message_on_stderr_and_exit_1(data_root, tmp_path, monkeypatch, capsys):
    workdir = tmp_path / "failed"
    _failing_grain_save(monkeypatch, 2)
    assert cli.main(_pretrain_args(workdir, data_root, "--no-progress", steps=4, checkpoint_every=2)) == 1
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if _SAVE_FAILED in line and "Traceback" not in err]
    assert lines and lines[0].startswith("bat-jax pretrain: "), err  # one message line, no traceback
    assert lines[0].endswith("the latest complete checkpoint is none"), err


# ---------------------------------------------------------------------------------------------------------
# 3. Restore across meshes: 4x2 → 8x1 → one device


@pytest.mark.slow
def test_restore_4x2_then_8x1_then_one_device_continues_the_straight_run(straight_run, data_root, tmp_path):
    """Four steps on the 4x2 (data x fsdp, FSDP) mesh, checkpoints every step; resumed from step 2 on the
    8x1 mesh, then from the 8x1 run's step 3 on one device (1x1 mesh, a subprocess that sees one CPU
    device). Every run's step-4 loss is the straight 8x1 run's to float tolerance."""
    workdir = tmp_path / "remesh"
    fsdp = ["--config.mesh.shape.data=4", "--config.mesh.shape.fsdp=2"]
    rc, lines = run(config(data_root, *fsdp, checkpoint_every=1), workdir)
    assert rc == 0 and "mesh {'data': 4, 'fsdp': 2}" in lines[0], lines
    for step in (3, 4):
        (workdir / "checkpoints" / str(step)).rename(tmp_path / f"4x2_{step}")  # kept out of the way
    rc, lines = run(config(data_root, checkpoint_every=1), workdir)
    assert rc == 0 and any("mesh {'data': 8, 'fsdp': 1}" in line for line in lines), lines
    assert f"resuming from {workdir}/checkpoints/2 (step 2)" in lines, lines
    # The checks of the former test_pretrain.py::test_resume_onto_another_mesh (the same two runs: 4x2, then
    # resumed from step 2 on 8x1): the last and first losses are the straight run's.
    assert any("(step 2)" in line for line in lines if line.startswith("resuming from")), lines
    straight_losses = [r["loss"] for r in read_metrics(straight_run[0])]
    resumed = [r["loss"] for r in read_metrics(workdir)]  # steps 2, 4 (4x2), then 4 again (8x1)
    np.testing.assert_allclose(resumed[-1], straight_losses[-1], rtol=1e-4)
    np.testing.assert_allclose(resumed[0], straight_losses[0], rtol=1e-4)
    (workdir / "checkpoints" / "4").rename(tmp_path / "8x1_4")
    argv = [sys.executable, "-m", "bat_jax.cli"]
    argv += _pretrain_args(workdir, data_root, "--no-progress", checkpoint_every=1)
    one = subprocess.run(argv, env=_env(devices=1), capture_output=True, text=True, timeout=_TIMEOUT)
    assert one.returncode == 0, one.stderr[-3000:]
    assert "mesh {'data': 1, 'fsdp': 1}, 1 cpu devices" in one.stdout, one.stdout
    assert f"resuming from {workdir}/checkpoints/3 (step 3)" in one.stdout, one.stdout
    rows = read_metrics(workdir)  # 4x2: steps 2, 4; 8x1: 4; one device: 4
    assert [r["step"] for r in rows] == [2, 4, 4, 4], rows
    straight = {r["step"]: r["loss"] for r in read_metrics(straight_run[0])}
    for row in rows:
        np.testing.assert_allclose(row["loss"], straight[row["step"]], rtol=1e-4)
    assert int(saved_state(workdir, 4)["step"]) == 4  # (parameters: Adam turns float noise in near-zero
    # gradients into lr-sized steps, so only the losses are compared)


# ---------------------------------------------------------------------------------------------------------
# 4. train.init_from


class _Captured(Exception):
    """Raised instead of compiling: the run's start state has been captured."""


def _start_state(cfg, workdir, monkeypatch) -> tuple[Any, list[str]]:
    """The state the run of ``cfg`` would start from (as numpy), captured at `Job.compile`, and its lines."""
    captured, lines = {}, []

    def capture(self, state, *args, **kwargs):
        captured["state"] = jax.device_get(state)
        raise _Captured

    monkeypatch.setattr(setup_lib.Job, "compile", capture)
    with pytest.raises(_Captured):
        pretrain.run(cfg, workdir, progress=False, say=lines.append)
    return captured["state"], lines


@pytest.fixture(scope="module")
def converted_golden(tmp_path_factory):
    """`bat-jax convert` of the HF folder: a bat-jax checkpoint folder."""
    out = tmp_path_factory.mktemp("converted") / "bat"
    assert cli.main(["convert", str(GOLDEN_HF), str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def fresh_start(data_root, tmp_path_factory):
    """The start state of a fresh run (no init_from), with the config's seed."""
    with pytest.MonkeyPatch.context() as monkeypatch:
        return _start_state(config(data_root), tmp_path_factory.mktemp("fresh") / "run", monkeypatch)[0]


@pytest.mark.slow
@pytest.mark.parametrize("source", ["workdir", "hf", "converted"])
def test_init_from_loads_student_and_teacher_encoders_decoder_and_optimizer_fresh(
    source, straight_run, converted_golden, fresh_start, data_root, tmp_path, monkeypatch
):
    """From a finished run's workdir, a HF BAT folder (model.safetensors) or a `bat-jax convert` folder: the
    start state's student and teacher encoders are the source's, the optimizer state a fresh run's, step 0;
    the decoder is the workdir's (its latest checkpoint's, bitwise), a fresh run's for the other sources."""
    path = {"workdir": straight_run[0], "hf": GOLDEN_HF, "converted": converted_golden}[source]
    fresh = fresh_start
    state, lines = _start_state(
        config(data_root, f"--config.train.init_from={path}"), tmp_path / "init", monkeypatch
    )
    expected = load_weights(path)[1]
    assert int(state.step) == 0
    assert_trees_equal(state.params["encoder"], expected)
    assert_trees_equal(state.teacher_params, expected)
    assert_trees_equal(state.opt_state, fresh.opt_state)
    assert _differing_fraction(state.params["encoder"], fresh.params["encoder"]) > 0.5  # not a fresh one
    said = [line for line in lines if line.startswith("init_from ")]
    assert len(said) == 1, lines
    if source == "workdir":  # the source's decoder, trained STEPS steps, is taken with its encoders
        source_state = saved_state(path, STEPS)
        assert_trees_equal(expected, source_state["params"]["encoder"])
        assert_trees_equal(state.params["decoder"], source_state["params"]["decoder"])
        assert _differing_fraction(state.params["decoder"], fresh.params["decoder"]) > 0.5
        assert f"student and teacher encoders and the decoder loaded from {path} step {STEPS}" in said[0]
    else:
        assert_trees_equal(state.params["decoder"], fresh.params["decoder"])  # a fresh init with the seed
        assert "student and teacher encoders loaded, decoder fresh" in said[0], said
    assert said[0].endswith("optimizer state fresh, step 0"), said


@pytest.mark.slow
def test_init_from_a_workdir_whose_decoder_does_not_fit_keeps_the_decoder_fresh_and_says_why(
    straight_run, fresh_start, data_root, tmp_path, monkeypatch
):
    """A workdir whose encoder fits the config but whose decoder does not (one kernel of another shape, one
    key missing): the encoders are loaded, the decoder stays fresh, and the line names both differences."""
    tree = saved_state(straight_run[0], STEPS)
    decoder = tree["params"]["decoder"]
    block = next(k for k in sorted(decoder) if k.startswith("blocks_"))
    kernel = decoder[block]["mlp"]["fc1"]["kernel"]
    wider = (kernel.shape[0], 2 * kernel.shape[1])
    decoder[block]["mlp"]["fc1"]["kernel"] = np.zeros(wider, kernel.dtype)
    missing = "out_proj"
    del decoder[missing]
    other = tmp_path / "other"
    other.mkdir()
    (other / "config.json").write_text((straight_run[0] / "config.json").read_text())
    with ocp.PyTreeCheckpointer() as checkpointer:
        checkpointer.save((other / "checkpoints" / "3" / "state").absolute(), tree)
    state, lines = _start_state(
        config(data_root, f"--config.train.init_from={other}"), tmp_path / "init", monkeypatch
    )
    assert_trees_equal(state.params["encoder"], tree["params"]["encoder"])
    assert_trees_equal(state.teacher_params, tree["params"]["encoder"])
    assert_trees_equal(state.params["decoder"], fresh_start.params["decoder"])
    (said,) = [line for line in lines if line.startswith("init_from ")]
    assert f"student and teacher encoders loaded from {other} step 3, decoder fresh: " in said, said
    assert f"{block}/mlp/fc1/kernel: config {kernel.shape} vs checkpoint {wider}" in said, said
    assert re.search(rf"{missing}/\S+: in the config, not in the checkpoint", said), said


def _differing_fraction(a, b) -> float:
    pairs = list(zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))
    return sum(not np.array_equal(x, y) for x, y in pairs) / len(pairs)


@pytest.mark.slow
def test_init_from_with_other_shapes_exits_2_naming_the_field_and_a_key(data_root, tmp_path, capsys):
    other = save_encoder(FrozenEncoder.random(tiny(dim=32)), tmp_path / "dim32")
    workdir = tmp_path / "w"
    argv = _pretrain_args(workdir, data_root, f"--config.train.init_from={other}", "--no-progress")
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("bat-jax pretrain: error: config train.init_from (bat_jax/train/setup.py)"), err
    assert "expected an encoder checkpoint whose shapes fit the config's encoder" in err, err
    assert "blocks_0/attn/proj/bias: config (64,) vs checkpoint (32,)" in err, err  # a key, both shapes
    assert "\\" not in err and "['" not in err, err  # no escaped quotes, no key brackets
    assert len(err.strip().splitlines()) == 1, err
    assert not (workdir / "checkpoints").exists() or not list((workdir / "checkpoints").iterdir())


@pytest.mark.slow
@pytest.mark.parametrize("source", ["missing", "not_a_checkpoint"])
def test_init_from_an_unreadable_source_exits_2_naming_the_field_the_path_and_the_cause(
    source, data_root, tmp_path, capsys
):
    """A path that does not exist, or a folder that is no checkpoint: one error line, exit 2, no traceback."""
    path = tmp_path / source
    if source == "not_a_checkpoint":
        path.mkdir()
        (path / "notes.txt").write_text("not weights")
    workdir = tmp_path / "w"
    argv = _pretrain_args(workdir, data_root, f"--config.train.init_from={path}", "--no-progress")
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("bat-jax pretrain: error: config train.init_from (bat_jax/train/setup.py)"), err
    assert f"expected a checkpoint that bat_jax.load_encoder reads, but {path} could not be read: " in err
    cause = "no such file or folder" if source == "missing" else "not a recognised encoder checkpoint"
    assert cause in err, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert not (workdir / "checkpoints").exists() or not list((workdir / "checkpoints").iterdir())
