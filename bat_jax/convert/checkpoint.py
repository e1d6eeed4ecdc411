"""The project's own encoder checkpoint: an Orbax params checkpoint plus a config.json.

Layout of a checkpoint folder OUT (written by `save_encoder` / `bat-jax convert`)::

    OUT/config.json   {"format": "bat-jax-encoder", "format_version": 1,
                       "config": {EncoderConfig fields}, "source": SRC}
    OUT/params/       Orbax (StandardCheckpointer) checkpoint of the parameter pytree
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jax
import numpy as np

from bat_jax.models.config import EncoderConfig
from bat_jax.models.encoder import Encoder, abstract_params, unbox

FORMAT = "bat-jax-encoder"
FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
PARAMS_DIR = "params"


def read_own_config(folder: Path) -> dict[str, Any] | None:
    """The parsed config.json of a bat-jax checkpoint folder, or None when `folder` is not one."""
    path = folder / CONFIG_FILE
    if not path.is_file():
        return None
    try:
        meta = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return meta if isinstance(meta, dict) and meta.get("format") == FORMAT else None


def save_encoder(
    encoder: Encoder, out: str | Path, *, source: str | None = None, overwrite: bool = False
) -> Path:
    """Write `encoder` to the folder `out` (see module docstring); returns the folder."""
    out = Path(out).absolute()
    params_dir = out / PARAMS_DIR
    if params_dir.exists() and not overwrite:
        raise FileExistsError(
            f"{params_dir} already exists: choose another folder, or overwrite it "
            "(bat-jax convert --overwrite, save_encoder(..., overwrite=True))"
        )
    out.mkdir(parents=True, exist_ok=True)
    import orbax.checkpoint as ocp  # imported lazily: keeps `import bat_jax` fast

    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(params_dir, jax.tree.map(np.asarray, encoder.params), force=overwrite)
    checkpointer.wait_until_finished()
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "config": encoder.config.to_dict(),
        "source": source,
    }
    (out / CONFIG_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    return out


def _flat_shapes(tree: Any) -> dict[str, tuple[int, ...]]:
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {"/".join(str(getattr(k, "key", k)) for k in path): tuple(leaf.shape) for path, leaf in flat}


def check_tree(found: Any, expected: Any, where: str) -> None:
    """Raise ValueError naming missing/unexpected parameter paths and shape mismatches."""
    got, want = _flat_shapes(found), _flat_shapes(expected)
    missing, unexpected = sorted(set(want) - set(got)), sorted(set(got) - set(want))
    if missing or unexpected:
        raise ValueError(
            f"{where}: the parameters do not match the config: missing {missing[:12]}, "
            f"unexpected {unexpected[:12]}"
        )
    for key, shape in want.items():
        if got[key] != shape:
            raise ValueError(f"{where}: parameter {key!r} has shape {list(got[key])}, expected {list(shape)}")


def load_own(folder: Path, meta: dict[str, Any]) -> tuple[EncoderConfig, Any]:
    """(config, params as numpy) from a bat-jax checkpoint folder, checked against the config."""
    where = str(folder)
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"{where}/{CONFIG_FILE}: format_version {meta.get('format_version')}, expected {FORMAT_VERSION}"
        )
    config = EncoderConfig.from_dict(meta["config"])
    params_dir = (folder / PARAMS_DIR).absolute()
    if not params_dir.is_dir():
        raise FileNotFoundError(f"{where}: expected the Orbax params checkpoint in {params_dir}")
    import orbax.checkpoint as ocp

    params = ocp.StandardCheckpointer().restore(params_dir)
    params = jax.tree.map(np.asarray, params)
    check_tree(params, unbox(abstract_params(config)), str(params_dir))
    return config, params
