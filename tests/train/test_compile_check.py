"""`bat-jax compile-check` (issue 9 §1): the tiny pretraining config compiled for the smallest v5p slice (4
chips) on this CPU machine through libtpu's compile-only client, and for 2 nodes of 4 H100 through XLA:GPU's
(JAX's CUDA plugin, no GPU); the report's figures; a step that does not fit is refused with a sentence naming
the chip, the need, the excess and what to try; a topology neither knows is one line, exit 2."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bat_jax.train import compile_check as cc
from bat_jax.train import gpu_targets
from tests.train.small_config import write_small_config

REPO = Path(__file__).resolve().parents[2]
TINY = str(REPO / "configs" / "pretrain" / "tiny.py")


def _run(*args, config: str = TINY) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # no simulated CPU devices needed
    return subprocess.run(
        [sys.executable, "-m", "bat_jax.cli", "compile-check", "--config", config, *args],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip


@pytest.mark.slow
def test_tiny_config_compiles_for_four_v5p_chips(tmp_path):
    small = write_small_config(tmp_path)
    out = _run("--topology", "v5p:2x2x1", "--json", "--config.data.global_batch_size=8", config=small)
    assert out.returncode == 0, out.stderr[-3000:]
    row = json.loads(out.stdout.strip().splitlines()[-1])
    assert row["chips"] == 4 and row["device_kind"] == "TPU v5" and row["mesh"] == {"data": 4, "fsdp": 1}
    assert row["global_batch"] == 8 and row["clips_per_chip"] == 2 and row["views"] == 2
    assert row["hbm_bytes"] == 95 * 2**30 and row["fits"] is True
    # the state (params, teacher, Adam moments) is an argument of the step and aliased to its output
    assert 0 < row["alias_bytes"] <= row["argument_bytes"] and row["temp_bytes"] > 0
    assert row["total_bytes"] == (
        row["argument_bytes"]
        + row["output_bytes"]
        + row["temp_bytes"]
        + row["code_bytes"]
        - row["alias_bytes"]
    )
    # XLA's FLOPs of one chip: about a quarter of the model FLOPs of the global batch (backward = 2 forwards
    # in the model count; XLA counts what it compiled, remat and the teacher included)
    assert 0.1 < row["xla_flops_per_chip"] * 4 / row["model_flops"] < 3, row
    assert row["compile_s"] > 0


@pytest.mark.slow
def test_tiny_config_compiles_for_two_nodes_of_four_h100(tmp_path):
    small = write_small_config(tmp_path)
    out = _run("--topology", "h100:2x4", "--json", "--config.data.global_batch_size=16", config=small)
    assert out.returncode == 0, out.stderr[-3000:]
    # no libtpu warnings, nor the CUDA plugin's "no CUDA driver" lines (bat_jax.cli drops those)
    assert out.stderr == ""
    row = json.loads(out.stdout.strip())
    assert (
        row["topology"] == "h100:2x4" and row["chips"] == 8 and row["device_kind"] == "NVIDIA H100 80GB HBM3"
    )
    assert row["mesh"] == {"data": 8, "fsdp": 1} and row["clips_per_chip"] == 2
    assert row["hbm_bytes"] == gpu_targets.CARDS["h100"].memory_bytes and row["fits"] is True
    assert (
        row["limit_bytes"] == row["usable_bytes"] == int(0.75 * row["hbm_bytes"])
    )  # JAX's allocator's share
    assert 0 < row["alias_bytes"] <= row["argument_bytes"] and row["temp_bytes"] > 0
    assert row["xla_flops_per_chip"] is None  # XLA:GPU's compile-only executables have no cost analysis


@pytest.mark.parametrize(
    "topology, want",
    [("h100:8", ("NVIDIA H100 80GB HBM3", 1, 8)), ("A100:4x8", ("NVIDIA A100-SXM4-80GB", 4, 8)),
     ("h200:1x2", ("NVIDIA H200 141GB HBM3e", 1, 2))],
)  # fmt: skip
def test_gpu_topologies_are_cards_nodes_and_gpus_per_node(topology, want):
    card, nodes, per_node = gpu_targets.parse(topology)
    assert (card.name, nodes, per_node) == want
    text = card.target_config()
    assert (
        f"device_memory_size: {card.memory_bytes}\n" in text
        and f'device_description_str: "{card.name}"' in text
    )


@pytest.mark.parametrize("topology", ["h100:", "h100:0", "h100:2x0", "h100:x8", "h100:4x8x2", "h100:eight"])
def test_a_malformed_gpu_topology_is_one_sentence(topology):
    with pytest.raises(cc.CompileCheckError, match=r"expected a GPU topology like h100:8 .* found"):
        cc.topology_devices(topology)


def test_gpu_topology_without_the_cuda_plugin_says_what_to_install(monkeypatch):
    assert gpu_targets.cuda_plugin_installed()  # the test environment has it (make venv-test)
    monkeypatch.setattr(gpu_targets, "cuda_plugin_installed", lambda: False)
    with pytest.raises(
        cc.CompileCheckError, match=r"needs JAX's CUDA plugin .*pip install 'bat-jax\[gpu-compile\]'"
    ):
        cc.topology_devices("h100:8")


def _report(**kw) -> cc.Report:
    base = dict(
        topology="v5e:2x2", device_kind="TPU v5 lite", chips=4, mesh={"data": 4, "fsdp": 1}, global_batch=64,
        clips_per_chip=16, micro_batches=1, views=16, remat="none", argument_bytes=3 * 2**30,
        output_bytes=3 * 2**30, temp_bytes=15 * 2**30, alias_bytes=3 * 2**30, code_bytes=2**20,
        hbm_bytes=cc.hbm_bytes("TPU v5 lite"), xla_flops_per_chip=1e12, model_flops=4e12, compile_s=1.0,
    )  # fmt: skip
    base.update(kw)
    return cc.Report(**base)


def test_a_step_over_hbm_is_refused_naming_the_chip_the_excess_and_what_to_try():
    r = _report()
    assert r.total_bytes == 18 * 2**30 + 2**20 and r.fits is False
    with pytest.raises(cc.DoesNotFit) as e:
        cc.check_fits(r)
    msg = str(e.value)
    assert "18.00 GiB per TPU v5 lite chip, which has 16.00 GiB HBM (2.00 GiB over)" in msg
    assert "--config.mesh.shape.fsdp=2" in msg and "remat_policy=full" in msg
    assert "--config.train.micro_batches=2" in msg and "global_batch_size (now 64)" in msg
    cc.check_fits(_report(temp_bytes=2**30))  # fits: nothing raised
    assert _report(device_kind="TPU v9", hbm_bytes=None).fits is None


def test_unknown_topology_is_one_line_exit_2():
    out = _run("--topology", "v5p-2x2x1")
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [
        "bat-jax compile-check: error: --topology: expected a TPU topology like v5p:2x2x1 or v5e:4x4 "
        "(generation:chips per axis) or GPUs like h100:8 or h100:4x8 (nodes x GPUs per node), "
        "found 'v5p-2x2x1'"
    ]


def test_a_mesh_that_splits_the_slices_physical_axes_is_laid_out():
    """fsdp 8 on a 4x4x4 v5p slice: no mesh axis is a product of the physical axes (4, 4, 4); the mesh is
    laid out with a physical axis split between data and fsdp (jax.make_mesh alone raises)."""
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    from bat_jax.train import mesh as mesh_lib
    from bat_jax.train.config import load

    devices = cc.topology_devices("v5p:4x4x4")
    cfg = load(TINY)
    cfg.mesh.shape.fsdp = 8
    cfg.data.global_batch_size = 64
    mesh = mesh_lib.make_mesh(cfg, devices)
    assert dict(mesh.shape) == {"data": 8, "fsdp": 8}
    assert sorted(d.id for d in mesh.devices.flat) == sorted(d.id for d in devices)


def test_the_cuda_plugins_no_driver_lines_are_dropped_and_nothing_else():
    from bat_jax.cli import CUDA_PLUGIN_NOISE

    preamble = "WARNING: All log messages before absl::InitializeLog() is called are written to STDERR\n"
    stub = "I0000 00:00:1796329067.366570    6631 cudart_stub.cc:31] Could not find cuda drivers on your "
    stub += "machine, "
    stub += "GPU will not be used."
    said = preamble + stub + "\n" + preamble + stub + preamble + "W0000 a real XLA warning\nlibtpu says\n"
    assert CUDA_PLUGIN_NOISE.sub("", said) == "W0000 a real XLA warning\nlibtpu says\n"


def test_on_gpus_the_step_must_fit_the_share_jax_allocates(monkeypatch):
    """JAX takes XLA_PYTHON_CLIENT_MEM_FRACTION (0.75 by default) of a GPU's memory: a step between that and
    the whole memory does not fit, and the advice names the variable."""
    h100 = gpu_targets.CARDS["h100"].name
    monkeypatch.delenv("XLA_PYTHON_CLIENT_MEM_FRACTION", raising=False)
    assert cc.usable_bytes(h100) == int(0.75 * cc.hbm_bytes(h100)) and cc.usable_bytes("TPU v5") == 95 * 2**30
    r = _report(
        topology="h100:8", device_kind=h100, chips=8, mesh={"data": 8, "fsdp": 1}, temp_bytes=65 * 2**30,
        hbm_bytes=cc.hbm_bytes(h100), usable_bytes=cc.usable_bytes(h100),
    )  # fmt: skip
    assert r.total_bytes < r.hbm_bytes and r.fits is False
    with pytest.raises(cc.DoesNotFit) as e:
        cc.check_fits(r)
    assert "68.00 GiB per NVIDIA H100 80GB HBM3 chip, which has 59.33 GiB usable of 79.11 GiB HBM" in str(
        e.value
    )
    assert "XLA_PYTHON_CLIENT_MEM_FRACTION=0.95 in the job's environment" in str(e.value)
    assert "59.33 GiB usable (0.75 of 79.11 GiB HBM" in cc.format_report(r)
    monkeypatch.setenv("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.95")
    assert cc.usable_bytes(h100) == int(0.95 * cc.hbm_bytes(h100))
    monkeypatch.setenv("XLA_PYTHON_CLIENT_MEM_FRACTION", "1.5")
    with pytest.raises(cc.CompileCheckError, match=r"expected a number in \(0, 1\], found '1.5'"):
        cc.usable_bytes(h100)


def test_without_a_gpu_the_cuda_plugins_cannot_load_traceback_is_dropped_too():
    from bat_jax.cli import CUDA_PLUGIN_UNUSABLE

    said = (
        "Jax plugin configuration error: Exception when calling jax_plugins.xla_cuda12.initialize()\n"
        "Traceback (most recent call last):\n  File ...\n"
        "RuntimeError: jaxlib/cuda/versions_helpers.cc:38: ...\n\n"
        "The above exception was the direct cause of the following exception:\n\nTraceback ...\n"
        "RuntimeError: Unable to load CUDA. Is it installed?\nW0000 a real warning\n"
    )
    assert CUDA_PLUGIN_UNUSABLE.sub("", said) == "W0000 a real warning\n"
