"""notebooks/layer_gates.ipynb run headless with nbclient, on a kernel of this test's own interpreter.

The kernel: a kernelspec written under tmp_path (found first through JUPYTER_PATH) whose argv is
sys.executable -m ipykernel_launcher, so the notebook runs in this virtual environment whatever "python3"
kernel the machine has registered.
"""

import json
import sys
from pathlib import Path

import nbformat
import numpy as np
import pytest
from nbclient import NotebookClient

from tests.probe.test_report import CONFIG, late_gates, mid_gates, softmax, write_workdir

NOTEBOOK = Path(__file__).resolve().parents[2] / "notebooks" / "layer_gates.ipynb"
KERNEL = "bat-jax-test-venv"
CELL_TIMEOUT_S = 600


@pytest.fixture
def venv_kernel(tmp_path, monkeypatch) -> str:
    spec_dir = tmp_path / "jupyter" / "kernels" / KERNEL
    spec_dir.mkdir(parents=True)
    spec = {
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": f"bat-jax tests ({sys.executable})",
        "language": "python",
    }
    (spec_dir / "kernel.json").write_text(json.dumps(spec))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    monkeypatch.setenv("IPYTHONDIR", str(tmp_path / "ipython"))  # no profile of the user's
    return KERNEL


def execute(kernel: str) -> nbformat.NotebookNode:
    """The notebook executed in its own folder; a cell error raises nbclient's CellExecutionError."""
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = NotebookClient(
        nb, timeout=CELL_TIMEOUT_S, kernel_name=kernel, resources={"metadata": {"path": str(NOTEBOOK.parent)}}
    )
    client.execute()
    return nb


def outputs(nb: nbformat.NotebookNode) -> list[dict]:
    return [out for cell in nb.cells if cell.cell_type == "code" for out in cell.get("outputs", [])]


def text_of(nb: nbformat.NotebookNode) -> str:
    parts = []
    for out in outputs(nb):
        parts.append(out.get("text", ""))
        parts.append(out.get("data", {}).get("text/plain", ""))
        parts.append(out.get("data", {}).get("text/markdown", ""))
    return "\n".join(parts)


def images(nb: nbformat.NotebookNode) -> list[str]:
    return [out["data"]["image/png"] for out in outputs(nb) if "image/png" in out.get("data", {})]


def test_notebook_on_given_workdirs(tmp_path, monkeypatch, venv_kernel):
    folds = {"0": late_gates(12), "1": softmax(np.linspace(-1.0, 1.5, 12))}
    bat = write_workdir(
        tmp_path / "runs" / "bat_esc50",
        {"cgp": late_gates(12), "lcgp": folds},
        per_layer={"metric": "accuracy", "values": [0.3 + 0.04 * i for i in range(12)]},
        config=CONFIG,
    )
    eat = write_workdir(
        tmp_path / "runs" / "eat_esc50",
        {"cgp": mid_gates(12), "lcgp": mid_gates(12)},
        config={**CONFIG, "encoder": {"path": "/ckpt/eat_base"}},
    )
    monkeypatch.setenv("BAT_JAX_PROBE_WORKDIRS", f"{bat}, {eat}")
    nb = execute(venv_kernel)
    text = text_of(nb)
    assert "bat_esc50: encoder bat_base, task esc50, L = 12" in text, text
    assert "eat_esc50: encoder eat_base, task esc50, L = 12" in text, text
    assert "| run | encoder | task | probe |" in text, text
    # a gates figure per run, and one comparison per probe both runs have (cgp, lcgp)
    assert len(images(nb)) == 4, text


@pytest.mark.slow
def test_notebook_tiny_probe_run(tmp_path, monkeypatch, venv_kernel):
    """No workdir given: the notebook prepares synthetic data and trains a tiny probe with
    bat_jax.probe.run_probe and configs/probe/synthetic.py on a random tiny encoder."""
    monkeypatch.delenv("BAT_JAX_PROBE_WORKDIRS", raising=False)
    monkeypatch.delenv("BAT_JAX_PROBE_ENCODER", raising=False)
    monkeypatch.setenv("TMPDIR", str(tmp_path))  # the notebook's tempfile.mkdtemp folders land here
    nb = execute(venv_kernel)
    text = text_of(nb)
    assert "is not available" not in text, text
    assert images(nb), f"expected a gates figure of the tiny run, found none; the notebook printed:\n{text}"
    workdirs = list(tmp_path.glob("layer_gates_*/probe"))
    assert len(workdirs) == 1 and (workdirs[0] / "gates.json").is_file(), text
    assert "L = 3, gated probes ['cgp', 'lcgp']" in text, text  # the tiny encoder's 3 blocks
