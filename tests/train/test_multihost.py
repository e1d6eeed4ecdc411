"""Two JAX processes on the CPU (2 simulated devices each, gloo collectives, a local coordinator) running the
real `bat-jax pretrain` on a 2x2 (data x fsdp) mesh: they agree on every loss, only process 0 writes the
workdir's files, a resumed run equals the straight one, and SIGTERM to one process stops both after the same
step. Each process is tests/train/multihost_worker.py (the command line plus a record of its own losses). The
runs use the tiny config cut to 1 encoder block, 1 decoder block and 2 views (`small_config`): every launch
compiles (process 1 always: its persistent-cache keys differ from process 0's), and none of these properties
depends on the model's size."""

import functools
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from bat_jax import cli
from bat_jax.train import distributed
from bat_jax.train.metrics import read_metrics
from tests.train.small_config import write_small_config

REPO = Path(__file__).resolve().parents[2]
TINY = str(REPO / "configs" / "pretrain" / "tiny.py")
WORKER = str(Path(__file__).with_name("multihost_worker.py"))
PROCESSES = 2
TIMEOUT = 400  # seconds for one launch of both processes (2 busy cores)


@pytest.fixture(scope="module")
def small_config(tmp_path_factory) -> str:
    """A config file: the tiny config with 1 encoder block, 1 decoder block and 2 views."""
    return write_small_config(tmp_path_factory.mktemp("config"))


@pytest.fixture(scope="module")
def compile_cache(tmp_path_factory):
    """The JAX persistent compilation cache of every launch: the test session's (tests/conftest.py), else one
    for the module. jax writes it from process 0 only, and process 1's keys differ: a relaunch (the resume)
    skips process 0's compiles, process 1 compiles again."""
    session = os.environ.get("JAX_COMPILATION_CACHE_DIR")
    return Path(session) if session else tmp_path_factory.mktemp("jax_cache")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _argv(config: str, root, workdir, port: int, process: int, **train) -> list[str]:
    base = {"steps": 4, "log_every": 2, "checkpoint_every": 2, "keep": 5, "keep_every": 0, **train}
    return [
        sys.executable, WORKER, "pretrain", "--config", config, "--workdir", str(workdir), "--no-progress",
        "--coordinator-address", f"127.0.0.1:{port}", "--num-processes", str(PROCESSES),
        "--process-id", str(process),
        f"--config.data.root={root}", "--config.frames=64", "--config.optim.warmup_steps=2",
        "--config.mesh.shape.data=2", "--config.mesh.shape.fsdp=2",
        "--config.train.peak_flops_per_device=1e10",  # the MFU's peak given: no matmul measured at the start
        *[f"--config.train.{k}={v}" for k, v in base.items()],
    ]  # fmt: skip


def _start(config: str, root, workdir: Path, cache: Path, **train) -> list[subprocess.Popen]:
    """Both processes of one run; each records its logged losses under WORKDIR.losses/."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # not with jax_num_cpu_devices (PITFALLS)
    env.update(JAX_PLATFORMS="cpu", JAX_NUM_CPU_DEVICES="2", BAT_JAX_TEST_LOSSES=f"{workdir}.losses")
    env.update(JAX_COMPILATION_CACHE_DIR=str(cache), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
    port = _free_port()
    return [
        subprocess.Popen(
            _argv(config, root, workdir, port, i, **train),
            env=env,
            cwd=REPO,
            text=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )  # fmt: skip
        for i in range(PROCESSES)
    ]


def _finish(procs: list[subprocess.Popen]) -> list[tuple[int, str, str]]:
    """(exit status, stdout, stderr) of each process; both killed after TIMEOUT."""
    deadline = time.time() + TIMEOUT
    results = []
    try:
        for proc in procs:
            out, err = proc.communicate(timeout=max(deadline - time.time(), 1))
            results.append((proc.returncode, out, err))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return results


def _run(config: str, root, workdir: Path, cache: Path, **train) -> list[tuple[int, str, str]]:
    results = _finish(_start(config, root, workdir, cache, **train))
    for i, (rc, _, err) in enumerate(results):
        assert rc == 0, f"process {i} exited {rc}:\n{err[-3000:]}"
    return results


def _losses(workdir: Path, process: int) -> list[float]:
    path = Path(f"{workdir}.losses") / f"process_{process}.jsonl"
    return [json.loads(line)["loss"] for line in path.read_text().splitlines()]


def _ours(text: str) -> list[str]:
    """The job's own lines (without gloo's connection messages)."""
    return [line for line in text.splitlines() if line.startswith(("bat-jax", "resuming", "done", "nothing"))]


def _state(workdir: Path, step: int) -> dict:
    """The saved state item of a checkpoint as numpy (its shardings name the 2 processes' devices)."""
    path = (workdir / "checkpoints" / str(step) / "state").absolute()
    with ocp.PyTreeCheckpointer() as checkpointer:
        tree = checkpointer.metadata(path).item_metadata.tree
        as_numpy = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
        return checkpointer.restore(path, args=ocp.args.PyTreeRestore(restore_args=as_numpy))


def _assert_trees_equal(a, b):
    leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
    assert jax.tree.structure(a) == jax.tree.structure(b) and len(leaves_a) > 10
    for x, y in zip(leaves_a, leaves_b, strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.slow
def test_two_processes_agree_save_and_resume_as_the_straight_run(
    small_config, data_root, compile_cache, tmp_path
):
    """4 steps straight (checkpoints 2 and 4); then the checkpoint of step 4 lost and the same command again:
    it resumes from step 2 and ends bitwise where the straight run did."""
    workdir = tmp_path / "run"
    (_, out0, err0), (_, out1, err1) = _run(small_config, data_root, workdir, compile_cache)
    assert _ours(out0)[0].startswith("bat-jax pretrain: mesh {'data': 2, 'fsdp': 2}, 4 cpu devices"), out0
    assert _ours(out0)[-1] == f"done: 4 steps; checkpoint {workdir}/checkpoints/4", out0
    assert _ours(out1) == [] and _ours(err1) == [], (out1, err1)  # process 1 stays quiet
    rows = read_metrics(workdir)
    assert [r["step"] for r in rows] == [2, 4]
    straight = [r["loss"] for r in rows]
    assert _losses(workdir, 0) == _losses(workdir, 1) == straight and np.isfinite(straight).all()
    assert json.loads((workdir / "config.json").read_text())["mesh"]["shape"] == {"data": 2, "fsdp": 2}
    for step in (2, 4):
        data = {p.name for p in (workdir / "checkpoints" / str(step) / "data").iterdir()}
        assert {"process_0-of-2.json", "process_1-of-2.json"} <= data, data
    final = _state(workdir, 4)
    assert int(final["step"]) == 4

    shutil.rmtree(workdir / "checkpoints" / "4")
    shutil.rmtree(f"{workdir}.losses")
    (_, out0, _), (_, out1, _) = _run(small_config, data_root, workdir, compile_cache)
    assert f"resuming from {workdir}/checkpoints/2 (step 2)" in _ours(out0), out0
    assert _ours(out1) == [], out1
    assert _losses(workdir, 0) == _losses(workdir, 1) == straight[1:]
    assert [r["loss"] for r in read_metrics(workdir)] == straight + straight[1:]
    _assert_trees_equal(_state(workdir, 4), final)


def _terminate_one(procs: list[subprocess.Popen], which: int, rows: Path, after: int):
    """SIGTERM to process ``which`` once process 0 has logged more than ``after`` lines in ``rows``; the
    (exit status, stdout, stderr) of both."""
    deadline = time.time() + TIMEOUT
    while time.time() < deadline and not (rows.exists() and rows.read_text().count("\n") > after):
        assert all(p.poll() is None for p in procs), _finish(procs)
        time.sleep(0.2)
    procs[which].send_signal(signal.SIGTERM)
    results = _finish(procs)
    for i, (rc, _, err) in enumerate(results):
        assert rc == 0, f"process {i} exited {rc}:\n{err[-3000:]}"
    return results


def _saved(workdir: Path) -> list[int]:
    return sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())


@pytest.mark.slow
def test_sigterm_to_one_process_stops_both_after_the_same_step(
    small_config, data_root, compile_cache, tmp_path
):
    """SIGTERM to process 1 only: both take the stop after the same step, save it together and exit 0. The
    same command again resumes from it, and SIGTERM to process 0 alone stops both again."""
    workdir = tmp_path / "term"
    train = {"steps": 100_000, "log_every": 1, "checkpoint_every": 100_000}  # each step logs, no saves
    losses = Path(f"{workdir}.losses") / "process_0.jsonl"
    launch = functools.partial(_start, small_config, data_root, workdir, compile_cache, **train)
    results = _terminate_one(launch(), 1, losses, after=1)
    assert len(_saved(workdir)) == 1 and _saved(workdir)[0] >= 2, _saved(workdir)
    step = _saved(workdir)[0]
    expected = f"bat-jax pretrain: SIGTERM: saved step {step} to {workdir}/checkpoints/{step}; run the same"
    assert any(line.startswith(expected) for line in _ours(results[0][2])), results[0][2]
    assert _ours(results[1][1]) == [] and _ours(results[1][2]) == [], results[1]
    # Both processes ran exactly `step` steps (one log line each), with the same losses.
    assert _losses(workdir, 0) == _losses(workdir, 1) and len(_losses(workdir, 1)) == step
    assert int(_state(workdir, step)["step"]) == step

    results = _terminate_one(launch(), 0, losses, after=step + 1)
    assert f"resuming from {workdir}/checkpoints/{step} (step {step})" in _ours(results[0][1]), results[0]
    again = _saved(workdir)[-1]
    assert _saved(workdir) == [step, again] and again > step
    assert [r["step"] for r in read_metrics(workdir)] == list(range(1, again + 1))
    assert _losses(workdir, 0) == _losses(workdir, 1) and len(_losses(workdir, 1)) == again
    assert int(_state(workdir, again)["step"]) == again


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        (["--num-processes", "2"], "--num-processes: expected --coordinator-address HOST:PORT, "
         "--num-processes N and --process-id I together, found no --coordinator-address and no --process-id"),
        (["--coordinator-address", "h:1", "--process-id", "0"], "found no --num-processes"),
        (["--coordinator-address", "h:1", "--num-processes", "2", "--process-id", "2"],
         "--process-id: expected 0 <= I < --num-processes = 2, found 2"),
        (["--coordinator-address", "h:1", "--num-processes", "0", "--process-id", "0"],
         "--num-processes: expected an integer >= 1, found 0"),
        (["--coordinator-address", "localhost", "--num-processes", "2", "--process-id", "0"],
         "--coordinator-address: expected HOST:PORT (process 0's address), found 'localhost'"),
        (["--local-device-ids", "0,x"], "--local-device-ids: expected comma-separated device numbers"),
        (["--local-device-ids", "0"], "--local-device-ids: expected a multi-process run"),
        (["--single-process", "--process-id", "1"], "--single-process: expected no multi-process flags"),
        (["--num-processes", "two"], "--num-processes: invalid int value: 'two'"),
    ],
)  # fmt: skip
def test_bad_multi_process_flags_are_one_line_errors(flags, expected, tmp_path, capsys, monkeypatch):
    for name in ("JAX_COORDINATOR_ADDRESS", "SLURM_JOB_ID", "TPU_WORKER_HOSTNAMES", "OMPI_MCA_orte_hnp_uri"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(distributed, "_on_tpu_vm", lambda: False)
    argv = ["pretrain", "--config", TINY, "--workdir", str(tmp_path / "w"), *flags]
    try:
        rc = cli.main(argv)
    except SystemExit as e:  # argparse's own type errors
        rc = e.code
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("bat-jax pretrain: error: ") and err.count("\n") == 1, err
    assert expected in err, err
    assert not (tmp_path / "w").exists()


SLURM = {"SLURM_JOB_ID": "7", "SLURM_STEP_NODELIST": "n[1-2]", "SLURM_PROCID": "0", "SLURM_LOCALID": "0"}


@pytest.mark.parametrize(
    ("environ", "expected"),
    [
        ({}, None),
        ({"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234"}, "JAX_COORDINATOR_ADDRESS"),
        ({**SLURM, "SLURM_NTASKS": "4"}, "slurm"),
        ({**SLURM, "SLURM_NTASKS": "1"}, None),  # one task: a plain process
        ({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "4"}, None),  # an salloc shell, not an srun step
        ({"OMPI_MCA_orte_hnp_uri": "1.0;tcp://10.0.0.1:1", "OMPI_COMM_WORLD_SIZE": "2"}, "mpi"),
        ({"TPU_WORKER_HOSTNAMES": "w0,w1"}, "tpu"),
        ({"TPU_WORKER_HOSTNAMES": "w0"}, None),
    ],
)
def test_the_environment_decides_when_no_flag_is_given(environ, expected):
    assert distributed.detect_cluster(environ, tpu_vm=False) == expected


def test_a_tpu_vm_is_a_cluster_unless_jax_skips_the_metadata_query():
    assert distributed.detect_cluster({}, tpu_vm=True) == "tpu"
    assert distributed.detect_cluster({"TPU_SKIP_MDS_QUERY": "1"}, tpu_vm=True) is None


def test_one_process_stops_on_its_own_flag_at_once():
    mesh = jax.make_mesh((8, 1), ("data", "fsdp"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    stop = distributed.StopAgreement(mesh)
    assert [stop.poll(flag) for flag in (False, False, True)] == [False, False, True]


def test_help_documents_the_multi_process_flags(capsys):
    with pytest.raises(SystemExit):
        cli.main(["pretrain", "--help"])
    out = capsys.readouterr().out
    for flag in ("--coordinator-address", "--num-processes", "--process-id", "--local-device-ids", "SLURM"):
        assert flag in out


def test_initialize_passes_the_flags_or_lets_jax_detect_the_cluster_or_does_nothing(monkeypatch):
    calls = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda *a, **k: calls.append((a, k)))
    monkeypatch.setattr(jax.distributed, "is_initialized", lambda: False)
    monkeypatch.setattr(distributed, "_on_tpu_vm", lambda: False)
    for name in ("JAX_COORDINATOR_ADDRESS", "SLURM_JOB_ID", "TPU_WORKER_HOSTNAMES", "OMPI_MCA_orte_hnp_uri"):
        monkeypatch.delenv(name, raising=False)
    explicit = distributed.Options("10.0.0.1:1234", 2, 1, local_device_ids=(0, 1))
    assert distributed.initialize(explicit) == "flags"
    assert calls == [(("10.0.0.1:1234", 2, 1), {"local_device_ids": [0, 1]})]
    assert distributed.initialize(distributed.Options()) is None and len(calls) == 1  # a plain process
    for name, value in {**SLURM, "SLURM_NTASKS": "2"}.items():
        monkeypatch.setenv(name, value)
    assert distributed.initialize(distributed.Options(single_process=True)) is None and len(calls) == 1
    assert distributed.initialize(distributed.Options()) == "slurm"
    assert calls[-1] == ((), {"local_device_ids": None})  # jax reads the rest from SLURM


def test_a_runtime_that_does_not_start_is_a_one_line_error(monkeypatch, tmp_path, capsys):
    def fail(*args, **kwargs):
        raise ValueError("Number of processes must be defined.\nmore detail")

    monkeypatch.setattr(jax.distributed, "initialize", fail)
    monkeypatch.setattr(jax.distributed, "is_initialized", lambda: False)
    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "10.0.0.1:1234")
    assert cli.main(["pretrain", "--config", TINY, "--workdir", str(tmp_path / "w")]) == 2
    err = capsys.readouterr().err
    expected = (
        "bat-jax pretrain: error: jax.distributed.initialize (JAX_COORDINATOR_ADDRESS) failed: Number of "
        "processes must be defined. (pass --single-process to run as one process)\n"
    )
    assert err == expected, err
