"""benchmarks/pretrain.py: its helpers, and a smoke run of the job and the bare step (no timing asserted)."""

import math
import time

import pytest

from bat_jax.data import pipeline
from benchmarks import pretrain as bench
from tests.train.small_config import write_small_config


def test_parse_mesh():
    assert bench.parse_mesh("1") is None
    assert bench.parse_mesh("4x2") == (4, 2)
    assert bench.mesh_devices(bench.parse_mesh("4x2")) == 8
    with pytest.raises(SystemExit, match="expected 1 or DxF"):
        bench.parse_mesh("four")


def test_steps_must_exceed_the_first_log_window():
    with pytest.raises(SystemExit):
        bench.parse_args(["--steps", "5", "--log-every", "5"])


def test_child_env_sets_the_device_count_and_keeps_other_flags(monkeypatch):
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=8 --xla_cpu_foo=1")
    env = bench.child_env(1)
    flags = env["XLA_FLAGS"].split()
    assert "--xla_force_host_platform_device_count=1" in flags and "--xla_cpu_foo=1" in flags
    assert not any(f.endswith("=8") for f in flags)


def test_child_command_passes_the_options_on():
    args = bench.parse_args(["--steps", "7", "--log-every", "2", "--worker-count", "1", "--breakdown"])
    cmd = bench.child_command(args, 256, "4x2")
    assert cmd[cmd.index("--mesh") + 1] == "4x2" and cmd[cmd.index("--frames") + 1] == "256"
    assert cmd[cmd.index("--steps") + 1] == "7" and cmd[cmd.index("--worker-count") + 1] == "1"
    assert "--child" in cmd and "--breakdown" in cmd and "--data" not in cmd


def test_timed_next_times_every_call_and_puts_the_method_back():
    original = pipeline.PretrainLoader.__next__

    class Fake:
        pass

    calls = []

    def slow_next(self):
        time.sleep(0.01)
        calls.append(self)
        return {"spec": None}

    pipeline.PretrainLoader.__next__ = slow_next
    try:
        record = []
        with bench.timed_next(record):
            pipeline.PretrainLoader.__next__(Fake())
            pipeline.PretrainLoader.__next__(Fake())
        assert len(record) == 2 and all(t >= 0.01 for t in record)
        assert pipeline.PretrainLoader.__next__ is slow_next  # restored to what it was
    finally:
        pipeline.PretrainLoader.__next__ = original


@pytest.mark.slow
@pytest.mark.parametrize("mesh", [None, (4, 2)], ids=["1-device", "4x2"])
def test_smoke_run(mesh, tmp_path):
    """2 job steps (the first, excluded, then 1 steady) and 1 bare step on 64-frame clips; in-process (the
    suite's 8 simulated devices)."""
    small = write_small_config(tmp_path)
    args = bench.parse_args(
        ["--config", small, "--steps", "2", "--log-every", "1", "--rounds", "1", "--clips", "16",
         "--breakdown", "--breakdown-batches", "1"]
    )  # fmt: skip
    result = bench.run_one(args, 64, mesh)
    assert result["mesh"] == ("1" if mesh is None else "4x2") and result["frames"] == 64
    assert result["batch"] == 8 and result["steady_steps"] == 1 and len(result["rounds_detail"]) == 1
    for key in ("job_steps_per_s", "job_clips_per_s", "bare_steps_per_s", "job_over_bare"):
        assert math.isfinite(result[key]) and result[key] > 0, key
    assert math.isclose(result["job_clips_per_s"], 8 * result["job_steps_per_s"], rel_tol=1e-2)
    assert 0 <= result["in_next_fraction"] <= 1 and 0 <= result["wait_fraction_job_metric"] <= 1
    assert set(result["breakdown_ms"]) == {"read", "decode", "roll_crop_pad", "batch", "place"}
    devices = 1 if mesh is None else 8
    assert f"{devices} cpu devices" in result["first_line"]
