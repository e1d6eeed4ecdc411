"""Helpers shared by the weight-import tests: parity against the reference outputs, folder builders."""

import json
import shutil

import numpy as np
from safetensors.numpy import save_file

TOL = 1e-4  # maximum relative error ‖out − ref‖ / ‖ref‖ per array for float32 weights (fixed by the issue)


def rel(a, b):
    return float(np.linalg.norm(np.asarray(a, np.float64) - b) / np.linalg.norm(b))


def parity_errors(enc, golden):
    """Worst relative error of (cls, patches) against the reference, per input ("short", "long")."""
    errors = {}
    for tag in ("short", "long"):  # long: 96 time patches = chunks of 64 + 32
        out = enc(golden[f"spec_{tag}"])
        patches = np.asarray(out.patches, np.float32).transpose(0, 1, 4, 2, 3)  # [L,B,T,F,D] → [L,B,D,T,F]
        assert out.cls.shape == golden[f"cls_{tag}"].shape and patches.shape == golden[f"patches_{tag}"].shape
        cls = np.asarray(out.cls, np.float32)
        errors[tag] = max(rel(cls, golden[f"cls_{tag}"]), rel(patches, golden[f"patches_{tag}"]))
    return errors


def check_parity(enc, golden, tol=TOL):
    errors = parity_errors(enc, golden)
    assert max(errors.values()) <= tol, errors


def hf_folder(tmp_path, state, config=None, src_config=None, name="hf"):
    """A HF-style folder with `state` and (a changed copy of) the fixture config.json."""
    folder = tmp_path / name
    folder.mkdir()
    save_file(state, str(folder / "model.safetensors"))
    cfg = json.loads(src_config.read_text())
    cfg.update(config or {})
    (folder / "config.json").write_text(json.dumps(cfg))
    return folder


def copy_with_config(src, folder, config_json):
    """`src` copied into `folder` (created) with the fixture config.json beside it; returns the copy."""
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(config_json, folder / "config.json")
    dst = folder / src.name
    shutil.copy(src, dst)
    return dst
